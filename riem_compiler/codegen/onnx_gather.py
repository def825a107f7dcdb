"""Embedding tables in ONNX: finding the weights only read by row Gathers, and (onnx_format="ort")
their onnxruntime `GatherBlockQuantized` nodes.

A weight is a table when every use of it in the graph that defines it is Gather(W, indices)
along axis 0 (rows), no subgraph reads it and it is no graph output. For the standard form that
only picks the row-major DequantizeLinear layout (`Method.onnx_native(..., table=True)`); for
"ort" each Gather is replaced in place (same node name and output) by GatherBlockQuantized on the
method's `NativeGather` arrays, which dequantises only the gathered rows. The metadata entry keeps
the replaced Gathers, serialised, so `materialize_onnx` puts them back with the decoded table.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import helper

from riem_compiler.codegen.onnx_matmulnbits import MS_DOMAIN
from riem_compiler.frontend.onnx_frontend import DEFAULT_DOMAINS

OP_TYPE = "GatherBlockQuantized"


@dataclass
class GatherPlan:
    """The Gathers of one table, as (index in graph.node, node) in graph order."""

    consumers: list = field(default_factory=list)


def plan_gathers(graph: onnx.GraphProto, name: str, captured: set) -> GatherPlan | str:
    """The Gathers of weight `name` defined in `graph`, or why it is not only a row-gathered table."""
    if name in captured:
        return "read inside a subgraph"
    if name in {o.name for o in graph.output}:
        return "a graph output"
    users = [(i, n) for i, n in enumerate(graph.node) if name in n.input]
    if not users:
        return "no consumer in its graph"
    for _, node in users:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if not (node.domain in DEFAULT_DOMAINS and node.op_type == "Gather" and len(node.input) == 2
                and node.input[0] == name and node.input[1] != name and axis in (0, -2)):
            return f"consumer {node.op_type} {node.name!r} is not a Gather of its rows"
    return GatherPlan(users)


def replacement(node: onnx.NodeProto, data_name: str, scales_name: str, form) -> onnx.NodeProto:
    """The GatherBlockQuantized node that takes `node`'s place (same name and output)."""
    if "zero_points" in form.tensors:
        raise NotImplementedError("GatherBlockQuantized zero points are not written yet")
    return helper.make_node(OP_TYPE, [data_name, node.input[1], scales_name], [node.output[0]], name=node.name,
                            domain=MS_DOMAIN, **form.attrs)
