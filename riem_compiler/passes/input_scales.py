"""Stored input-channel scales (`Config.input_scales`, AWQ-style: Lin et al. 2023), data-free.

A layer y = W x is rewritten as y = (W diag(s)) (x / s): the same function, but the weight that is
compressed has column c scaled by s_c = (rms_c / geometric mean of rms) ** a, where rms_c is the
root mean square of input channel c on synthetic inputs (made as auto's sensitivity makes them:
BatchNorm inversion, Gaussian or sampler inputs). Input channels that carry more signal get larger
columns, so a quantiser's error on them shrinks relative to what they contribute to the output.
As AWQ searches its exponent per layer on real activations, a is chosen per layer among 0,
alpha / 2 and alpha (Config.input_scales = alpha) by a probe quantiser's output error on the layer's
synthetic input second moments; a = 0 leaves the layer as it is, without a scale.

Where the layer's input is one other layer's output through ReLU / ReLU6 / max pool / pass-through
ops that feed nothing else (a CNN's conv -> BatchNorm -> ReLU6 -> conv), 1/s is folded into that
layer's output channels, exactly (a ReLU6 becomes a per-channel clip, as in equalisation): nothing
is stored and nothing extra runs. Elsewhere (a post-LayerNorm encoder's normalised outputs also feed
the residual) 1/s is stored per input channel as float16 (2 bytes a channel, counted in the layer's
stored bytes) and multiplies the layer's input at run time: `RieMLinear` / `RieMConv` do it in their
forward, and the exported ONNX and TVM graphs hold it as a Mul before the MatMul / Conv.

Eligible: nn.Linear and ungrouped nn.Conv1d / nn.Conv2d layers that the frontend found (a depthwise
conv's rows each read one channel, so a channel scale only rescales its row). Layers the pass then
keeps dense get their weight back and no scale.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn

from riem_compiler import methods
from riem_compiler.errors import InputError
from riem_compiler.metrics import relative_error

log = logging.getLogger("riem_compiler.input_scales")

SCALE = "input_scale"  # the float16 buffer (1/s per input channel) on the layer module
# s is kept within [1/LIMIT, LIMIT]: a near-silent channel would otherwise get a column scaled to nothing
LIMIT = 256.0
# the quantiser that chooses each layer's exponent: min-max affine at 3 bits in groups of 64 inputs (the
# bits auto's candidates spend near 1/8 to 1/16 of float32; fast: no solver iterations)
PROBE_BITS, PROBE_GROUP = 3, 64


def channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def scaled(x: torch.Tensor, scale: torch.Tensor | None, dim: int) -> torch.Tensor:
    """x times the per-channel input scale along `dim` (x itself without one)."""
    if scale is None:
        return x
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * scale.to(x.dtype).reshape(shape)


def scale_input(module: nn.Module, args: tuple):
    """Forward pre-hook of a plain layer that holds an input scale (the float model the pass fits,
    and `materialize`'s copy that exporters trace): its input times the scale."""
    return (scaled(args[0], getattr(module, SCALE), channel_dim(module)), *args[1:])


def attach(module: nn.Module, scale: torch.Tensor) -> None:
    """Give a plain nn.Linear / Conv the input scale (buffer + pre-hook), in place."""
    module.register_buffer(SCALE, scale.detach().clone().to(torch.float16))
    module.register_forward_pre_hook(scale_input)


def detach(module: nn.Module) -> torch.Tensor:
    """Take the input scale off a plain layer, in place, and give its weight back its original
    columns (to float rounding); returns the scale."""
    scale = getattr(module, SCALE)
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is scale_input:
            del module._forward_pre_hooks[key]
    delattr(module, SCALE)
    with torch.no_grad():
        module.weight.mul_(_column_view(scale.float(), module.weight.dim()))
    return scale


def _column_view(values, ndim: int):
    """Per-input-channel values (torch or numpy) shaped to broadcast over an (out, in, *k) weight."""
    return values.reshape([1, -1] + [1] * (ndim - 2))


def columns(scale: torch.Tensor, ndim: int) -> np.ndarray:
    """The stored 1/s as float32 numpy, shaped to multiply a (out, in, *k) weight's columns: the
    fitted weight W diag(s) times it is the original W (to float rounding)."""
    return _column_view(scale.detach().float().numpy(), ndim)


def eligible(module) -> bool:
    if type(module) is nn.Linear:
        return module.in_features > 1
    return type(module) in (nn.Conv1d, nn.Conv2d) and module.groups == 1 and module.in_channels > 1


def layer_statistics(model: nn.Module, names: list[str], inputs: tuple) -> dict[str, tuple[np.ndarray, object]]:
    """Module name -> (E[x_c^2] per input channel, the input second moments `SecondMoment` the
    sensitivity uses) over the synthetic inputs, from forward hooks."""
    from riem_compiler.passes.sensitivity import Moments, _ModuleHook

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    moments = {n: Moments(16384) for n in names}

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].detach().double()
            x = x.movedim(channel_dim(module), -1).reshape(-1, x.shape[channel_dim(module)])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    handles += [modules[n].register_forward_hook(_ModuleHook(moments[n])) for n in names]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: ((sums[n] / counts[n]).numpy(), moments[n].result()) for n in names if n in sums}


def scales_from(mean_squares: np.ndarray, alpha: float) -> np.ndarray:
    """float16 1/s per channel, s = (rms / geometric mean of the positive rms) ** alpha, within
    [1/LIMIT, LIMIT]; a silent channel keeps s = 1."""
    rms = np.sqrt(np.maximum(mean_squares, 0.0))
    live = rms > 0
    if not live.any():
        return np.ones(len(rms), np.float16)
    centre = math.exp(float(np.mean(np.log(rms[live]))))
    s = np.ones(len(rms))
    s[live] = np.clip((rms[live] / centre) ** alpha, 1.0 / LIMIT, LIMIT)
    return (1.0 / s).astype(np.float16)


def probe_error(weight: np.ndarray, inv: np.ndarray, moment) -> float:
    """E||(W - W_hat) x||^2 on the layer's synthetic second moments, W_hat the probe quantiser's
    (PROBE_BITS-bit min-max affine in groups of PROBE_GROUP inputs) decode of W diag(s), times 1/s."""
    from riem_compiler.methods.affine import fit_affine
    from riem_compiler.passes.sensitivity import MomentError

    cols = _column_view(inv.astype(np.float32), weight.ndim)
    scaled_weight = weight / cols
    cw = fit_affine(scaled_weight, PROBE_BITS, PROBE_GROUP, 1, iterations=0)
    decoded = methods.decode(cw).reshape(weight.shape) * cols
    return MomentError(moment, False, 1)(weight - decoded)


def scale_layers(model: nn.Module, specs, inputs: tuple, alpha: float, stats: dict | None = None
                 ) -> tuple[nn.Module, dict, dict]:
    """Input scales for the eligible layers of `model` (IN PLACE: the pass's own copy); returns the
    model (its fx GraphModule when a shared ReLU6 needed a clip per call, as equalisation does) and
    the report entry. Per layer the exponent is the one of 0, alpha / 2 and alpha whose probe
    quantiser has the lowest output error on the layer's synthetic second moments (`probe_error`);
    0 leaves the layer as it is. Where the layer's input is the output of one other layer through
    ReLU / ReLU6 / max pool / pass-through ops that feed nothing else, 1/s is folded into that
    layer's output channels (exact: a ReLU6 becomes a per-channel clip) and nothing is stored;
    elsewhere the layer keeps 1/s as a float16 buffer. stats: the folded BatchNorm statistics, scaled
    along with the channels they describe (bias correction reads them). The third value maps the
    weight of each layer folded into to s^2 per output row (`MomentError.rows`): auto's proxy then
    counts that layer's errors in the units the model sees, as before the fold."""
    from riem_compiler.passes import dfq

    layers = {s.module: s for s in specs if s.module and eligible(model.get_submodule(s.module))}
    measured = layer_statistics(model, list(layers), inputs)
    chosen, exponents = {}, {}
    for name in layers:
        if name not in measured or measured[name][1] is None:  # not called on these inputs: nothing to go by
            continue
        weight = model.get_submodule(name).weight.detach().float().numpy()
        mean_squares, moment = measured[name]
        tried = {a: scales_from(mean_squares, a) for a in (0.0, alpha / 2, alpha)}
        errors = {a: probe_error(weight, inv, moment) for a, inv in tried.items()}
        exponents[name] = min(errors, key=lambda a: (errors[a], a))
        if exponents[name] > 0:
            chosen[name] = torch.from_numpy(tried[exponents[name]])
    links = [link for link in dfq.find_links(model)[0] if link.second in chosen] if chosen else []
    model, clips = dfq.clip_relu6(model, links)
    for link in links:  # s = 1 / (float16 1/s), as a stored scale would give
        dfq.scale_channels(model, link, 1.0 / chosen[link.second].double(), stats)
    folded = {link.second for link in links}
    stored = [name for name in chosen if name not in folded]
    for name in stored:
        module = model.get_submodule(name)
        with torch.no_grad():  # W diag(s) with s = 1 / (the stored float16 1/s): the function stays the same
            module.weight.div_(_column_view(chosen[name].float(), module.weight.dim()))
        attach(module, chosen[name])
    log.info("input scales (alpha up to %g): %d of %d layers, %d folded into the layer before", alpha,
             len(chosen), len(specs), len(links))
    weight_of = {s.module: s.name for s in specs if s.module}
    rows = {weight_of[link.first]: (1.0 / chosen[link.second].double().numpy()) ** 2
            for link in links if link.first in weight_of}
    return model, {"alpha": alpha, "layers": stored, "folded": [[link.first, link.second] for link in links],
                   "relu6_clips": clips, "exponents": exponents}, rows


def scale_nbytes(module: nn.Module) -> int:
    scale = getattr(module, SCALE, None)
    return 0 if scale is None else scale.numel() * scale.element_size()


def drop_unused(model: nn.Module, names: list[str]) -> list[str]:
    """After the rewrite: layers in `names` that stayed plain (kept dense) lose their scale and get
    their weight back; returns the names whose scale stayed (on a compressed layer)."""
    kept = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and hasattr(module, SCALE):
            detach(module)
        elif getattr(module, SCALE, None) is not None:
            kept.append(name)
    return kept


def replay(model: nn.Module, names: list[str]) -> nn.Module:
    """For `load(model=fresh)`: the layers that held an input scale get one (values come from the
    artifact), so the rewrite carries it into their compressed modules. In place."""
    for name in names:
        module = model.get_submodule(name)
        channels = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        attach(module, torch.ones(channels, dtype=torch.float16))
    return model


def within_budget(cfg, model: nn.Module, specs):
    """cfg with the ratio the fits get once the input scales on `model`'s layers take their bytes
    out of the budget (cfg itself without scales)."""
    extra = sum(scale_nbytes(model.get_submodule(s.module)) for s in specs if s.module)
    if not extra:
        return cfg
    ratio = cfg.ratio - extra / sum(s.fp32_bytes for s in specs)
    if ratio <= 0:
        raise InputError(f"the input scales take {extra} bytes, the whole budget at ratio {cfg.ratio}; raise the "
                         "ratio or set input_scales=0")
    return replace(cfg, ratio=ratio)


def settle(entry: dict, new_model: nn.Module | None, specs, compressed: dict, records) -> None:
    """After the rewrite: layers kept dense give their scale back (`drop_unused`); each compressed
    one counts the scale's bytes in its record, and its error is measured against the original
    weight. Updates the report entry (`layers`: those that keep a scale) and the records."""
    kept = drop_unused(new_model, entry["layers"]) if new_model is not None else []
    entry.update(layers=kept, dropped=len(entry["layers"]) - len(kept))
    spec_of = {s.name: s for s in specs}
    for rec in records:
        spec = spec_of.get(rec.name)
        if spec is None or rec.status != "compressed" or spec.module not in kept:
            continue
        module = new_model.get_submodule(spec.module)
        inv = columns(module.input_scale, len(spec.shape))
        decoded = methods.decode(compressed[rec.name]).reshape(spec.shape)
        rec.rel_error = relative_error(spec.weight * inv, decoded * inv)
        rec.bytes_after += scale_nbytes(module)
        rec.settings = {**rec.settings, "input_scale_bytes": scale_nbytes(module)}
