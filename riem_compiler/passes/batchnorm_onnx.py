"""BatchNorm folding for ONNX: Conv -> BatchNormalization becomes one Conv with folded W and B.

Same reason and the same exact arithmetic as the torch pass (passes/batchnorm.py):
W' = W * s, B' = (B - mean) * s + beta, s = scale / sqrt(var + epsilon). Folded only where exact:
a BatchNormalization in inference mode (one output) in the main graph, whose X is the output of a
Conv used by nothing else, whose scale/B/mean/var are initializers, and whose Conv reads W (and B)
straight from initializers no other node reads. The Conv then writes the BatchNormalization's output
name, the node and its now unused initializers go. Works on a copy of the ModelProto.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from riem_compiler.frontend.onnx_frontend import DEFAULT_DOMAINS, iter_graphs

log = logging.getLogger("riem_compiler.batchnorm")


def _uses(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> number of node inputs (all graphs) and graph outputs that read it."""
    count: dict[str, int] = {}
    for _, graph in iter_graphs(model.graph):
        for node in graph.node:
            for name in node.input:
                if name:
                    count[name] = count.get(name, 0) + 1
    for out in model.graph.output:
        count[out.name] = count.get(out.name, 0) + 1
    return count


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def fold_batchnorm_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """(folded copy, {"folded": [[conv, bn], ...], "kept": [[bn, reason], ...]}); the model itself
    when it has no BatchNormalization."""
    is_bn = lambda n: n.op_type == "BatchNormalization" and n.domain in DEFAULT_DOMAINS  # noqa: E731
    nested = [[_label(n), "inside a control-flow subgraph (only the main graph is folded)"]
              for path, g in iter_graphs(model.graph) if path for n in g.node if is_bn(n)]
    if not any(is_bn(n) for n in model.graph.node):
        return model, {"folded": [], "kept": nested}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    producer = {o: n for n in graph.node for o in n.output}
    uses = _uses(out)
    folded, kept, drop = [], list(nested), []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or bn.domain not in DEFAULT_DOMAINS:
            continue
        reason = _problem(bn, producer, inits, graph_inputs, uses)
        if reason:
            kept.append([_label(bn), reason])
            continue
        conv = producer[bn.input[0]]
        _fold(graph, conv, bn, inits, uses)
        conv.output[0] = bn.output[0]
        drop.append(bn)
        folded.append([_label(conv), _label(bn)])
    for bn in drop:
        graph.node.remove(bn)
    uses = _uses(out)
    unused = [t for t in graph.initializer if uses.get(t.name, 0) == 0 and t.name not in graph_inputs]
    for t in unused:
        graph.initializer.remove(t)
    if folded:
        log.info("folded %d BatchNormalization nodes into the preceding Conv", len(folded))
    for name, reason in kept:
        log.info("BatchNormalization %s kept: %s", name, reason)
    return out, {"folded": folded, "kept": kept}


def _problem(bn, producer, inits, graph_inputs, uses) -> str:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
    if attrs.get("training_mode", 0) or sum(1 for o in bn.output if o) != 1:
        return "training mode (more than one output)"
    if len(bn.input) < 5 or any(n not in inits or n in graph_inputs for n in bn.input[1:5]):
        return "scale, B, mean and var are not all initializers"
    conv = producer.get(bn.input[0])
    if conv is None or conv.op_type != "Conv" or conv.domain not in DEFAULT_DOMAINS:
        return "its input is not the output of a Conv"
    if uses.get(bn.input[0], 0) != 1:
        return "the Conv's output feeds more than this BatchNormalization"
    if len(conv.input) < 2 or conv.input[1] not in inits or conv.input[1] in graph_inputs or uses.get(conv.input[1]) != 1:
        return "the Conv's W is not an initializer that only this Conv reads"
    has_bias = len(conv.input) > 2 and conv.input[2]
    if has_bias and (conv.input[2] not in inits or conv.input[2] in graph_inputs or uses.get(conv.input[2]) != 1):
        return "the Conv's B is not an initializer that only this Conv reads"
    w = inits[conv.input[1]]
    if w.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return f"the Conv's W has data type {onnx.TensorProto.DataType.Name(w.data_type)}"
    channels = w.dims[0] if w.dims else -1
    if any(int(np.prod(inits[n].dims)) != channels for n in bn.input[1:5]):
        return f"statistics do not have the Conv's {channels} output channels"
    return ""


def _fold(graph, conv, bn, inits, uses) -> None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
    eps = float(attrs.get("epsilon", 1e-5))
    scale, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64).reshape(-1) for n in bn.input[1:5])
    s = scale / np.sqrt(var + eps)
    w_t = inits[conv.input[1]]
    w = numpy_helper.to_array(w_t)
    folded_w = (w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
    w_t.CopyFrom(numpy_helper.from_array(folded_w, w_t.name))
    if len(conv.input) > 2 and conv.input[2]:
        b_t = inits[conv.input[2]]
        b = numpy_helper.to_array(b_t).astype(np.float64)
    else:
        taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        name = _fresh_name(f"{w_t.name}_bn_bias", taken)
        b_t = graph.initializer.add()
        b_t.name = name
        inits[name] = b_t
        while len(conv.input) < 2:
            conv.input.append("")
        if len(conv.input) == 2:
            conv.input.append(name)
        else:
            conv.input[2] = name
        b = np.zeros(len(s))
    b_t.CopyFrom(numpy_helper.from_array(((b - mean) * s + beta).astype(w.dtype), b_t.name))


def _fresh_name(base: str, taken) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name
