"""Data-free refinement: after fitting, tune the compressed layers toward the ORIGINAL model's
outputs (not just its weights), using only synthetic inputs and statistics the model carries.

Why: fitting matches each weight matrix in isolation (||W - W_hat||), but what matters is the
model's function. Errors in directions the next layers ignore are harmless, others are not;
only inputs can tell which. Without real data the inputs are made (BatchNorm inversion, Gaussian
noise or a user sampler): see `passes/synthetic_inputs.py`; the options are `RefineSettings`
(`passes/refine_settings.py`). This module is the training loop.

Only the float parts of what is stored are trained, through the exact decoder:
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

import torch
import torch.nn as nn

from riem_compiler import methods
from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.metrics import flat_outputs, model_output_error, squared_error_terms
from riem_compiler.methods.trainable import TrainableWeight
from riem_compiler.passes.refine_settings import INPUT_MODES, InputSampler, RefineSettings
from riem_compiler.passes.rewrite_torch import RieMConv, RieMLinear, RieMWeight, _split, compressed_weights
from riem_compiler.passes.synthetic_inputs import SyntheticSet, _as_tuple, bn_inversion, make_synthetic, synthetic_inputs

# Re-exported: callers import these from `riem_compiler.passes.refine`, as before the split.
__all__ = ["INPUT_MODES", "InputSampler", "RefineOutcome", "RefineSettings", "SyntheticSet", "TrainableWeight",
           "bn_inversion", "calibrated_lrs", "make_synthetic", "make_trainable", "refine_result", "refine_torch",
           "synthetic_inputs"]

log = logging.getLogger("riem_compiler.refine")


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


# ----------------------------------------------------------------------------- trainable views

def make_trainable(cw: CompressedWeight, param_name: str = "") -> TrainableWeight | None:
    """The trainable view of a stored weight (its method's `trainable`), or None for a method
    we do not refine."""
    return methods.get(cw.method).trainable(cw, param_name)


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
            n_b, d_b = squared_error_terms(original(*xb), model(*xb))
            num += n_b
            den += d_b
    return num / max(den, 1e-30)


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
    # inputs are made from the user's model (its BatchNorm statistics); the teacher is the float model
    # that was compressed (BatchNorm folded, equalised: same outputs, same layers as result.model)
    teacher = getattr(result, "prepared", None) or result.original
    synthetic = None
    if teacher is not result.original:
        s = settings or RefineSettings()
        s.validate()
        was_training = result.original.training
        result.original.eval()
        try:
            synthetic = make_synthetic(result.original, inputs, s)
        finally:
            result.original.train(was_training)
    outcome = refine_torch(teacher, result.model, settings, inputs, synthetic)
    if outcome.kept:
        result.model = outcome.model
        result.compressed = {k: outcome.compressed[k] for k in result.compressed}
        weights = {s.name: s.weight for s in result.specs}
        for rec in result.report.layers:
            cw = result.compressed.get(rec.name)
            if cw is not None and rec.name in weights and rec.status == "compressed":
                rec.rel_error = methods.relative_error(weights[rec.name], cw)
        if inputs is not None:
            result.report.output_error = model_output_error(result.original, result.model, _as_tuple(inputs))
    return result, outcome
