"""Synthetic inputs for data-free refinement: the model's inputs are made, not read.

Refinement (`passes/refine.py`) tunes the compressed layers toward the ORIGINAL model's outputs;
without real data, these are the inputs it trains and judges on:

- "bn_inversion" (models with BatchNorm and float inputs): start from Gaussian noise and optimise
  the inputs so that the batch mean/variance of every BatchNorm's input match its running
  statistics (the "DeepInversion" trick), plus a small total-variation/L2 prior and, for a
  classifier, a cross-entropy toward evenly spread pseudo-labels so all classes are covered;
- "gaussian" (float inputs, no BatchNorm): N(input_mean, input_std^2) in the example's shape;
- `input_sampler` (any model, e.g. token ids): a user function (n, torch.Generator) -> inputs.

`make_synthetic` builds the training pool and a held-out set (other seed) as a `SyntheticSet`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from riem_compiler.errors import InputError
from riem_compiler.metrics import flat_outputs
from riem_compiler.passes.refine_settings import INPUT_MODES, InputSampler, RefineSettings

__all__ = ["INPUT_MODES", "InputSampler", "SyntheticSet", "bn_inversion", "make_synthetic", "synthetic_inputs"]

log = logging.getLogger("riem_compiler.refine")  # the refinement pass's logger, as before the split

def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None and m.running_var is not None]


def _resolve_mode(settings: RefineSettings, original: nn.Module, example_inputs) -> str:
    if settings.input_sampler is not None and settings.inputs in ("auto", "sampler"):
        return "sampler"
    if example_inputs is None:
        raise InputError("refinement needs example_inputs (their shapes and dtypes shape the synthetic "
                         "inputs) or RefineSettings(input_sampler=...)")
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in example_inputs):
        raise InputError("example_inputs hold non-float tensors (e.g. token ids): synthetic inputs cannot be "
                         "drawn for them; pass RefineSettings(input_sampler=(n, generator) -> inputs)")
    if settings.inputs == "auto":
        return "bn_inversion" if _batchnorms(original) else "gaussian"
    if settings.inputs == "bn_inversion" and not _batchnorms(original):
        raise InputError("inputs='bn_inversion' needs a model with BatchNorm layers (running statistics)")
    return settings.inputs


def _gaussian(example_inputs, n: int, gen: torch.Generator, s: RefineSettings) -> tuple:
    return tuple(torch.randn((n,) + tuple(t.shape[1:]), generator=gen) * s.input_std + s.input_mean
                 for t in example_inputs)


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 3:
        return x.new_zeros(())
    tv = (x[..., 1:] - x[..., :-1]).pow(2).mean()
    if x.dim() >= 4:
        tv = tv + (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean()
    return tv


def _channel_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and (biased) variance of a (N, C, ...) activation, as E[x^2] - E[x]^2
    from sums over the contiguous trailing axes first: torch's var over axes (0, 2, 3) took a quarter of
    an inversion step on EfficientNet-Lite2, this 0.6x of that, forward and backward. (Cancellation
    costs about 1e-7 * (1 + mean^2 / var) of the variance, far below what the inversion matches.)"""
    r = x.reshape(x.shape[0], x.shape[1], -1)
    count = r.shape[0] * r.shape[2]
    mean = r.sum(2).sum(0) / count
    return mean, (r * r).sum(2).sum(0) / count - mean * mean


def leaf_output_bytes(model: nn.Module, inputs) -> list[int]:
    """Bytes of every leaf module's output for the first sample of inputs (one forward pass without
    autograd): their sum is about what one sample's backward pass keeps alive (the inversion's
    micro-batches), their largest what one forward call allocates at once (the probes' chunks)."""
    sizes: list[int] = []

    def hook(_mod, _inputs, out):
        sizes.extend(t.numel() * t.element_size() for t in flat_outputs(out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(*[x[:1] for x in inputs])
    finally:
        for h in handles:
            h.remove()
    return sizes


def micro_batch(model: nn.Module, xs: list[torch.Tensor], s: RefineSettings) -> int:
    """Samples per backward pass of the inversion: as many as keep about s.inversion_memory_mb of
    activations (a function of the model and the input shape only, so the same on every machine)."""
    per_sample = sum(leaf_output_bytes(model, xs))
    return max(1, (s.inversion_memory_mb << 20) // max(per_sample, 1))


def _side_terms(xs: list[torch.Tensor], out: list, s: RefineSettings, targets, share: float) -> torch.Tensor:
    """The total-variation and L2 priors and the pseudo-label cross-entropy of a batch's `share`
    of the samples (means over the whole batch = share x the slice's means)."""
    loss = xs[0].new_zeros(())
    for x in xs:
        loss = loss + share * (s.inversion_tv * _total_variation(x) + s.inversion_l2 * x.pow(2).mean())
    if targets is not None:
        loss = loss + share * s.inversion_ce * F.cross_entropy(out[0], targets)
    return loss


def bn_inversion(model: nn.Module, example_inputs, n: int, gen: torch.Generator, s: RefineSettings,
                 progress: bool = False) -> tuple:
    """DeepInversion-style inputs: noise optimised so each BatchNorm sees its running mean/var
    (progress: a bar over the optimisation steps, which take minutes on an ImageNet CNN).

    The statistics are matched over batches of s.inversion_batch samples. A batch whose backward
    pass would hold more than s.inversion_memory_mb of activations (32 images through an ImageNet
    CNN: 5 GB) runs in micro-batches, with the exact gradient: a forward pass without autograd
    sums every BatchNorm input's per-channel x and x^2 over the whole batch; the loss's gradient
    with respect to those sums then weights each micro-batch's own sums in its backward pass."""
    bns = _batchnorms(model)
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    chunks = []
    bar = tqdm(total=-(-n // s.inversion_batch) * s.inversion_steps, unit="step",
               desc=f"synthetic inputs: BatchNorm inversion of {n}", disable=not progress, leave=False)
    try:
        micro = micro_batch(model, list(example_inputs), s)  # the drawn inputs have the example's shapes
        for start in range(0, n, s.inversion_batch):
            m = min(s.inversion_batch, n - start)
            xs = [t.clone().requires_grad_() for t in _gaussian(example_inputs, m, gen, s)]
            opt = torch.optim.Adam(xs, lr=s.inversion_lr)
            step_fn = _whole_batch_step if micro >= m else _micro_batch_step
            for _ in range(s.inversion_steps):
                opt.zero_grad(set_to_none=True)
                loss = step_fn(model, bns, xs, start, s, micro)
                opt.step()
                bar.update()
            log.debug("bn inversion chunk %d: final loss %.4g (micro-batches of %d)", start // s.inversion_batch,
                      loss, min(micro, m))
            chunks.append([x.detach() for x in xs])
    finally:
        bar.close()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    return tuple(torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0])))


def _targets(out: list, s: RefineSettings, start: int, lo: int, hi: int):
    """Pseudo-labels of samples lo..hi of the batch that starts at sample `start` (None: no term)."""
    if not (s.inversion_ce > 0 and out and out[0].dim() == 2 and out[0].shape[1] > 1):
        return None
    return (torch.arange(lo, hi) + start) % out[0].shape[1]


def _whole_batch_step(model, bns, xs, start: int, s: RefineSettings, _micro: int) -> float:
    """One forward and backward pass of the whole batch (its gradients land in xs)."""
    stats: list[torch.Tensor] = []

    def hook(mod, inputs, _out):
        mean, var = _channel_mean_var(inputs[0])
        stats.append(torch.linalg.vector_norm(mean - mod.running_mean) + torch.linalg.vector_norm(var - mod.running_var))

    handles = [bn.register_forward_hook(hook) for bn in bns]
    try:
        out = flat_outputs(model(*xs))
    finally:
        for h in handles:
            h.remove()
    loss = torch.stack(stats).sum() if stats else xs[0].new_zeros(())
    loss = loss + _side_terms(xs, out, s, _targets(out, s, start, 0, len(xs[0])), 1.0)
    loss.backward()
    return float(loss.detach())


def _channel_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel sums of x and x^2 of a (N, C, ...) activation, and how many values each holds."""
    r = x.reshape(x.shape[0], x.shape[1], -1)
    return r.sum(2).sum(0), (r * r).sum(2).sum(0), r.shape[0] * r.shape[2]


def _micro_batch_step(model, bns, xs, start: int, s: RefineSettings, micro: int) -> float:
    """The whole batch's gradient, micro-batch by micro-batch (see bn_inversion)."""
    m = len(xs[0])
    sums: dict[int, list] = {}

    def add_sums(mod, inputs, _out):
        s1, s2, count = _channel_sums(inputs[0])
        held = sums.setdefault(id(mod), [0, 0, 0])
        held[0], held[1], held[2] = held[0] + s1, held[1] + s2, held[2] + count

    handles = [bn.register_forward_hook(add_sums) for bn in bns]
    try:
        with torch.no_grad():
            for lo in range(0, m, micro):
                model(*[x[lo:lo + micro] for x in xs])
    finally:
        for h in handles:
            h.remove()
    grads, loss = {}, 0.0
    for bn in bns:
        if id(bn) not in sums:
            continue
        s1, s2, count = sums[id(bn)]
        s1, s2 = s1.clone().requires_grad_(), s2.clone().requires_grad_()
        mean = s1 / count
        term = (torch.linalg.vector_norm(mean - bn.running_mean)
                + torch.linalg.vector_norm(s2 / count - mean * mean - bn.running_var))
        grads[id(bn)] = torch.autograd.grad(term, (s1, s2))
        loss += float(term.detach())

    def weigh(mod, inputs, _out):
        s1, s2, _ = _channel_sums(inputs[0])
        g1, g2 = grads[id(mod)]
        parts.append((g1 * s1).sum() + (g2 * s2).sum())

    handles = [bn.register_forward_hook(weigh) for bn in bns if id(bn) in grads]
    try:
        for lo in range(0, m, micro):
            hi = min(m, lo + micro)
            parts: list[torch.Tensor] = []
            sl = [x[lo:hi] for x in xs]
            out = flat_outputs(model(*sl))
            side = _side_terms(sl, out, s, _targets(out, s, start, lo, hi), (hi - lo) / m)
            (torch.stack(parts).sum() + side if parts else side).backward()
            loss += float(side.detach())
    finally:
        for h in handles:
            h.remove()
    return loss


def synthetic_inputs(original: nn.Module, example_inputs, n: int, settings: RefineSettings,
                     seed: int, progress: bool = False) -> tuple[tuple, str]:
    """n synthetic inputs for `original` and the mode that made them (deterministic given seed)."""
    example_inputs = None if example_inputs is None else _as_tuple(example_inputs)
    mode = _resolve_mode(settings, original, example_inputs)
    gen = torch.Generator().manual_seed(seed)
    if mode == "sampler":
        return _as_tuple(settings.input_sampler(n, gen)), mode
    if mode == "gaussian":
        return _gaussian(example_inputs, n, gen, settings), mode
    return bn_inversion(original, example_inputs, n, gen, settings, progress), mode


@dataclass
class SyntheticSet:
    """Training and held-out synthetic inputs; make once, reuse across refinements of one model."""

    train: tuple
    holdout: tuple
    mode: str
    seconds: float


def make_synthetic(original: nn.Module, example_inputs=None, settings: RefineSettings | None = None) -> SyntheticSet:
    """settings.num_samples training and settings.holdout held-out inputs (held-out seed differs)."""
    s = settings or RefineSettings()
    s.validate()
    t0 = time.perf_counter()
    train, mode = synthetic_inputs(original, example_inputs, s.num_samples, s, s.seed)
    holdout, _ = synthetic_inputs(original, example_inputs, s.holdout, s, s.seed + 7919)
    return SyntheticSet(train, holdout, mode, time.perf_counter() - t0)
