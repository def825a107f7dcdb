"""PyTorch frontend: find compressible weights in nn.Module / fx.GraphModule / ExportedProgram.

Two ways a weight is used:
- module layers: nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding (the pass swaps the module);
- functional uses in a graph: F.linear / conv / matmul / mm / addmm / embedding (torch or aten
  ops) whose weight is a get_attr of a parameter, possibly through a transpose (not for an
  embedding table: its rows are what is gathered) (the pass swaps the get_attr).
An embedding with max_norm renormalises the rows it reads in place, so it is left as is.
An ExportedProgram is unlifted with `.module()` first, so its parameters are get_attr nodes.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from riem_compiler.errors import InputError
from riem_compiler.frontend.layers import LayerSpec, apply_scope

log = logging.getLogger("riem_compiler.frontend")

MODULE_KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}
MAX_NORM_SKIP = "embedding with max_norm (it renormalises its weight in place); left as is"

_aten = torch.ops.aten
# function -> (kind, index of the weight argument)
FUNCTIONAL_WEIGHT_ARG = {
    F.linear: ("linear", 1),
    torch.matmul: ("matmul", 1),
    operator.matmul: ("matmul", 1),
    torch.mm: ("matmul", 1),
    torch.addmm: ("matmul", 2),
    F.conv1d: ("conv1d", 1),
    F.conv2d: ("conv2d", 1),
    _aten.linear.default: ("linear", 1),
    _aten.matmul.default: ("matmul", 1),
    _aten.mm.default: ("matmul", 1),
    _aten.addmm.default: ("matmul", 2),
    _aten.conv1d.default: ("conv1d", 1),
    _aten.conv2d.default: ("conv2d", 1),
    _aten.conv1d.padding: ("conv1d", 1),
    _aten.conv2d.padding: ("conv2d", 1),
    _aten.convolution.default: ("conv", 1),
    F.embedding: ("embedding", 1),
    _aten.embedding.default: ("embedding", 0),
}
# ops that only re-view a weight on its way to a matmul
TRANSPOSE_OPS = {torch.t, torch.transpose, _aten.t.default, _aten.transpose.int, _aten.permute.default}
TRANSPOSE_METHODS = {"t", "transpose", "permute"}


@dataclass
class Detection:
    """What the frontend found: layers to compress and (name, reason) for those it will not."""

    layers: list[LayerSpec] = field(default_factory=list)
    skipped: list[tuple[LayerSpec | str, str]] = field(default_factory=list)
    graph_module: torch.fx.GraphModule | None = None  # set when functional weights need graph surgery


def as_module(graph) -> nn.Module:
    """Turn any accepted torch input into an nn.Module the pass can edit."""
    if isinstance(graph, torch.export.ExportedProgram):
        return graph.module()
    if isinstance(graph, nn.Module):
        return graph
    raise InputError(
        f"expected an nn.Module, torch.fx.GraphModule, torch.export.ExportedProgram, onnx.ModelProto or a "
        f"path to a .onnx file; got {type(graph).__name__}"
    )


def find_torch_layers(model: nn.Module, config) -> Detection:
    """Detect compressible weights. A plain nn.Module is also traced (when fx can) to find
    functional uses of its parameters; then `graph_module` is the traced module to rewrite."""
    det = Detection()
    params = dict(model.named_parameters())
    owned = set()
    if not isinstance(model, torch.fx.GraphModule):
        for mod_name, mod in model.named_modules():
            kind = MODULE_KINDS.get(type(mod))
            if kind is None:
                continue
            _add_module(det, mod_name, mod, kind)
            owned.add(_join(mod_name, "weight"))
        leftovers = [n for n, p in params.items() if p.dim() >= 2 and n not in owned]
        if leftovers:
            try:
                traced = torch.fx.symbolic_trace(model)
            except Exception as exc:  # fx cannot trace every model; module layers still work
                det.skipped += [(n, f"used outside Linear/Conv and fx could not trace the model ({type(exc).__name__})")
                                for n in leftovers]
            else:
                graph_layers, graph_skipped = _graph_layers(traced, set(leftovers))
                if graph_layers:
                    det.graph_module = traced
                det.layers += graph_layers
                det.skipped += graph_skipped
    else:
        for node in model.graph.nodes:
            if node.op == "call_module":
                mod = model.get_submodule(node.target)
                kind = MODULE_KINDS.get(type(mod))
                if kind is not None:
                    _add_module(det, node.target, mod, kind)
                    owned.add(_join(node.target, "weight"))
        graph_layers, graph_skipped = _graph_layers(model, {n for n in params if n not in owned})
        if graph_layers:
            det.graph_module = model
        det.layers += graph_layers
        det.skipped += graph_skipped
    accounted = owned | {s.name for s in det.layers} | {n.name if isinstance(n, LayerSpec) else n for n, _ in det.skipped}
    det.skipped += [(n, kept_reason(model, n)) for n, p in params.items() if p.dim() >= 2 and n not in accounted]
    det.layers, filtered = apply_scope(det.layers, config)
    det.skipped += filtered
    return det


def kept_reason(model: nn.Module, param_name: str) -> str:
    """Why a weight matrix that no compressible layer uses stays float, named by its module."""
    path = param_name.split(".")[:-1]
    owner = model.get_submodule(".".join(path))
    ancestors = [model.get_submodule(".".join(path[:i])) for i in range(len(path))]
    if any(isinstance(m, nn.MultiheadAttention) for m in [*ancestors, owner]):  # out_proj is a Linear inside it
        return ("nn.MultiheadAttention weight (its fused attention reads the projection weights directly, "
                "not through a Linear call); kept float")
    if isinstance(owner, nn.RNNBase):
        return f"{type(owner).__name__} weight (the fused recurrent kernel reads its raw weights); kept float"
    if isinstance(owner, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return f"{type(owner).__name__} weight (transposed convolutions are not a compressible layer kind yet); kept float"
    if isinstance(owner, nn.Conv3d):
        return "Conv3d weight (3-D convolutions are not a compressible layer kind yet); kept float"
    return f"used by {type(owner).__name__}.forward, which the pass does not rewrite; kept float"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _add_module(det: Detection, mod_name: str, mod: nn.Module, kind: str) -> None:
    """A module layer's spec, or (for an embedding with max_norm) its skip reason."""
    if kind == "embedding" and mod.max_norm is not None:
        det.skipped.append((_join(mod_name, "weight"), MAX_NORM_SKIP))
        return
    det.layers.append(_module_spec(mod_name, mod, kind))


def _module_spec(mod_name: str, mod: nn.Module, kind: str) -> LayerSpec:
    attrs, conv = {}, {}
    if kind.startswith("conv"):
        attrs = {"padding": mod.padding if isinstance(mod.padding, str) else list(mod.padding),
                 "padding_mode": mod.padding_mode}
        conv = {"groups": mod.groups, "stride": tuple(mod.stride), "dilation": tuple(mod.dilation)}
    elif kind == "embedding":
        attrs = {"padding_idx": mod.padding_idx}
    bias = getattr(mod, "bias", None)
    bias = None if bias is None else bias.detach().cpu().float().numpy()
    return LayerSpec(name=_join(mod_name, "weight"), kind=kind, weight=_numpy(mod.weight), bias=bias,
                     attrs=attrs, module=mod_name, **conv)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """The weight as float32 numpy: a float32 CPU weight as a read-only view of the model's own
    tensor (a copy held every weight of the model once more for the whole run; nothing writes a
    spec's weight), any other one converted (a copy of its own)."""
    t = t.detach()
    if t.dtype != torch.float32 or t.device.type != "cpu":
        return t.cpu().float().numpy()
    view = t.numpy()
    view.flags.writeable = False
    return view


def _weight_source(node) -> str | None:
    """Follow transposes back to a get_attr; return its target."""
    while isinstance(node, torch.fx.Node):
        if node.op == "get_attr":
            return node.target
        transposing = (node.op == "call_function" and node.target in TRANSPOSE_OPS) or (
            node.op == "call_method" and node.target in TRANSPOSE_METHODS)
        if not transposing:
            return None
        node = node.args[0]
    return None


def _graph_layers(gm: torch.fx.GraphModule, candidates: set[str]):
    """Functional weight uses in a graph; a parameter qualifies only if every use is a weight use."""
    uses: dict[str, list[str | None]] = {}
    convs: dict[str, list[dict | None]] = {}  # conv attributes of each convolution use
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in candidates:
            continue
        uses.setdefault(node.target, [])
        for user in _through_transposes(node):
            kind = None
            entry = FUNCTIONAL_WEIGHT_ARG.get(user.target) if user.op == "call_function" else None
            if entry is not None:
                kind, idx = entry
                arg = user.args[idx] if len(user.args) > idx else user.kwargs.get("weight")
                if _weight_source(arg) != node.target:
                    kind = None
                elif kind == "embedding":
                    kind = kind if arg is node and _embedding_max_norm(user) is None else None
                elif kind.startswith("conv"):
                    convs.setdefault(node.target, []).append(_conv_call_attrs(user))
            uses[node.target].append(kind)
    layers, skipped = [], []
    for name, kinds in uses.items():
        param = gm.get_parameter(name) if _is_parameter(gm, name) else None
        if param is None or param.dim() < 2 or not param.is_floating_point():
            continue
        if not kinds or any(k is None for k in kinds):
            skipped.append((name, "parameter is used by an op the pass does not compress"))
            continue
        kind = "embedding" if "embedding" in kinds else kinds[0]  # a tied table: rows are gathered
        if kind == "conv":
            kind = {3: "conv1d", 4: "conv2d"}.get(param.dim())
            if kind is None:
                skipped.append((name, f"convolution with a {param.dim()}-D weight is not supported"))
                continue
        conv = {}
        if name in convs:
            found = convs[name]
            if any(c is None for c in found):
                skipped.append((name, "convolution whose groups/stride/dilation are not constants"))
                continue
            if len({c["groups"] for c in found}) > 1:
                skipped.append((name, f"used by convolutions with different groups {sorted({c['groups'] for c in found})}"))
                continue
            spatial = param.dim() - 2
            conv = {k: (v if k == "groups" else _per_dim(v, spatial)) for k, v in found[0].items()}
        layers.append(LayerSpec(name=name, kind=kind, weight=_numpy(param), attrs={"functional": True}, **conv))
    return layers, skipped


# positions of stride, dilation, groups in F.conv*/aten.conv*(input, weight, bias, stride, padding,
# dilation, groups) and aten.convolution(input, weight, bias, stride, padding, dilation, transposed,
# output_padding, groups)
_CONV_ARG_POS = {"stride": 3, "dilation": 5, "groups": 6}
_CONVOLUTION_ARG_POS = {"stride": 3, "dilation": 5, "groups": 8}


def _conv_call_attrs(user) -> dict | None:
    """groups/stride/dilation of a functional convolution call; None when one is not a constant."""
    positions = _CONVOLUTION_ARG_POS if user.target is _aten.convolution.default else _CONV_ARG_POS
    out = {}
    for key, pos in positions.items():
        value = user.args[pos] if len(user.args) > pos else user.kwargs.get(key, 1)
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            value = tuple(value)
        elif not isinstance(value, int) or isinstance(value, bool):
            return None
        out[key] = value
    return out if isinstance(out["groups"], int) else None


def _embedding_max_norm(user):
    """F.embedding's max_norm argument (position 3); aten.embedding has none."""
    if user.target is not F.embedding:
        return None
    return user.args[3] if len(user.args) > 3 else user.kwargs.get("max_norm")


def _per_dim(value, spatial: int) -> tuple[int, ...]:
    """One int per spatial dimension (torch accepts an int or a 1-tuple for all of them)."""
    if isinstance(value, int):
        return (value,) * spatial
    return tuple(value) * spatial if len(value) == 1 else tuple(value)


def _is_parameter(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False


def _through_transposes(node):
    for user in node.users:
        transposing = (user.op == "call_function" and user.target in TRANSPOSE_OPS) or (
            user.op == "call_method" and user.target in TRANSPOSE_METHODS)
        if transposing:
            yield from _through_transposes(user)
        else:
            yield user


