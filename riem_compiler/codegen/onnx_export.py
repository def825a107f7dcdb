"""ONNX out: RieM (and baseline) weights as model-local functions whose bodies are standard ops.

Design (decided here, documented for the lead):
- A compressed weight stays one tensor. Its initializer (or Constant node) is replaced by one call
  of a decoder function in the custom domain "riem_compiler" (e.g. `RieMWeight`) whose output has
  the weight's original name, dtype and shape. Every consumer (Gemm/MatMul/Conv, and any
  Identity/Cast/Transpose between) is left exactly as it was, so all patterns, shared weights and
  control-flow bodies are handled the same way; a runtime that wants a fused kernel pattern-matches
  decoder -> consumer.
- Compact arrays are initializers at their stored precision (uint8 packed codes, float32
  scale/offset, float16/float32 metric network); the model's metadata_props entry
  "riem_compiler.compressed" (JSON) maps each weight to its method, shape, meta and array
  initializer names, so `read_compressed_onnx` recovers every `CompressedWeight` from the file.
- Opset: function bodies use the model's own default-domain opset (so they are checked against
  the same operator versions); they need >= 13, so a model at opset 11/12 is upgraded to 13 with
  onnx.version_converter (the only change made to the rest of the graph). IR version >= 8.
- Decoders are small builders keyed by `CompressedWeight.method` (`CALL_BUILDERS`): "riem",
  "svd", "rtn", "tucker2", "dense". Adding a method = one onnxscript function + one builder.
- Decoder functions (inputs = the stored arrays of one CompressedWeight, shape info as attributes):
    RieMWeight(a_codes, a_scale, a_offset, b_codes, b_scale, b_offset, U, beta, v, c)
        <shape, rows, cols, bits>    bit-packed neuron states (state_bits < 32)
    RieMMatrix(a, b, U, beta, v, c) <shape>   float32 states; also the core of RieMWeight
    RieMStates(codes, scale, offset) <rows, bits>, UnpackBits(packed, count) <bits>,
    RieMBranch(a, bt, U, beta, v_row) <k, branches>   helpers
    SVDWeight / SVDWeightInt8, RTNWeight / RTNWeightGrouped, TuckerWeight   baselines
  RieMMatrix sums six RieMBranch calls (K = 6 unrolled; other K is refused at export). Each branch
  builds one (rows, m, cols) tensor: Sigmoid(A_k[:, :, None] + B_k^T[None, :, :]), then a batched
  (1, m) x (m, cols) MatMul with v; the roll of b is a Gather on U_k's columns (small). An
  earlier body concatenated the branches into (rows, cols, K*m) and used a MatMul with a 1-D v,
  which onnxruntime runs slowly: opening a compressed MiniLM took ~20 s (see
  benchmarks/results/onnx_size_latency.md). UnpackBits reads each code from three gathered bytes
  (int64 per code, no per-bit matrix).
- onnxruntime with default options folds each decoder into a constant at session creation
  (steady-state latency = the dense model's); `materialize_onnx` writes plain standard-op ONNX.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxscript import FLOAT, INT64, UINT8, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

# ----------------------------------------------------------------------------- decoder functions
# Bodies are written against opset 18 in onnxscript but use only ops whose signatures are the
# same from opset 13 on; function_protos() stamps the model's own opset on each.

DOMAIN = "riem_compiler"
DOMAIN_VERSION = 1
RIEM = Opset(DOMAIN, DOMAIN_VERSION)

_F = 1  # TensorProto.FLOAT
RIEM_BRANCHES = 6  # riem.K_BRANCHES; RieMMatrix sums this many RieMBranch calls


@script(RIEM)
def UnpackBits(packed: UINT8, count: INT64, bits: int) -> FLOAT:
    """`count` codes of `bits` (1..16) bits from a little-endian bit stream (riem.pack_codes).

    Code i starts at bit i*bits: it is read from the three bytes from byte (i*bits)//8 on, as
    (b0 + 256 b1 + 65536 b2) // 2^((i*bits) % 8) mod 2^bits. Every tensor is one int64 per code
    (no per-bit matrix; MatMul with a 1-D operand is slow in onnxruntime).
    """
    pow2 = op.Constant(value=np.array([1 << i for i in range(17)], dtype=np.int64))
    nbits = op.Constant(value_int=bits)
    eight = op.Constant(value_int=8)
    start = op.Range(op.Constant(value_int=0), op.Squeeze(count), op.Constant(value_int=1)) * nbits
    first = op.Div(start, eight)
    wide = op.Cast(op.Concat(packed, op.Constant(value=np.zeros(2, dtype=np.uint8)), axis=0), to=7)  # int64
    second = first + op.Constant(value_int=1)
    third = first + op.Constant(value_int=2)
    word = (op.Gather(wide, first) + op.Gather(wide, second) * op.Constant(value_int=256)
            + op.Gather(wide, third) * op.Constant(value_int=65536))
    code = op.Mod(op.Div(word, op.Gather(pow2, op.Mod(start, eight))), op.Gather(pow2, nbits))
    return op.Cast(code, to=_F)


@script(RIEM)
def RieMStates(codes: UINT8, scale: FLOAT, offset: FLOAT, rows: int, bits: int) -> FLOAT:
    """Per-dimension dequantisation of packed state codes: (rows, q) = codes * scale + offset."""
    q = op.Shape(scale)
    n = op.Reshape(op.Constant(value_int=rows), op.Constant(value_ints=[1]))
    values = UnpackBits(codes, op.Mul(n, q), bits=bits)
    return op.Reshape(values, op.Concat(n, q, axis=0)) * scale + offset


@script(RIEM)
def RieMBranch(a: FLOAT, bt: FLOAT, U: FLOAT, beta: FLOAT, v_row: FLOAT, k: int, branches: int) -> FLOAT:
    """Branch k as (rows, 1, cols): v^T sigmoid(A_k[:, :, None] + B_k^T[None, :, :]) per row.

    a (rows, q), bt (q, cols): states (b transposed); U (K, m, q), beta (K, m) float32; v_row (1, m).
    The roll of b is moved onto U_k (small): (S^s b) U_k^T = b U'_k^T with U'_k[:, e] = U_k[:, (e-s) mod q].
    Layout (rows, m, cols): the broadcast Add runs along cols, and the readout is a batched
    (1, m) x (m, cols) MatMul straight from the Sigmoid output, so the only large tensors are the
    Add and Sigmoid outputs, (rows, m, cols) each (these dominate onnxruntime's constant folding,
    which copies every folded tensor).
    """
    index = op.Constant(value_int=k)
    q = op.Gather(op.Shape(bt), op.Constant(value_int=0))
    shift = op.Div(index * q, op.Constant(value_int=branches))  # s_k = floor(k q / K)
    rolled = op.Mod(op.Range(op.Constant(value_int=0), q, op.Constant(value_int=1)) - shift + q, q)
    Uk = op.Gather(U, index, axis=0)  # (m, q)
    A = op.MatMul(a, op.Transpose(Uk, perm=[1, 0])) + op.Gather(beta, index, axis=0)  # (rows, m)
    B = op.MatMul(op.Gather(Uk, rolled, axis=1), bt)  # (m, cols)
    S = op.Sigmoid(op.Unsqueeze(A, op.Constant(value_ints=[2])) + op.Unsqueeze(B, op.Constant(value_ints=[0])))
    return op.MatMul(v_row, S)


@script(RIEM)
def RieMMatrix(a: FLOAT, b: FLOAT, U, beta, v, c, shape: list[int]) -> FLOAT:
    """W = c + sum_k sigmoid(a U_k^T + beta_k + (S^{s_k} b) U_k^T) @ v, reshaped to `shape`.

    The K = 6 branches (riem.K_BRANCHES) are six RieMBranch calls summed, so evaluation (and
    onnxruntime's constant folding) never holds more than one (rows, m, cols) tensor per branch.
    """
    Uf = op.Cast(U, to=_F)
    betaf = op.Cast(beta, to=_F)
    v_row = op.Unsqueeze(op.Cast(v, to=_F), op.Constant(value_ints=[0]))
    bt = op.Transpose(b, perm=[1, 0])
    W = op.Sum(RieMBranch(a, bt, Uf, betaf, v_row, k=0, branches=6),
               RieMBranch(a, bt, Uf, betaf, v_row, k=1, branches=6),
               RieMBranch(a, bt, Uf, betaf, v_row, k=2, branches=6),
               RieMBranch(a, bt, Uf, betaf, v_row, k=3, branches=6),
               RieMBranch(a, bt, Uf, betaf, v_row, k=4, branches=6),
               RieMBranch(a, bt, Uf, betaf, v_row, k=5, branches=6))
    return op.Reshape(W + op.Cast(c, to=_F), op.Constant(value_ints=shape))


@script(RIEM)
def RieMWeight(a_codes: UINT8, a_scale: FLOAT, a_offset: FLOAT, b_codes: UINT8, b_scale: FLOAT,
               b_offset: FLOAT, U, beta, v, c, shape: list[int], rows: int, cols: int, bits: int) -> FLOAT:
    """RieM weight from bit-packed neuron states and the metric network."""
    a = RieMStates(a_codes, a_scale, a_offset, rows=rows, bits=bits)
    b = RieMStates(b_codes, b_scale, b_offset, rows=cols, bits=bits)
    return RieMMatrix(a, b, U, beta, v, c, shape=shape)


@script(RIEM)
def SVDWeight(left, right, shape: list[int]) -> FLOAT:
    """left @ right (float16/float32 factors)."""
    return op.Reshape(op.MatMul(op.Cast(left, to=_F), op.Cast(right, to=_F)), op.Constant(value_ints=shape))


@script(RIEM)
def SVDWeightInt8(left_codes, left_scale: FLOAT, right_codes, right_scale: FLOAT, shape: list[int]) -> FLOAT:
    """Int8 factors with one float32 scale per row."""
    col = op.Constant(value_ints=[1])
    left = op.Cast(left_codes, to=_F) * op.Unsqueeze(left_scale, col)
    right = op.Cast(right_codes, to=_F) * op.Unsqueeze(right_scale, col)
    return op.Reshape(op.MatMul(left, right), op.Constant(value_ints=shape))


@script(RIEM)
def RTNWeight(codes: UINT8, scale, shape: list[int], rows: int, cols: int, bits: int, offset: float) -> FLOAT:
    """(codes - offset) * scale[row]."""
    n = op.Reshape(op.Constant(value_int=rows), op.Constant(value_ints=[1]))
    d = op.Reshape(op.Constant(value_int=cols), op.Constant(value_ints=[1]))
    values = UnpackBits(codes, op.Mul(n, d), bits=bits) - op.Constant(value_float=offset)
    matrix = op.Reshape(values, op.Concat(n, d, axis=0))
    W = matrix * op.Unsqueeze(op.Cast(scale, to=_F), op.Constant(value_ints=[1]))
    return op.Reshape(W, op.Constant(value_ints=shape))


@script(RIEM)
def RTNWeightGrouped(codes: UINT8, scale, shape: list[int], rows: int, cols: int, bits: int,
                     offset: float, group: int) -> FLOAT:
    """(codes - offset) * scale[row, col // group]; the last group may be shorter.

    The per-column scale comes from one Gather of scale's columns (no Expand/Reshape/Slice copies).
    """
    n = op.Reshape(op.Constant(value_int=rows), op.Constant(value_ints=[1]))
    d = op.Reshape(op.Constant(value_int=cols), op.Constant(value_ints=[1]))
    values = UnpackBits(codes, op.Mul(n, d), bits=bits) - op.Constant(value_float=offset)
    matrix = op.Reshape(values, op.Concat(n, d, axis=0))
    column_group = op.Div(op.Range(op.Constant(value_int=0), op.Constant(value_int=cols), op.Constant(value_int=1)),
                          op.Constant(value_int=group))
    s = op.Gather(op.Cast(scale, to=_F), column_group, axis=1)  # (rows, cols)
    return op.Reshape(matrix * s, op.Constant(value_ints=shape))


@script(RIEM)
def TuckerWeight(out_factor, core, in_factor, shape: list[int]) -> FLOAT:
    """W[o, i, k] = sum_rs out_factor[o, r] core[r, s, k] in_factor[i, s]."""
    out_f = op.Cast(out_factor, to=_F)
    in_f = op.Cast(in_factor, to=_F)
    core_f = op.Cast(core, to=_F)
    r_out = op.Gather(op.Shape(core_f), op.Constant(value_ints=[0]))
    r_in = op.Gather(op.Shape(core_f), op.Constant(value_ints=[1]))
    flat_core = op.Reshape(core_f, op.Concat(r_out, op.Constant(value_ints=[-1]), axis=0))
    mixed = op.Reshape(op.MatMul(out_f, flat_core),
                       op.Concat(op.Constant(value_ints=[0]), r_in, op.Constant(value_ints=[-1]), axis=0))
    by_tap = op.MatMul(op.Transpose(mixed, perm=[0, 2, 1]), op.Transpose(in_f, perm=[1, 0]))  # (out, k, in)
    return op.Reshape(op.Transpose(by_tap, perm=[0, 2, 1]), op.Constant(value_ints=shape))


# which functions each entry point calls (they must all be in model.functions)
DEPENDENCIES = {
    "UnpackBits": ("UnpackBits",),
    "RieMWeight": ("UnpackBits", "RieMStates", "RieMBranch", "RieMMatrix", "RieMWeight"),
    "RieMMatrix": ("RieMBranch", "RieMMatrix"),
    "SVDWeight": ("SVDWeight",),
    "SVDWeightInt8": ("SVDWeightInt8",),
    "RTNWeight": ("UnpackBits", "RTNWeight"),
    "RTNWeightGrouped": ("UnpackBits", "RTNWeightGrouped"),
    "TuckerWeight": ("TuckerWeight",),
}

FUNCTIONS = {f.name: f for f in (UnpackBits, RieMStates, RieMBranch, RieMMatrix, RieMWeight, SVDWeight, SVDWeightInt8,
                                 RTNWeight, RTNWeightGrouped, TuckerWeight)}


log = logging.getLogger("riem_compiler.onnx_export")

META_KEY = "riem_compiler.compressed"
MIN_FUNCTION_OPSET = 13
EXTERNAL_DATA_THRESHOLD = 1_500_000_000  # bytes of tensors above which the file gets external data


# ----------------------------------------------------------------------------- decoder builders

@dataclass
class DecoderCall:
    """One node that decodes a CompressedWeight: op type, array keys in input order, attributes."""

    op_type: str
    inputs: list[str]
    attrs: dict = field(default_factory=dict)
    domain: str = DOMAIN


def _riem_call(cw) -> DecoderCall:
    rows, cols = cw.matrix_shape
    shape = [int(s) for s in cw.shape]
    metric = ["U", "beta", "v", "c"]
    branches = int(cw.meta.get("k_branches", cw.arrays["U"].shape[0]))
    if branches != RIEM_BRANCHES or cw.arrays["U"].shape[0] != RIEM_BRANCHES:
        from riem_compiler.errors import InputError
        raise InputError(f"ONNX export of RieM weights needs {RIEM_BRANCHES} branches (the RieMMatrix body "
                         f"unrolls them); this weight has {branches}: refit it with k_branches={RIEM_BRANCHES}")
    if cw.meta["state_bits"] == 32:
        return DecoderCall("RieMMatrix", ["a", "b", *metric], {"shape": shape})
    states = ["a_codes", "a_scale", "a_offset", "b_codes", "b_scale", "b_offset"]
    return DecoderCall("RieMWeight", states + metric,
                       {"shape": shape, "rows": rows, "cols": cols, "bits": int(cw.meta["state_bits"])})


def _svd_call(cw) -> DecoderCall:
    shape = [int(s) for s in cw.shape]
    if cw.meta["factor_bits"] == 8:
        return DecoderCall("SVDWeightInt8", ["left_codes", "left_scale", "right_codes", "right_scale"],
                           {"shape": shape})
    return DecoderCall("SVDWeight", ["left", "right"], {"shape": shape})


def _rtn_call(cw) -> DecoderCall:
    rows, cols = cw.matrix_shape
    attrs = {"shape": [int(s) for s in cw.shape], "rows": rows, "cols": cols, "bits": int(cw.meta["bits"]),
             "offset": float(cw.meta["offset"])}
    if cw.meta.get("group_size") is None:
        return DecoderCall("RTNWeight", ["codes", "scale"], attrs)
    return DecoderCall("RTNWeightGrouped", ["codes", "scale"], {**attrs, "group": int(cw.meta["group_size"])})


def _tucker_call(cw) -> DecoderCall:
    return DecoderCall("TuckerWeight", ["out_factor", "core", "in_factor"], {"shape": [int(s) for s in cw.shape]})


def _dense_call(cw) -> DecoderCall:
    return DecoderCall("Cast", ["weight"], {"to": onnx.TensorProto.FLOAT}, domain="")


CALL_BUILDERS = {"riem": _riem_call, "svd": _svd_call, "rtn": _rtn_call, "tucker2": _tucker_call,
                 "dense": _dense_call}


def function_protos(op_types, opset: int) -> list[onnx.FunctionProto]:
    """FunctionProtos for these decoder entry points (and what they call), at the model's opset."""
    names = []
    for op_type in op_types:
        for dep in DEPENDENCIES.get(op_type, ()):
            if dep not in names:
                names.append(dep)
    out = []
    for name in names:
        proto = FUNCTIONS[name].to_function_proto()
        del proto.opset_import[:]
        proto.opset_import.extend([helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
        out.append(proto)
    return out


# ----------------------------------------------------------------------------- rewrite

def rewrite_onnx(model: onnx.ModelProto, specs, compressed: dict) -> onnx.ModelProto:
    """A copy of `model` where each weight in `compressed` is produced by its decoder function.

    specs: the LayerSpecs the frontend found (only those names are rewritten), or None to
    rewrite every name in `compressed` (weights are located by initializer/Constant name).
    """
    from riem_compiler.errors import InputError
    from riem_compiler.frontend.onnx_frontend import default_opset, definition_counts

    wanted = dict(compressed) if specs is None else {s.name: compressed[s.name] for s in specs
                                                       if s.name in compressed}
    for name, cw in wanted.items():
        if cw.method not in CALL_BUILDERS:
            raise InputError(f"no ONNX decoder for method {cw.method!r} (weight {name!r}); "
                             f"known: {sorted(CALL_BUILDERS)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not wanted:
        return out
    definitions = definition_counts(out.graph)
    shadowed = sorted(n for n in wanted if definitions.get(n, 0) > 1)
    if shadowed:  # the decoder output keeps the weight's name, which must then be unique in every scope
        raise InputError(f"weights {shadowed[:5]} are defined more than once in the model (a subgraph shadows "
                         "the name); they cannot be replaced")
    opset = default_opset(out) or 0
    if opset < MIN_FUNCTION_OPSET:
        out = _upgrade_opset(out, opset)
        opset = MIN_FUNCTION_OPSET
    state = _RewriteState(wanted, _all_names(out))
    _rewrite_graph(out.graph, state, {i.name for i in out.graph.input})
    missing = sorted(set(wanted) - set(state.entries))
    if missing:
        raise InputError(f"weights {missing[:5]} are not initializers or Constant outputs of this model")
    out.ir_version = max(out.ir_version, 8)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    present = {(f.domain, f.name) for f in out.functions}
    for proto in function_protos(sorted(state.op_types), opset):
        if (proto.domain, proto.name) not in present:
            out.functions.append(proto)
    _write_meta(out, {**_read_meta(out), **state.entries})
    log.info("ONNX: %d weights replaced by decoder functions", len(state.entries))
    check_rewritten(model, out)
    return out


def check_rewritten(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    """Raise RiemError when the rewritten model is one that neither onnx.checker nor onnxruntime
    would accept while the original is: a written model that does not load is never a result.

    onnx.checker runs with full_check (shape inference) where the original passes it; the
    onnxruntime session is created with graph optimisations off, so the decoders are not folded
    (graph resolution alone finds broken SSA, unknown names and type errors)."""
    from riem_compiler.errors import RiemError

    if rewritten.ByteSize() >= onnx.checker.MAXIMUM_PROTOBUF or original.ByteSize() >= onnx.checker.MAXIMUM_PROTOBUF:
        log.info("model over 2 GiB: rewritten model not checked in memory")
        return
    for full in (True, False):
        problem = _checker_problem(rewritten, full)
        if problem is None:
            break
        if _checker_problem(original, full) is None:
            raise RiemError(f"internal error: the rewritten ONNX model fails onnx.checker (full_check={full}) "
                            f"while the original passes: {problem}")
    try:
        import onnxruntime as ort
    except ImportError:
        return
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        ort.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        try:
            ort.InferenceSession(original.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:
            log.info("onnxruntime cannot load the original model either: rewritten model not checked with it")
            return
        raise RiemError("internal error: onnxruntime cannot load the rewritten ONNX model while it loads the "
                        f"original: {_one_line(e)}") from None


def _checker_problem(model: onnx.ModelProto, full: bool) -> str | None:
    try:
        onnx.checker.check_model(model, full_check=full)
    except Exception as e:  # ValidationError, InferenceError
        return _one_line(e)
    return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from riem_compiler.errors import RiemError
    from onnx import version_converter

    log.info("upgrading model from opset %d to %d for the decoder functions", opset, MIN_FUNCTION_OPSET)
    try:
        return version_converter.convert_version(model, MIN_FUNCTION_OPSET)
    except Exception as e:
        raise RiemError(f"the decoder functions need opset >= {MIN_FUNCTION_OPSET} and onnx could not upgrade "
                        f"this opset-{opset} model ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "re-export the model at opset 13 or newer") from None


@dataclass
class _RewriteState:
    wanted: dict
    taken: set
    entries: dict = field(default_factory=dict)
    op_types: set = field(default_factory=set)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def _all_names(model: onnx.ModelProto) -> set:
    from riem_compiler.frontend.onnx_frontend import iter_graphs

    names = set()
    for _, g in iter_graphs(model.graph):
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in (*g.input, *g.output, *g.value_info))
        for n in g.node:
            names.update(n.output)
            names.add(n.name)
    return names


def _subgraphs(node: onnx.NodeProto):
    from riem_compiler.frontend.onnx_frontend import subgraphs

    for _, g in subgraphs(node):
        yield g


def _rewrite_graph(graph: onnx.GraphProto, state: _RewriteState, graph_inputs: set) -> None:
    """Bottom-up: subgraphs first (edited in place), then this graph's node list is rebuilt."""
    for node in graph.node:
        for sub in _subgraphs(node):
            _rewrite_graph(sub, state, {i.name for i in sub.input})
    front, new_inits, drop = [], [], []
    for i, t in enumerate(graph.initializer):
        if t.name in state.wanted and t.name not in state.entries:
            if t.name in graph_inputs:
                from riem_compiler.errors import InputError
                raise InputError(f"weight {t.name!r} is also a graph input; it cannot be replaced")
            nodes, inits = _decoder(t.name, t, state)
            front += nodes
            new_inits += inits
            drop.append(i)
    body, changed = [], bool(front)
    for node in graph.node:
        out = node.output[0] if len(node.output) == 1 else None
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and out in state.wanted
                and out not in state.entries):
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                nodes, inits = _decoder(out, value, state)
                body += nodes
                new_inits += inits
                changed = True
                continue
        body.append(node)
    for i in reversed(drop):
        del graph.initializer[i]
    graph.initializer.extend(new_inits)
    if changed:
        rebuilt = []
        for n in front + body:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            rebuilt.append(copy)
        del graph.node[:]
        graph.node.extend(rebuilt)


def _decoder(name: str, tensor: onnx.TensorProto, state: _RewriteState):
    """(nodes, initializers) producing tensor `name` from its CompressedWeight."""
    from riem_compiler.errors import InputError

    cw = state.wanted[name]
    if tuple(tensor.dims) != tuple(cw.shape):
        raise InputError(f"weight {name!r} has shape {tuple(tensor.dims)} in the model but the compressed "
                         f"weight has shape {tuple(cw.shape)}")
    call = CALL_BUILDERS[cw.method](cw)
    arrays = {}
    inits = []
    for key in call.inputs:
        init_name = state.fresh(f"{name}.{cw.method}.{key}")
        inits.append(numpy_helper.from_array(np.ascontiguousarray(cw.arrays[key]), init_name))
        arrays[key] = init_name
    dtype = int(tensor.data_type)
    decoded = name if dtype == onnx.TensorProto.FLOAT else state.fresh(f"{name}.decoded")
    nodes = [helper.make_node(call.op_type, [arrays[k] for k in call.inputs], [decoded],
                              name=state.fresh(f"{name}.decode"), domain=call.domain, **call.attrs)]
    if decoded != name:
        nodes.append(helper.make_node("Cast", [decoded], [name], name=state.fresh(f"{name}.cast"), to=dtype))
    if call.domain == DOMAIN:
        state.op_types.add(call.op_type)
    state.entries[name] = {"method": cw.method, "shape": [int(s) for s in cw.shape], "meta": cw.meta,
                           "dtype": dtype, "arrays": arrays, "nodes": [n.output[0] for n in nodes]}
    return nodes, inits


def _read_meta(model: onnx.ModelProto) -> dict:
    for p in model.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    return {}


def _write_meta(model: onnx.ModelProto, entries: dict) -> None:
    for i in reversed(range(len(model.metadata_props))):
        if model.metadata_props[i].key == META_KEY:
            del model.metadata_props[i]
    if entries:
        model.metadata_props.append(onnx.StringStringEntryProto(key=META_KEY, value=json.dumps(entries, sort_keys=True)))


# ----------------------------------------------------------------------------- round trip

def read_compressed_onnx(model) -> dict:
    """Weight name -> CompressedWeight stored in a rewritten ONNX model (ModelProto or path)."""
    from riem_compiler.compressed import CompressedWeight
    from riem_compiler.errors import InputError
    from riem_compiler.frontend.onnx_frontend import iter_graphs, load_onnx

    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model)
    entries = _read_meta(model)
    tensors = {t.name: t for _, g in iter_graphs(model.graph) for t in g.initializer}
    out = {}
    for name, e in entries.items():
        missing = [n for n in e["arrays"].values() if n not in tensors]
        if missing:
            raise InputError(f"compressed weight {name!r}: initializers {missing[:3]} named in the "
                             f"{META_KEY} metadata are missing from the model")
        arrays = {k: np.array(numpy_helper.to_array(tensors[n])) for k, n in e["arrays"].items()}
        out[name] = CompressedWeight(e["method"], tuple(e["shape"]), e["meta"], arrays)
    return out


def materialize_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Plain ONNX: every decoder replaced by an initializer with the decoded weight (original name
    and dtype), compact arrays, functions and the custom domain removed. Runs anywhere."""
    entries = _read_meta(model)
    compressed = read_compressed_onnx(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_node = {n: w for w, e in entries.items() for n in e["nodes"]}
    arrays = {n for e in entries.values() for n in e["arrays"].values()}
    _materialize_graph(out.graph, entries, compressed, by_node, arrays)
    funcs = [f for f in out.functions if f.domain != DOMAIN]
    del out.functions[:]
    out.functions.extend(funcs)
    for i in reversed(range(len(out.opset_import))):
        if out.opset_import[i].domain == DOMAIN:
            del out.opset_import[i]
    _write_meta(out, {})
    check_rewritten(model, out)
    return out


def _materialize_graph(graph, entries, compressed, by_node, arrays) -> None:
    for node in graph.node:
        for sub in _subgraphs(node):
            _materialize_graph(sub, entries, compressed, by_node, arrays)
    keep, decoded = [], []
    for node in graph.node:
        weight = by_node.get(node.output[0]) if len(node.output) == 1 else None
        if weight is None:
            keep.append(node)
            continue
        if node.output[0] == weight:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(entries[weight]["dtype"])
            decoded.append(numpy_helper.from_array(compressed[weight].reconstruct().astype(dtype), weight))
    if len(keep) == len(graph.node):
        return
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in arrays:
            del graph.initializer[i]
    graph.initializer.extend(decoded)
    rebuilt = []
    for n in keep:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        rebuilt.append(copy)
    del graph.node[:]
    graph.node.extend(rebuilt)


# ----------------------------------------------------------------------------- files

def save_onnx(model: onnx.ModelProto, path) -> Path:
    """Write atomically (temporary folder beside the target, then rename); tensors go to an
    external data file "<name>.data" when they exceed EXTERNAL_DATA_THRESHOLD bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from riem_compiler.frontend.onnx_frontend import all_tensors

    tensor_bytes = sum(len(t.raw_data) for t in all_tensors(model))
    external = tensor_bytes > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, str(tmp / path.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            os.replace(tmp / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(tmp / path.name))
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def export_result_onnx(result, path, materialize: bool = False) -> Path:
    """`Result.export_onnx`: the compressed model as ONNX (decoder functions), or plain ONNX with
    decoded weights when `materialize` is set."""
    if result.source == "onnx":
        model = result.model
    else:
        model = torch_result_to_onnx(result)
    if materialize:
        model = materialize_onnx(model)
    return save_onnx(model, path)


def torch_result_to_onnx(result) -> onnx.ModelProto:
    """Export a compressed torch model: export a materialised copy (plain Linear/Conv, same
    parameter names) with torch.onnx.export(dynamo=True, optimize=False), which keeps every
    parameter as an initializer of the same name, then put the compressed weights back in."""
    import torch

    from riem_compiler.errors import InputError, RiemError
    from riem_compiler.passes.rewrite_torch import materialize

    if result.example_inputs is None:
        raise InputError("export_onnx of a PyTorch result needs example inputs: pass example_inputs= to optimize()")
    inputs = result.example_inputs
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    plain = materialize(result.model).eval()
    with torch.no_grad():
        program = torch.onnx.export(plain, inputs, dynamo=True, optimize=False, verbose=False)
    model = program.model_proto
    found = {}
    from riem_compiler.frontend.onnx_frontend import iter_graphs

    tensors = {t.name: t for _, g in iter_graphs(model.graph) for t in g.initializer}
    for name, cw in result.compressed.items():
        t = tensors.get(name)
        if t is None or tuple(t.dims) != tuple(cw.shape):
            log.warning("export_onnx: weight %s is not an initializer of the exported graph; left dense", name)
            continue
        if not np.allclose(numpy_helper.to_array(t).astype(np.float32), cw.reconstruct(), atol=1e-5, rtol=1e-4):
            log.warning("export_onnx: initializer %s does not hold the decoded weight; left dense", name)
            continue
        found[name] = cw
    if result.compressed and not found:
        raise RiemError("export_onnx: none of the compressed weights appear as initializers of the exported "
                        "ONNX graph, so the file would not be compressed")
    return rewrite_onnx(model, None, found)


# ----------------------------------------------------------------------------- running

class OnnxRuntimeModel:
    """A .onnx file (or ModelProto) run by onnxruntime, called like a model.

    Takes numpy arrays or torch tensors (positional in graph-input order, or by name) and
    returns the same kind; a single output is returned bare.
    """

    def __init__(self, path_or_model, device: str = "cpu", session_options=None):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda"):
            providers.insert(0, "CUDAExecutionProvider")
        source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
        self.session = ort.InferenceSession(source, sess_options=session_options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *args, **kwargs):
        if len(args) > len(self.input_names):
            raise TypeError(f"model takes {len(self.input_names)} inputs {self.input_names}, got {len(args)}")
        named = {**dict(zip(self.input_names, args)), **kwargs}
        as_torch = False
        feeds = {}
        for k, v in named.items():
            if hasattr(v, "detach"):
                as_torch = True
                v = v.detach().cpu().numpy()
            feeds[k] = np.asarray(v)
        outs = self.session.run(None, feeds)
        if as_torch:
            import torch

            outs = [torch.from_numpy(np.ascontiguousarray(o)) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)
