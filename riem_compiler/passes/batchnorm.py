"""BatchNorm folding for PyTorch models: Conv/Linear -> BatchNorm pairs become one layer with a bias.

Why: a vision CNN's BatchNorm scales vary over orders of magnitude per channel, so the error of a
conv weight measured before folding says little about the error of what the network computes.
Folding first makes every weight error the pass sees (fitting, `auto`'s choice) the one that counts.

Folding is exact where it is done: W' = W * s, b' = (b - mean) * s + beta with
s = gamma / sqrt(var + eps). It is done only where that holds: the BatchNorm is a module in eval
mode with running statistics, it is called once, and its input is the output of a Conv1d/Conv2d
(or a Linear, when the example inputs show a 2-D output) that is called once and feeds nothing
else. Pairs are found on an fx trace; the fold is applied to a deep copy of the model (the conv
gets the folded weight and a bias, the BatchNorm becomes nn.Identity), so the copy keeps the
user's module class and parameter names. Every BatchNorm not folded is listed with a reason.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger("riem_compiler.batchnorm")

# layer type -> the BatchNorm type whose channel axis is its output channel axis
PAIRS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d}
_FUNCTIONAL_BN = ("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                  "native_batch_norm", "cudnn_batch_norm")


@dataclass
class FoldOutcome:
    """What folding did. `stats`: layer module -> (mean, std) per output channel of the folded
    layer, i.e. the BatchNorm's output distribution N(beta, (gamma * sqrt(var / (var + eps)))^2)
    that DFQ's bias correction and dead-channel handling start from."""

    folded: list[tuple[str, str]] = field(default_factory=list)  # (layer module, BatchNorm module)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (BatchNorm module or node, reason)
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"folded": [list(p) for p in self.folded], "kept": [list(k) for k in self.kept]}


class _Tracer(torch.fx.Tracer):
    """fx's tracer, with the preprocessing's own modules (`fx_leaf = True`, e.g. dfq.ChannelClip) kept
    as module calls: the graph walks know them by their module, and their forward is not traceable."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return getattr(m, "fx_leaf", False) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """The fx graph of `model` (a GraphModule is its own); raises what fx raises."""
    if isinstance(model, torch.fx.GraphModule):
        return model
    return torch.fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)


def module_calls(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Module name -> number of call_module nodes that call it."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def has_batchnorm(model: nn.Module) -> bool:
    """Any BatchNorm module, or (in a GraphModule) any functional batch_norm node."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return True
    return isinstance(model, torch.fx.GraphModule) and any(
        n.op == "call_function" and getattr(n.target, "__name__", "").split(".")[0] in _FUNCTIONAL_BN
        for n in model.graph.nodes)


def fold_batchnorm(model: nn.Module, example_inputs: tuple | None = None) -> tuple[nn.Module, FoldOutcome]:
    """A copy of `model` with every exactly foldable Layer -> BatchNorm pair folded; the input is
    never modified. Returns (copy, outcome); with nothing to fold the copy is still a copy."""
    out = copy.deepcopy(model)
    outcome = FoldOutcome()
    bns = [n for n, m in out.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        gm = trace(out)
    except Exception as exc:  # fx cannot trace every model
        outcome.kept = [(n, f"fx could not trace the model ({type(exc).__name__}); BatchNorm kept") for n in bns]
        _log(outcome)
        return out, outcome
    calls = module_calls(gm)
    linear_dims = _linear_output_dims(out, example_inputs)
    pairs = []
    graph_folds = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in _FUNCTIONAL_BN:
            conv, reason = _functional_problem(gm, node)
            if reason:
                outcome.kept.append((node.name, reason))
            else:
                graph_folds.append((conv, node))
            continue
        if node.op != "call_module" or node.target not in bns:
            continue
        layer_name, reason = _pair_problem(gm, node, out, calls, linear_dims)
        if reason:
            outcome.kept.append((node.target, reason))
        else:
            pairs.append((layer_name, node.target))
    outcome.kept += [(n, "not called in the traced graph") for n in bns
                     if n not in calls and all(n != k for k, _ in outcome.kept)]
    for layer_name, bn_name in pairs:
        layer, bn = out.get_submodule(layer_name), out.get_submodule(bn_name)
        outcome.stats[layer_name] = _fold_into(layer, bn)
        set_submodule(out, bn_name, nn.Identity())
        outcome.folded.append((layer_name, bn_name))
    for conv, node in graph_folds:  # only in a GraphModule: `out` is then `gm`
        _fold_graph_node(gm, conv, node)  # no stats: the DFQ passes work on module layers
        outcome.folded.append((conv.name, node.name))
    if isinstance(out, torch.fx.GraphModule):
        out.graph.lint()
        out.recompile()
    _log(outcome)
    return out, outcome


def _log(outcome: FoldOutcome) -> None:
    if outcome.folded:
        log.info("folded %d BatchNorm layers into the preceding conv/linear", len(outcome.folded))
    for name, reason in outcome.kept:
        log.info("BatchNorm %s kept: %s", name, reason)


def _pair_problem(gm, node, model: nn.Module, calls: dict[str, int], linear_dims: dict[str, int]):
    """(layer module name, "") when the BatchNorm at `node` folds exactly, else ("", reason)."""
    bn = model.get_submodule(node.target)
    if type(bn) not in (nn.BatchNorm1d, nn.BatchNorm2d):
        return "", f"{type(bn).__name__} is not folded (only BatchNorm1d/2d)"
    if calls.get(node.target, 0) != 1:
        return "", f"the BatchNorm module is called {calls.get(node.target, 0)} times"
    if bn.training:
        return "", "in training mode (it normalises with batch statistics); call model.eval() to fold it"
    if bn.running_mean is None or bn.running_var is None:
        return "", "no running statistics (track_running_stats=False)"
    src = node.args[0] if node.args else None
    if not isinstance(src, torch.fx.Node) or src.op != "call_module":
        return "", "its input is not the output of a Conv/Linear module"
    layer = model.get_submodule(src.target)
    if type(layer) not in PAIRS:
        return "", f"its input comes from {type(layer).__name__}, not a Conv1d/Conv2d/Linear"
    if PAIRS[type(layer)] is not type(bn):
        return "", f"{type(layer).__name__} -> {type(bn).__name__} channel axes do not match"
    if calls.get(src.target, 0) != 1 or len(src.users) != 1:
        return "", f"{src.target} is called more than once or its output feeds more than this BatchNorm"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != bn.num_features:
        return "", f"{src.target} has {channels} output channels, the BatchNorm {bn.num_features}"
    if isinstance(layer, nn.Linear) and linear_dims.get(src.target) != 2:
        return "", ("Linear -> BatchNorm1d is folded only when the example inputs show a 2-D Linear output "
                    "(then both act on the same axis)")
    if not layer.weight.is_floating_point():
        return "", f"{src.target} weight is not floating point"
    return src.target, ""


def _linear_output_dims(model: nn.Module, example_inputs) -> dict[str, int]:
    """Linear module -> ndim of its output on the example inputs (when they are given and the
    model is in eval mode, so running it changes no statistics)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or example_inputs is None or any(m.training for m in model.modules()):
        return {}
    dims: dict[str, int] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: dims.__setitem__(n, o.dim()))
             for n in linears]
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception:  # the example inputs are checked elsewhere; here they only decide Linear folds
        return {}
    finally:
        for h in hooks:
            h.remove()
    return dims


# ----------------------------------------------------------------------------- functional (torch.export graphs)

_aten = torch.ops.aten
GRAPH_CONVS = (_aten.conv1d.default, _aten.conv2d.default)


def _attr(gm, node):
    """The tensor a get_attr node reads, or None (an argument that is None stays None)."""
    if node is None:
        return None
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        raise ValueError("not a get_attr")
    return _get_attr(gm, node.target)


def _get_attr(gm, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _sole_reader(gm, node) -> bool:
    """`node` is a get_attr whose tensor no other node reads."""
    return (isinstance(node, torch.fx.Node) and node.op == "get_attr" and len(node.users) == 1
            and sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == node.target) == 1)


def _functional_problem(gm, node):
    """(conv node, "") when aten.batch_norm at `node` folds exactly into its input conv, else (None, reason)."""
    if node.target is not _aten.batch_norm.default:
        return None, f"functional {node.target} is not folded (only aten.batch_norm from torch.export graphs)"
    args = list(node.args) + [None] * 9
    inp, weight, bias, mean, var, training = args[:6]
    if training:
        return None, "batch_norm in training mode (batch statistics)"
    try:
        if _attr(gm, mean) is None or _attr(gm, var) is None:
            return None, "batch_norm without running statistics"
        _attr(gm, weight), _attr(gm, bias)
    except ValueError:
        return None, "batch_norm parameters are not constants of the graph"
    if not isinstance(inp, torch.fx.Node) or inp.op != "call_function" or inp.target not in GRAPH_CONVS:
        return None, "its input is not the output of an aten conv1d/conv2d"
    if len(inp.users) != 1:
        return None, f"{inp.name}'s output feeds more than this batch_norm"
    conv_args = list(inp.args) + [None] * 3
    if not _sole_reader(gm, conv_args[1]) or not isinstance(_attr(gm, conv_args[1]), nn.Parameter):
        return None, f"{inp.name}'s weight is not a parameter only it reads"
    if conv_args[2] is not None and not _sole_reader(gm, conv_args[2]):
        return None, f"{inp.name}'s bias is not a parameter only it reads"
    return inp, ""


def _fold_graph_node(gm, conv, node) -> tuple[np.ndarray, np.ndarray]:
    """Fold aten.batch_norm `node` into aten conv `conv` of `gm`, in place (gm is the pass's copy)."""
    args = list(node.args) + [None] * 9
    weight, bias, mean, var, eps = (_attr(gm, args[1]), _attr(gm, args[2]), _attr(gm, args[3]),
                                    _attr(gm, args[4]), float(args[7] if args[7] is not None else 1e-5))
    bn = nn.BatchNorm1d(mean.numel(), eps=eps, affine=weight is not None)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if weight is not None:
            bn.weight.copy_(weight)
            bn.bias.copy_(bias if bias is not None else torch.zeros_like(weight))
    conv_args = list(conv.args)
    w_node = conv_args[1]
    holder = _ConvView(_get_attr(gm, w_node.target),
                       _get_attr(gm, conv_args[2].target) if len(conv_args) > 2 and conv_args[2] is not None else None)
    stats = _fold_into(holder, bn.eval())
    if len(conv_args) < 3 or conv_args[2] is None:
        target = graph_bias_name(gm, w_node.target)
        owner, _, attr = target.rpartition(".")
        (gm.get_submodule(owner) if owner else gm).register_parameter(attr, holder.bias)
        with gm.graph.inserting_before(conv):
            b_node = gm.graph.get_attr(target)
        conv_args = conv_args + [None] * (3 - len(conv_args))
        conv_args[2] = b_node
        conv.args = tuple(conv_args)
    node.replace_all_uses_with(conv)
    readers = [a for a in node.args if isinstance(a, torch.fx.Node)]
    gm.graph.erase_node(node)
    for r in readers:
        if r.op == "get_attr" and not r.users:
            gm.graph.erase_node(r)
    return stats


class _ConvView:
    """weight/bias of a functional conv, in the shape `_fold_into` works on."""

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


def graph_bias_name(gm, weight_target: str) -> str:
    """Where a functional conv without bias gets the folded one: beside its weight ("0.weight" ->
    "0.bias"), or "<weight>_bn_bias" when that name is taken."""
    owner, _, attr = weight_target.rpartition(".")
    base = "bias" if attr == "weight" else f"{attr}_bn_bias"
    module = gm.get_submodule(owner) if owner else gm
    name = base if not hasattr(module, base) else f"{attr}_bn_bias"
    return f"{owner}.{name}" if owner else name


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, mean, beta) in float64: y = (x - mean) * s + beta."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    return gamma / torch.sqrt(var + bn.eps), mean, beta


def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """Fold `bn` into `layer` in place; returns the (mean, std) of the folded output per channel."""
    s, mean, beta = bn_scale_shift(bn)
    w = layer.weight.detach()
    shape = (-1,) + (1,) * (w.dim() - 1)
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(s)
    with torch.no_grad():
        layer.weight.copy_((w.double() * s.reshape(shape)).to(w.dtype))
        new_bias = ((bias - mean) * s + beta).to(w.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.copy_(new_bias)
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    std = gamma.abs() * torch.sqrt(var / (var + bn.eps))
    return beta.numpy().copy(), std.numpy().copy()


def apply_fold_structure(model: nn.Module, folded: list) -> nn.Module:
    """For `load(model=fresh)`: give a copy of `model` the structure folding gave the compressed
    one (a bias on each folded layer, nn.Identity for its BatchNorm); values come from the artifact."""
    out = copy.deepcopy(model)
    graph_nodes = {n.name: n for n in out.graph.nodes} if isinstance(out, torch.fx.GraphModule) else {}
    for layer_name, bn_name in folded:
        if bn_name in graph_nodes and graph_nodes[bn_name].op == "call_function":  # a functional fold
            _fold_graph_node(out, graph_nodes[layer_name], graph_nodes[bn_name])
            continue
        layer = out.get_submodule(layer_name)
        if layer.bias is None:
            channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            layer.bias = nn.Parameter(torch.zeros(channels, dtype=layer.weight.dtype))
        set_submodule(out, bn_name, nn.Identity())
    if isinstance(out, torch.fx.GraphModule):
        out.graph.lint()
        out.recompile()
    return out
