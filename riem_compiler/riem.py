"""The RieM representation of one weight matrix: parameters, reconstruction, storage, sizing.

W_hat[i, j] = c + sum_r v_r * sum_k sigmoid(U_k (a_i + S^{s_k} b_j) + beta_k)_r

with S^s a cyclic left shift by s = floor(k*q/K). Reconstruction uses the precomputed form
A_k = a U_k^T + beta_k, B_k = (S^{s_k} b) U_k^T, so each element costs K*m adds and sigmoids.

Storage: neuron states a, b are kept at `state_bits` (32 = float32; fewer bits = per-dimension
min-max uniform codes, bit-packed) with float32 scale/offset per dimension; the metric network
(U, beta, v, c) in float16 or float32. `stored_tensors` is the exact set of arrays an artifact
writes, so the byte count is the sum of their sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from riem_compiler import bitpack

K_BRANCHES = 6
STATE_BITS = (32, 16, 8, 6, 4)
METRIC_DTYPES = ("float16", "float32")


def branch_shifts(q: int, k_branches: int = K_BRANCHES) -> list[int]:
    """Shift s_k = floor(k*q/K) for k = 0..K-1."""
    return [(k * q) // k_branches for k in range(k_branches)]


def shifted_states(b: torch.Tensor, k_branches: int = K_BRANCHES) -> torch.Tensor:
    """Stack of S^{s_k} b for every branch: (K, N_in, q). S^s moves coordinate d+s to d."""
    q = b.shape[-1]
    return torch.stack([torch.roll(b, -s, dims=-1) for s in branch_shifts(q, k_branches)])


def reconstruct(a, b, U, beta, v, c, row_chunk: int = 0) -> torch.Tensor:
    """Weight matrix (N_out, N_in) from RieM parameters (differentiable torch tensors).

    row_chunk > 0 bounds peak memory to row_chunk * N_in * m floats per branch.
    """
    k_branches = U.shape[0]
    A = torch.einsum("iq,kmq->kim", a, U) + beta[:, None, :]  # (K, N_out, m)
    B = torch.einsum("kjq,kmq->kjm", shifted_states(b, k_branches), U)  # (K, N_in, m)
    if row_chunk <= 0 or row_chunk >= a.shape[0]:
        return _sum_branches(A, B, v) + c
    rows = [_sum_branches(A[:, r:r + row_chunk], B, v) for r in range(0, a.shape[0], row_chunk)]
    return torch.cat(rows) + c


def _sum_branches(A: torch.Tensor, B: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = None
    for k in range(A.shape[0]):
        term = torch.sigmoid(A[k][:, None, :] + B[k][None, :, :]) @ v
        out = term if out is None else out + term
    return out


def reconstruct_reference(a, b, U, beta, v, c) -> np.ndarray:
    """Direct per-element evaluation of the formula (slow; used to check `reconstruct`)."""
    a, b, U, beta, v = (np.asarray(x, dtype=np.float64) for x in (a, b, U, beta, v))
    n_out, n_in = a.shape[0], b.shape[0]
    q, k_branches = a.shape[1], U.shape[0]
    shifts = branch_shifts(q, k_branches)
    W = np.zeros((n_out, n_in))
    for i in range(n_out):
        for j in range(n_in):
            total = float(c)
            for k in range(k_branches):
                sb = np.array([b[j, (d + shifts[k]) % q] for d in range(q)])
                z = U[k] @ (a[i] + sb) + beta[k]
                total += float(v @ (1.0 / (1.0 + np.exp(-z))))
            W[i, j] = total
    return W


def parameter_count(n_out: int, n_in: int, q: int, m: int, k_branches: int = K_BRANCHES) -> int:
    return (n_out + n_in) * q + k_branches * m * (q + 1) + m + 1


# ----------------------------------------------------------------------------- quantisation

def state_grid(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) per dimension (column) of x's min-max uniform grid."""
    levels = (1 << bits) - 1
    lo = x.amin(dim=0)  # amin/amax: min(dim=0) also finds the indices, 3x slower
    hi = x.amax(dim=0)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, lo


def quantize_states(x: torch.Tensor, bits: int, grid: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Per-dimension (column) min-max uniform quantisation: codes, scale, offset (x ~ codes*scale+offset).
    grid: the (scale, offset) of a larger set of states that x's rows belong to (state_grid)."""
    scale, lo = grid if grid is not None else state_grid(x, bits)
    codes = torch.clamp(torch.round((x - lo) / scale), 0, (1 << bits) - 1)
    return codes, scale, lo


def fake_quantize_states(x: torch.Tensor, bits: int, grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Quantise-dequantise with a straight-through gradient (for quantisation-aware fitting).
    grid: as in quantize_states (fake-quantising some rows of the states on the grid of all)."""
    if bits >= 32:
        return x
    codes, scale, lo = quantize_states(x.detach(), bits, grid)
    return x + (codes * scale + lo - x).detach()


# ----------------------------------------------------------------------------- the layer record

@dataclass
class RieMFactors:
    """Float RieM parameters of one matrix; scale of W already folded into v and c."""

    a: torch.Tensor  # (N_out, q)
    b: torch.Tensor  # (N_in, q)
    U: torch.Tensor  # (K, m, q)
    beta: torch.Tensor  # (K, m)
    v: torch.Tensor  # (m,)
    c: torch.Tensor  # ()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[0], self.b.shape[0])

    @property
    def q(self) -> int:
        return self.a.shape[1]

    @property
    def m(self) -> int:
        return self.U.shape[1]

    def weight(self, row_chunk: int = 256) -> torch.Tensor:
        with torch.no_grad():
            return reconstruct(self.a, self.b, self.U, self.beta, self.v, self.c, row_chunk)


def store(f: RieMFactors, state_bits: int, metric_dtype: str) -> dict[str, np.ndarray]:
    """The arrays an artifact writes for one RieM matrix (their nbytes sum is the stored size)."""
    if state_bits not in STATE_BITS:
        raise ValueError(f"state_bits must be one of {STATE_BITS}, got {state_bits}")
    if metric_dtype not in METRIC_DTYPES:
        raise ValueError(f"metric_dtype must be one of {METRIC_DTYPES}, got {metric_dtype!r}")
    out: dict[str, np.ndarray] = {}
    for name, x in (("a", f.a), ("b", f.b)):
        x = x.detach().float().cpu()
        if state_bits == 32:
            out[name] = x.numpy().astype(np.float32)
            continue
        codes, scale, lo = quantize_states(x, state_bits)
        out[f"{name}_codes"] = bitpack.pack(codes.numpy().astype(np.int64), state_bits)
        out[f"{name}_scale"] = scale.numpy().astype(np.float32)
        out[f"{name}_offset"] = lo.numpy().astype(np.float32)
    for name in ("U", "beta", "v", "c"):
        value = getattr(f, name).detach().float().cpu().numpy().astype(metric_dtype)
        out[name] = value.reshape(1) if name == "c" else value
    return out


def load_stored(
    arrays: dict[str, np.ndarray], shape: tuple[int, int], q: int, state_bits: int
) -> RieMFactors:
    """Inverse of `store`: dequantised float32 factors."""
    states = []
    for name, rows in (("a", shape[0]), ("b", shape[1])):
        if state_bits == 32:
            states.append(torch.from_numpy(np.asarray(arrays[name], dtype=np.float32)).reshape(rows, q))
            continue
        codes = bitpack.unpack(arrays[f"{name}_codes"], state_bits, rows * q).reshape(rows, q)
        x = codes.astype(np.float32) * arrays[f"{name}_scale"].astype(np.float32) + arrays[
            f"{name}_offset"
        ].astype(np.float32)
        states.append(torch.from_numpy(x.astype(np.float32)))
    metric = {n: torch.from_numpy(np.asarray(arrays[n], dtype=np.float32)) for n in ("U", "beta", "v", "c")}
    return RieMFactors(states[0], states[1], metric["U"], metric["beta"], metric["v"], metric["c"].reshape(()))


def stored_nbytes(
    n_out: int, n_in: int, q: int, m: int, state_bits: int, metric_dtype: str,
    k_branches: int = K_BRANCHES,
) -> int:
    """Bytes of `store(...)` for these sizes, without building it."""
    if state_bits == 32:
        states = (n_out + n_in) * q * 4
    else:
        states = bitpack.packed_nbytes(n_out * q, state_bits) + bitpack.packed_nbytes(n_in * q, state_bits)
        states += 2 * 2 * q * 4  # scale and offset per dimension, for a and b
    metric = k_branches * m * (q + 1) + m + 1
    return states + metric * np.dtype(metric_dtype).itemsize


SIZINGS = ("max_q", "balanced", "search", "wide")


def search_widths(sizing: str) -> tuple[float, ...]:
    """The metric widths (multiples of the balanced one) size_candidates offers a sizing: "wide"
    only the widest of SEARCH_WIDER, "search" all of them."""
    return (SEARCH_WIDER[-1],) if sizing == "wide" else SEARCH_WIDER


MAX_M = 32  # the widest metric net "balanced" sizing grows to (step cost grows with m)


def choose_size(
    n_out: int, n_in: int, ratio: float, state_bits: int, metric_dtype: str, m: int,
    k_branches: int = K_BRANCHES, sizing: str = "max_q",
) -> tuple[int, int] | None:
    """(q, m) whose stored bytes fit ratio * fp32 bytes; None when not even q=1 fits.

    "max_q": the largest q at metric width m (m shrunk if the metric net alone is too big).
    "wide": the 1.3x-wider candidate of size_candidates (SEARCH_WIDER[-1]), without pilot fits.
    "balanced": W_hat depends on a state only through the k_branches * m numbers U_k a_i (and
    U_k S^s b_j), so state dimensions beyond k_branches * m carry nothing: m grows from the given
    width (up to MAX_M) until the largest q that fits is no more than k_branches * m, trading the
    dead state dimensions for a wider metric net. Measured on the MiniLM layer-0 query at 1/4
    (benchmarks/results/fit_fidelity.md): q150/m16 0.279 vs q128/m22 0.188 relative error."""
    if sizing not in SIZINGS:
        raise ValueError(f"sizing must be one of {SIZINGS}, got {sizing!r}")
    if sizing in ("search", "wide"):  # search without pilot fits: the first candidate it would try
        found = size_candidates(n_out, n_in, ratio, (state_bits,), metric_dtype, k_branches,
                                search_widths(sizing))
        return found[0][:2] if found else None
    size = _max_q(n_out, n_in, ratio, state_bits, metric_dtype, m, k_branches)
    if sizing == "max_q" or size is None:
        return size
    for m_try in range(size[1], MAX_M + 1):
        grown = _max_q(n_out, n_in, ratio, state_bits, metric_dtype, m_try, k_branches)
        if grown is None or grown[1] != m_try:
            break
        size = grown
        if grown[0] <= k_branches * m_try:
            break
    return size


def _largest_q(n_out: int, n_in: int, m: int, state_bits: int, metric_dtype: str, k_branches: int,
               budget: float, cap: int | None = None) -> int:
    """Largest q <= min(cap, 4 * min(n_out, n_in)) whose stored bytes fit `budget` (binary search);
    0 when even q=1 does not fit."""
    if stored_nbytes(n_out, n_in, 1, m, state_bits, metric_dtype, k_branches) > budget:
        return 0
    limit = 4 * min(n_out, n_in)
    lo, hi = 1, max(1, limit if cap is None else min(cap, limit))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if stored_nbytes(n_out, n_in, mid, m, state_bits, metric_dtype, k_branches) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _max_q(n_out: int, n_in: int, ratio: float, state_bits: int, metric_dtype: str, m: int,
           k_branches: int) -> tuple[int, int] | None:
    """Largest q (with m shrunk if the metric net alone is too big) within ratio * fp32 bytes."""
    budget = ratio * n_out * n_in * 4
    for m_try in sorted({m, max(1, m // 2), max(1, m // 4), 1}, reverse=True):
        q = _largest_q(n_out, n_in, m_try, state_bits, metric_dtype, k_branches, budget)
        if q:
            return q, m_try
    return None


AUTO_STATE_BITS = (8, 6, 4)  # state widths state_bits="auto" chooses among
SEARCH_MAX_M = 48  # widest metric net the search tries (step cost grows linearly with m)
SEARCH_WIDER = (1.0, 1.3)  # metric widths tried per bit width, as multiples of the balanced width


def size_candidates(
    n_out: int, n_in: int, ratio: float, bits_options, metric_dtype: str,
    k_branches: int = K_BRANCHES, wider=SEARCH_WIDER, max_m: int = SEARCH_MAX_M,
) -> list[tuple[int, int, int]]:
    """Shapes (q, m, state_bits) within ratio * fp32 bytes, none with dead state dimensions.

    W_hat sees a state only through k_branches * m numbers, so q <= k_branches * m. Per bit width
    the balanced width m* is the narrowest m whose largest fitting q is at most k_branches * m
    (narrower: dead dimensions; wider: fewer states per byte); the candidates are m* times each
    factor in `wider`, each with its largest fitting q (capped at k_branches * m when even max_m
    leaves dead dimensions). Ordered by bit width as given, then width; pilot fits choose."""
    budget = ratio * n_out * n_in * 4
    out: list[tuple[int, int, int]] = []
    for bits in bits_options:
        def largest_q(m, bits=bits):
            return _largest_q(n_out, n_in, m, bits, metric_dtype, k_branches, budget, cap=k_branches * m)
        # largest_q(m) is capped at k_branches * m; the balanced width is the first m where the
        # cap does not bind (or the last m that still fits anything)
        m_star = None
        for m in range(1, max_m + 1):
            q = largest_q(m)
            if q == 0:
                break
            m_star = m
            uncapped = stored_nbytes(n_out, n_in, q + 1, m, bits, metric_dtype, k_branches) > budget
            if uncapped:
                break
        if m_star is None:
            continue
        for factor in wider:
            m = min(max_m, max(m_star, round(m_star * factor)))
            q = largest_q(m)
            if q > 0 and not any(c[1:] == (m, bits) for c in out):
                out.append((q, m, bits))
    return out
