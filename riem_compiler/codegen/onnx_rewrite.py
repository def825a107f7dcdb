"""The ONNX graph rewrite: compressed weights become calls of decoder functions, and back.

`rewrite_onnx` replaces each compressed weight's initializer (or Constant) by a call of its
method's decoder function and records the compact arrays in the model's metadata;
`read_compressed_onnx` and `materialize_onnx` read that record back. This module owns the
format of a compressed ONNX model; writing files, the torch export and running the model live
beside it (onnx_export.py, torch_to_onnx.py, ort_runner.py).

Design:
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
- Each method owns its decoder (`Method.onnx_call` names the node, `Method.onnx_functions` gives
  the onnxscript bodies, in riem_compiler/methods/<name>/onnx.py); this module only rewrites.
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
  of its 8-code unit (int32 per code, no per-bit matrix).
- onnx_format="standard" (`Config.onnx_format`): a weight whose method has a standard-op form
  (`Method.onnx_native`; rtn 8/4-bit -> one DequantizeLinear on signed int8/int4 codes, no zero
  point, so the initializers hold exactly the CompressedWeight's bytes, input-major for 2-D
  weights so onnxruntime fuses it with the MatMul into MatMulNBits) gets that instead of the
  function call, upgrading the model to the opset it needs (21) when onnx.version_converter does
  so cleanly. Its metadata entry says "onnx_form": "standard" and its "encoding", and
  `read_compressed_onnx` converts the initializers back (`Method.onnx_native_arrays`); a weight
  that keeps the function form has "onnx_form": "functions" and an "onnx_note" saying why.
- onnx_format="ort": a weight whose every use is a MatMul/Gemm (onnx_matmulnbits.py says which
  patterns) and whose method has a MatMulNBits layout (`Method.onnx_matmul`; rtn 2/4/8-bit,
  affine 2/4-bit with float zero points) has those consumers replaced by com.microsoft
  MatMulNBits nodes ("onnx_form": "ort"; the float16 scales and float zero points are Cast to
  float32; the replaced nodes are kept in the metadata for `materialize_onnx`); the others get
  the standard form where they have one, else the function form, with an "onnx_note".
- onnx_format="auto" (the default of `Config.onnx_format` and the CLI): per weight the best native
  form that maps for the setting the method chose (unlike "standard"/"ort", it does not make rtn
  prefer 8/4-bit settings: at 1/4 rtn keeps 7-bit codes, which have no native form), in the order
  of "ort": MatMulNBits (rtn/affine MatMul/Gemm weights) or
  GatherBlockQuantized (rtn tables), else the blocked DequantizeLinear of "standard" (rtn Conv
  weights, and matmul weights whose layout MatMulNBits does not take), else the decoder function.
  Every metadata entry then says "onnx_format": "auto", its "onnx_form", and in "onnx_note" why
  (which op, or why no native form maps); the report copies both into the layer's settings. For the
  same compressed weights the file is the one "ort" writes, apart from those notes.
- Embedding tables (a weight whose every use is a row Gather, onnx_gather.py): "standard" writes
  the row-major DequantizeLinear (`Method.onnx_native(..., table=True)`); "ort" replaces each
  Gather by com.microsoft GatherBlockQuantized (`Method.onnx_gather`; rtn 4/8-bit), restored by
  `materialize_onnx` like the MatMulNBits consumers.
- onnxruntime with default options folds each decoder into a constant at session creation
  (steady-state latency = the dense model's); `materialize_onnx` writes plain standard-op ONNX.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from riem_compiler import methods
from riem_compiler.codegen import onnx_gather as gq
from riem_compiler.codegen import onnx_matmulnbits as mm
from riem_compiler.codegen.onnx_matmulnbits import MS_DOMAIN
from riem_compiler.config import ONNX_FORMATS
from riem_compiler.methods.base import NativeGather
from riem_compiler.methods.onnx_common import DOMAIN, DOMAIN_VERSION
from riem_compiler.methods.onnx_common import FUNCTIONS as COMMON_FUNCTIONS


def decoder_functions() -> dict:
    """name -> (onnxscript function, names it calls) over every registered method."""
    table = dict(COMMON_FUNCTIONS)
    for method in methods.all_methods():
        table.update(method.onnx_functions())
    return table


log = logging.getLogger("riem_compiler.onnx_export")  # the ONNX codegen's logger, as before the split

META_KEY = "riem_compiler.compressed"
MIN_FUNCTION_OPSET = 13
NATIVE_OPSET = 21


def check_onnx_format(onnx_format: str) -> None:
    """ONNX_FORMATS (defined with the option, in riem_compiler.config): "functions", every weight
    a decoder-function call; "standard", weights whose method has a standard-op form
    (`Method.onnx_native`, e.g. rtn 8/4-bit -> DequantizeLinear) get it, the others keep the
    function form (the metadata entry and the report say which, and why); "ort" and "auto" (the
    default), MatMulNBits / GatherBlockQuantized where they map, else as "standard"."""
    if onnx_format not in ONNX_FORMATS:
        from riem_compiler.errors import InputError

        raise InputError(f"onnx_format must be one of {ONNX_FORMATS}; got {onnx_format!r}")


def function_protos(op_types, opset: int) -> list[onnx.FunctionProto]:
    """FunctionProtos for these decoder entry points (and what they call), at the model's opset."""
    table = decoder_functions()
    names = []

    def add(name):  # what a function calls comes before it
        for dep in table[name][1]:
            add(dep)
        if name not in names:
            names.append(name)

    for op_type in op_types:
        if op_type in table:
            add(op_type)
    out = []
    for name in names:
        proto = table[name][0].to_function_proto()
        del proto.opset_import[:]
        proto.opset_import.extend([helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
        out.append(proto)
    return out


# ----------------------------------------------------------------------------- rewrite

def rewrite_onnx(model: onnx.ModelProto, specs, compressed: dict, onnx_format: str = "functions") -> onnx.ModelProto:
    """A copy of `model` where each weight in `compressed` is produced by its decoder function
    (or, with onnx_format="standard", by standard ops where its method has such a form; with
    "ort" or "auto", consumed by MatMulNBits nodes where it can be, else as with "standard"; "auto"
    also notes why for every weight).

    specs: the LayerSpecs the frontend found (only those names are rewritten), or None to
    rewrite every name in `compressed` (weights are located by initializer/Constant name).
    A standard form that needs a newer opset than the model's upgrades the model with
    onnx.version_converter when the upgraded model passes the checker and loads in onnxruntime;
    otherwise those weights keep the function form with a note ("onnx_note" in the metadata).
    """
    from riem_compiler.errors import InputError
    from riem_compiler.frontend.onnx_frontend import default_opset, definition_counts

    check_onnx_format(onnx_format)
    wanted = dict(compressed) if specs is None else {s.name: compressed[s.name] for s in specs
                                                       if s.name in compressed}
    for name, cw in wanted.items():
        if cw.method not in methods.MODULES:
            raise InputError(f"no ONNX decoder for method {cw.method!r} (weight {name!r}); "
                             f"known: {sorted(methods.MODULES)}")
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
    tables = _table_names(out, wanted)
    per_layer = onnx_format in ("ort", "auto")  # MatMulNBits / GatherBlockQuantized, else standard, else functions
    ort_forms, notes = _matmul_forms(out, wanted, tables) if per_layer else ({}, {})
    rest = {n: cw for n, cw in wanted.items() if n not in ort_forms}
    native, standard_notes = _native_forms(rest, "standard" if per_layer else onnx_format, tables)
    for name, why in standard_notes.items():
        notes[name] = f"{notes[name]}; {why}" if name in notes else why
    need = max((d.opset for d in native.values()), default=0)
    if need > opset:
        target = need
        upgraded, problem = _try_upgrade(out, opset, target)
        if upgraded is not None:
            out, opset = upgraded, target
        for name in [n for n, d in native.items() if d.opset > opset]:
            notes[name] = (f"its standard form needs opset {native.pop(name).opset}; the opset-{opset} model "
                           f"could not be upgraded ({problem})")
    if opset < MIN_FUNCTION_OPSET:
        out = _upgrade_opset(out, opset)
        opset = MIN_FUNCTION_OPSET
    state = _RewriteState(wanted, _all_names(out), native=native, notes=notes, ort=ort_forms)
    _rewrite_graph(out.graph, state, {i.name for i in out.graph.input})
    missing = sorted(set(wanted) - set(state.entries))
    if missing:
        raise InputError(f"weights {missing[:5]} are not initializers or Constant outputs of this model")
    out.ir_version = max(out.ir_version, 10 if state.native and opset >= NATIVE_OPSET else 8)
    if (onnx_format == "functions" or state.op_types) and not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    if state.ort and not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    present = {(f.domain, f.name) for f in out.functions}
    for proto in function_protos(sorted(state.op_types), opset):
        if (proto.domain, proto.name) not in present:
            out.functions.append(proto)
    if onnx_format == "auto":
        for name, entry in state.entries.items():
            _note_auto_choice(entry, state.notes.get(name))
    _write_meta(out, {**_read_meta(out), **state.entries})
    log.info("ONNX: %d weights replaced by decoder functions, %d by standard ops, %d by MatMulNBits/GatherBlockQuantized",
             len(state.entries) - len(state.native) - len(state.ort), len(state.native), len(state.ort))
    check_rewritten(model, out)
    return out


def _note_auto_choice(entry: dict, why_not: str | None) -> None:
    """onnx_format "auto": mark the entry and say in "onnx_note" which form it got and why."""
    form = entry.get("onnx_form", "functions")
    entry["onnx_format"] = "auto"
    entry["onnx_form"] = form
    if form == "ort":
        op = "GatherBlockQuantized" if "data" in entry["arrays"] else "MatMulNBits"
        uses = "row Gathers" if op == "GatherBlockQuantized" else "MatMul/Gemm"
        meta = entry.get("meta", {})
        layout = ""
        if "bits" in meta:
            group = meta.get("group_size")
            layout = f" ({meta['bits']}-bit, " + ("a scale per row" if group is None else f"groups of {group}") + ")"
        entry["onnx_note"] = f"com.microsoft.{op}: every use is a {uses} its {entry['method']} layout{layout} maps to"
    elif form == "standard":
        entry["onnx_note"] = "DequantizeLinear" + (f"; {why_not}" if why_not else "")
    elif _has_native_form(entry["method"]):
        entry["onnx_note"] = why_not or "no native form maps"
        if _prefers_native(entry["method"]):
            entry["onnx_note"] += "; onnx_format 'ort' makes it choose among the settings that map"
    else:
        entry["onnx_note"] = (f"method {entry['method']!r} has no native ONNX form (MatMulNBits, GatherBlockQuantized "
                              "or DequantizeLinear): decoder function")


def _prefers_native(method: str) -> bool:
    """Whether the method's settings take onnx_format (rtn: "standard"/"ort" prefer native settings)."""
    import dataclasses

    return "onnx_format" in {f.name for f in dataclasses.fields(methods.get(method).Settings)}


def _has_native_form(method: str) -> bool:
    """Whether the method overrides any of the native-form hooks of `Method`."""
    from riem_compiler.methods.base import Method

    cls = type(methods.get(method))
    return any(getattr(cls, hook) is not getattr(Method, hook) for hook in ("onnx_native", "onnx_matmul", "onnx_gather"))


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


def _native_forms(wanted: dict, onnx_format: str, tables: set) -> tuple[dict, dict]:
    """(name -> NativeDecoder, name -> why it keeps the function form) for this format; `tables`
    (weights only read by row Gathers) get their row-major layout."""
    native, notes = {}, {}
    if onnx_format == "functions":
        return native, notes
    for name, cw in wanted.items():
        got = methods.get(cw.method).onnx_native(cw, onnx_format, table=name in tables)
        if isinstance(got, str):
            notes[name] = got
        else:
            native[name] = got
    return native, notes


def _defining_graphs(model: onnx.ModelProto, wanted):
    """(graph, names of `wanted` it defines, names read in its subgraphs) for each graph that
    defines one (the first definition of a name)."""
    from riem_compiler.frontend.onnx_frontend import iter_graphs

    seen = set()
    for _, graph in iter_graphs(model.graph):
        defined = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node
                                                         if n.op_type == "Constant" and n.output}
        here = [n for n in wanted if n in defined and n not in seen]
        if here:
            seen.update(here)
            yield graph, here, mm.captured_names(graph)


def _tensor_type(graph: onnx.GraphProto, name: str) -> int | None:
    """The data type of initializer or Constant `name` of this graph."""
    for t in graph.initializer:
        if t.name == name:
            return t.data_type
    for n in graph.node:
        if n.op_type == "Constant" and n.output and n.output[0] == name:
            return next((a.t.data_type for a in n.attribute if a.name == "value"), None)
    return None


def _table_names(model: onnx.ModelProto, wanted: dict) -> set:
    """The weights of `wanted` whose every use is a row Gather (embedding tables)."""
    return {name for graph, here, captured in _defining_graphs(model, wanted) for name in here
            if isinstance(gq.plan_gathers(graph, name, captured), gq.GatherPlan)}


def _matmul_forms(model: onnx.ModelProto, wanted: dict, tables: set) -> tuple[dict, dict]:
    """onnx_format "ort": (name -> NativeMatMul for weights whose uses all map to MatMulNBits, or
    NativeGather for tables whose method maps to GatherBlockQuantized, name -> why the others do
    not). The consumer plan itself is made again in `_rewrite_graph` (the model may be upgraded
    in between)."""
    forms, notes = {}, {}
    for graph, here, captured in _defining_graphs(model, wanted):
        inits = {t.name: t for t in graph.initializer}
        for name in here:
            if name in tables:
                got = methods.get(wanted[name].method).onnx_gather(wanted[name])
                if _tensor_type(graph, name) != onnx.TensorProto.FLOAT:
                    got = "the table is not float32 (the node's output has the scales' type)"
                if isinstance(got, str):
                    notes[name] = f"no GatherBlockQuantized form ({got})"
                else:
                    forms[name] = got
                continue
            plan = mm.plan_uses(graph, name, captured, inits)
            got = plan if isinstance(plan, str) else methods.get(wanted[name].method).onnx_matmul(wanted[name], plan.in_out)
            if isinstance(got, str):
                notes[name] = f"no MatMulNBits form ({got})"
            else:
                forms[name] = got
    return forms, notes


def _try_upgrade(model: onnx.ModelProto, opset: int, target: int):
    """(upgraded model, None) when onnx.version_converter lifts `model` to `target` cleanly (it
    passes the checker and loads in onnxruntime whenever the original does), else (None, why)."""
    from onnx import version_converter

    from riem_compiler.errors import RiemError

    try:
        upgraded = version_converter.convert_version(model, target)
    except Exception as e:
        return None, f"onnx.version_converter to opset {target}: {_one_line(e)}"
    # the converter runs shape inference, which fills in the graph's value infos: keep the model's own
    if [v.name for v in upgraded.graph.input] == [v.name for v in model.graph.input] and \
            [v.name for v in upgraded.graph.output] == [v.name for v in model.graph.output]:
        for part in ("input", "output", "value_info"):
            del getattr(upgraded.graph, part)[:]
            getattr(upgraded.graph, part).extend(getattr(model.graph, part))
    try:
        check_rewritten(model, upgraded)
    except RiemError as e:
        return None, f"the opset-{target} conversion is not valid: {_one_line(e)}"
    log.info("upgraded model from opset %d to %d for standard-op decoders", opset, target)
    return upgraded, None


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
    native: dict = field(default_factory=dict)  # name -> NativeDecoder (onnx_format "standard")
    notes: dict = field(default_factory=dict)  # name -> why it keeps the function form
    ort: dict = field(default_factory=dict)  # name -> NativeMatMul (onnx_format "ort")

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
    swap: dict[int, onnx.NodeProto | None] = {}  # node index -> its MatMulNBits replacement, None: dropped
    for i, t in enumerate(graph.initializer):
        if t.name in state.wanted and t.name not in state.entries:
            if t.name in graph_inputs:
                from riem_compiler.errors import InputError
                raise InputError(f"weight {t.name!r} is also a graph input; it cannot be replaced")
            nodes, inits = (_ort_decoder(t.name, t, graph, state, swap) if t.name in state.ort
                            else _decoder(t.name, t, state))
            front += nodes
            new_inits += inits
            drop.append(i)
    body, changed = [], bool(front)
    for index, node in enumerate(graph.node):
        if index in swap:
            if swap[index] is not None:
                body.append(swap[index])
            changed = True
            continue
        out = node.output[0] if len(node.output) == 1 else None
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and out in state.wanted
                and out not in state.entries):
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                nodes, inits = (_ort_decoder(out, value, graph, state, swap) if out in state.ort
                                else _decoder(out, value, state))
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
    if name in state.native:
        return _native_decoder(name, tensor, cw, state.native[name], state)
    call = methods.get(cw.method).onnx_call(cw)
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
    if name in state.notes:
        state.entries[name].update(onnx_form="functions", onnx_note=state.notes[name])
    return nodes, inits


def _native_decoder(name: str, tensor: onnx.TensorProto, cw, native, state: _RewriteState):
    """(nodes, initializers) of a NativeDecoder: its tensors as initializers (exactly cw's bytes),
    its constants as Constant nodes, its chain of standard ops, a Cast to the weight's dtype."""
    names, inits, nodes = {}, [], []
    for key, arr in native.tensors.items():
        init_name = state.fresh(f"{name}.{cw.method}.{key}")
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), init_name))
        names[key] = init_name
    for key, arr in native.constants.items():
        const = state.fresh(f"{name}.{key}")
        nodes.append(helper.make_node("Constant", [], [const], name=state.fresh(f"{name}.{key}.const"),
                                      value=numpy_helper.from_array(np.ascontiguousarray(arr), const)))
        names[key] = const
    dtype = int(tensor.data_type)
    same = helper.np_dtype_to_tensor_dtype(np.dtype(native.output_dtype)) == dtype
    prev = None
    for i, (op_type, inputs, attrs) in enumerate(native.nodes):
        last = i == len(native.nodes) - 1
        output = name if last and same else state.fresh(f"{name}.decoded")
        nodes.append(helper.make_node(op_type, [prev if k is None else names[k] for k in inputs], [output],
                                      name=state.fresh(f"{name}.{op_type.lower()}"), **attrs))
        prev = output
    if prev != name:
        nodes.append(helper.make_node("Cast", [prev], [name], name=state.fresh(f"{name}.cast"), to=dtype))
    state.entries[name] = {"method": cw.method, "shape": [int(s) for s in cw.shape], "meta": cw.meta,
                           "dtype": dtype, "arrays": {k: names[k] for k in native.tensors},
                           "nodes": [n.output[0] for n in nodes], "onnx_form": "standard",
                           "encoding": native.encoding}
    if name in state.notes:  # onnx_format "ort": why not MatMulNBits
        state.entries[name]["onnx_note"] = state.notes[name]
    return nodes, inits


def _ort_decoder(name: str, tensor: onnx.TensorProto, graph, state: _RewriteState, swap: dict):
    """onnx_format "ort": (nodes, initializers) for a weight whose consumers become MatMulNBits
    (MatMul/Gemm uses) or GatherBlockQuantized (row Gathers of a table): the form's arrays as
    initializers (plus a Cast of float16 scales); the replaced consumers are recorded in `swap`."""
    from riem_compiler.errors import RiemError

    cw, form = state.wanted[name], state.ort[name]
    if tuple(tensor.dims) != tuple(cw.shape):
        return _decoder(name, tensor, state)  # the shape error is _decoder's
    gather = isinstance(form, NativeGather)
    captured = mm.captured_names(graph)
    plan = (gq.plan_gathers(graph, name, captured) if gather
            else mm.plan_uses(graph, name, captured, {t.name: t for t in graph.initializer}))
    if isinstance(plan, str):
        raise RiemError(f"internal error: weight {name!r} lost its {'Gather' if gather else 'MatMulNBits'} plan ({plan})")
    names, inits, nodes = {}, [], []
    for key, arr in form.tensors.items():
        names[key] = state.fresh(f"{name}.{cw.method}.{key}")
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), names[key]))
    scales = names["scales"]
    zero_points = names.get("zero_points", "")
    if form.cast_scales:
        scales = state.fresh(f"{name}.scales_f32")
        nodes.append(helper.make_node("Cast", [names["scales"]], [scales], name=state.fresh(f"{name}.cast"),
                                      to=onnx.TensorProto.FLOAT))
        if zero_points and form.tensors["zero_points"].dtype.kind == "f":  # float zero points: the scales' type
            zero_points = state.fresh(f"{name}.zero_points_f32")
            nodes.append(helper.make_node("Cast", [names["zero_points"]], [zero_points],
                                          name=state.fresh(f"{name}.cast"), to=onnx.TensorProto.FLOAT))
    originals = []
    for index, node, *bias in plan.consumers:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        originals.append(copy)
        swap[index] = (gq.replacement(node, names["data"], scales, form) if gather
                       else mm.replacement(node, bias[0], names["B"], scales, form, zero_points))
    transposes = [] if gather else plan.transposes
    for index, _ in transposes:
        swap[index] = None
    state.entries[name] = {"method": cw.method, "shape": [int(s) for s in cw.shape], "meta": cw.meta,
                           "dtype": int(tensor.data_type), "arrays": {k: names[k] for k in form.tensors},
                           "nodes": [n.output[0] for n in nodes], "onnx_form": "ort", "encoding": form.encoding,
                           "replaced": mm.serialise(originals), "transposes": mm.serialise([t for _, t in transposes])}
    return nodes, inits


def onnx_forms(model: onnx.ModelProto) -> dict:
    """Weight name -> {"onnx_form": "ort" | "standard" | "functions", "onnx_note": why (functions
    only; every form with onnx_format "auto")} for the weights of a model rewritten with onnx_format
    other than "functions"."""
    return {name: {k: e[k] for k in ("onnx_form", "onnx_note") if k in e}
            for name, e in _read_meta(model).items() if "onnx_form" in e}


def convert_onnx_format(model: onnx.ModelProto, onnx_format: str) -> onnx.ModelProto:
    """A rewritten model in another onnx_format (its compressed weights read back, decoded in
    place, and rewritten); the model itself when it already has that form."""
    check_onnx_format(onnx_format)
    entries = _read_meta(model)
    forms = {e.get("onnx_form") for e in entries.values()}
    current = ("auto" if any(e.get("onnx_format") == "auto" for e in entries.values())
               else "ort" if "ort" in forms else "standard" if "standard" in forms else "functions")
    if not entries or current == onnx_format:
        return model
    compressed = read_compressed_onnx(model)
    return rewrite_onnx(materialize_onnx(model), None, compressed, onnx_format)


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
        if e.get("onnx_form") in ("standard", "ort"):
            arrays = methods.get(e["method"]).onnx_native_arrays(e["meta"], tuple(e["shape"]), e["encoding"], arrays)
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
    restore = _ort_restore(entries)
    from riem_compiler.frontend.onnx_frontend import iter_graphs

    _materialize_graph(out.graph, entries, compressed, by_node, arrays, restore)
    if restore and not any(n.domain == MS_DOMAIN for _, g in iter_graphs(out.graph) for n in g.node):
        for i in reversed(range(len(out.opset_import))):
            if out.opset_import[i].domain == MS_DOMAIN:
                del out.opset_import[i]
    funcs = [f for f in out.functions if f.domain != DOMAIN]
    del out.functions[:]
    out.functions.extend(funcs)
    for i in reversed(range(len(out.opset_import))):
        if out.opset_import[i].domain == DOMAIN:
            del out.opset_import[i]
    _write_meta(out, {})
    check_rewritten(model, out)
    return out


def _ort_restore(entries: dict) -> dict:
    """MatMulNBits / GatherBlockQuantized output -> (weight, original consumer node, Transposes it
    needs first)."""
    restore = {}
    for weight, e in entries.items():
        if e.get("onnx_form") != "ort":
            continue
        transposes = mm.deserialise(e.get("transposes", []))
        for node in mm.deserialise(e.get("replaced", [])):
            needs = [t for t in transposes if t.output[0] in node.input]
            restore[node.output[0]] = (weight, node, needs)
    return restore


def _materialize_graph(graph, entries, compressed, by_node, arrays, restore) -> None:
    for node in graph.node:
        for sub in _subgraphs(node):
            _materialize_graph(sub, entries, compressed, by_node, arrays, restore)
    keep, decoded, placed = [], [], set()
    for node in graph.node:
        if node.domain == MS_DOMAIN and node.op_type in ("MatMulNBits", gq.OP_TYPE) and node.output[0] in restore:
            weight, original, transposes = restore[node.output[0]]
            keep += [t for t in transposes if t.output[0] not in placed]
            placed.update(t.output[0] for t in transposes)
            keep.append(original)
            if weight not in placed:
                placed.add(weight)
                dtype = onnx.helper.tensor_dtype_to_np_dtype(entries[weight]["dtype"])
                decoded.append(numpy_helper.from_array(methods.decode(compressed[weight]).astype(dtype), weight))
            continue
        weight = by_node.get(node.output[0]) if len(node.output) == 1 else None
        if weight is None:
            keep.append(node)
            continue
        if node.output[0] == weight:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(entries[weight]["dtype"])
            decoded.append(numpy_helper.from_array(methods.decode(compressed[weight]).astype(dtype), weight))
    if len(keep) == len(graph.node) and not placed:
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
