"""What a deployment target runs compressed, and in how many bytes: `auto` with `Config.plan_for`.

`runtime(spec, cw, target)` is the weight bytes `cw` occupies while `target` runs the layer and how it
runs there, or a str saying why that target would not run it in a compressed form (then `auto` leaves
the candidate out). Both answers come from the methods' own codegen hooks (base.Method), never from a method name:

- "onnx": the form onnx_format "auto" (the default) writes for the layer (`layer_form`): MatMulNBits
  or GatherBlockQuantized (com.microsoft), else the blocked / per-axis DequantizeLinear of the
  standard form. onnxruntime keeps all three compressed: its constant folding skips
  DequantizeLinear, and the contrib ops read their packed data directly. A weight that would keep the
  decoder-function form is folded to dense float32 when a session is created, so it is left out.
  Run-time bytes are the form's initializers with every float tensor at 4 bytes an element: float16
  scales and zero points are Cast to float32 in the graph and onnxruntime folds those Casts at session
  creation, so they exceed the stored bytes by the scales' size (MatMulNBits rows padded to whole
  blocks count too). A per-axis DequantizeLinear feeding a MatMul (rtn 8/4-bit with a scale per row
  whose row length is no power of two) is rebuilt by onnxruntime as MatMulNBits with blocks of
  ORT_DQ_MATMUL_BLOCK inputs, the row scale repeated per block at float32: those are its bytes.
- "tvm": the weight has a fused dequantise-matmul kernel (`Method.tvm_fusable`), which build_tvm's
  mode "fused" runs it with, reading the stored arrays (the artifact's parameters are exactly those):
  run-time bytes = stored bytes. Mode "auto" fuses the same weights where the method's speed says so
  and decodes the others once at load.

A candidate that keeps the layer as it is (stored bytes reaching the float32 weight's: dense float32)
is the original weight on either target, at its float32 bytes. Dense float16 is not: onnxruntime folds
its Cast to float32 and the TVM artifact stores it as float32, so neither target runs it in its bytes.
"""
from __future__ import annotations

import numpy as np

from riem_compiler import methods
from riem_compiler.methods.base import NativeGather

PLAN_TARGETS = ("onnx", "tvm")  # Config.plan_for (None: plan over every candidate at its stored bytes)
# onnxruntime 1.32 turns a per-axis int8/int4 DequantizeLinear + MatMul into MatMulNBits with this block size
# (its session option session.qdq_matmulnbits_block_size, default 32): codes padded to whole blocks, one float32
# scale per block (measured: tests/test_plan_targets.py, MiniLM's 384-wide rows)
ORT_DQ_MATMUL_BLOCK = 32


def layer_form(spec, cw):
    """The native form onnx_format "auto" writes `cw` in for a layer like `spec`, predicted from the
    layer's kind and in_axis (no graph needed, so `auto` can plan before any export): ("ort",
    NativeMatMul | NativeGather) or ("standard", NativeDecoder), or a str saying why it would keep the
    decoder-function form. The same method hooks in the same order as codegen/onnx_rewrite.py's
    `_matmul_forms` and `_native_forms`: an embedding table tries GatherBlockQuantized, a 2-D
    Linear/MatMul weight MatMulNBits (used as (in, out) when in_axis is 0), then the standard
    DequantizeLinear. The graph can still differ (a Gemm with alpha != 1, a weight also read by
    another op); the exported report's "onnx_form" per layer says what was written."""
    method = methods.get(cw.method)
    table = spec.kind == "embedding"
    notes = []
    if table:
        got = method.onnx_gather(cw)
        if not isinstance(got, str):
            return "ort", got
        notes.append(f"no GatherBlockQuantized form ({got})")
    elif len(cw.shape) == 2 and spec.kind in ("linear", "matmul"):
        got = method.onnx_matmul(cw, spec.in_axis == 0)
        if not isinstance(got, str):
            return "ort", got
        notes.append(f"no MatMulNBits form ({got})")
    got = method.onnx_native(cw, "standard", table=table)
    if not isinstance(got, str):
        return "standard", got
    return "; ".join([*notes, got])


def runtime(spec, cw, target: str) -> tuple[int, str] | str:
    """(weight bytes of `cw` at run time on `target` (one of PLAN_TARGETS) for layer `spec`, how it runs
    there: "dense float32", "fused" or the ONNX op), or why that target does not run it compressed."""
    if target not in PLAN_TARGETS:
        from riem_compiler.errors import InputError

        raise InputError(f"plan target must be one of {PLAN_TARGETS}; got {target!r}")
    if cw.nbytes >= spec.fp32_bytes:  # auto keeps such a layer as it is
        return int(spec.fp32_bytes), "dense float32"
    if target == "tvm":
        why = methods.get(cw.method).tvm_fusable(cw)
        return (int(cw.nbytes), "fused") if why is None else f"no fused TVM kernel: {why}"
    got = layer_form(spec, cw)
    if isinstance(got, str):
        return f"no native ONNX form (onnxruntime would fold it to float32): {got}"
    kind, form = got
    if kind == "standard":
        rebuilt = _dq_matmul_bytes(spec, form)
        return (form_bytes(form) if rebuilt is None else rebuilt), "DequantizeLinear"
    return form_bytes(form), "GatherBlockQuantized" if isinstance(form, NativeGather) else "MatMulNBits"


def _dq_matmul_bytes(spec, form) -> int | None:
    """The bytes onnxruntime holds for a per-axis DequantizeLinear of a 2-D weight feeding a MatMul (it
    rebuilds it as MatMulNBits, blocks of ORT_DQ_MATMUL_BLOCK), or None for any other standard form."""
    if spec.kind not in ("linear", "matmul") or spec.weight.ndim != 2:
        return None
    dq = [attrs for op, _, attrs in form.nodes if op == "DequantizeLinear"]
    codes = np.asarray(form.tensors.get("codes", np.zeros(0)))
    bits = {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4}.get(codes.dtype.name)
    if len(dq) != 1 or "block_size" in dq[0] or bits is None:
        return None
    k, n = (spec.shape[1], spec.shape[0]) if spec.in_axis == 1 else spec.shape
    blocks = -(-int(k) // ORT_DQ_MATMUL_BLOCK)
    return int(n) * blocks * (ORT_DQ_MATMUL_BLOCK * bits // 8 + 4)


def form_bytes(form) -> int:
    """Run-time bytes of a NativeMatMul / NativeGather / NativeDecoder's tensors: float tensors at
    float32 (their Casts are folded at session creation), int4 two codes a byte, others as stored."""
    total = 0
    for arr in form.tensors.values():
        arr = np.asarray(arr)
        if arr.dtype.kind == "f":
            total += arr.size * 4
        elif arr.dtype.name in ("int4", "uint4"):
            total += (arr.size + 1) // 2
        else:
            total += arr.nbytes
    return int(total)
