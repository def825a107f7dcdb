"""The error measures every part reports: one definition each.

- `relative_error`: ||W - W_hat||_F / ||W||_F in float64 (||W - W_hat||_F when W == 0). No floor
  on ||W||: a weight of subnormal magnitude would otherwise score any W_hat (even 0) as exact.
- `output_error`: ||y - y_ref|| / ||y_ref|| over every tensor of two model outputs.
"""
from __future__ import annotations

import numpy as np


def relative_error(weight, approx) -> float:
    """||weight - approx|| / ||weight|| in float64. Sums with numpy's pairwise summation, not a BLAS
    dot (np.linalg.norm): the same bits in every process, whatever the BLAS threads or core type
    (local and Ray results must match)."""
    w = np.ravel(np.asarray(weight))
    a = np.ravel(np.asarray(approx))
    if a.size != w.size:
        raise ValueError(f"relative_error: {a.size} values for a weight of {w.size}")
    diff_sq, norm_sq = _sums_of_squares(w, a, 0, w.size)
    diff, norm = float(np.sqrt(diff_sq)), float(np.sqrt(norm_sq))
    return diff / norm if norm > 0 else diff


# values per np.sum call of `_sums_of_squares`
SUM_BLOCK = 1 << 16


def _sums_of_squares(x: np.ndarray, y: np.ndarray, lo: int, n: int) -> tuple[float, float]:
    """(sum (x - y)^2, sum x^2) over x[lo:lo + n] in float64, bit for bit what np.sum gives over the
    whole float64 arrays: pieces split where numpy's pairwise summation splits n (n // 2, rounded
    down to a multiple of 8), each piece summed by np.sum, both sums from one float64 copy of the
    piece. Whole-array float64 copies had made scoring a candidate take 10x its weight's bytes."""
    if n <= SUM_BLOCK:
        piece = x[lo:lo + n].astype(np.float64)
        norm_sq = np.sum(np.square(piece))
        piece -= y[lo:lo + n]
        return np.sum(np.square(piece, out=piece)), norm_sq
    half = n // 2
    half -= half % 8
    first, second = _sums_of_squares(x, y, lo, half), _sums_of_squares(x, y, lo + half, n - half)
    return first[0] + second[0], first[1] + second[1]


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
