"""The error measures every part reports: one definition each.

- `relative_error`: ||W - W_hat||_F / ||W||_F in float64 (||W - W_hat||_F when W == 0). No floor
  on ||W||: a weight of subnormal magnitude would otherwise score any W_hat (even 0) as exact.
- `output_error`: ||y - y_ref|| / ||y_ref|| over every tensor of two model outputs.
- `spectrum`: what the truncated SVD of a matrix loses at every rank (`tail_sums` of its squared
  singular values).
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True, eq=False)
class Spectrum:
    """What the truncated SVD of a layer's weight loses at each rank, without the SVD itself: the
    squared singular values and the singular vectors of the shorter side of the layer's view (out x
    in: the matrix that multiplies the layer's inputs)."""

    squares: np.ndarray  # squared singular values, descending, float64
    vectors: object  # torch.Tensor (short side, k), float32 orthonormal columns in the order of squares
    side: str  # "out" or "in": the side of the layer's view the vectors span
    tails: np.ndarray  # tails[r] = ||W - W_r||_F^2 of the rank-r truncation, r = 0 .. k, float64

    def relative_error(self, rank: int) -> float:
        """||W - W_r|| / ||W|| of the truncated SVD at this rank (Eckart-Young: the least of any rank-r W_hat)."""
        total = self.tails[0]
        return float(np.sqrt(self.tails[min(rank, len(self.tails) - 1)] / total)) if total > 0 else 0.0


def read_only_tensor(array: np.ndarray):
    """torch.from_numpy without its warning about a read-only array (the frontend's weights are):
    for tensors that are only read."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array)


def tail_sums(terms) -> np.ndarray:
    """tails[r] = sum of terms[r:] for r = 0 .. len(terms) (the last is 0), float64: what a truncation
    to the first r terms leaves out."""
    terms = np.asarray(terms)
    tails = np.zeros(len(terms) + 1)
    tails[:-1] = np.cumsum(terms[::-1])[::-1]
    return tails


def spectrum(layer_matrix) -> Spectrum:
    """The `Spectrum` of an (out, in) matrix, from the eigen-decomposition of the Gram matrix of its
    shorter side in float32. One thread, 4096x11008: 10 s, where the float64 SVD with both factors and
    svd's fits took 41 s; the tails agree with float64's to 1e-8 of the energy on such a layer."""
    import torch

    m = read_only_tensor(np.asarray(layer_matrix, dtype=np.float32))
    side = "out" if m.shape[0] <= m.shape[1] else "in"
    gram = m @ m.T if side == "out" else m.T @ m
    values, vectors = torch.linalg.eigh(gram)  # ascending
    del gram
    squares = values.flip(0).double().clamp_(min=0.0).numpy()
    return Spectrum(squares, vectors.flip(1), side, tail_sums(squares))


def sum_of_squares(x: np.ndarray) -> float:
    """np.sum(np.square(x)) in float64, bit for bit, without the whole squared copy (`_sums_of_squares`)."""
    flat = np.ravel(np.asarray(x))
    return float(_sums_of_squares(flat, flat, 0, flat.size)[1]) if flat.size else 0.0


def streamed_sum_of_squares(piece, size: int) -> float:
    """`sum_of_squares` of a float64 array of `size` values that is never whole: piece(lo, n) gives
    its values [lo, lo + n), asked for in increasing order (rotq's rotated rows, made a chunk at a time)."""
    return float(_pairwise(lambda lo, n: (np.sum(np.square(piece(lo, n))),), 0, size)[0]) if size else 0.0


# values per np.sum call of `_pairwise`
SUM_BLOCK = 1 << 16


def _pairwise(leaf, lo: int, n: int) -> tuple:
    """Sums over values [lo, lo + n) split where numpy's pairwise summation splits n (n // 2, rounded
    down to a multiple of 8) down to pieces of at most SUM_BLOCK values, each summed by leaf(lo, n)
    (a tuple of np.sum results): bit for bit what np.sum gives over the whole float64 arrays."""
    if n <= SUM_BLOCK:
        return leaf(lo, n)
    half = n // 2
    half -= half % 8
    return tuple(a + b for a, b in zip(_pairwise(leaf, lo, half), _pairwise(leaf, lo + half, n - half)))


def _sums_of_squares(x: np.ndarray, y: np.ndarray, lo: int, n: int) -> tuple[float, float]:
    """(sum (x - y)^2, sum x^2) over x[lo:lo + n] in float64 (`_pairwise`), both sums from one float64
    copy of each piece. Whole-array float64 copies had made scoring a candidate take 10x its weight's
    bytes."""
    def leaf(lo, n):
        piece = x[lo:lo + n].astype(np.float64)
        norm_sq = np.sum(np.square(piece))
        piece -= y[lo:lo + n]
        return np.sum(np.square(piece, out=piece)), norm_sq

    return _pairwise(leaf, lo, n)


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
