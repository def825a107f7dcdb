"""Options of data-free refinement (`RefineSettings`), shared by the synthetic-input generator
(`passes/synthetic_inputs.py`) and the training loop (`passes/refine.py`); both import it from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from riem_compiler.errors import InputError

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
    # activations one backward pass of the inversion may hold; a batch that needs more runs in
    # exact micro-batches (synthetic_inputs.bn_inversion)
    inversion_memory_mb: int = 512
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
        for name in ("steps", "batch_size", "num_samples", "holdout", "inversion_batch", "inversion_memory_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"RefineSettings.{name} must be a positive integer; got {value!r}")
        if not self.lr > 0 or not (self.time_budget_s is None or 0 < self.time_budget_s < math.inf):
            raise InputError("RefineSettings.lr must be positive and time_budget_s positive and finite (or None)")
