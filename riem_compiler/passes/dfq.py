"""Data-free preprocessing from DFQ (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"), for PyTorch models after BatchNorm folding.

- `equalize`: cross-layer equalisation. For Layer1 -> act -> Layer2 (Conv1d/Conv2d/Linear, depthwise
  and grouped included; act ReLU, ReLU6, or nothing, with Identity/Dropout/pooling in between), scale
  output channel i of Layer1 by 1/s_i and input channel i of Layer2 by s_i with
  s_i = sqrt(r1_i / r2_i) (r = the channel's largest |weight|), so both ranges become sqrt(r1_i r2_i).
  Exact because ReLU(x / s) = ReLU(x) / s for s > 0. ReLU6 is not (the clip at 6): the paper
  replaces it by ReLU; here an nn.ReLU6 module becomes a `ChannelClip` that clips channel i at
  6 / s_i, so the float model's outputs stay exactly the same.
- `dead_channels`: a folded channel whose BatchNorm output barely varies (running variance or
  gamma about 0) is the constant beta: its weight row is zeroed (it then costs no fitting error) and
  its bias set to beta; where the constant after the activation is 0, or the next layer sees no
  padding, it is moved into the next layer's bias and that layer's input column is zeroed too.
- `bias_corrections`: after fitting, the expected output shift (W_hat - W) E[x] of each layer,
  subtracted from its bias. E[x] comes from BatchNorm statistics: a folded layer's output is taken
  as N(beta, gamma^2), ReLU / ReLU6 give clipped-normal moments, residual sums add them, spatial
  means keep them (`node_moments`).

All three walk an fx trace of the (already copied) model and work on module layers.
"""
from __future__ import annotations

import copy
import logging
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from riem_compiler.passes.batchnorm import module_calls, set_submodule, trace

log = logging.getLogger("riem_compiler.dfq")

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
# commute with positive per-channel scales
PASS_MODULES = (nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.ZeroPad1d, nn.ZeroPad2d)
PASS_FUNCTIONS = (F.dropout, F.max_pool1d, F.max_pool2d)
RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
DEAD_TOL = 1e-3  # a channel is dead when its BatchNorm output std is below this times the layer's median
MAX_SWEEPS = 100


class ChannelClip(nn.Module):
    """ReLU6 with a per-channel upper bound: clamp(x, 0, upper[c]). What nn.ReLU6 becomes when
    equalisation scales the channels around it (upper = 6 / s)."""

    fx_leaf = True  # batchnorm.trace keeps it a module call (its forward reads x.dim(), which fx cannot trace)

    def __init__(self, channels: int, dim: int = 1, upper: float = 6.0):
        super().__init__()
        self.dim = dim
        self.register_buffer("upper", torch.full((channels,), float(upper)))

    def forward(self, x):
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return torch.minimum(torch.clamp_min(x, 0), self.upper.reshape(shape))

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}, dim={self.dim}"


@dataclass
class Link:
    """Layer1 -> [pass-through] -> activation -> [pass-through] -> Layer2, as found on the graph."""

    first: str
    second: str
    act: str  # "relu" | "relu6" | "clip" | "none"
    act_module: str = ""  # the nn.ReLU6 / ChannelClip module, when act is one
    act_node: str = ""  # the activation's graph node (a shared nn.ReLU6 gets a ChannelClip per call)
    pooled: bool = False  # a max pool in between (fine for scaling, not for expectations)


# ----------------------------------------------------------------------------- graph walking

def _one_user(node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _kind(gm, node, model: nn.Module) -> str:
    """"layer", "pass", "pool", "relu", "relu6", "clip" or "" for what `node` computes."""
    if node.op == "call_module":
        mod = model.get_submodule(node.target)
        if type(mod) in LAYERS:
            return "layer"
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)):
            return "pool"
        if isinstance(mod, PASS_MODULES):
            return "pass"
        if type(mod) is nn.ReLU:
            return "relu"
        if type(mod) is nn.ReLU6:
            return "relu6"
        if isinstance(mod, ChannelClip):
            return "clip"
    elif node.op == "call_function":
        if node.target in RELU_FUNCTIONS:
            return "relu"
        if node.target is F.relu6:
            return "relu6"
        if node.target in (F.max_pool1d, F.max_pool2d):
            return "pool"
        if node.target in PASS_FUNCTIONS:
            return "pass"
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return ""


def find_links(model: nn.Module) -> tuple[list[Link], list[tuple[str, str]]]:
    """Every Layer1 -> act -> Layer2 chain whose intermediate values feed nothing else, and
    (layer, reason) for layers whose output could have been equalised but is not."""
    try:
        gm = trace(model)
    except Exception as exc:
        return [], [("*", f"fx could not trace the model ({type(exc).__name__})")]
    calls = module_calls(gm)
    links, skipped = [], []
    for node in gm.graph.nodes:
        if _kind(gm, node, model) != "layer" or calls[node.target] != 1:
            continue
        act, act_module, act_node, pooled, cur = "none", "", "", False, node
        while True:
            nxt = _one_user(cur)
            if nxt is None or not nxt.args or nxt.args[0] is not cur:
                break
            kind = _kind(gm, nxt, model)
            if kind in ("pass", "pool"):
                pooled = pooled or kind == "pool"
                cur = nxt
            elif kind in ("relu", "relu6", "clip") and act == "none":
                act, act_module, act_node, cur = kind, nxt.target if nxt.op == "call_module" else "", nxt.name, nxt
            elif kind == "layer":
                second = model.get_submodule(nxt.target)
                first = model.get_submodule(node.target)
                if calls[nxt.target] != 1:
                    skipped.append((node.target, f"{nxt.target} is called more than once"))
                elif isinstance(first, nn.Linear) != isinstance(second, nn.Linear):
                    skipped.append((node.target, "conv <-> linear (a flatten would be needed)"))
                elif act == "clip" and calls.get(act_module, 0) != 1:
                    skipped.append((node.target, f"ChannelClip {act_module} is shared"))
                else:
                    links.append(Link(node.target, nxt.target, act, act_module, act_node, pooled))
                break
            else:
                break
    return links, skipped


# ----------------------------------------------------------------------------- weights per channel

def _in_view(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Weight (out, in/groups, *k) as (groups, out/groups, in/groups, k): input channel
    g * (in/groups) + c is [g, :, c, :]."""
    out = weight.shape[0]
    cpg = weight.shape[1]
    return weight.reshape(groups, out // groups, cpg, -1)


def _groups(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else layer.groups


def _out_channels(layer: nn.Module) -> int:
    return layer.weight.shape[0]


def in_ranges(layer: nn.Module) -> torch.Tensor:
    """max |W| over everything that reads each input channel (float64)."""
    v = _in_view(layer.weight.detach().double(), _groups(layer))
    return v.abs().amax(dim=(1, 3)).reshape(-1)


def out_ranges(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().double().abs().reshape(_out_channels(layer), -1).amax(dim=1)


def _scale_in(layer: nn.Module, s: torch.Tensor) -> None:
    """Multiply input channel i of `layer` by s[i]."""
    g = _groups(layer)
    w = layer.weight
    v = _in_view(w.detach().double(), g) * s.reshape(g, 1, -1, 1)
    with torch.no_grad():
        w.copy_(v.reshape(w.shape).to(w.dtype))


def _scale_out(layer: nn.Module, s: torch.Tensor) -> None:
    """Divide output channel i of `layer` (weight row and bias) by s[i]."""
    w = layer.weight
    shape = (-1,) + (1,) * (w.dim() - 1)
    with torch.no_grad():
        w.copy_((w.detach().double() / s.reshape(shape)).to(w.dtype))
        if layer.bias is not None:
            layer.bias.copy_((layer.bias.detach().double() / s).to(layer.bias.dtype))


# ----------------------------------------------------------------------------- equalisation

@dataclass
class EqualizeOutcome:
    pairs: list[tuple[str, str]] = field(default_factory=list)
    clips: list[dict] = field(default_factory=list)  # ReLU6 modules made ChannelClip: name, channels, dim
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sweeps: int = 0

    def to_dict(self) -> dict:
        return {"pairs": [list(p) for p in self.pairs], "relu6_clips": self.clips,
                "skipped": [list(s) for s in self.skipped], "sweeps": self.sweeps}


def equalize(model: nn.Module, stats: dict | None = None, tol: float = 1e-4) -> tuple[nn.Module, EqualizeOutcome]:
    """Cross-layer equalisation of `model` IN PLACE (pass a copy); returns (model, outcome). `stats`
    (layer -> (mean, std) of its output, from folding) are scaled along so later passes see the
    equalised channels. An nn.ReLU6 module called at several places needs one clip per call: then the
    model returned is its fx GraphModule (same parameter names) with those calls retargeted."""
    links, skipped = find_links(model)
    outcome = EqualizeOutcome(skipped=skipped)
    model, outcome.clips = clip_relu6(model, links)
    for sweep in range(MAX_SWEEPS):
        worst = 0.0
        for link in links:
            first, second = model.get_submodule(link.first), model.get_submodule(link.second)
            r1, r2 = out_ranges(first), in_ranges(second)
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, 1.0)), torch.ones_like(r1))
            scale_channels(model, link, s, stats)
            worst = max(worst, float(torch.log(s).abs().max()) if s.numel() else 0.0)
        outcome.sweeps = sweep + 1
        if worst < tol:
            break
    outcome.pairs = [(link.first, link.second) for link in links]
    if isinstance(model, torch.fx.GraphModule):
        model.graph.lint()
        model.recompile()
    log.info("equalised %d layer pairs in %d sweeps", len(links), outcome.sweeps)
    return model, outcome


def clip_relu6(model: nn.Module, links: list[Link]) -> tuple[nn.Module, list[dict]]:
    """Make the ReLU6 of each link a ChannelClip (upper 6 per channel), so that its first layer's
    output channels can be scaled; returns the model (its fx GraphModule, same parameter names, when
    a shared or functional ReLU6 needs a clip per call) and the clips made (the report's record,
    `apply_clip_structure` replays it). The links are updated to act "clip". IN PLACE."""
    relu6 = [link for link in links if link.act == "relu6"]
    calls = module_calls(trace(model)) if relu6 else {}
    per_call = [link for link in relu6 if not link.act_module or calls.get(link.act_module, 0) > 1]
    if per_call and not isinstance(model, torch.fx.GraphModule):
        model = trace(model)
    nodes = {n.name: n for n in model.graph.nodes} if isinstance(model, torch.fx.GraphModule) else {}
    clips = []
    for link in relu6:
        first = model.get_submodule(link.first)
        clip = ChannelClip(_out_channels(first), -1 if isinstance(first, nn.Linear) else 1)
        entry = {"module": link.act_module, "channels": clip.upper.numel(), "dim": clip.dim}
        if link in per_call:  # functional or shared: a clip of its own for this call
            entry["module"] = f"{link.act_node}_clip"
            entry["node"] = link.act_node
            model.add_submodule(entry["module"], clip)
            _to_module_call(nodes[link.act_node], entry["module"])
        else:
            set_submodule(model, link.act_module, clip)
        clips.append(entry)
        link.act, link.act_module = "clip", entry["module"]
    if isinstance(model, torch.fx.GraphModule):
        model.graph.lint()
        model.recompile()
    return model, clips


def scale_channels(model: nn.Module, link: Link, s: torch.Tensor, stats: dict | None = None) -> None:
    """Divide the first layer's output channels of `link` by s (rows, bias, its ChannelClip's upper
    bound and its folded statistics) and multiply the second layer's input channels by s: the same
    function, for s > 0 (ReLU, max pool and per-channel clips commute with it). IN PLACE."""
    _scale_out(model.get_submodule(link.first), s)
    _scale_in(model.get_submodule(link.second), s)
    if link.act == "clip":
        clip = model.get_submodule(link.act_module)
        clip.upper.copy_((clip.upper.double() / s).to(clip.upper.dtype))
    if stats is not None and link.first in stats:
        mean, std = stats[link.first]
        stats[link.first] = (mean / s.numpy(), std / s.numpy())


def _to_module_call(node, target: str) -> None:
    """Make an activation node (module call or F.relu6) call the module `target` on its input."""
    node.op, node.target, node.args, node.kwargs = "call_module", target, (node.args[0],), {}


def apply_clip_structure(model: nn.Module, clips: list[dict]) -> nn.Module:
    """For `load(model=fresh)`: the ReLU6 modules equalisation turned into ChannelClips (a copy; a
    GraphModule when calls of a shared ReLU6 were retargeted, as `equalize` did)."""
    out = copy.deepcopy(model)
    if any("node" in c for c in clips):
        out = trace(out)
        nodes = {n.name: n for n in out.graph.nodes}
    for c in clips:
        clip = ChannelClip(int(c["channels"]), int(c["dim"]))
        if "node" in c:
            out.add_submodule(c["module"], clip)
            _to_module_call(nodes[c["node"]], c["module"])
        else:
            set_submodule(out, c["module"], clip)
    if isinstance(out, torch.fx.GraphModule):
        out.recompile()
    return out


# ----------------------------------------------------------------------------- dead channels

def dead_channels(model: nn.Module, stats: dict, tol: float = DEAD_TOL) -> dict[str, dict]:
    """Handle folded channels whose BatchNorm output is (nearly) constant, IN PLACE; returns
    layer -> {"channels": [...], "moved_to": next layer or ""} for what was changed."""
    links, _ = find_links(model)
    after = {link.first: link for link in links}
    done: dict[str, dict] = {}
    for name, (mean, std) in stats.items():
        scale = float(np.median(std)) if std.size else 0.0
        dead = np.flatnonzero(std <= tol * max(scale, 1e-12))
        if dead.size == 0:
            continue
        layer = model.get_submodule(name)
        idx = torch.from_numpy(dead)
        with torch.no_grad():
            layer.weight[idx] = 0
            layer.bias[idx] = torch.from_numpy(mean[dead]).to(layer.bias.dtype)
        std[dead] = 0.0
        moved = _move_constant(model, after.get(name), dead, mean)
        if moved:
            mean[dead] = 0.0
        done[name] = {"channels": dead.tolist(), "moved_to": moved}
    if done:
        log.info("dead channels: %s", {k: len(v["channels"]) for k, v in done.items()})
    return done


def _act_value(link: Link, model: nn.Module, x: np.ndarray, channels: np.ndarray) -> np.ndarray:
    if link.act == "relu":
        return np.maximum(x, 0)
    if link.act == "relu6":
        return np.clip(x, 0, 6)
    if link.act == "clip":
        upper = model.get_submodule(link.act_module).upper.double().numpy()[channels]
        return np.clip(x, 0, upper)
    return x


def _move_constant(model: nn.Module, link: Link | None, dead: np.ndarray, mean: np.ndarray) -> str:
    """Move dead channels' constant output into the next layer's bias where that is exact."""
    if link is None:
        return ""
    first, second = model.get_submodule(link.first), model.get_submodule(link.second)
    const = _act_value(link, model, mean[dead], dead)
    padded = not isinstance(second, nn.Linear) and (
        isinstance(second.padding, str) and second.padding != "valid"
        or not isinstance(second.padding, str) and any(p != 0 for p in second.padding))
    if (padded and np.any(const != 0)) or (second.bias is None and np.any(const != 0)):
        return ""
    g = _groups(second)
    view = _in_view(second.weight.detach().double(), g)  # (g, out/g, cpg, k)
    cpg = view.shape[2]
    e = torch.zeros(g * cpg, dtype=torch.float64)
    e[torch.from_numpy(dead)] = torch.from_numpy(const).double()
    shift = torch.einsum("gock,gc->go", view, e.reshape(g, cpg)).reshape(-1)
    keep = torch.ones(g * cpg, dtype=torch.float64)
    keep[torch.from_numpy(dead)] = 0
    with torch.no_grad():
        if second.bias is not None:
            second.bias.copy_((second.bias.detach().double() + shift).to(second.bias.dtype))
        second.weight.copy_((view * keep.reshape(g, 1, cpg, 1)).reshape(second.weight.shape).to(second.weight.dtype))
        first.bias[torch.from_numpy(dead)] = 0  # act(0) = 0: the channel now outputs zeros
    return link.second


# ----------------------------------------------------------------------------- bias correction

def _phi(z):
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _cdf(z):
    return torch.special.ndtr(torch.as_tensor(z, dtype=torch.float64)).numpy()


def clipped_normal_mean(mu: np.ndarray, sd: np.ndarray, lower: float | np.ndarray = 0.0,
                        upper: float | np.ndarray = np.inf) -> np.ndarray:
    """E[clip(z, lower, upper)] for z ~ N(mu, sd^2), elementwise (sd = 0: clip(mu))."""
    mu, sd = np.asarray(mu, np.float64), np.asarray(sd, np.float64)
    lower = np.broadcast_to(np.asarray(lower, np.float64), mu.shape)
    upper = np.broadcast_to(np.asarray(upper, np.float64), mu.shape)
    out = np.clip(mu, lower, upper)
    pos = sd > 0
    m, s, lo, hi = mu[pos], sd[pos], lower[pos], upper[pos]
    a, b = (lo - m) / s, (hi - m) / s
    with np.errstate(invalid="ignore"):
        inner = m * (_cdf(b) - _cdf(a)) + s * (_phi(a) - _phi(b))
        low_part = np.where(np.isfinite(lo), lo * _cdf(a), 0.0)
        high_part = np.where(np.isfinite(hi), hi * (1 - _cdf(b)), 0.0)
    out[pos] = inner + low_part + high_part
    return out


def clipped_normal_moments(mu, sd, lower=0.0, upper=np.inf) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of clip(z, lower, upper) for z ~ N(mu, sd^2), elementwise."""
    mu, sd = np.asarray(mu, np.float64), np.asarray(sd, np.float64)
    lower = np.broadcast_to(np.asarray(lower, np.float64), mu.shape)
    upper = np.broadcast_to(np.asarray(upper, np.float64), mu.shape)
    mean = clipped_normal_mean(mu, sd, lower, upper)
    second = np.clip(mu, lower, upper) ** 2
    pos = sd > 0
    m, s, lo, hi = mu[pos], sd[pos], lower[pos], upper[pos]
    a, b = (lo - m) / s, (hi - m) / s
    with np.errstate(invalid="ignore"):
        pa, pb = _phi(a), _phi(b)
        ta = np.where(np.isfinite(a), a * pa, 0.0)
        tb = np.where(np.isfinite(b), b * pb, 0.0)
        mass = _cdf(b) - _cdf(a)
        inner = m * m * mass + 2 * m * s * (pa - pb) + s * s * (mass + ta - tb)
        low_part = np.where(np.isfinite(lo), lo * lo * _cdf(a), 0.0)
        high_part = np.where(np.isfinite(hi), hi * hi * (1 - _cdf(b)), 0.0)
    second[pos] = inner + low_part + high_part
    return mean, np.sqrt(np.maximum(second - mean ** 2, 0.0))


_ADDS = (operator.add, torch.add)
_MEANS = (torch.mean,)


def _spatial_mean_dims(node) -> bool:
    """x.mean((2, 3)) / torch.mean(x, dim=...) / adaptive_avg_pool to 1: a per-channel average."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dims, int):
        dims = (dims,)
    return isinstance(dims, (tuple, list)) and len(dims) > 0 and all(isinstance(d, int) and d >= 2 for d in dims)


def node_moments(model: nn.Module, stats: dict) -> tuple[torch.fx.GraphModule, dict[str, tuple]]:
    """Per-channel (mean, std) of every graph value that follows from BatchNorm statistics: a
    folded layer's output is N(beta, gamma^2); ReLU/ReLU6/ChannelClip give clipped-normal moments;
    Identity/Dropout/zero padding and spatial means keep the channel means; a sum of two such values
    adds means and variances (taken as independent). Max pooling, flattening and the rest end it."""
    gm = trace(model)
    known: dict[str, tuple] = {}
    for node in gm.graph.nodes:
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        src = known.get(args[0].name) if args else None
        kind = _kind(gm, node, model) if node.op in ("call_module", "call_function", "call_method") else ""
        if kind == "layer":
            if node.target in stats:
                mean, std = stats[node.target]
                known[node.name] = (np.asarray(mean, np.float64), np.asarray(std, np.float64))
        elif src is None:
            continue
        elif kind == "pass" or (node.op == "call_module" and isinstance(model.get_submodule(node.target),
                                                                        nn.AdaptiveAvgPool2d)):
            known[node.name] = src
        elif kind == "relu":
            known[node.name] = clipped_normal_moments(*src)
        elif kind == "relu6":
            known[node.name] = clipped_normal_moments(*src, 0.0, 6.0)
        elif kind == "clip":
            known[node.name] = clipped_normal_moments(*src, 0.0, model.get_submodule(node.target).upper.double().numpy())
        elif (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target == "add"):
            other = known.get(node.args[1].name) if len(node.args) > 1 and isinstance(node.args[1], torch.fx.Node) else None
            if other is not None and other[0].shape == src[0].shape and not node.kwargs:
                known[node.name] = (src[0] + other[0], np.sqrt(src[1] ** 2 + other[1] ** 2))
        elif ((node.op == "call_method" and node.target == "mean") or
              (node.op == "call_function" and node.target in _MEANS)) and _spatial_mean_dims(node):
            known[node.name] = src
    return gm, known


def expected_inputs(model: nn.Module, stats: dict) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Layer module -> E[input channel] where it follows from BatchNorm statistics (`node_moments`);
    and layer -> why not, for the others."""
    try:
        gm, known = node_moments(model, stats)
    except Exception as exc:  # fx cannot trace every model
        return {}, {"*": f"fx could not trace the model ({type(exc).__name__})"}
    out, why = {}, {}
    calls = module_calls(gm)
    for node in gm.graph.nodes:
        if node.op != "call_module" or _kind(gm, node, model) != "layer":
            continue
        if calls[node.target] != 1:
            why[node.target] = "called more than once"
            continue
        src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        moments = known.get(src.name) if src is not None else None
        layer = model.get_submodule(node.target)
        fan_in = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        if moments is None:
            why[node.target] = "its input's distribution does not follow from BatchNorm statistics"
        elif moments[0].shape != (fan_in,):
            why[node.target] = f"its input has {moments[0].shape} channel statistics, it reads {fan_in} channels"
        else:
            out[node.target] = moments[0]
    return out, why


def output_shift(error: np.ndarray, groups: int, expected: np.ndarray) -> np.ndarray:
    """(W_hat - W) E[x] per output channel, for a weight (out, in/groups, *k) and E[x] per input channel."""
    out, cpg = error.shape[0], error.shape[1]
    view = error.astype(np.float64).reshape(groups, out // groups, cpg, -1)
    return np.einsum("gock,gc->go", view, expected.reshape(groups, cpg)).reshape(out)


def bias_corrections(model: nn.Module, specs, weights_hat: dict[str, np.ndarray], stats: dict
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Module -> the amount to subtract from its bias (its expected output shift), for each compressed
    module layer with a known input expectation; and module -> why not, for the others."""
    expected, why = expected_inputs(model, stats)
    shifts, skipped = {}, {}
    for spec in specs:
        if spec.name not in weights_hat or not spec.module:
            continue
        layer = model.get_submodule(spec.module)
        if spec.module not in expected:
            skipped[spec.module] = why.get(spec.module, "input is not a BatchNorm-folded layer's output")
        elif getattr(layer, "bias", None) is None:
            skipped[spec.module] = "the layer has no bias"
        else:
            err = weights_hat[spec.name] - spec.weight
            scale = getattr(layer, "input_scale", None)  # a stored input scale multiplies the input first
            mean = expected[spec.module] * (1.0 if scale is None else scale.double().numpy())
            shifts[spec.module] = output_shift(err, spec.groups, mean)
    return shifts, skipped


def apply_bias_corrections(model: nn.Module, shifts: dict[str, np.ndarray]) -> None:
    """Subtract each shift from its module's bias, IN PLACE (the rewritten model's own copy)."""
    for name, shift in shifts.items():
        bias = model.get_submodule(name).bias
        with torch.no_grad():
            bias.copy_((bias.detach().double() - torch.from_numpy(shift)).to(bias.dtype))

