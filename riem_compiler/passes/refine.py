"""Data-free refinement: after fitting, tune the compressed layers toward the ORIGINAL model's
outputs (not just its weights), using only synthetic inputs and statistics the model carries.

Why: fitting matches each weight matrix in isolation (||W - W_hat||), but what matters is the
model's function. Errors in directions the next layers ignore are harmless, others are not;
only inputs can tell which. Without real data we make inputs:

- "bn_inversion" (models with BatchNorm and float inputs): start from Gaussian noise and optimise
  the inputs so that the batch mean/variance of every BatchNorm's input match its running
  statistics (the "DeepInversion" trick), plus a small total-variation/L2 prior and, for a
  classifier, a cross-entropy toward evenly spread pseudo-labels so all classes are covered;
- "gaussian" (float inputs, no BatchNorm): N(input_mean, input_std^2) in the example's shape;
- `input_sampler` (any model, e.g. token ids): a user function (n, torch.Generator) -> inputs.

Then only the float parts of what is stored are trained, through the exact decoder:
RieM a, b (straight-through 8-bit fake quantisation), U, beta, v, c (rounded to the metric
dtype with a straight-through gradient); SVD/Tucker-2 factors; RTN scales (codes stay fixed);
dense float16 weights; optionally the biases of compressed layers (stored uncompressed anyway).
Loss: normalised squared error of the model outputs plus of every compressed layer's output.
Afterwards each layer is stored again in its own format (same arrays, same byte count).

"Measured, not assumed": a held-out synthetic set (other seed) is scored before and after; if
refinement did not lower its output error, the input model is returned unchanged.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from riem_compiler import riem
from riem_compiler.compressed import DECODERS, CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.api import flat_outputs
from riem_compiler.passes.baselines import relative_error
from riem_compiler.passes.rewrite_torch import RieMConv, RieMLinear, RieMWeight, _split, compressed_weights

log = logging.getLogger("riem_compiler.refine")

INPUT_MODES = ("auto", "bn_inversion", "gaussian", "sampler")
# (n, generator) -> tuple of input tensors with leading batch dimension n
InputSampler = Callable[[int, torch.Generator], tuple]


@dataclass
class RefineSettings:
    """Options of data-free refinement. `lr`: each tensor's step size is calibrated so that one step
    changes its layer's decoded weight by about this fraction (see `calibrated_lrs`); biases move
    about lr x their RMS per step."""

    steps: int = 200
    lr: float = 5e-3
    batch_size: int = 32
    num_samples: int = 256  # synthetic training pool
    holdout: int = 64  # separate synthetic samples that judge before/after
    inputs: str = "auto"  # see INPUT_MODES
    input_mean: float = 0.0  # "gaussian" inputs and the start of "bn_inversion"
    input_std: float = 1.0
    inversion_steps: int = 200
    inversion_lr: float = 0.05
    inversion_batch: int = 64  # BatchNorm statistics are matched per batch of this size
    inversion_tv: float = 1e-4
    inversion_l2: float = 1e-5
    inversion_ce: float = 0.1  # pseudo-label term when the output is (N, classes) logits; 0 disables
    output_weight: float = 1.0
    layer_weight: float = 1.0
    train_bias: bool = True
    layers_per_step: int = 0  # >0: train a random subset of this many layers per step (big models)
    time_budget_s: float | None = None  # wall-clock guard; None: steps alone decide the result
    seed: int = 0
    input_sampler: InputSampler | None = field(default=None, repr=False)

    def validate(self) -> None:
        if self.inputs not in INPUT_MODES:
            raise InputError(f"RefineSettings.inputs must be one of {INPUT_MODES}; got {self.inputs!r}")
        if self.inputs == "sampler" and self.input_sampler is None:
            raise InputError("RefineSettings.inputs='sampler' needs input_sampler=(n, generator) -> inputs")
        for name in ("steps", "batch_size", "num_samples", "holdout", "inversion_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"RefineSettings.{name} must be a positive integer; got {value!r}")
        if not self.lr > 0 or not (self.time_budget_s is None or 0 < self.time_budget_s < math.inf):
            raise InputError("RefineSettings.lr must be positive and time_budget_s positive and finite (or None)")


@dataclass
class RefineOutcome:
    model: nn.Module  # refined copy (or the input model when `kept` is False)
    compressed: dict[str, CompressedWeight]  # weight name -> refined stored weight
    loss_before: float  # held-out synthetic output error ||y - y_ref||^2 / ||y_ref||^2
    loss_after: float
    kept: bool  # False: refinement did not lower the held-out error, input model returned
    steps: int
    seconds: float
    inputs: str  # how the synthetic inputs were made
    trained: list[str]  # weight names whose stored arrays were tuned
    history: list[float] = field(default_factory=list, repr=False)  # training loss every 10 steps
    steps_planned: int = 0  # steps < steps_planned: the time budget stopped it

    def to_dict(self) -> dict:
        return {"loss_before": self.loss_before, "loss_after": self.loss_after, "kept": self.kept,
                "steps": self.steps, "steps_planned": self.steps_planned, "seconds": round(self.seconds, 3),
                "inputs": self.inputs,
                "trained": list(self.trained)}


# ----------------------------------------------------------------------------- straight-through rounding

def _round_dtype(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round to the stored float dtype in the forward pass; identity gradient."""
    if dtype == "float32":
        return x
    return x + (x.to(getattr(torch, dtype)).float() - x).detach()


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes (straight-through) and per-row float32 scale, as baselines.fit_svd stores."""
    scale = (x.detach().abs().amax(dim=1) / 127.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = x / scale[:, None]
    codes = scaled + (torch.clamp(torch.round(scaled), -127, 127) - scaled).detach()
    return codes, scale


# ----------------------------------------------------------------------------- trainable views

class TrainableWeight(nn.Module):
    """Float shadow parameters of one stored weight. forward() returns the weight the stored
    arrays would decode to (rounding applied straight-through); `to_compressed()` stores them."""

    def __init__(self, cw: CompressedWeight, param_name: str):
        super().__init__()
        self.cw = CompressedWeight(cw.method, tuple(cw.shape), dict(cw.meta), dict(cw.arrays))
        self.param_name = param_name
        self.active = True
        self.exact = False  # True: skip the storage rounding (used to measure sensitivities)
        self._frozen: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def to_compressed(self) -> CompressedWeight:
        raise NotImplementedError

    def invalidate(self) -> None:
        self._frozen = None

    def forward(self) -> torch.Tensor:
        if self.active:
            return self.weight()
        if self._frozen is None:
            with torch.no_grad():
                self._frozen = self.weight().detach()
        return self._frozen


class _RieMView(TrainableWeight):
    def __init__(self, cw, param_name):
        super().__init__(cw, param_name)
        f = riem.load_stored(cw.arrays, cw.matrix_shape, cw.meta["q"], cw.meta["state_bits"])
        for name in ("a", "b", "U", "beta", "v", "c"):
            setattr(self, name, nn.Parameter(getattr(f, name).detach().clone().float()))

    def _parts(self):
        bits, dt = self.cw.meta["state_bits"], self.cw.meta["metric_dtype"]
        if self.exact:
            bits, dt = 32, "float32"
        a = riem.fake_quantize_states(self.a, bits)
        b = riem.fake_quantize_states(self.b, bits)
        return (a, b) + tuple(_round_dtype(getattr(self, n), dt) for n in ("U", "beta", "v", "c"))

    def weight(self):
        # checkpointed: the (N_out, N_in, m) sigmoid features are recomputed in backward, not kept
        W = checkpoint(lambda *p: riem.reconstruct(*p, row_chunk=256), *self._parts(), use_reentrant=False)
        return W.reshape(self.cw.shape)

    def to_compressed(self):
        f = riem.RieMFactors(*(getattr(self, n).detach().cpu() for n in ("a", "b", "U", "beta", "v")),
                             self.c.detach().cpu().reshape(()))
        arrays = riem.store(f, self.cw.meta["state_bits"], self.cw.meta["metric_dtype"])
        return CompressedWeight("riem", self.cw.shape, dict(self.cw.meta), arrays)


class _FloatArraysView(TrainableWeight):
    """Methods whose stored arrays are float factors (svd16/32, tucker2, dense): every float array
    trains, rounded to its stored dtype; decoding goes through the method's own decoder."""

    def __init__(self, cw, param_name):
        super().__init__(cw, param_name)
        self._names = [n for n, a in cw.arrays.items() if np.issubdtype(a.dtype, np.floating)]
        self._dtypes = {n: str(cw.arrays[n].dtype) for n in self._names}
        for n in self._names:
            self.register_parameter("p_" + n, nn.Parameter(torch.from_numpy(cw.arrays[n].astype(np.float32))))
        for n, a in cw.arrays.items():
            if n not in self._names:
                self.register_buffer("f_" + n, torch.from_numpy(np.ascontiguousarray(a)).clone())

    def _tensors(self) -> dict[str, torch.Tensor]:
        t = {n: _round_dtype(getattr(self, "p_" + n), "float32" if self.exact else self._dtypes[n]) for n in self._names}
        t.update({n: getattr(self, "f_" + n) for n in self.cw.arrays if n not in self._names})
        return t

    def weight(self):
        return DECODERS[self.cw.method](self.cw, self._tensors()).reshape(self.cw.shape)

    def to_compressed(self):
        arrays = dict(self.cw.arrays)
        for n in self._names:
            arrays[n] = getattr(self, "p_" + n).detach().cpu().numpy().astype(self._dtypes[n])
        return CompressedWeight(self.cw.method, self.cw.shape, dict(self.cw.meta), arrays)


class _SvdInt8View(TrainableWeight):
    """svd with int8 factors: float factors, re-quantised per row (straight-through) on every pass."""

    def __init__(self, cw, param_name):
        super().__init__(cw, param_name)
        for side in ("left", "right"):
            x = cw.arrays[f"{side}_codes"].astype(np.float32) * cw.arrays[f"{side}_scale"].astype(np.float32)[:, None]
            self.register_parameter(side, nn.Parameter(torch.from_numpy(x)))

    def _tensors(self):
        t = {}
        for side in ("left", "right"):
            x = getattr(self, side)
            t[f"{side}_codes"], t[f"{side}_scale"] = (x, torch.ones(x.shape[0])) if self.exact else _int8_rows(x)
        return t

    def weight(self):
        return DECODERS["svd"](self.cw, self._tensors()).reshape(self.cw.shape)

    def to_compressed(self):
        arrays = {}
        for k, v in self._tensors().items():
            v = v.detach().cpu()
            arrays[k] = torch.round(v).to(torch.int8).numpy() if k.endswith("codes") else v.numpy().astype(np.float32)
        return CompressedWeight("svd", self.cw.shape, dict(self.cw.meta), arrays)


def make_trainable(cw: CompressedWeight, param_name: str = "") -> TrainableWeight | None:
    """The trainable view of a stored weight, or None for a method we do not refine."""
    if cw.method == "riem":
        return _RieMView(cw, param_name)
    if cw.method == "svd" and cw.meta.get("factor_bits") == 8:
        return _SvdInt8View(cw, param_name)
    if cw.method in ("svd", "tucker2", "dense", "rtn"):
        # rtn: only the float scales are float arrays; packed codes stay fixed buffers
        return _FloatArraysView(cw, param_name)
    return None


# ----------------------------------------------------------------------------- synthetic inputs

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


def bn_inversion(model: nn.Module, example_inputs, n: int, gen: torch.Generator, s: RefineSettings) -> tuple:
    """DeepInversion-style inputs: noise optimised so each BatchNorm sees its running mean/var."""
    bns = _batchnorms(model)
    stats: list[torch.Tensor] = []

    def hook(mod, inputs, _out):
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        stats.append(torch.linalg.vector_norm(mean - mod.running_mean) + torch.linalg.vector_norm(var - mod.running_var))

    handles = [bn.register_forward_hook(hook) for bn in bns]
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    chunks = []
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
            log.debug("bn inversion chunk %d: final loss %.4g", start // s.inversion_batch, loss.item())
            chunks.append([x.detach() for x in xs])
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    return tuple(torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0])))


def synthetic_inputs(original: nn.Module, example_inputs, n: int, settings: RefineSettings,
                     seed: int) -> tuple[tuple, str]:
    """n synthetic inputs for `original` and the mode that made them (deterministic given seed)."""
    example_inputs = None if example_inputs is None else _as_tuple(example_inputs)
    mode = _resolve_mode(settings, original, example_inputs)
    gen = torch.Generator().manual_seed(seed)
    if mode == "sampler":
        return _as_tuple(settings.input_sampler(n, gen)), mode
    if mode == "gaussian":
        return _gaussian(example_inputs, n, gen, settings), mode
    return bn_inversion(original, example_inputs, n, gen, settings), mode


# ----------------------------------------------------------------------------- refinement

def calibrated_lrs(view: TrainableWeight, target: float, gen: torch.Generator,
                   probe: float = 1e-3) -> list[tuple[nn.Parameter, float]]:
    """A learning rate per tensor such that one Adam step (about lr per element) changes the
    decoded weight by about `target` relative (Frobenius).

    Why: factorised forms are ill-conditioned in different ways (RieM's least-squares readout v
    can be large with cancelling terms; SVD factors are not), so a step size relative to each
    tensor's own magnitude can wreck one layer while barely moving another. The sensitivity is
    measured with a random-sign probe of `probe` x the tensor's RMS, without storage rounding
    (a probe below one quantisation step would read as zero)."""
    out = []
    with torch.no_grad():
        view.exact = True
        try:
            w0 = view.weight()
            norm = float(w0.norm()) or 1.0
            for p in view.parameters():
                step = probe * max(float(p.pow(2).mean().sqrt()), 1e-8)
                delta = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -step, step)
                p.add_(delta)
                change = float((view.weight() - w0).norm()) / norm
                p.sub_(delta)
                lr = target * step / change if change > 0 else target * step / probe
                out.append((p, lr))
        finally:
            view.exact = False
    return out


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, attr = _split(path)
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _nmse(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-12)


def _output_error(model, original, inputs, batch: int) -> float:
    """||y - y_ref||^2 / ||y_ref||^2 over all outputs, in batches."""
    num = den = 0.0
    n = inputs[0].shape[0]
    with torch.no_grad():
        for start in range(0, n, batch):
            xb = tuple(t[start:start + batch] for t in inputs)
            for o, r in zip(flat_outputs(model(*xb)), flat_outputs(original(*xb))):
                num += float((o.double() - r.double()).pow(2).sum())
                den += float(r.double().pow(2).sum())
    return num / max(den, 1e-30)


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


def refine_torch(original: nn.Module, compressed_model: nn.Module, settings: RefineSettings | None = None,
                 example_inputs=None, synthetic: SyntheticSet | None = None) -> RefineOutcome:
    """Tune the compressed layers of `compressed_model` (output of the rewrite pass) so that it
    reproduces `original` on synthetic inputs (made here, or `synthetic` from `make_synthetic`).
    Neither input model is modified."""
    s = settings or RefineSettings()
    s.validate()
    t0 = time.perf_counter()
    if synthetic is None:
        synthetic = make_synthetic(original, example_inputs, s)
    original_was_training = original.training
    original.eval()  # BatchNorm must use its running statistics; mode restored at the end
    try:
        return _refine(original, compressed_model, s, synthetic, t0)
    finally:
        original.train(original_was_training)


def _refine(original, compressed_model, s: RefineSettings, synthetic: SyntheticSet, t0: float) -> RefineOutcome:
    model = copy.deepcopy(compressed_model).eval()
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    pool, holdout, mode = synthetic.train, synthetic.holdout, synthetic.mode
    loss_before = _output_error(model, original, holdout, s.batch_size)

    # swap every stored weight for its trainable view
    views: dict[str, TrainableWeight] = {}
    layer_paths: dict[str, str] = {}  # weight name -> path of its Linear/Conv module (for the layer loss)
    biases: list[nn.Parameter] = []
    for path, mod in list(model.named_modules()):
        if not isinstance(mod, RieMWeight):
            continue
        view = make_trainable(mod.compressed(), mod.param_name)
        if view is None:
            log.info("%s: method %s is not refined", mod.param_name, mod.method)
            continue
        _set_module(model, path, view)
        views[path] = view
        parent_path, _ = _split(path)
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(parent, (RieMLinear, RieMConv)):
            layer_paths[path] = parent_path
            if s.train_bias and parent.bias is not None:
                biases.append(parent.bias)
    if not views:
        log.warning("refine: no compressed weight with a trainable form; model returned unchanged")
        return RefineOutcome(compressed_model, compressed_weights(compressed_model), loss_before, loss_before,
                             False, 0, time.perf_counter() - t0, mode)

    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    probe_gen = torch.Generator().manual_seed(s.seed + 2)
    for view in views.values():
        for p, lr in calibrated_lrs(view, s.lr, probe_gen):
            p.requires_grad_(True)
            groups.append({"params": [p], "base": lr})
    for b in biases:
        b.requires_grad_(True)
        groups.append({"params": [b], "base": s.lr * max(float(b.detach().pow(2).mean().sqrt()), 1e-6)})
    opt = torch.optim.Adam([{"params": g["params"], "lr": g["base"]} for g in groups])

    # layer-output hooks: original Linear/Conv vs its compressed twin, same module path
    acts_ref: dict[str, torch.Tensor] = {}
    acts: dict[str, torch.Tensor] = {}
    handles = []
    if s.layer_weight > 0:
        for path, lp in layer_paths.items():
            try:
                ref_mod = original.get_submodule(lp)
            except AttributeError:
                continue
            handles.append(ref_mod.register_forward_hook(lambda m, i, o, k=lp: acts_ref.__setitem__(k, o)))
            handles.append(model.get_submodule(lp).register_forward_hook(lambda m, i, o, k=lp: acts.__setitem__(k, o)))

    gen = torch.Generator().manual_seed(s.seed + 1)
    paths = list(views)
    history: list[float] = []
    n = pool[0].shape[0]
    steps_done = 0
    try:
        for step in range(s.steps):
            if s.time_budget_s is not None and time.perf_counter() - t0 > s.time_budget_s:
                log.warning("refine: time budget %.0f s reached after %d of %d steps; the result depends on "
                            "machine load", s.time_budget_s, step, s.steps)
                break
            scale = 0.5 * (1 + math.cos(math.pi * step / s.steps))
            for g, spec in zip(opt.param_groups, groups):
                g["lr"] = spec["base"] * scale
            if 0 < s.layers_per_step < len(paths):
                chosen = set(torch.randperm(len(paths), generator=gen)[: s.layers_per_step].tolist())
                for i, p in enumerate(paths):
                    views[p].active = i in chosen
            idx = torch.randperm(n, generator=gen)[: s.batch_size]
            xb = tuple(t[idx] for t in pool)
            acts_ref.clear()
            acts.clear()
            with torch.no_grad():
                ref = flat_outputs(original(*xb))
            out = flat_outputs(model(*xb))
            loss = s.output_weight * sum(_nmse(o, r) for o, r in zip(out, ref))
            if acts:
                layer_terms = [_nmse(acts[k], acts_ref[k].detach()) for k in acts if k in acts_ref]
                loss = loss + s.layer_weight * torch.stack(layer_terms).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for v in views.values():
                if v.active:
                    v.invalidate()
            steps_done = step + 1
            if step % 10 == 0:
                history.append(loss.item())
                log.debug("refine step %d: loss %.5g", step, loss.item())
    finally:
        for h in handles:
            h.remove()

    # store every view again and put plain stored-weight modules back
    compressed: dict[str, CompressedWeight] = {}
    for path, view in views.items():
        old = compressed_model.get_submodule(path)
        cw = view.to_compressed()
        if cw.nbytes != old.compressed().nbytes:
            raise RuntimeError(f"refine changed the stored size of {view.param_name}: "
                               f"{old.compressed().nbytes} -> {cw.nbytes} bytes")
        _set_module(model, path, RieMWeight(cw, view.param_name, old.recompute))
        compressed[view.param_name] = cw
    for name, p in model.named_parameters():
        p.requires_grad_(requires.get(name, True))
    loss_after = _output_error(model, original, holdout, s.batch_size)
    seconds = time.perf_counter() - t0
    kept = loss_after < loss_before
    log.info("refine (%s inputs, %d steps, %.1f s): held-out output error %.4g -> %.4g%s", mode, steps_done,
             seconds, loss_before, loss_after, "" if kept else " (no gain: model left unchanged)")
    if not kept:
        return RefineOutcome(compressed_model, compressed_weights(compressed_model), loss_before, loss_after, False,
                             steps_done, seconds, mode, [v.param_name for v in views.values()], history, s.steps)
    for name, cw in compressed_weights(compressed_model).items():
        compressed.setdefault(name, cw)
    return RefineOutcome(model, compressed, loss_before, loss_after, True, steps_done, seconds, mode,
                         [v.param_name for v in views.values()], history, s.steps)


def refine_result(result, settings: RefineSettings | None = None, example_inputs=None):
    """Refine a torch `Result` of `optimize` in place of its model/compressed weights; returns
    (result, outcome). Per-layer rel. errors in the report are updated to the refined weights
    (they usually rise: refinement trades weight error for output error)."""
    if result.source != "torch":
        raise InputError("refinement works on PyTorch results; this one came from ONNX")
    if result.original is None:
        raise InputError("the Result has no original model to refine toward")
    inputs = example_inputs if example_inputs is not None else result.example_inputs
    outcome = refine_torch(result.original, result.model, settings, inputs)
    if outcome.kept:
        result.model = outcome.model
        result.compressed = {k: outcome.compressed[k] for k in result.compressed}
        weights = {s.name: s.weight for s in result.specs}
        for rec in result.report.layers:
            cw = result.compressed.get(rec.name)
            if cw is not None and rec.name in weights and rec.status == "compressed":
                rec.rel_error = relative_error(weights[rec.name], cw)
        if inputs is not None:
            from riem_compiler.api import torch_output_error

            result.report.output_error = torch_output_error(result.original, result.model, _as_tuple(inputs))
    return result, outcome
