"""ONNX frontend: load a model (file or ModelProto) and find the weights worth compressing.

A layer is a Gemm, a MatMul with one constant operand, a 1-D/2-D Conv whose weight is a
constant, or an embedding table: a Gather (axis 0) of rows of a 2-D float constant. A constant
is an initializer or a Constant node, possibly reached through Identity, Cast and Transpose
nodes (what real exporters put between a parameter and its consumer; no Transpose before a
table). Nodes inside control-flow subgraphs (If/Loop/Scan bodies) are searched too; a body may
use a constant of an enclosing graph.

The weight is keyed by the name of its initializer/Constant output. The rewrite replaces that
one tensor by a decoder node, so every consumer and every Identity/Cast/Transpose in between
stays exactly as it was. Whatever is seen but not taken is returned with a reason.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np
import onnx
from onnx import numpy_helper

from riem_compiler.errors import InputError
from riem_compiler.frontend.layers import LayerSpec, apply_scope

log = logging.getLogger("riem_compiler.onnx_frontend")

MIN_OPSET = 11
PASS_THROUGH_OPS = ("Identity", "Cast", "Transpose")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
               onnx.TensorProto.DOUBLE)
DEFAULT_DOMAINS = ("", "ai.onnx")


# ----------------------------------------------------------------------------- loading

def load_onnx(path_or_model) -> onnx.ModelProto:
    """A validated ModelProto from a ModelProto or a .onnx path (external data loaded).

    Raises InputError with one line naming the file and the problem: missing or truncated
    file, missing external data, external data entries that point at the model itself, outside
    the model's folder or past the end of their file, tensors whose stored bytes do not match
    their dtype and shape, failed checker, opset older than 11 or newer than onnx knows.
    """
    return load_onnx_files(path_or_model)[0]


def load_onnx_files(path_or_model) -> tuple[onnx.ModelProto, list[Path]]:
    """Like load_onnx, plus the resolved paths of the external data files that were read
    (empty for a ModelProto or a self-contained file)."""
    data_files: list[Path] = []
    if isinstance(path_or_model, onnx.ModelProto):
        model, where = path_or_model, "ONNX model"
    elif isinstance(path_or_model, (str, os.PathLike)):
        path = Path(path_or_model)
        where = str(path)
        if not path.is_file():
            raise InputError(f"{where}: no such file; pass the path of an existing .onnx file")
        model, data_files = _read_file(path)
    else:
        raise InputError(f"expected an onnx.ModelProto or a path to a .onnx file, got {type(path_or_model).__name__}")
    _check_external_data_loaded(model, where)
    _check_tensor_sizes(model, where)
    _check_opset(model, where)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InputError(f"{where}: not a valid ONNX model: {_first_line(e)}") from None
    return model, data_files


def _read_file(path: Path) -> tuple[onnx.ModelProto, list[Path]]:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise InputError(f"{path}: cannot parse ONNX protobuf ({_first_line(e) or type(e).__name__}); "
                         "the file is truncated or not an ONNX model") from None
    if len(model.graph.node) == 0 and len(model.graph.output) == 0:
        raise InputError(f"{path}: parsed as an empty ONNX model (no nodes, no outputs); the file is "
                         "truncated or not an ONNX model")
    data_files = {}
    for tensor in _external_tensors(model):
        data = _check_external_entry(path, tensor)
        data_files[str(data)] = data
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise InputError(f"{path}: cannot read external data ({_first_line(e)})") from None
    return model, list(data_files.values())


def _check_external_entry(path: Path, tensor: onnx.TensorProto) -> Path:
    """Validate one tensor's external-data entry before anything is read; the resolved data file.

    The location must be a relative path inside the model's folder (no absolute path, no `..`
    out of it) and not the model file itself; offset and length must lie inside the data file
    and the bytes they select must be exactly what the tensor's dtype and shape need."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    what = f"external data of tensor {tensor.name!r}"
    if not location:
        raise InputError(f"{path}: {what} has no location")
    if os.path.isabs(location) or PureWindowsPath(location).drive or location.startswith(("/", "\\")):
        raise InputError(f"{path}: {what} has the absolute location {location!r}; external data must be "
                         "a relative path inside the model's folder")
    parts = os.path.normpath(location.replace("\\", "/")).split(os.sep)
    if parts[0] == "..":
        raise InputError(f"{path}: {what} has the location {location!r}, outside the model's folder; "
                         "external data must be a relative path inside it")
    data = path.parent / location
    if not data.is_file():
        raise InputError(f"{path}: external data file {location!r} of tensor "
                         f"{tensor.name!r} not found next to the model (looked for {data})")
    resolved = data.resolve()
    if resolved == path.resolve():
        raise InputError(f"{path}: {what} has the location {location!r}, which is the model file itself")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InputError(f"{path}: {what} has a non-integer offset or length "
                         f"({info.get('offset')!r}, {info.get('length')!r})") from None
    size = resolved.stat().st_size
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"{path}: {what} has a negative offset or length ({offset}, {length})")
    if offset > size or (length is not None and offset + length > size):
        raise InputError(f"{path}: {what} reads bytes {offset}..{offset + (length or 0)} of {location!r}, "
                         f"which has only {size} bytes (file truncated?)")
    stored = size - offset if length is None else length
    needed = tensor_nbytes(tensor)
    if needed is not None and stored != needed:
        raise InputError(f"{path}: {what} in {location!r} holds {stored} bytes but its dtype and shape "
                         f"{list(tensor.dims)} need {needed} (file truncated or entry wrong)")
    return resolved


_HALF_BYTE_TYPES = tuple(getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
                         if hasattr(onnx.TensorProto, n))


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of the tensor's raw data for its dtype and dims; None where that has no fixed size
    (strings) or the dtype is unknown here (the checker judges those)."""
    if any(d < 0 for d in tensor.dims):
        return None  # the checker reports negative dims
    count = 1
    for d in tensor.dims:
        count *= int(d)
    if tensor.data_type in _HALF_BYTE_TYPES:
        return (count + 1) // 2
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        return None
    return count * itemsize


def all_tensors(model: onnx.ModelProto):
    """Every tensor the model stores: initializers and tensor attributes, subgraphs included."""
    for _, graph in iter_graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors


def tensor_sizes(model: onnx.ModelProto) -> dict[str, tuple[tuple, int]]:
    """Name -> (dims, bytes) of every initializer and Constant-node value, subgraphs included
    (the first definition of a name wins; a tensor of no fixed size counts 0 bytes)."""
    out: dict[str, tuple[tuple, int]] = {}
    for _, graph in iter_graphs(model.graph):
        named = [(t.name, t) for t in graph.initializer]
        named += [(n.output[0], a.t) for n in graph.node if n.op_type == "Constant" and n.output
                  for a in n.attribute if a.name == "value"]
        for name, t in named:
            out.setdefault(name, (tuple(t.dims), tensor_nbytes(t) or 0))
    return out


def _check_tensor_sizes(model: onnx.ModelProto, where: str) -> None:
    """Every raw_data must hold exactly dtype * shape bytes (the checker only catches too few)."""
    for t in all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data"):
            continue
        needed = tensor_nbytes(t)
        if needed is None:
            if any(d < 0 for d in t.dims):
                raise InputError(f"{where}: tensor {t.name!r} has a negative dimension {list(t.dims)}")
            continue
        stored = len(t.raw_data)
        if stored != needed:
            raise InputError(f"{where}: tensor {t.name!r} stores {stored} bytes but its dtype and shape "
                             f"{list(t.dims)} need {needed}; the file is damaged")


def _external_tensors(model: onnx.ModelProto):
    for _, graph in iter_graphs(model.graph):
        for t in graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                yield t
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_location == onnx.TensorProto.EXTERNAL:
                    yield a.t


def _check_external_data_loaded(model: onnx.ModelProto, where: str) -> None:
    for t in _external_tensors(model):
        raise InputError(f"{where}: tensor {t.name!r} still points to external data; pass the file path "
                         "(or load it with onnx.load(path, load_external_data=True))")


def default_opset(model: onnx.ModelProto) -> int | None:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else None


def _check_opset(model: onnx.ModelProto, where: str) -> None:
    version = default_opset(model)
    if version is None:
        raise InputError(f"{where}: no opset import for the default ONNX domain (file truncated or broken)")
    newest = onnx.defs.onnx_opset_version()
    if version < MIN_OPSET:
        raise InputError(f"{where}: opset {version} is not supported (need {MIN_OPSET}..{newest}); "
                         "re-export it or upgrade it with onnx.version_converter.convert_version")
    if version > newest:
        raise InputError(f"{where}: opset {version} is newer than the installed onnx supports ({newest}); "
                         "upgrade the onnx package")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


# ----------------------------------------------------------------------------- graph walking

def iter_graphs(graph: onnx.GraphProto, path: str = ""):
    """(path, graph) for the main graph ("") and every nested subgraph.

    A subgraph's path is "<parent path>/<node index>:<attribute name>" (e.g. "/3:then_branch"),
    so it stays valid after renaming nodes and does not depend on node names being unique.
    """
    yield path, graph
    for i, node in enumerate(graph.node):
        for label, g in subgraphs(node):
            yield from iter_graphs(g, f"{path}/{i}:{label}")


def subgraphs(node: onnx.NodeProto):
    """(label, graph) for each subgraph attribute of a node: the attribute name ("then_branch"),
    or "<name>.<j>" for the j-th graph of a GRAPHS attribute. The one place that knows where
    subgraphs live; every recursion over subgraphs goes through it."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for j, g in enumerate(a.graphs):
                yield f"{a.name}.{j}", g


def definition_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """Name -> how many times it is defined in the graph and all its subgraphs (an initializer,
    a graph input, a node output; an initializer listed as an input of its own graph counts once).

    A name defined more than once is shadowed: a subgraph redefines a name of an enclosing graph
    (or two sibling bodies use the same name). Such a weight cannot be replaced by a decoder node
    of the same name without breaking single static assignment across scopes."""
    counts: dict[str, int] = {}
    for _, g in iter_graphs(graph):
        names = [*({t.name for t in g.initializer} | {i.name for i in g.input}), *(o for n in g.node for o in n.output)]
        for name in names:
            if name:
                counts[name] = counts.get(name, 0) + 1
    return counts


@dataclass
class ConstSource:
    """Where a constant tensor lives: an initializer or a Constant node output in graph `graph`."""

    name: str
    graph: str
    kind: str  # "initializer" or "constant"
    tensor: onnx.TensorProto = field(repr=False)
    is_input: bool = False  # an initializer also listed as an input of its graph (a default value)


@dataclass
class _Scope:
    """Names visible in one graph: its own constants and producers, then the enclosing scope's."""

    consts: dict[str, ConstSource]
    producers: dict[str, onnx.NodeProto]
    graph_inputs: set[str]
    parent: "_Scope | None" = None

    def const(self, name: str) -> ConstSource | None:
        scope = self
        while scope is not None:
            if name in scope.consts:
                return scope.consts[name]
            if name in scope.producers or name in scope.graph_inputs:
                return None  # shadowed by a computed value or an input
            scope = scope.parent
        return None

    def producer(self, name: str) -> onnx.NodeProto | None:
        scope = self
        while scope is not None:
            if name in scope.producers:
                return scope.producers[name]
            if name in scope.consts or name in scope.graph_inputs:
                return None
            scope = scope.parent
        return None


def _scope_for(graph: onnx.GraphProto, path: str, parent: _Scope | None) -> _Scope:
    consts, producers = {}, {}
    inputs = {i.name for i in graph.input}
    for t in graph.initializer:
        consts[t.name] = ConstSource(t.name, path, "initializer", t, t.name in inputs)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.output) == 1:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                consts[node.output[0]] = ConstSource(node.output[0], path, "constant", value)
                continue
        for out in node.output:
            if out:
                producers[out] = node
    return _Scope(consts, producers, inputs, parent)


def trace_constant(scope: _Scope, name: str) -> tuple[ConstSource, list[str]] | None:
    """Follow Identity/Cast/Transpose back to a constant; (source, op types passed) or None."""
    chain = []
    for _ in range(64):
        src = scope.const(name)
        if src is not None:
            return src, chain[::-1]
        node = scope.producer(name)
        if node is None or node.domain not in DEFAULT_DOMAINS or node.op_type not in PASS_THROUGH_OPS:
            return None
        chain.append(node.op_type)
        name = node.input[0]
    return None


# ----------------------------------------------------------------------------- detection

def find_onnx_layers(model: onnx.ModelProto, config) -> tuple[list[LayerSpec], list[tuple[str, str]]]:
    """(specs, skipped): compressible weights, and (name, reason) for what was seen but not taken.

    Respects config.ignore (fnmatch on node or weight name), config.ignore_types (kinds),
    config.min_weight_size (elements) and config.keep_first_last.
    """
    walk = _Found(definition_counts(model.graph))
    _walk(model.graph, "", None, walk)
    found, skipped = walk.specs, walk.skipped
    kept, scope_skipped = apply_scope(list(found.values()), config)
    scope_skipped = [(spec, why) for spec, why in scope_skipped if spec.name not in skipped]
    log.info("ONNX: %d compressible weights, %d skipped", len(kept), len(skipped) + len(scope_skipped))
    return kept, sorted(skipped.items()) + scope_skipped


@dataclass
class _Found:
    """What the walk collected: specs by weight name, skip reasons by name."""

    definitions: dict[str, int]  # definition_counts of the model
    specs: dict[str, LayerSpec] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    not_tables: set[str] = field(default_factory=set)  # skipped only because a Gather of it is no row gather


def _walk(graph, path, parent, found: _Found):
    scope = _scope_for(graph, path, parent)
    for i, node in enumerate(graph.node):
        if node.domain in DEFAULT_DOMAINS and node.op_type in ("Gemm", "MatMul", "Conv"):
            _consider(node, scope, found)
        elif node.domain in DEFAULT_DOMAINS and node.op_type == "Gather":
            _consider_gather(node, scope, found)
        elif node.domain in DEFAULT_DOMAINS and node.op_type in KEPT_WEIGHT_OPS:
            _note_kept_weights(node, scope, found)
        for label, g in subgraphs(node):
            _walk(g, f"{path}/{i}:{label}", scope, found)


# ops whose constant weight matrices the pass sees but does not compress (listed in the report)
KEPT_WEIGHT_OPS = ("LSTM", "GRU", "RNN", "ConvTranspose")


def _note_kept_weights(node, scope, found: _Found):
    """Skip reasons for the float weight matrices of a recurrent or transposed-conv node."""
    for name in node.input[1:3] if node.op_type != "ConvTranspose" else node.input[1:2]:
        traced = trace_constant(scope, name) if name else None
        if traced is None:
            continue
        src = traced[0]
        if src.tensor.data_type in FLOAT_TYPES and len(src.tensor.dims) >= 2 and src.name not in found.specs:
            found.skipped.setdefault(src.name, f"{node.op_type} weight (not a compressible layer kind yet); kept float")


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({', '.join(node.input)})"


def _consider(node, scope, found: _Found):
    """Add one layer (or a skip reason) for a Gemm/MatMul/Conv node."""
    skipped = found.skipped
    traced = [trace_constant(scope, n) if n else None for n in node.input]
    if node.op_type == "Conv":
        operand = 1 if len(traced) > 1 and traced[1] is not None else None
    else:
        constant = [k for k in (1, 0) if k < len(traced) and traced[k] is not None]
        if len(constant) == 2:
            skipped.setdefault(_label(node), f"{node.op_type} with two constant operands (fold it instead)")
            return
        operand = constant[0] if constant else None
    if operand is None:
        return  # activations only: nothing to compress here
    src, chain = traced[operand]
    name = src.name
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    conv = {}
    if node.op_type == "Conv":
        spatial = max(len(src.tensor.dims) - 2, 0)
        conv = {"groups": attrs.pop("group", 1), "stride": tuple(attrs.pop("strides", (1,) * spatial)),
                "dilation": tuple(attrs.pop("dilations", (1,) * spatial))}
    earlier_gathers = []
    if name in found.specs and found.specs[name].attrs["op_type"] == "Gather" and (
            _matmul_in_axis(node, operand, attrs, chain, found.specs[name].weight.ndim) != 1):
        # a table also summed along its rows by a MatMul/Gemm: that use decides the layout and the
        # Gathers read rows of the decoded weight (as any other consumer does)
        earlier_gathers = found.specs.pop(name).attrs["consumers"]
    if name in found.specs:
        spec = found.specs[name]
        if conv and conv["groups"] != spec.groups:
            del found.specs[name]
            skipped[name] = f"used by convolutions with different groups {sorted({spec.groups, conv['groups']})}"
            return
        spec.attrs["consumers"].append(_label(node))
        return
    if name in found.not_tables:  # a MatMul/Gemm/Conv use makes it a layer; that Gather reads the decoded weight
        found.not_tables.discard(name)
        del skipped[name]
    if name in skipped:
        return
    reason = _reject(node, src, found.definitions)
    if reason:
        skipped[name] = reason
        return
    weight = numpy_helper.to_array(src.tensor).astype(np.float32)
    bias = None
    bias_index = 2
    if len(traced) > bias_index and traced[bias_index] is not None:
        bias = numpy_helper.to_array(traced[bias_index][0].tensor).astype(np.float32)
    if node.op_type == "Conv":
        kind = "conv1d" if weight.ndim == 3 else "conv2d"
    elif node.op_type == "Gemm":
        kind = "linear"
        for key, default in (("transA", 0), ("transB", 0), ("alpha", 1.0), ("beta", 1.0)):
            attrs.setdefault(key, default)
    else:
        kind = "matmul"
    in_axis = _matmul_in_axis(node, operand, attrs, chain, weight.ndim)
    attrs.update({
        "op_type": node.op_type, "operand": operand, "chain": chain, "graph": src.graph,
        "source": src.kind, "dtype": int(src.tensor.data_type), "consumers": earlier_gathers + [_label(node)],
    })
    found.specs[name] = LayerSpec(name, kind, weight, bias, attrs, node.name, in_axis=in_axis, **conv)


def _matmul_in_axis(node, operand: int, attrs: dict, chain: list, ndim: int) -> int:
    """LayerSpec.in_axis of this Gemm/MatMul/Conv use of its constant operand."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        trans_a, trans_b = int(bool(attrs.get("transA", 0))), int(bool(attrs.get("transB", 0)))
        in_axis = trans_b if operand == 1 else 1 - trans_a
    else:
        in_axis = 0 if operand == 1 else 1
    if ndim == 2 and chain.count("Transpose") % 2:  # the op sees W.T (a 2-D Transpose swaps the axes)
        in_axis = 1 - in_axis
    return in_axis


def _consider_gather(node, scope, found: _Found):
    """Add an embedding table (or a skip reason) for Gather(data=2-D float constant, indices).

    Gathers of integer constants (shape arithmetic) and of activations are not layers."""
    if len(node.input) < 2 or not node.input[0]:
        return
    traced = trace_constant(scope, node.input[0])
    if traced is None:
        return
    src, chain = traced
    if src.tensor.data_type not in FLOAT_TYPES or len(src.tensor.dims) != 2:
        return
    name, skipped = src.name, found.skipped
    if name in skipped:
        return
    axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    not_table = True
    if axis not in (0, -2):
        reason = f"Gather along axis {axis} of a 2-D constant (only row gathers, axis 0, are embedding tables)"
    elif "Transpose" in chain:
        reason = "Gather of a transposed constant (the table's rows are its columns); left as is"
    else:
        reason, not_table = _reject(node, src, found.definitions), False
    if name in found.specs:  # already a MatMul/Gemm/Conv operand: this Gather reads the decoded weight
        spec = found.specs[name]
        if reason is None and spec.in_axis == 1 and spec.kind in ("linear", "matmul"):
            spec.kind = "embedding"  # a table tied with an output head (rows = vocabulary): row groups suit both
        spec.attrs["consumers"].append(_label(node))
        return
    if reason:
        skipped[name] = reason
        if not_table:
            found.not_tables.add(name)
        return
    weight = numpy_helper.to_array(src.tensor).astype(np.float32)
    attrs = {"op_type": "Gather", "operand": 0, "chain": chain, "graph": src.graph, "source": src.kind,
             "dtype": int(src.tensor.data_type), "consumers": [_label(node)]}
    found.specs[name] = LayerSpec(name, "embedding", weight, None, attrs, node.name, in_axis=1)


def _reject(node, src: ConstSource, definitions: dict[str, int]) -> str | None:
    """Why this constant cannot be taken, or None."""
    if src.kind == "initializer" and src.is_input:
        return "initializer is also a graph input (callers may override it); left as is"
    if definitions.get(src.name, 1) > 1:
        return (f"name {src.name!r} is defined {definitions[src.name]} times in the model (a subgraph shadows "
                "it or is shadowed by it); left as is")
    if src.tensor.data_type not in FLOAT_TYPES:
        return f"weight type {onnx.helper.tensor_dtype_to_np_dtype(src.tensor.data_type)} is not floating point"
    ndim = len(src.tensor.dims)
    if node.op_type == "Conv" and ndim not in (3, 4):
        return f"{max(ndim - 2, 0)}-D convolution (weight of {ndim} dims; only 1-D and 2-D convolutions are supported)"
    if node.op_type in ("Gemm", "MatMul") and ndim != 2:
        return f"{node.op_type} with a {ndim}-D constant operand (only 2-D weights are supported)"
    return None


