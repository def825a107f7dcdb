"""The error measures every part reports: one definition each.

- `relative_error`: ||W - W_hat||_F / ||W||_F in float64 (||W - W_hat||_F when W == 0). No floor
  on ||W||: a weight of subnormal magnitude would otherwise score any W_hat (even 0) as exact.
- `output_error`: ||y - y_ref|| / ||y_ref|| over every tensor of two model outputs.
"""
from __future__ import annotations

import numpy as np


def relative_error(weight, approx) -> float:
    """Sums with numpy's pairwise summation, not a BLAS dot (np.linalg.norm): the same bits in
    every process, whatever the BLAS threads or core type (local and Ray results must match)."""
    w = np.asarray(weight, dtype=np.float64)
    diff = float(np.sqrt(np.sum(np.square(w - np.asarray(approx, dtype=np.float64).reshape(w.shape)))))
    norm = float(np.sqrt(np.sum(np.square(w))))
    return diff / norm if norm > 0 else diff


def flat_outputs(out) -> list:
    """Every tensor in a model output (tensor, tuple/list, dict), in order."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_outputs(o)]
    return []


def squared_error_terms(reference_out, candidate_out) -> tuple[float, float]:
    """(||y - y_ref||^2, ||y_ref||^2) in float64 over all tensors of two outputs of the same
    structure; sums of these over batches give the error over all of them."""
    ref, out = flat_outputs(reference_out), flat_outputs(candidate_out)
    num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(out, ref))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    return num, den


def output_error(reference_out, candidate_out) -> float:
    """||y - y_ref|| / ||y_ref|| over all tensors of two outputs of the same structure."""
    num, den = squared_error_terms(reference_out, candidate_out)
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def model_output_error(reference, candidate, inputs: tuple) -> float:
    """`output_error` of two torch models run on the same inputs."""
    import torch

    with torch.no_grad():
        return output_error(reference(*inputs), candidate(*inputs))
