"""Baseline weight-compression methods, stored in the same `CompressedWeight` contract as RieM.

Every comparison (and `method="auto"`) runs through one code path: a method fits a weight into
a `CompressedWeight` whose `arrays` are exactly what an artifact stores, and a torch decoder in
`DECODERS` turns those arrays back into the float32 weight (torch ops only, so it traces under
torch.export and exports to standard ONNX ops).

Methods (the weight is viewed as the matrix (shape[0], prod(shape[1:])) unless said otherwise):
- "dense":   the weight kept as float32 or float16 (the "do not compress" candidate).
- "svd":     truncated SVD, W ~ left @ right with the singular values split evenly between the two
             factors; factors stored as float32, float16 or int8 with a float32 scale per row.
- "tucker2": Tucker-2 on the two channel modes of a KxK conv weight (out, in, *kernel):
             W ~ core x0 out_factor x1 in_factor; exports as 1x1 conv, KxK conv, 1x1 conv.
- "rtn":     round-to-nearest symmetric integer codes, a scale per output row (per channel) or
             per group of `group_size` consecutive inputs; codes bit-packed with an offset of
             2**(bits-1) (the ONNX DequantizeLinear zero point for unsigned codes).

This module imports only numpy, torch and riem_compiler.{riem, compressed, errors}, so compressed.py can
import it to register the decoders without an import cycle.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from riem_compiler import riem
from riem_compiler.compressed import DECODERS, CompressedWeight
from riem_compiler.errors import InputError

log = logging.getLogger("riem_compiler.baselines")

SVD_FACTOR_BITS = (32, 16, 8)
RTN_BITS = (8, 4, 3, 2)
# (bits, group_size) from most to fewest bytes; `rtn_settings_for_ratio` takes the first that fits.
RTN_LADDER = ((8, None), (4, 128), (4, None), (3, 128), (3, None), (2, 128), (2, None))
DENSE_DTYPES = ("float32", "float16")


def _matrix(weight) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim < 2:
        raise InputError(f"expected a weight with at least 2 dimensions, got shape {w.shape}")
    return w.reshape(w.shape[0], -1)


def _fp32_bytes(shape) -> int:
    return int(np.prod(shape)) * 4


def matrix_svd(matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (U, S, Vt) in float64 (torch's LAPACK call: several times faster here than
    numpy's float32 one, and as deterministic)."""
    m = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float64))
    U, S, Vt = torch.linalg.svd(m, full_matrices=False)
    return U.numpy(), S.numpy(), Vt.numpy()


def relative_error(weight, cw: CompressedWeight) -> float:
    """||W - W_hat||_F / ||W||_F of the stored artifact (||W - W_hat||_F when W == 0). No floor
    on ||W||: a weight of subnormal magnitude would otherwise score any W_hat (even 0) as exact."""
    w = np.asarray(weight, dtype=np.float64)
    diff = np.linalg.norm(w - cw.reconstruct().astype(np.float64))
    norm = np.linalg.norm(w)
    return float(diff / norm) if norm > 0 else float(diff)


# ----------------------------------------------------------------------------- dense

def fit_dense(weight, dtype: str = "float16") -> CompressedWeight:
    """Keep the weight uncompressed (float32) or cast to float16."""
    if dtype not in DENSE_DTYPES:
        raise InputError(f"dense dtype must be one of {DENSE_DTYPES}, got {dtype!r}")
    w = np.asarray(weight, dtype=np.float32)
    return CompressedWeight("dense", tuple(w.shape), {"dtype": dtype}, {"weight": w.astype(dtype)})


def _decode_dense(cw: CompressedWeight, t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["weight"].to(torch.float32)


# ----------------------------------------------------------------------------- svd

def svd_nbytes(shape, rank: int, factor_bits: int = 16) -> int:
    """Stored bytes of a rank-`rank` SVD of the matrix view of `shape`."""
    n, d = shape[0], int(np.prod(shape[1:]))
    if factor_bits == 8:  # int8 codes + one float32 scale per row of each factor
        return rank * (n + d) + 4 * (n + rank)
    if factor_bits in (16, 32):
        return rank * (n + d) * factor_bits // 8
    raise InputError(f"factor_bits must be one of {SVD_FACTOR_BITS}, got {factor_bits}")


def svd_rank_for_ratio(shape, ratio: float, factor_bits: int = 16) -> int:
    """Largest rank whose stored bytes fit ratio * fp32 bytes (0 when not even rank 1 fits)."""
    budget = ratio * _fp32_bytes(shape)
    full = min(shape[0], int(np.prod(shape[1:])))
    rank = 0
    for r in range(1, full + 1):  # bytes grow linearly in r; a scan is exact and cheap
        if svd_nbytes(shape, r, factor_bits) > budget:
            break
        rank = r
    return rank


def solve_least_squares(A: np.ndarray, B: np.ndarray, min_pivot: float = 1e-8) -> np.ndarray:
    """X minimising ||A X - B||_F (float64), through the normal equations A^T A X = A^T B (fast:
    A is tall with few columns, B is wide), robust to a rank-deficient A.

    When A has no zero column and its column-scaled Gram matrix passes a Cholesky test (every
    pivot above `min_pivot`; the quantised factors here are near-orthogonal, so that test is
    tight) this is the plain LU solve, as before. Otherwise (rank-deficient or all-zero weights,
    factor columns that quantise to zero, dependent columns) the minimum-norm solution: zero
    rows for zero columns, and a truncated eigen-decomposition (a pseudo-inverse) of the
    column-scaled Gram matrix of the rest. Never raises on a finite A and B.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    G = A.T @ A
    rhs = A.T @ B
    k = G.shape[0]
    X = np.zeros((k,) + B.shape[1:])
    d = np.diag(G).copy()
    eps = np.finfo(np.float64).eps
    if not (np.isfinite(G).all() and np.isfinite(rhs).all()):
        return np.full(X.shape, np.nan)  # overflowed: a non-finite fit, which callers report
    if k == 0 or not d.max(initial=0.0) > 0:  # A == 0: the minimum-norm solution is 0
        return X
    live = d > k * eps * d.max()
    s = 1.0 / np.sqrt(d[live])
    Gs = G[np.ix_(live, live)] * s[:, None] * s[None, :]  # unit diagonal
    if live.all():
        try:
            pivots = np.diag(np.linalg.cholesky(Gs))
            if pivots.min() ** 2 > min_pivot:
                return np.linalg.solve(G, rhs)
        except np.linalg.LinAlgError:
            pass
    w, V = np.linalg.eigh(Gs)
    keep = w > Gs.shape[0] * eps * w.max()
    Vk = V[:, keep]
    col = (-1,) + (1,) * (rhs.ndim - 1)  # broadcast a per-row vector over rhs's other axes
    X[live] = s.reshape(col) * (Vk @ ((Vk.T @ (s.reshape(col) * rhs[live])) / w[keep].reshape(col)))
    return X


def _quantize_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes with one float32 scale per row."""
    scale = (np.abs(x).max(axis=1) / 127.0).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    return codes, scale


def fit_svd(weight, ratio: float, factor_bits: int = 16, *, usv=None) -> CompressedWeight:
    """Truncated SVD of the matrix view at the largest rank that fits ratio * fp32 bytes.

    usv: an already computed `matrix_svd(matrix)` to reuse across ratios.
    With int8 factors the right factor is re-solved by least squares against the quantised left
    factor before it is quantised itself, so part of the left factor's rounding is absorbed.
    """
    shape = tuple(np.shape(weight))
    M = _matrix(weight)
    rank = svd_rank_for_ratio(shape, ratio, factor_bits)
    if rank == 0:
        raise InputError(
            f"ratio {ratio} is too small for a rank-1 SVD of a {M.shape} matrix with "
            f"{factor_bits}-bit factors ({svd_nbytes(shape, 1, factor_bits)} bytes needed, "
            f"{ratio * _fp32_bytes(shape):.0f} allowed); raise the ratio or use another method")
    U, S, Vt = usv if usv is not None else matrix_svd(M)
    root = np.sqrt(S[:rank])
    left = U[:, :rank] * root
    right = root[:, None] * Vt[:rank]
    meta = {"rank": rank, "factor_bits": factor_bits}
    if factor_bits == 8:
        left_codes, left_scale = _quantize_rows_int8(left)
        left_q = left_codes.astype(np.float64) * left_scale[:, None]
        M = M.astype(np.float64)
        right = solve_least_squares(left_q, M)
        right_codes, right_scale = _quantize_rows_int8(right)
        arrays = {"left_codes": left_codes, "left_scale": left_scale,
                  "right_codes": right_codes, "right_scale": right_scale}
    else:
        dtype = np.float32 if factor_bits == 32 else np.float16
        arrays = {"left": left.astype(dtype), "right": right.astype(dtype)}
    return CompressedWeight("svd", shape, meta, arrays)


def _decode_svd(cw: CompressedWeight, t: dict[str, torch.Tensor]) -> torch.Tensor:
    if cw.meta["factor_bits"] == 8:
        left = t["left_codes"].to(torch.float32) * t["left_scale"].to(torch.float32)[:, None]
        right = t["right_codes"].to(torch.float32) * t["right_scale"].to(torch.float32)[:, None]
    else:
        left, right = t["left"].to(torch.float32), t["right"].to(torch.float32)
    return left @ right


# ----------------------------------------------------------------------------- tucker-2

def tucker2_nbytes(shape, ranks: tuple[int, int]) -> int:
    """Stored bytes (float16) of a Tucker-2 of a conv weight (out, in, *kernel)."""
    out_ch, in_ch, kernel = shape[0], shape[1], int(np.prod(shape[2:]))
    r_out, r_in = ranks
    return 2 * (out_ch * r_out + in_ch * r_in + r_out * r_in * kernel)


def tucker2_ranks_for_ratio(shape, ratio: float) -> tuple[int, int] | None:
    """Largest channel ranks, kept proportional to the channel counts, that fit ratio * fp32 bytes."""
    out_ch, in_ch, kernel = shape[0], shape[1], int(np.prod(shape[2:]))
    budget = ratio * _fp32_bytes(shape)
    max_out, max_in = min(out_ch, in_ch * kernel), min(in_ch, out_ch * kernel)
    for r_out in range(max_out, 0, -1):
        r_in = max(1, min(max_in, round(r_out * in_ch / out_ch)))
        feasible = r_out <= r_in * kernel and r_in <= r_out * kernel
        if feasible and tucker2_nbytes(shape, (r_out, r_in)) <= budget:
            return r_out, r_in
    return None


def _leading_left_vectors(unfolded: np.ndarray, rank: int) -> np.ndarray:
    return matrix_svd(unfolded)[0][:, :rank]


def channel_svds(weight) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(U, S) of the output-channel and of the input-channel unfolding of a conv weight: what
    the Tucker-2 rank choice and its HOSVD start both need (compute once per weight)."""
    w = np.asarray(weight, dtype=np.float64)
    u_out, s_out, _ = matrix_svd(w.reshape(w.shape[0], -1))
    u_in, s_in, _ = matrix_svd(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1))
    return (u_out, s_out), (u_in, s_in)


def tucker2_ranks_by_energy(weight, ratio: float, svds=None) -> tuple[int, int] | None:
    """Channel ranks that fit ratio * fp32 bytes and discard the least energy: the sum of the
    dropped squared singular values of the two channel unfoldings (an upper bound on the
    squared error of the truncated HOSVD). Ties go to the smaller pair. `svds`: channel_svds(weight)."""
    shape = np.shape(weight)
    out_ch, in_ch, kernel = shape[0], shape[1], int(np.prod(shape[2:]))
    (_, s_out), (_, s_in) = svds or channel_svds(weight)
    s_out, s_in = s_out ** 2, s_in ** 2
    tail_out = np.concatenate([np.cumsum(s_out[::-1])[::-1], [0.0]])  # tail_out[r] = sum s_out[r:]
    tail_in = np.concatenate([np.cumsum(s_in[::-1])[::-1], [0.0]])
    r_out = np.arange(1, len(s_out) + 1)[:, None]
    r_in = np.arange(1, len(s_in) + 1)[None, :]
    nbytes = 2 * (out_ch * r_out + in_ch * r_in + r_out * r_in * kernel)
    dropped = tail_out[r_out] + tail_in[r_in]
    # HOOI projects one mode onto the other's factor: a rank above r_other * kernel cannot exist
    feasible = (r_out <= r_in * kernel) & (r_in <= r_out * kernel)
    fits = (nbytes <= ratio * _fp32_bytes(shape)) & feasible
    if not fits.any():
        return None
    score = np.where(fits, dropped, np.inf)
    best = np.flatnonzero(score == score.min())
    i, j = np.unravel_index(best[np.argmin(nbytes.ravel()[best])], score.shape)
    return int(i) + 1, int(j) + 1


def fit_tucker2(weight, ratio: float, groups: int = 1, iterations: int = 5,
                rank_rule: str = "energy", svds=None) -> CompressedWeight:
    """Tucker-2 on the output/input channel modes of a conv weight (HOSVD start, then HOOI).

    Only for ungrouped convs with a kernel of more than one tap: a 1x1 or grouped conv is a
    matrix (use "svd") or a set of small matrices. rank_rule "energy" picks the rank pair by
    `tucker2_ranks_by_energy`; "proportional" keeps ranks proportional to the channel counts.
    `svds`: channel_svds(weight), when the caller already has it.
    """
    w = np.asarray(weight, dtype=np.float64)
    shape = tuple(w.shape)
    if w.ndim < 3 or int(np.prod(shape[2:])) <= 1:
        raise InputError(f"tucker2 needs a conv weight (out, in, *kernel) with more than one tap, "
                         f"got shape {shape}; use method 'svd' for matrices and 1x1 convs")
    if groups != 1:
        raise InputError(f"tucker2 supports groups == 1 only, got groups={groups}; use 'svd' or 'rtn'")
    svds = svds or channel_svds(w)
    if rank_rule == "energy":
        ranks = tucker2_ranks_by_energy(w, ratio, svds)
    elif rank_rule == "proportional":
        ranks = tucker2_ranks_for_ratio(shape, ratio)
    else:
        raise InputError(f"rank_rule must be 'energy' or 'proportional', got {rank_rule!r}")
    if ranks is None:
        raise InputError(f"ratio {ratio} is too small for a rank-(1, 1) Tucker-2 of shape {shape} "
                         f"({tucker2_nbytes(shape, (1, 1))} bytes needed); raise the ratio")
    r_out, r_in = ranks
    out_ch, in_ch = shape[0], shape[1]
    (u_out, _), (u_in, _) = svds
    out_f, in_f = u_out[:, :r_out], u_in[:, :r_in]
    for _ in range(iterations):
        y = np.einsum("oi...,is->os...", w, in_f)
        out_f = _leading_left_vectors(y.reshape(out_ch, -1), r_out)
        z = np.einsum("oi...,or->ir...", w, out_f)
        in_f = _leading_left_vectors(z.reshape(in_ch, -1), r_in)
    out_16, in_16 = out_f.astype(np.float16), in_f.astype(np.float16)
    # core against the stored (rounded) factors; least squares through their pseudo-inverses
    p_out = np.linalg.pinv(out_16.astype(np.float64))
    p_in = np.linalg.pinv(in_16.astype(np.float64))
    core = np.einsum("ro,oi...,si->rs...", p_out, w, p_in)
    arrays = {"out_factor": out_16, "core": core.astype(np.float16), "in_factor": in_16}
    meta = {"ranks": [r_out, r_in], "iterations": iterations, "rank_rule": rank_rule}
    return CompressedWeight("tucker2", shape, meta, arrays)


def _decode_tucker2(cw: CompressedWeight, t: dict[str, torch.Tensor]) -> torch.Tensor:
    out_f = t["out_factor"].to(torch.float32)
    in_f = t["in_factor"].to(torch.float32)
    core = t["core"].to(torch.float32)
    r_out, r_in = cw.meta["ranks"]
    kernel = int(np.prod(cw.shape[2:]))
    mixed = (out_f @ core.reshape(r_out, r_in * kernel)).reshape(-1, r_in, kernel)  # (out, r_in, k)
    return torch.einsum("osk,is->oik", mixed, in_f)


# ----------------------------------------------------------------------------- rtn

def _rtn_layout(shape, group_size: int | None) -> tuple[int, int, int]:
    """(rows, cols, group) of the matrix view; per-channel means one group of all columns."""
    n, d = shape[0], int(np.prod(shape[1:]))
    return n, d, (d if group_size is None else int(group_size))


def rtn_scale_dtype(group_size: int | None) -> str:
    """float32 for one scale per row (negligible bytes), float16 per group."""
    return "float32" if group_size is None else "float16"


def rtn_nbytes(shape, bits: int, group_size: int | None = 128) -> int:
    n, d, g = _rtn_layout(shape, group_size)
    groups = math.ceil(d / g)
    return riem.packed_nbytes(n * d, bits) + n * groups * np.dtype(rtn_scale_dtype(group_size)).itemsize


def rtn_settings_for_ratio(ratio: float, shape=None, group_size: int = 128) -> tuple[int, int | None] | None:
    """Most precise (bits, group_size) from RTN_LADDER whose stored bytes fit ratio * fp32 bytes.

    With `shape` the exact bytes of that weight are used: 4-bit codes plus float16 group scales
    cost a little over 1/8 of fp32, and int8 per channel a little over 1/4, so ratio 0.25 gets
    4-bit groups and 0.125 gets 3-bit groups. Without it, the per-row scale of a very wide matrix
    is taken as free (so 0.25 gives int8 per channel), which can overshoot a real weight's budget.
    None when not even 2 bits per channel fits.
    """
    if not isinstance(ratio, (int, float, np.floating)):
        raise InputError(f"rtn_settings_for_ratio(ratio, shape=None, group_size=128): ratio must be a "
                         f"number, got {type(ratio).__name__}")
    for bits, group in RTN_LADDER:
        group = None if group is None else group_size
        if shape is not None:
            fits = rtn_nbytes(shape, bits, group) <= ratio * _fp32_bytes(shape)
        else:
            per_weight = bits / 8 + (0.0 if group is None else np.dtype(rtn_scale_dtype(group)).itemsize / group)
            fits = per_weight <= 4 * ratio
        if fits:
            return bits, group
    return None


def fit_rtn(weight, bits: int = 8, group_size: int | None = None) -> CompressedWeight:
    """Round-to-nearest symmetric quantisation: codes in [-(2**(bits-1)-1), 2**(bits-1)-1],
    scale = max|w| / (2**(bits-1)-1) per row (group_size None) or per group of consecutive
    inputs along the matrix view's columns (the last group may be shorter)."""
    if bits not in RTN_BITS:
        raise InputError(f"rtn bits must be one of {RTN_BITS}, got {bits}")
    if group_size is not None and group_size < 1:
        raise InputError(f"group_size must be a positive integer or None, got {group_size}")
    shape = tuple(np.shape(weight))
    M = _matrix(weight)
    n, d, g = _rtn_layout(shape, group_size)
    groups = math.ceil(d / g)
    qmax = (1 << (bits - 1)) - 1
    offset = 1 << (bits - 1)
    padded = np.zeros((n, groups * g), dtype=np.float32)
    padded[:, :d] = M
    absmax = np.abs(padded.reshape(n, groups, g)).max(axis=2)
    sdtype = rtn_scale_dtype(group_size)
    tiny = np.finfo(sdtype).smallest_subnormal
    scale = np.maximum(absmax / qmax, tiny).astype(sdtype)  # codes use the stored (rounded) scale
    scale_cols = np.repeat(scale.astype(np.float32), g, axis=1)[:, :d]
    codes = np.clip(np.rint(M / scale_cols), -qmax, qmax).astype(np.int64) + offset
    arrays = {"codes": riem.pack_codes(codes, bits),
              "scale": scale.reshape(n) if group_size is None else scale}
    meta = {"bits": bits, "group_size": group_size, "offset": offset, "scale_dtype": sdtype}
    return CompressedWeight("rtn", shape, meta, arrays)


def unpack_codes_exportable(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Float32 codes from `riem.pack_codes` output (little-endian bit order), written with
    floor-division and remainder only: torch.onnx exports those (Div/Floor/Mod) where it
    rejects bit shifts. When bits divides 8, code j of a byte is (byte // 2**(j*bits)) % 2**bits."""
    p = packed.reshape(-1, 1).to(torch.int32)
    if bits == 8:
        return p.reshape(-1)[:count].to(torch.float32)
    if 8 % bits == 0:
        per_byte = 8 // bits
        div = 2 ** (bits * torch.arange(per_byte, dtype=torch.int32, device=p.device))
        codes = torch.remainder(torch.div(p, div, rounding_mode="floor"), 2 ** bits)
        return codes.reshape(-1)[:count].to(torch.float32)
    div = 2 ** torch.arange(8, dtype=torch.int32, device=p.device)
    stream = torch.remainder(torch.div(p, div, rounding_mode="floor"), 2).reshape(-1)[: count * bits]
    place = 2.0 ** torch.arange(bits, dtype=torch.float32, device=p.device)
    return (stream.reshape(count, bits).to(torch.float32) * place).sum(dim=1)


def _decode_rtn(cw: CompressedWeight, t: dict[str, torch.Tensor]) -> torch.Tensor:
    n, d, g = _rtn_layout(cw.shape, cw.meta["group_size"])
    bits = cw.meta["bits"]
    codes = unpack_codes_exportable(t["codes"], bits, n * d).reshape(n, d) - float(cw.meta["offset"])
    scale = t["scale"].to(torch.float32).reshape(n, -1)
    if cw.meta["group_size"] is not None:
        scale = scale.repeat_interleave(g, dim=1)[:, :d]
    return codes * scale


# ----------------------------------------------------------------------------- one entry point

def fit_for_ratio(method: str, weight, ratio: float, groups: int = 1, svd_factor_bits: int = 16,
                  rtn_group_size: int = 128) -> CompressedWeight:
    """A baseline at `ratio` of the weight's fp32 bytes (what method="svd"/"rtn"/"tucker2" does
    per layer). RTN takes the most precise setting that fits, so 0.25 gets 4-bit groups: int8
    per channel needs 1/4 plus its scales."""
    shape = tuple(np.shape(weight))
    if method == "svd":
        return fit_svd(weight, ratio, svd_factor_bits)
    if method == "tucker2":
        return fit_tucker2(weight, ratio, groups=groups)
    if method == "rtn":
        setting = rtn_settings_for_ratio(ratio, shape, rtn_group_size)
        if setting is None:
            raise InputError(f"ratio {ratio} is too small for 2-bit RTN of shape {shape} "
                             f"({rtn_nbytes(shape, 2, None)} bytes needed); raise the ratio")
        return fit_rtn(weight, *setting)
    raise InputError(f"unknown baseline method {method!r}; known: 'svd', 'tucker2', 'rtn'")


DECODERS["dense"] = _decode_dense
DECODERS["svd"] = _decode_svd
DECODERS["tucker2"] = _decode_tucker2
DECODERS["rtn"] = _decode_rtn
