"""Fast start for compressed .onnx files: decode the weights here, hand onnxruntime plain initializers.

A function-form file stores each compressed weight as compact initializers plus a call of a
decoder function (domain "riem_compiler"). onnxruntime constant-folds those calls when it
creates the session, which is slow and memory-hungry (MiniLM: seconds and ~10x the resident
memory of the dense model; benchmarks/results/onnx_forms.md). Here the same weights are decoded
with `methods.decode` (vectorised torch, one weight per worker thread), the decoder nodes,
compact initializers and decoder functions are removed, and the decoded weights go to
onnxruntime through `SessionOptions.add_external_initializers`: no decoder runs in the session.

How the session gets the weights: the stripped model keeps, under each weight's name, a
placeholder initializer that points at external data (dims and dtype only, no bytes), and
add_external_initializers replaces it before any graph optimisation. Large dense initializers
of the main graph travel the same way, so the serialised model handed over is small (no 2 GiB
protobuf limit for big models either). Decoded weights inside control-flow subgraphs are embedded
as ordinary initializers of their subgraph. onnxruntime copies these arrays into the session, but
its SessionOptions keeps pointers to them and its Python session keeps the options to re-create
itself (`set_providers`, provider fallback): freeing them crashes such a re-creation. So the
arrays belong to the SessionOptions object (`_Options`), which lives as long as the session; that
costs one extra copy of the weights in memory, far less than folding (see the benchmark). A
caller's own SessionOptions is never given the arrays (it could be reused after they are gone):
with one, every decoded weight is embedded in the serialised model instead.

Only weights in the function form are decoded; standard-op forms (DequantizeLinear, MatMulNBits)
stay as they are, and a file with no function-form weight opens exactly as before (`has_decoder_functions`
reads only the file's metadata, skipping the graph). Nothing in the file is executed or
unpickled: the record of the compressed weights is JSON, checked field by field here.

This module does not import codegen/onnx_rewrite.py, which loads onnxscript (about 2 s): the two
format names below are that module's (tests/test_fast_load.py checks they agree).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from riem_compiler.errors import InputError

META_KEY = "riem_compiler.compressed"  # = onnx_rewrite.META_KEY
DOMAIN = "riem_compiler"  # = methods.onnx_common.DOMAIN
PLACEHOLDER = "riem_compiler-fast-start"  # external-data location of a placeholder; never read
MOVE_BYTES = 1 << 16  # main-graph initializers at least this big travel outside the serialised model
_NUMERIC = "fiub"  # numpy dtype kinds an OrtValue takes from numpy
NONFINITE = ("decodes to NaN or infinite weights (its stored arrays or metadata are damaged or were edited); "
             "compress the original model again or restore the file")


@dataclass
class FastStart:
    """A model ready for onnxruntime: `model` without decoders, `external` the arrays that
    replace its placeholder initializers, `decoded` the names of the weights decoded here."""

    model: onnx.ModelProto
    external: dict[str, np.ndarray] = field(default_factory=dict)
    decoded: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- which files

def has_decoder_functions(path_or_model) -> bool:
    """Whether the model records a compressed weight in the function form (what fast start
    decodes). For a path only the top-level metadata is read, so a plain file costs nothing;
    a file that cannot be read this way counts as False and opens as before."""
    if isinstance(path_or_model, onnx.ModelProto):
        raw = next((p.value for p in path_or_model.metadata_props if p.key == META_KEY), None)
    else:
        try:
            raw = _file_metadata(path_or_model).get(META_KEY)
        except (OSError, ValueError):
            return False
    if raw is None:
        return False
    try:
        entries = json.loads(raw)
    except ValueError:
        return True  # corrupt record: let prepare_fast_start say what is wrong
    return not isinstance(entries, dict) or any(_is_function_form(e) for e in entries.values())


def _file_metadata(path) -> dict[str, str]:
    """metadata_props of a .onnx file without parsing it: walk the ModelProto's top-level
    protobuf fields and seek past the others (the graph is field 7, metadata_props field 14)."""
    out = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while f.tell() < size:
            key = _varint(f)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _varint(f)
            elif wire == 1:
                f.seek(8, os.SEEK_CUR)
            elif wire == 5:
                f.seek(4, os.SEEK_CUR)
            elif wire == 2:
                length = _varint(f)
                if number == 14:
                    entry = onnx.StringStringEntryProto()
                    entry.ParseFromString(f.read(length))
                    out[entry.key] = entry.value
                else:
                    f.seek(length, os.SEEK_CUR)
            else:
                raise ValueError(f"protobuf wire type {wire} at the top level")
    return out


def _varint(f) -> int:
    value, shift = 0, 0
    while True:
        byte = f.read(1)
        if not byte or shift > 63:
            raise ValueError("truncated or overlong varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7


def _is_function_form(entry) -> bool:
    return isinstance(entry, dict) and entry.get("onnx_form", "functions") == "functions"


# ----------------------------------------------------------------------------- preparing the model

def prepare_fast_start(path_or_model, workers: int | None = None, embed: bool = False) -> FastStart | None:
    """The model with its function-form weights decoded, or None when it has none.

    path_or_model: a .onnx path (read and validated by `load_onnx`) or a ModelProto (copied).
    workers: decoding threads (each runs torch single-threaded); None: torch's thread count.
    embed: every decoded weight becomes an ordinary initializer (`external` stays empty).
    Raises InputError with one line naming the problem for a corrupt record or weight.
    """
    from riem_compiler.frontend.onnx_frontend import iter_graphs, load_onnx

    where = "ONNX model" if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    if isinstance(path_or_model, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)
        model = load_onnx(model)
    else:
        model = load_onnx(path_or_model)
    entries = {n: e for n, e in _entries(model, where).items() if _is_function_form(e)}
    if not entries:
        return None
    graphs = [g for _, g in iter_graphs(model.graph)]
    producers = {}  # output name -> (graph, node) over every graph
    for g in graphs:
        for node in g.node:
            for out in node.output:
                producers[out] = (g, node)
    arrays = _stored_arrays(graphs)
    weights = {name: _compressed(name, e, arrays, producers, where) for name, e in entries.items()}
    decoded = _decode_all(weights, {n: e["dtype"] for n, e in entries.items()}, workers, where)

    drop_nodes = {out for e in entries.values() for out in e["nodes"]}
    for g in graphs:
        for i in reversed(range(len(g.node))):
            if g.node[i].output and g.node[i].output[0] in drop_nodes:
                del g.node[i]
    used = {x for g in graphs for node in g.node for x in node.input} | {o.name for g in graphs for o in g.output}
    compact = {n for e in entries.values() for n in e["arrays"].values()} - used
    for g in graphs:
        for i in reversed(range(len(g.initializer))):
            if g.initializer[i].name in compact:
                del g.initializer[i]

    result = FastStart(model, decoded=sorted(decoded))
    for name, weight in decoded.items():
        graph = producers[name][0]
        if not embed and graph is model.graph and weight.dtype.kind in _NUMERIC:
            graph.initializer.append(_placeholder(name, weight))
            result.external[name] = weight
        else:  # embedded, in a subgraph, or a dtype numpy cannot hand over: an ordinary initializer
            graph.initializer.append(numpy_helper.from_array(weight, name))
    if not embed:
        _move_large_initializers(model, result.external)
    _drop_decoder_functions(model, graphs)
    return result


def _entries(model: onnx.ModelProto, where: str) -> dict:
    """The model's record of compressed weights (name -> entry), each entry checked."""
    raw = next((p.value for p in model.metadata_props if p.key == META_KEY), None)
    if raw is None:
        return {}
    try:
        entries = json.loads(raw)
    except ValueError as e:
        raise InputError(f"{where}: the {META_KEY} metadata is not valid JSON ({e})") from None
    if not isinstance(entries, dict):
        raise InputError(f"{where}: the {META_KEY} metadata is not a JSON object")
    for name, e in entries.items():
        if _is_function_form(e):
            problem = _entry_problem(name, e)
            if problem:
                raise InputError(f"{where}: compressed weight {name!r} in the {META_KEY} metadata: {problem}")
    return entries


def _entry_problem(name: str, e: dict) -> str | None:
    from riem_compiler import methods

    if e.get("method") not in methods.MODULES:
        return f"unknown method {e.get('method')!r} (known: {sorted(methods.MODULES)})"
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        return f"shape {shape!r} is not a list of sizes"
    if not isinstance(e.get("meta"), dict):
        return "meta is not an object"
    if not isinstance(e.get("dtype"), int) or e["dtype"] not in onnx.TensorProto.DataType.values():
        return f"dtype {e.get('dtype')!r} is not an ONNX tensor type"
    arrays = e.get("arrays")
    if not isinstance(arrays, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in arrays.items()):
        return "arrays is not an object of initializer names"
    nodes = e.get("nodes")
    if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes) or nodes[-1] != name:
        return f"nodes {nodes!r} is not a list of node outputs ending with the weight"
    return None


def _stored_arrays(graphs) -> dict:
    out = {}
    for g in graphs:
        for t in g.initializer:
            out.setdefault(t.name, t)
    return out


def _compressed(name: str, e: dict, arrays: dict, producers: dict, where: str):
    """The CompressedWeight of one entry, after checking that its nodes are a decoder call
    (and a Cast) in the model and its arrays are initializers."""
    from riem_compiler.compressed import CompressedWeight

    for out in e["nodes"]:
        node = producers.get(out, (None, None))[1]
        if node is None:
            return _bad(where, name, f"no node produces {out!r}")
        if node.domain != DOMAIN and node.op_type != "Cast":
            return _bad(where, name, f"node {out!r} is {node.op_type!r}, not a decoder call")
    missing = [n for n in e["arrays"].values() if n not in arrays]
    if missing:
        return _bad(where, name, f"initializers {missing[:3]} are missing from the model")
    # a copy: to_array may give a read-only view of the proto's bytes, which torch warns about
    stored = {k: np.array(numpy_helper.to_array(arrays[n])) for k, n in e["arrays"].items()}
    return CompressedWeight(e["method"], tuple(e["shape"]), e["meta"], stored)


def _bad(where: str, name: str, problem: str):
    raise InputError(f"{where}: compressed weight {name!r} in the {META_KEY} metadata: {problem}")


def _decode_all(weights: dict, dtypes: dict, workers: int | None, where: str) -> dict[str, np.ndarray]:
    """methods.decode of every weight, cast to the model's dtype of that weight.

    One weight per thread with torch single-threaded inside: the decodes are many small ops,
    and torch's own thread pool on a busy machine spends more time at its barriers than
    working (MiniLM rtn: 0.2 s single-threaded vs 1-2 s with 2 threads on 2 loaded cores).
    torch's thread count is process-wide; it is restored afterwards."""
    import torch

    from riem_compiler import methods

    previous = torch.get_num_threads()
    workers = max(1, min(workers or previous, len(weights)))

    def one(item):
        name, cw = item
        try:
            weight = methods.decode(cw)
        except Exception as e:  # a record that does not fit its method's layout
            text = str(e).strip().splitlines()
            _bad(where, name, f"cannot decode it as {cw.method} ({type(e).__name__}: {text[0] if text else ''})")
        if not np.isfinite(weight).all():  # e.g. a NaN zero point: the model would output NaN
            _bad(where, name, NONFINITE)
        return name, np.ascontiguousarray(weight.astype(helper.tensor_dtype_to_np_dtype(dtypes[name]), copy=False))

    torch.set_num_threads(1)
    try:
        if workers == 1:
            return dict(map(one, weights.items()))
        with ThreadPoolExecutor(workers) as pool:
            return dict(pool.map(one, weights.items()))
    finally:
        torch.set_num_threads(previous)


def check_record_finite(path_or_model, skip_function_form: bool = False) -> None:
    """Raise InputError (one line naming the weight) when a compressed weight recorded in the model
    decodes to NaN or inf: a damaged or edited record (a NaN scale or zero point) would otherwise
    open and make the model output NaN. skip_function_form: leave the function-form weights to fast
    start, which decodes and checks them anyway. A file without a record costs a metadata read."""
    from riem_compiler import methods
    from riem_compiler.compressed import CompressedWeight
    from riem_compiler.frontend.onnx_frontend import iter_graphs, load_onnx

    is_proto = isinstance(path_or_model, onnx.ModelProto)
    where = "ONNX model" if is_proto else str(path_or_model)
    if is_proto:
        raw = next((p.value for p in path_or_model.metadata_props if p.key == META_KEY), None)
    else:
        try:
            raw = _file_metadata(path_or_model).get(META_KEY)
        except (OSError, ValueError):
            return  # not readable this way: onnxruntime says what is wrong with the file
    if raw is None:
        return
    try:
        names = json.loads(raw)
    except ValueError:
        names = None  # _entries below says what is wrong
    if isinstance(names, dict) and skip_function_form:
        names = {n: e for n, e in names.items() if not _is_function_form(e)}
        if not names:
            return
    model = path_or_model if is_proto else load_onnx(path_or_model)
    entries = _entries(model, where)
    arrays = _stored_arrays([g for _, g in iter_graphs(model.graph)])
    for name, e in entries.items():
        if skip_function_form and _is_function_form(e):
            continue
        try:
            stored = {k: np.array(numpy_helper.to_array(arrays[n])) for k, n in e["arrays"].items()}
            if e.get("onnx_form") in ("standard", "ort"):
                stored = methods.get(e["method"]).onnx_native_arrays(e["meta"], tuple(e["shape"]), e["encoding"],
                                                                     stored)
            weight = methods.decode(CompressedWeight(e["method"], tuple(e["shape"]), e["meta"], stored))
        except Exception as exc:  # a record that does not fit the file or its method's layout
            text = str(exc).strip().splitlines()
            _bad(where, name, f"cannot decode it ({type(exc).__name__}: {text[0] if text else ''})")
        if not np.isfinite(weight).all():
            _bad(where, name, NONFINITE)


def _placeholder(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer with the array's name, dims and dtype whose data is "external": the
    session takes the array itself in its place (add_external_initializers)."""
    t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=PLACEHOLDER)
    return t


def _move_large_initializers(model: onnx.ModelProto, external: dict) -> None:
    """Main-graph initializers of MOVE_BYTES or more become placeholders + arrays, so that the
    serialised model stays small (load_onnx has read any external data into memory)."""
    inits = model.graph.initializer
    for i in range(len(inits)):
        t = inits[i]
        if (t.name in external or t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data")
                or len(t.raw_data) < MOVE_BYTES):
            continue
        array = numpy_helper.to_array(t)
        if array.dtype.kind not in _NUMERIC:
            continue
        external[t.name] = array
        inits[i].CopyFrom(_placeholder(t.name, array))


def _drop_decoder_functions(model: onnx.ModelProto, graphs) -> None:
    """Remove the decoder functions and their domain when no node calls into it any more
    (a node left in that domain keeps them, and onnxruntime folds it as before)."""
    if any(node.domain == DOMAIN for g in graphs for node in g.node):
        return
    keep = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(keep)
    for i in reversed(range(len(model.opset_import))):
        if model.opset_import[i].domain == DOMAIN:
            del model.opset_import[i]


# ----------------------------------------------------------------------------- the session

class _Options(ort.SessionOptions):
    """SessionOptions that owns the arrays given to add_external_initializers (see the module's
    docstring: onnxruntime may read them again whenever it re-creates the session)."""

    def __init__(self, arrays: dict):
        super().__init__()
        self.held_arrays = arrays
        names = list(arrays)
        if names:
            self.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(arrays[n]) for n in names])


def fast_start_session(path_or_model, providers: list[str], session_options=None, workers: int | None = None):
    """(onnxruntime session, names of the weights decoded here), or None when the model has no
    function-form weight (open it the ordinary way then).

    Without session_options the weights reach the session through add_external_initializers
    (options of our own, which keep the arrays). With the caller's session_options they are
    embedded in the serialised model instead, and that object is left as it was."""
    if not has_decoder_functions(path_or_model):
        return None
    prepared = prepare_fast_start(path_or_model, workers, embed=session_options is not None)
    if prepared is None:
        return None
    options = session_options if session_options is not None else _Options(prepared.external)
    data = prepared.model.SerializeToString()
    prepared.model = None  # onnxruntime parses its own copy: let the proto go first
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=providers)
    except Exception as e:
        text = str(e).strip().splitlines()
        where = "ONNX model" if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
        raise InputError(f"{where}: onnxruntime cannot open the model with its weights decoded "
                         f"({text[0] if text else type(e).__name__}); fast_start=False lets onnxruntime "
                         "run the decoders instead") from None
    return session, prepared.decoded
