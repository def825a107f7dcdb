"""rtn: round-to-nearest symmetric integer codes, a scale per output row (per channel) or per
group of `group_size` consecutive inputs; codes bit-packed (riem_compiler/bitpack.py) with an
offset of 2**(bits-1) (the ONNX DequantizeLinear zero point for unsigned codes).

Groups run along the layer's input axis (`LayerSpec.in_axis`), as the runtimes' fused low-bit
matmuls (onnxruntime MatMulNBits) need. For a weight stored (in, out), e.g. the right operand of
an ONNX MatMul, the quantised matrix is its transpose: meta "transposed" is True and the codes
and scales describe W.T, rows = outputs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from riem_compiler import bitpack
from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.methods.base import DecoderCall, Method, fp32_bytes, matrix, within_ratio
from riem_compiler.methods.rtn.layout import is_transposed, quantised_shape, weight_layout

BITS = (8, 4, 3, 2)
# (bits, group_size) from most to fewest bytes; `rtn_settings_for_ratio` takes the first that fits.
LADDER = ((8, None), (4, 128), (4, None), (3, 128), (3, None), (2, 128), (2, None))


@dataclass(frozen=True)
class RTNSettings:
    """group_size: the group of the ladder's grouped rungs (bits and grouping follow the ratio)."""

    group_size: int = 128

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise InputError(f"rtn group_size must be a positive integer; got {self.group_size!r}")


def _rtn_layout(shape, group_size: int | None, transposed: bool = False) -> tuple[int, int, int]:
    """(rows, cols, group) of the quantised matrix; per-channel means one group of all columns."""
    n, d = quantised_shape(shape, transposed)
    return n, d, (d if group_size is None else int(group_size))


def rtn_scale_dtype(group_size: int | None) -> str:
    """float32 for one scale per row (negligible bytes), float16 per group."""
    return "float32" if group_size is None else "float16"


def rtn_nbytes(shape, bits: int, group_size: int | None = 128, transposed: bool = False) -> int:
    n, d, g = _rtn_layout(shape, group_size, transposed)
    groups = math.ceil(d / g)
    return bitpack.packed_nbytes(n * d, bits) + n * groups * np.dtype(rtn_scale_dtype(group_size)).itemsize


def rtn_settings_for_ratio(ratio: float, shape=None, group_size: int = 128,
                          transposed: bool = False) -> tuple[int, int | None] | None:
    """Most precise (bits, group_size) from LADDER whose stored bytes fit ratio * fp32 bytes.

    With `shape` the exact bytes of that weight are used: 4-bit codes plus float16 group scales
    cost a little over 1/8 of fp32, and int8 per channel a little over 1/4, so ratio 0.25 gets
    4-bit groups and 0.125 gets 3-bit groups. Without it, the per-row scale of a very wide matrix
    is taken as free (so 0.25 gives int8 per channel), which can overshoot a real weight's budget.
    None when not even 2 bits per channel fits.
    """
    if not isinstance(ratio, (int, float, np.floating)):
        raise InputError(f"rtn_settings_for_ratio(ratio, shape=None, group_size=128): ratio must be a "
                         f"number, got {type(ratio).__name__}")
    for bits, group in LADDER:
        group = None if group is None else group_size
        if shape is not None:
            fits = rtn_nbytes(shape, bits, group, transposed) <= ratio * fp32_bytes(shape)
        else:
            per_weight = bits / 8 + (0.0 if group is None else np.dtype(rtn_scale_dtype(group)).itemsize / group)
            fits = per_weight <= 4 * ratio
        if fits:
            return bits, group
    return None


def fit_rtn(weight, bits: int = 8, group_size: int | None = None, in_axis: int = 1) -> CompressedWeight:
    """Round-to-nearest symmetric quantisation: codes in [-(2**(bits-1)-1), 2**(bits-1)-1],
    scale = max|w| / (2**(bits-1)-1) per output (group_size None) or per group of consecutive
    inputs (the last group may be shorter). in_axis 0 (a 2-D (in, out) weight) quantises W.T."""
    if bits not in BITS:
        raise InputError(f"rtn bits must be one of {BITS}, got {bits}")
    if group_size is not None and group_size < 1:
        raise InputError(f"group_size must be a positive integer or None, got {group_size}")
    shape, transposed = weight_layout(weight, in_axis, "rtn")
    M = np.ascontiguousarray(matrix(weight).T) if transposed else matrix(weight)
    n, d, g = _rtn_layout(shape, group_size, transposed)
    groups = math.ceil(d / g)
    qmax = (1 << (bits - 1)) - 1
    offset = 1 << (bits - 1)
    padded = np.zeros((n, groups * g), dtype=np.float32)
    padded[:, :d] = M
    absmax = np.abs(padded.reshape(n, groups, g)).max(axis=2)
    sdtype = rtn_scale_dtype(group_size)
    tiny = np.finfo(sdtype).smallest_subnormal
    scale = np.maximum(absmax / qmax, tiny).astype(sdtype)  # codes use the stored (rounded) scale
    scale_cols = np.repeat(scale.astype(np.float32), g, axis=1)[:, :d]
    codes = np.clip(np.rint(M / scale_cols), -qmax, qmax).astype(np.int64) + offset
    arrays = {"codes": bitpack.pack(codes, bits),
              "scale": scale.reshape(n) if group_size is None else scale}
    meta = {"bits": bits, "group_size": group_size, "offset": offset, "scale_dtype": sdtype}
    if transposed:
        meta["transposed"] = True
    return CompressedWeight("rtn", shape, meta, arrays)


def decode_rtn(cw: CompressedWeight, t: dict) -> torch.Tensor:
    """The quantised matrix, as the weight's (rows, cols) matrix view."""
    transposed = is_transposed(cw)
    n, d, g = _rtn_layout(cw.shape, cw.meta["group_size"], transposed)
    bits = cw.meta["bits"]
    codes = bitpack.unpack_torch(t["codes"], bits, n * d).reshape(n, d) - float(cw.meta["offset"])
    scale = t["scale"].to(torch.float32).reshape(n, -1)
    if cw.meta["group_size"] is not None:
        scale = scale.repeat_interleave(g, dim=1)[:, :d]
    W = codes * scale
    return W.T.contiguous() if transposed else W


class RTN(Method):
    name = "rtn"
    Settings = RTNSettings
    tvm_dense_reason = None

    def fit(self, spec, ratio, settings, index=0):
        shape = spec.shape
        setting = rtn_settings_for_ratio(ratio, shape, settings.group_size, spec.in_axis == 0)
        if setting is None:
            raise InputError(f"ratio {ratio} is too small for 2-bit RTN of shape {shape} "
                             f"({rtn_nbytes(shape, 2, None, spec.in_axis == 0)} bytes needed); raise the ratio")
        return within_ratio(spec, ratio, fit_rtn(spec.weight, *setting, in_axis=spec.in_axis))

    def candidates(self, spec, budget_ratio, options, attempt):
        group_size = options.get("group_size", 128)
        for bits, group in options.get("ladder", LADDER):
            group = None if group is None else group_size
            attempt(spec.name, f"rtn{bits}" + ("" if group is None else f"/g{group}"), fit_rtn, spec.weight, bits,
                    group, spec.in_axis)

    def decode_torch(self, cw, tensors):
        return decode_rtn(cw, tensors)

    def label(self, cw):
        m = cw.meta
        return f"rtn{m['bits']}" + ("" if m["group_size"] is None else f"/g{m['group_size']}")

    def trainable(self, cw, param_name=""):
        # only the float scales train; the packed codes stay fixed buffers
        from riem_compiler.methods.trainable import FloatArraysView

        return FloatArraysView(cw, param_name)

    def onnx_call(self, cw):
        transposed = is_transposed(cw)
        rows, cols = quantised_shape(cw.shape, transposed)
        attrs = {"rows": rows, "cols": cols, "bits": int(cw.meta["bits"]), "offset": float(cw.meta["offset"])}
        if not transposed:
            attrs["shape"] = [int(s) for s in cw.shape]
        suffix = "T" if transposed else ""  # the T decoders end with a Transpose of the (rows, cols) matrix
        if cw.meta.get("group_size") is None:
            return DecoderCall("RTNWeight" + suffix, ["codes", "scale"], attrs)
        return DecoderCall("RTNWeightGrouped" + suffix, ["codes", "scale"], {**attrs, "group": int(cw.meta["group_size"])})

    def onnx_native(self, cw, onnx_format, table=False):
        from riem_compiler.methods.rtn.native import native_rtn

        return native_rtn(cw, onnx_format, table)

    def onnx_matmul(self, cw, in_out):
        from riem_compiler.methods.rtn.native import matmulnbits_rtn

        return matmulnbits_rtn(cw, in_out)

    def onnx_gather(self, cw):
        from riem_compiler.methods.rtn.native import gather_rtn

        return gather_rtn(cw)

    def onnx_native_arrays(self, meta, shape, encoding, tensors):
        from riem_compiler.methods.rtn.native import rtn_arrays_from_native

        return rtn_arrays_from_native(meta, shape, encoding, tensors)

    def onnx_functions(self):
        from riem_compiler.methods.rtn import onnx as o

        return {name: (getattr(o, name), ("UnpackBits",))
                for name in ("RTNWeight", "RTNWeightGrouped", "RTNWeightT", "RTNWeightGroupedT")}

    def tvm_kernel(self):
        from riem_compiler.methods.rtn import tvm

        return tvm


METHOD = RTN()
