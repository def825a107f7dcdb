"""Run the data-free preprocessing a config asks for, in order, and replay its structure at load.

Before fitting: BatchNorm folding (`fold_batchnorm`), dead channels (`dead_channels`), cross-layer
equalisation (`equalize`), stored input-channel scales (`input_scales`). After fitting: bias
correction (`bias_correction`, on by default), on the rewritten model, for the layers whose input
statistics the folding gave.
Each works on a copy of the user's model; what each did goes into the report (`Report.preprocess`),
which `load(model=fresh)` reads back to give a fresh instance the same structure.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch.nn as nn

from riem_compiler.passes import batchnorm, dfq, input_scales

log = logging.getLogger("riem_compiler.preprocess")


@dataclass
class Prepared:
    """The float model the pass compresses (output-equivalent to the user's) and what was done."""

    model: nn.Module
    record: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict, repr=False)  # layer -> (mean, std) of its folded output
    # (inputs, how they were made): the synthetic inputs the input scales were measured on, the same that
    # auto's sensitivity draws (same samples and seed), so it takes them instead of making them again
    synthetic: tuple | None = field(default=None, repr=False)
    # weight name -> s^2 per output row of a layer an input scale was folded into (auto's proxy counts its
    # errors in the units the model sees: sensitivity.MomentError.rows)
    row_weights: dict = field(default_factory=dict, repr=False)


def prepare_torch(model: nn.Module, example_inputs, cfg, input_sampler=None) -> Prepared:
    """A copy of `model` folded / cleaned / equalised / input-scaled as `cfg` says (the input is never
    modified). input_sampler: optimize's, for the synthetic inputs the input scales are measured on."""
    folds = cfg.fold_batchnorm and batchnorm.has_batchnorm(model)
    if not (folds or cfg.equalize or cfg.dead_channels or cfg.input_scales):
        # nothing to fold, clean or equalise: no copy, no trace (large models without BatchNorm); bias
        # correction then has no statistics to work from and leaves the model as fitted
        return Prepared(model)
    if folds or (cfg.fold_batchnorm and (cfg.equalize or cfg.dead_channels)):  # the DFQ passes read its graph
        out, fold = batchnorm.fold_batchnorm(model, example_inputs)
        prepared = Prepared(out, {"batchnorm": fold.to_dict()}, fold.stats)
    else:
        prepared = Prepared(copy.deepcopy(model))
    if cfg.dead_channels:
        prepared.record["dead_channels"] = dfq.dead_channels(prepared.model, prepared.stats)
    if cfg.equalize:
        prepared.model, outcome = dfq.equalize(prepared.model, prepared.stats)
        prepared.record["equalize"] = outcome.to_dict()
    if cfg.input_scales:
        prepared.model, prepared.record["input_scales"], prepared.synthetic, prepared.row_weights = _scale_inputs(
            prepared.model, model, example_inputs, cfg, input_sampler, prepared.stats)
    return prepared


def _scale_inputs(prepared_model: nn.Module, user_model: nn.Module, example_inputs, cfg, input_sampler, stats
                  ) -> tuple[nn.Module, dict, tuple, dict]:
    """`input_scales.scale_layers` on synthetic inputs made as auto's sensitivity makes them (from the
    user's model: BatchNorm inversion, Gaussian or sampler inputs; as many samples, so a model whose
    Linear layers see one vector per sample still gets a settled mean square per channel). Returns the
    model, the report entry, (inputs, how they were made) and the proxy's row weights."""
    from riem_compiler.frontend.torch_frontend import find_torch_layers
    from riem_compiler.passes.sensitivity import probe_inputs

    samples = cfg.sensitivity_samples
    inputs, mode = probe_inputs(user_model, example_inputs, samples, cfg.seed, input_sampler,
                                cfg.sensitivity_inversion_steps, progress=not cfg.quiet)
    model, record, rows = input_scales.scale_layers(prepared_model, find_torch_layers(prepared_model, cfg).layers,
                                                    inputs, cfg.input_scales, stats)
    return model, {**record, "inputs": mode, "samples": samples}, (inputs, mode), rows


def correct_biases(prepared: Prepared, new_model: nn.Module, specs, compressed) -> dict | None:
    """Bias correction on the rewritten model (in place); returns the report entry, None when the
    preprocessing folded no BatchNorm (no statistics: nothing to correct)."""
    if not prepared.stats:
        return None
    from riem_compiler import methods

    hats = {s.name: methods.decode(compressed[s.name]) for s in specs if s.name in compressed and s.module}
    shifts, skipped = dfq.bias_corrections(prepared.model, specs, hats, prepared.stats)
    dfq.apply_bias_corrections(new_model, shifts)
    log.info("bias correction: %d layers corrected, %d not", len(shifts), len(skipped))
    return {"corrected": sorted(shifts), "skipped": [[k, v] for k, v in sorted(skipped.items())]}


def replay_structure(model: nn.Module, record: dict | None) -> nn.Module:
    """For `load(model=fresh)`: the structure the preprocessing gave the compressed model (folded
    BatchNorms as nn.Identity with a bias on their layer, ChannelClips for equalised ReLU6s), so
    the artifact's state-dict keys match. Values come from the artifact."""
    if not record:
        return model
    folded = record.get("batchnorm", {}).get("folded", [])
    clips = record.get("equalize", {}).get("relu6_clips", [])
    out = batchnorm.apply_fold_structure(model, folded) if folded else model
    out = dfq.apply_clip_structure(out, clips) if clips else out
    scales = record.get("input_scales", {})
    out = dfq.apply_clip_structure(out, scales["relu6_clips"]) if scales.get("relu6_clips") else out
    scaled = scales.get("layers", [])
    return input_scales.replay(copy.deepcopy(out) if out is model else out, scaled) if scaled else out
