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


def bn_inversion(model: nn.Module, example_inputs, n: int, gen: torch.Generator, s: RefineSettings,
                 progress: bool = False) -> tuple:
    """DeepInversion-style inputs: noise optimised so each BatchNorm sees its running mean/var
    (progress: a bar over the optimisation steps, which take minutes on an ImageNet CNN)."""
    bns = _batchnorms(model)
    stats: list[torch.Tensor] = []

    def hook(mod, inputs, _out):
        mean, var = _channel_mean_var(inputs[0])
        stats.append(torch.linalg.vector_norm(mean - mod.running_mean) + torch.linalg.vector_norm(var - mod.running_var))

    handles = [bn.register_forward_hook(hook) for bn in bns]
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    chunks = []
    bar = tqdm(total=-(-n // s.inversion_batch) * s.inversion_steps, unit="step",
               desc=f"synthetic inputs: BatchNorm inversion of {n}", disable=not progress, leave=False)
    try:
        for start in range(0, n, s.inversion_batch):
            m = min(s.inversion_batch, n - start)
            xs = [t.clone().requires_grad_() for t in _gaussian(example_inputs, m, gen, s)]
            opt = torch.optim.Adam(xs, lr=s.inversion_lr)
            targets = None
            for step in range(s.inversion_steps):
                stats.clear()
                out = flat_outputs(model(*xs))
                loss = torch.stack(stats).sum() if stats else xs[0].new_zeros(())
                for x in xs:
                    loss = loss + s.inversion_tv * _total_variation(x) + s.inversion_l2 * x.pow(2).mean()
                if s.inversion_ce > 0 and out and out[0].dim() == 2 and out[0].shape[1] > 1:
                    if targets is None:
                        targets = (torch.arange(m) + start) % out[0].shape[1]
                    loss = loss + s.inversion_ce * F.cross_entropy(out[0], targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update()
            log.debug("bn inversion chunk %d: final loss %.4g", start // s.inversion_batch, loss.item())
            chunks.append([x.detach() for x in xs])
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    return tuple(torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0])))


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
