"""ONNX frontend: load a model (file or ModelProto) and find the weights worth compressing.

A layer is a Gemm, a MatMul with one constant operand, or a 1-D/2-D Conv whose weight is a
constant: an initializer or a Constant node, possibly reached through Identity, Cast and
Transpose nodes (what real exporters put between a parameter and its consumer). Nodes inside
control-flow subgraphs (If/Loop/Scan bodies) are searched too; a body may use a constant of an
enclosing graph.

The weight is keyed by the name of its initializer/Constant output. The rewrite replaces that
one tensor by a decoder node, so every consumer and every Identity/Cast/Transpose in between
stays exactly as it was. Whatever is seen but not taken is returned with a reason.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

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
    file, missing external data, failed checker, opset older than 11 or newer than onnx knows.
    """
    if isinstance(path_or_model, onnx.ModelProto):
        model, where = path_or_model, "ONNX model"
    elif isinstance(path_or_model, (str, os.PathLike)):
        path = Path(path_or_model)
        where = str(path)
        if not path.is_file():
            raise InputError(f"{where}: no such file; pass the path of an existing .onnx file")
        model = _read_file(path)
    else:
        raise InputError(f"expected an onnx.ModelProto or a path to a .onnx file, got {type(path_or_model).__name__}")
    _check_external_data_loaded(model, where)
    _check_opset(model, where)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InputError(f"{where}: not a valid ONNX model: {_first_line(e)}") from None
    return model


def _read_file(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise InputError(f"{path}: cannot parse ONNX protobuf ({_first_line(e) or type(e).__name__}); "
                         "the file is truncated or not an ONNX model") from None
    if len(model.graph.node) == 0 and len(model.graph.output) == 0:
        raise InputError(f"{path}: parsed as an empty ONNX model (no nodes, no outputs); the file is "
                         "truncated or not an ONNX model")
    for tensor in _external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        data = path.parent / info.get("location", "")
        if not data.is_file():
            raise InputError(f"{path}: external data file {info.get('location')!r} of tensor "
                             f"{tensor.name!r} not found next to the model (looked for {data})")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise InputError(f"{path}: cannot read external data ({_first_line(e)})") from None
    return model


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
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(a.g, f"{path}/{i}:{a.name}")
            elif a.type == onnx.AttributeProto.GRAPHS:
                for j, g in enumerate(a.graphs):
                    yield from iter_graphs(g, f"{path}/{i}:{a.name}.{j}")


@dataclass
class ConstSource:
    """Where a constant tensor lives: an initializer or a Constant node output in graph `graph`."""

    name: str
    graph: str
    kind: str  # "initializer" or "constant"
    tensor: onnx.TensorProto = field(repr=False)


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
    for t in graph.initializer:
        consts[t.name] = ConstSource(t.name, path, "initializer", t)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.output) == 1:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                consts[node.output[0]] = ConstSource(node.output[0], path, "constant", value)
                continue
        for out in node.output:
            if out:
                producers[out] = node
    return _Scope(consts, producers, {i.name for i in graph.input}, parent)


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
    found: dict[str, LayerSpec] = {}
    skipped: dict[str, str] = {}
    overridable = {i.name for i in model.graph.input}
    _walk(model.graph, "", None, found, skipped, overridable)
    kept, scope_skipped = apply_scope(list(found.values()), config)
    scope_skipped = [(spec, why) for spec, why in scope_skipped if spec.name not in skipped]
    log.info("ONNX: %d compressible weights, %d skipped", len(kept), len(skipped) + len(scope_skipped))
    return kept, sorted(skipped.items()) + scope_skipped


def _walk(graph, path, parent, found, skipped, overridable):
    scope = _scope_for(graph, path, parent)
    for i, node in enumerate(graph.node):
        if node.domain in DEFAULT_DOMAINS and node.op_type in ("Gemm", "MatMul", "Conv"):
            _consider(node, scope, path, found, skipped, overridable)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _walk(a.g, f"{path}/{i}:{a.name}", scope, found, skipped, overridable)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for j, g in enumerate(a.graphs):
                    _walk(g, f"{path}/{i}:{a.name}.{j}", scope, found, skipped, overridable)


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({', '.join(node.input)})"


def _consider(node, scope, path, found, skipped, overridable):
    """Add one layer (or a skip reason) for a Gemm/MatMul/Conv node."""
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
    if name in found:
        found[name].attrs["consumers"].append(_label(node))
        return
    if name in skipped:
        return
    reason = _reject(node, src, operand, overridable)
    if reason:
        skipped[name] = reason
        return
    weight = numpy_helper.to_array(src.tensor).astype(np.float32)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    bias = None
    bias_index = 2
    if len(traced) > bias_index and traced[bias_index] is not None:
        bias = numpy_helper.to_array(traced[bias_index][0].tensor).astype(np.float32)
    if node.op_type == "Conv":
        kind = "conv1d" if weight.ndim == 3 else "conv2d"
        attrs.setdefault("group", 1)
    elif node.op_type == "Gemm":
        kind = "linear"
        for key, default in (("transA", 0), ("transB", 0), ("alpha", 1.0), ("beta", 1.0)):
            attrs.setdefault(key, default)
    else:
        kind = "matmul"
    attrs.update({
        "op_type": node.op_type, "operand": operand, "chain": chain, "graph": src.graph,
        "source": src.kind, "dtype": int(src.tensor.data_type), "consumers": [_label(node)],
    })
    found[name] = LayerSpec(name, kind, weight, bias, attrs, node.name)


def _reject(node, src: ConstSource, operand: int, overridable: set[str]) -> str | None:
    """Why this constant cannot be taken, or None."""
    if src.kind == "initializer" and src.graph == "" and src.name in overridable:
        return "initializer is also a graph input (callers may override it); left as is"
    if src.tensor.data_type not in FLOAT_TYPES:
        return f"weight type {onnx.helper.tensor_dtype_to_np_dtype(src.tensor.data_type)} is not floating point"
    ndim = len(src.tensor.dims)
    if node.op_type == "Conv" and ndim not in (3, 4):
        return f"{max(ndim - 2, 0)}-D convolution (weight of {ndim} dims; only 1-D and 2-D convolutions are supported)"
    if node.op_type in ("Gemm", "MatMul") and ndim != 2:
        return f"{node.op_type} with a {ndim}-D constant operand (only 2-D weights are supported)"
    return None


