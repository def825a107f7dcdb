"""onnx_format="ort": a compressed weight's consumers become onnxruntime `MatMulNBits` nodes.

The standard form (DequantizeLinear -> MatMul) relies on onnxruntime fusing the pair into
MatMulNBits when a session is created; its own fusions can get there first (Gemm + Relu becomes a
FusedGemm, and then the weight is dequantised on every call), and 2-bit codes have no standard
ONNX type at all. Writing MatMulNBits into the file leaves nothing to the optimiser.

A weight takes this form when every use of it in the graph that defines it is one of
- MatMul(x, W)                                        W used as (in, out);
- Gemm(x, W, bias?) with transA=0, alpha=1, beta=1    (in, out) for transB=0, (out, in) for 1,
  bias absent or a 1-D initializer;
- Transpose(W, perm=[1, 0]) whose every user is MatMul(x, W.T)    (out, in) (torch's export of
  Linear for inputs of rank > 2);
and no subgraph reads it, it is no graph output, and the method has a MatMulNBits layout for that
use (`Method.onnx_matmul`). Each such MatMul/Gemm is replaced in place (same node name and
output); Transposes are dropped. The metadata entry keeps every replaced node, serialised, so
`materialize_onnx` puts the original graph back with the decoded weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import helper

from riem_compiler.frontend.onnx_frontend import DEFAULT_DOMAINS, subgraphs

MS_DOMAIN = "com.microsoft"


@dataclass
class MatMulPlan:
    """The uses of one weight that become MatMulNBits: (index in graph.node, consumer node,
    bias name or "") in graph order, the Transposes to drop as (index, node), and whether W is
    used as (in, out). Nodes are named by index: protobuf hands out a new wrapper per access."""

    in_out: bool
    consumers: list = field(default_factory=list)
    transposes: list = field(default_factory=list)


def captured_names(graph: onnx.GraphProto) -> set:
    """Names read inside the subgraphs of `graph`'s nodes (outer-scope captures included)."""
    names = set()
    for node in graph.node:
        for _, sub in subgraphs(node):
            for _, g in _walk(sub):
                for n in g.node:
                    names.update(n.input)
    return names


def _walk(graph):
    yield None, graph
    for node in graph.node:
        for _, sub in subgraphs(node):
            yield from _walk(sub)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def plan_uses(graph: onnx.GraphProto, name: str, captured: set, inits: dict) -> MatMulPlan | str:
    """The MatMulNBits plan for weight `name` defined in `graph`, or why it cannot have one.
    inits: this graph's initializers by name (a Gemm bias must be a 1-D one)."""
    if name in captured:
        return "read inside a subgraph"
    if name in {o.name for o in graph.output}:
        return "a graph output"
    nodes = list(graph.node)
    users = [(i, n) for i, n in enumerate(nodes) if name in n.input]
    if not users:
        return "no consumer in its graph"
    consumers, transposes, layouts = [], [], set()
    for index, node in users:
        ours = node.domain in DEFAULT_DOMAINS
        a = _attrs(node)
        if ours and node.op_type == "MatMul" and list(node.input) == [node.input[0], name] and node.input[0] != name:
            consumers.append((index, node, ""))
            layouts.add(True)
        elif ours and node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] == name \
                and node.input[0] != name and a.get("transA", 0) == 0 \
                and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0:
            bias = node.input[2] if len(node.input) > 2 else ""
            if bias and (bias not in inits or len(inits[bias].dims) != 1):
                return f"Gemm {node.name!r} has a bias that is not a 1-D initializer"
            consumers.append((index, node, bias))
            layouts.add(not a.get("transB", 0))
        elif ours and node.op_type == "Transpose" and list(a.get("perm", [1, 0])) == [1, 0] \
                and list(node.input) == [name]:
            out = node.output[0]
            if out in captured or out in {o.name for o in graph.output}:
                return f"the output of Transpose {node.name!r} is read by a subgraph or is a graph output"
            later = [(i, n) for i, n in enumerate(nodes) if out in n.input]
            if not later or not all(n.domain in DEFAULT_DOMAINS and n.op_type == "MatMul"
                                    and list(n.input) == [n.input[0], out] and n.input[0] != out for _, n in later):
                return f"the output of Transpose {node.name!r} is not only the right operand of MatMuls"
            consumers += [(i, n, "") for i, n in later]
            transposes.append((index, node))
            layouts.add(False)
        else:
            return f"consumer {node.op_type} {node.name!r} is not a MatMul / Gemm(transA=0, alpha=beta=1)"
    if len(layouts) > 1:
        return "used both as (in, out) and as (out, in)"
    consumers.sort(key=lambda c: c[0])
    return MatMulPlan(layouts.pop(), consumers, transposes)


def replacement(node: onnx.NodeProto, bias: str, b_name: str, scales_name: str, form,
                zero_points_name: str = "") -> onnx.NodeProto:
    """The MatMulNBits node that takes `node`'s place (same name and output); zero_points_name:
    the zero points (of the scales' type) when the form has them."""
    if ("zero_points" in form.tensors) != bool(zero_points_name):
        raise ValueError("a MatMulNBits form with zero points needs their input name, and only then")
    inputs = [node.input[0], b_name, scales_name]
    if zero_points_name or bias:
        inputs.append(zero_points_name)
    if bias:
        inputs += ["", bias]
    return helper.make_node("MatMulNBits", inputs, [node.output[0]], name=node.name, domain=MS_DOMAIN, **form.attrs)


def serialise(nodes) -> list[str]:
    """Nodes as hex strings for the JSON metadata (protobuf bytes: parsing runs no code)."""
    return [n.SerializeToString().hex() for n in nodes]


def deserialise(items) -> list[onnx.NodeProto]:
    from riem_compiler.errors import InputError

    nodes = []
    for item in items:
        node = onnx.NodeProto()
        try:
            node.ParseFromString(bytes.fromhex(item))
        except (ValueError, TypeError, Exception) as e:  # DecodeError
            raise InputError(f"the {MS_DOMAIN} MatMulNBits metadata holds an unreadable node ({type(e).__name__}); "
                             "the file is damaged: write it again") from None
        nodes.append(node)
    return nodes
