"""svd: truncated SVD of the matrix view, W ~ left @ right with the singular values split evenly
between the two factors; factors stored as float32, float16, or int8 with a float32 scale per row."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.methods.base import DecoderCall, Method, RankEstimate, fp32_bytes, matrix, ratios_with, within_ratio
from riem_compiler.metrics import spectrum

FACTOR_BITS = (32, 16, 8)


@dataclass(frozen=True)
class SVDSettings:
    factor_bits: int = 16

    def __post_init__(self):
        if self.factor_bits not in FACTOR_BITS:
            raise InputError(f"svd factor_bits must be one of {FACTOR_BITS}; got {self.factor_bits!r}")


def matrix_svd(matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (U, S, Vt) in float64, through the eigen-decomposition of the Gram matrix of the
    matrix's shorter side: 2-4x faster than LAPACK's SVD of the matrix itself and without its
    workspace of several matrix sizes (one thread: 5632x2048 3.2 s instead of 6.4 s, 2048x5632
    3.1 s instead of 12.2 s; singular values within 3e-15 of LAPACK's relative to the largest,
    rank-700 truncations within 2e-13, on random weights).

    Each singular value is the norm of the matrix times its singular vector (accurate where the
    Gram's eigenvalue, a square, is not); directions with no energy get a zero vector on the long
    side (the reconstruction U S Vt is exact either way). Deterministic, like torch's LAPACK calls."""
    m = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float64))
    wide = m.shape[0] < m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    _, short = torch.linalg.eigh(gram)  # eigenvalues ascending
    del gram
    short = short.flip(1)
    scaled = short.T @ m if wide else m @ short  # S_i times the long side's vector i (rows or columns)
    S = torch.linalg.vector_norm(scaled, dim=1 if wide else 0)
    if not bool((S[:-1] >= S[1:]).all()):  # near-equal values the norms ordered otherwise
        order = torch.argsort(S, descending=True, stable=True)
        S, short, scaled = S[order], short[:, order], (scaled[order] if wide else scaled[:, order])
    live = S > torch.finfo(torch.float64).tiny
    inverse = torch.where(live, 1.0 / torch.where(live, S, 1.0), 0.0)
    if wide:
        return short.numpy(), S.numpy(), scaled.mul_(inverse[:, None]).numpy()
    return scaled.mul_(inverse).numpy(), S.numpy(), np.ascontiguousarray(short.T.numpy())


def svd_nbytes(shape, rank: int, factor_bits: int = 16) -> int:
    """Stored bytes of a rank-`rank` SVD of the matrix view of `shape`."""
    n, d = shape[0], int(np.prod(shape[1:]))
    if factor_bits == 8:  # int8 codes + one float32 scale per row of each factor
        return rank * (n + d) + 4 * (n + rank)
    if factor_bits in (16, 32):
        return rank * (n + d) * factor_bits // 8
    raise InputError(f"factor_bits must be one of {FACTOR_BITS}, got {factor_bits}")


def svd_rank_for_ratio(shape, ratio: float, factor_bits: int = 16) -> int:
    """Largest rank whose stored bytes fit ratio * fp32 bytes (0 when not even rank 1 fits)."""
    budget = ratio * fp32_bytes(shape)
    full = min(shape[0], int(np.prod(shape[1:])))
    rank = 0
    for r in range(1, full + 1):  # bytes grow linearly in r; a scan is exact and cheap
        if svd_nbytes(shape, r, factor_bits) > budget:
            break
        rank = r
    return rank


def solve_least_squares(A: np.ndarray, B: np.ndarray, min_pivot: float = 1e-8) -> np.ndarray:
    """X minimising ||A X - B||_F (float64), through the normal equations A^T A X = A^T B (fast:
    A is tall with few columns, B is wide), robust to a rank-deficient A (`solve_normal_equations`).
    fit_svd calls the two steps itself, so that it can free A and B before the solve."""
    return solve_normal_equations(*normal_equations(A, B), min_pivot=min_pivot)


def normal_equations(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A^T A, A^T B) in float64; B's float64 copy lives only in here."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    return A.T @ A, A.T @ B


def solve_normal_equations(G: np.ndarray, rhs: np.ndarray, min_pivot: float = 1e-8) -> np.ndarray:
    """X solving G X = rhs for G = A^T A, rhs = A^T B: the least-squares solution of A X = B.

    When A has no zero column and its column-scaled Gram matrix passes a Cholesky test (every
    pivot above `min_pivot`; the quantised factors here are near-orthogonal, so that test is
    tight) this is the plain LU solve. Otherwise (rank-deficient or all-zero weights, factor
    columns that quantise to zero, dependent columns) the minimum-norm solution: zero rows for
    zero columns, and a truncated eigen-decomposition (a pseudo-inverse) of the column-scaled
    Gram matrix of the rest. Never raises on finite G and rhs.
    """
    k = G.shape[0]
    shape = (k,) + rhs.shape[1:]
    d = np.diag(G).copy()
    eps = np.finfo(np.float64).eps
    if not (np.isfinite(G).all() and np.isfinite(rhs).all()):
        return np.full(shape, np.nan)  # overflowed: a non-finite fit, which callers report
    if k == 0 or not d.max(initial=0.0) > 0:  # A == 0: the minimum-norm solution is 0
        return np.zeros(shape)
    live = d > k * eps * d.max()
    s = 1.0 / np.sqrt(d[live])
    Gs = G[np.ix_(live, live)]  # a copy, scaled in place to a unit diagonal
    Gs *= s[:, None]
    Gs *= s[None, :]
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
    X = np.zeros(shape)
    X[live] = s.reshape(col) * (Vk @ ((Vk.T @ (s.reshape(col) * rhs[live])) / w[keep].reshape(col)))
    return X


def _quantize_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes with one float32 scale per row. Overwrites x (a float64 factor, up to
    2x the weight's bytes: a copy of it was most of the fit's peak)."""
    scale = (np.abs(x).max(axis=1) / 127.0).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = x
    q /= scale[:, None]
    np.rint(q, out=q)
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8), scale


def fit_svd(weight, ratio: float, factor_bits: int = 16, *, usv=None) -> CompressedWeight:
    """Truncated SVD of the matrix view at the largest rank that fits ratio * fp32 bytes.

    usv: an already computed `matrix_svd(matrix)` to reuse across ratios.
    With int8 factors the right factor is re-solved by least squares against the quantised left
    factor before it is quantised itself, so part of the left factor's rounding is absorbed.
    """
    shape = tuple(np.shape(weight))
    M = matrix(weight)
    rank = svd_rank_for_ratio(shape, ratio, factor_bits)
    if rank == 0:
        raise InputError(
            f"ratio {ratio} is too small for a rank-1 SVD of a {M.shape} matrix with "
            f"{factor_bits}-bit factors ({svd_nbytes(shape, 1, factor_bits)} bytes needed, "
            f"{ratio * fp32_bytes(shape):.0f} allowed); raise the ratio or use another method")
    U, S, Vt = usv if usv is not None else matrix_svd(M)
    root = np.sqrt(S[:rank])
    left = U[:, :rank] * root
    right = root[:, None] * Vt[:rank]
    meta = {"rank": rank, "factor_bits": factor_bits}
    if factor_bits == 8:
        left_codes, left_scale = _quantize_rows_int8(left)
        del left
        left_q = left_codes.astype(np.float64)
        left_q *= left_scale[:, None]
        G, rhs = normal_equations(left_q, M)
        del left_q  # the solve holds only the (rank x rank) and (rank x cols) systems
        right = solve_normal_equations(G, rhs)
        del G, rhs
        right_codes, right_scale = _quantize_rows_int8(right)
        arrays = {"left_codes": left_codes, "left_scale": left_scale,
                  "right_codes": right_codes, "right_scale": right_scale}
    else:
        dtype = np.float32 if factor_bits == 32 else np.float16
        arrays = {"left": left.astype(dtype), "right": right.astype(dtype)}
    return CompressedWeight("svd", shape, meta, arrays)


def decode_svd(cw: CompressedWeight, t: dict) -> torch.Tensor:
    if cw.meta["factor_bits"] == 8:
        left = t["left_codes"].to(torch.float32) * t["left_scale"].to(torch.float32)[:, None]
        right = t["right_codes"].to(torch.float32) * t["right_scale"].to(torch.float32)[:, None]
    else:
        left, right = t["left"].to(torch.float32), t["right"].to(torch.float32)
    return left @ right


class SVD(Method):
    name = "svd"
    Settings = SVDSettings
    tvm_dense_reason = None
    screened_by_rank = True  # a layer's spectrum costs a quarter of its SVD and fits (metrics.spectrum)

    def fit(self, spec, ratio, settings, index=0):
        # InputError (a ValueError) when not even rank 1 fits
        return within_ratio(spec, ratio, fit_svd(spec.weight, ratio, settings.factor_bits))

    def candidates(self, spec, budget_ratio, options, attempt):
        w = np.asarray(spec.weight, dtype=np.float32)
        if w.ndim < 2 or min(w.shape[0], int(np.prod(w.shape[1:]))) <= 1:
            return
        ratios = ratios_with(options.get("ratios", ()), budget_ratio)
        n, d = w.shape[0], int(np.prod(w.shape[1:]))
        rungs = []  # (bits, rank, ratio), one per (bits, rank)
        for bits in options.get("factor_bits", (16, 8)):
            ranks = set()
            for r in ratios:
                rank = svd_rank_for_ratio(w.shape, r, bits)
                # factors of as many numbers as the matrix are no low-rank form: the matrix itself at
                # those bits (rtn8, float16) is a candidate in fewer bytes (a full-rank int8 pair took
                # 2.4 of a 2048x5632 layer's 6.6 s of svd fits)
                if rank > 0 and rank not in ranks and rank * (n + d) < n * d:
                    ranks.add(rank)
                    rungs.append((bits, rank, r))
        if not rungs:
            return
        if options.get("rank_estimates"):  # auto's screening: the truncated SVD's errors, no factors yet
            layer_view = w.reshape(n, d).T if spec.in_axis == 0 else w.reshape(n, d)
            found = attempt(spec.name, "svd (spectrum)", spectrum, layer_view, keep=False)
            if found is None:
                return
            for bits, rank, _ in rungs:
                attempt(spec.name, f"svd{bits} r{rank}", RankEstimate, self.name, f"svd{bits} r{rank}",
                        f"svd{bits}", w.shape, svd_nbytes(w.shape, rank, bits), rank, found)
            return
        usv = []  # the matrix SVD (or why it failed), made at the first fit attempted: auto's second
        # pass may attempt none of them

        def fit(ratio, bits):
            if not usv:
                try:
                    usv.append(matrix_svd(w.reshape(n, d)))
                except Exception as exc:  # noqa: BLE001 - each candidate is dropped with it
                    usv.append(exc)
            if isinstance(usv[0], Exception):
                raise usv[0]
            return fit_svd(w, ratio, bits, usv=usv[0])

        for bits, rank, r in rungs:
            attempt(spec.name, f"svd{bits} r{rank}", fit, r, bits)

    def decode_torch(self, cw, tensors):
        return decode_svd(cw, tensors)

    def family(self, cw):
        return f"svd{cw.meta['factor_bits']}"

    def label(self, cw):
        return f"svd{cw.meta['factor_bits']} r{cw.meta['rank']}"

    def trainable(self, cw, param_name=""):
        if cw.meta.get("factor_bits") == 8:
            from riem_compiler.methods.svd.trainable import SvdInt8View

            return SvdInt8View(cw, param_name)
        from riem_compiler.methods.trainable import FloatArraysView

        return FloatArraysView(cw, param_name)

    def onnx_call(self, cw):
        shape = [int(s) for s in cw.shape]
        if cw.meta["factor_bits"] == 8:
            return DecoderCall("SVDWeightInt8", ["left_codes", "left_scale", "right_codes", "right_scale"],
                               {"shape": shape})
        return DecoderCall("SVDWeight", ["left", "right"], {"shape": shape})

    def onnx_functions(self):
        from riem_compiler.methods.svd import onnx as o

        return {"SVDWeight": (o.SVDWeight, ()), "SVDWeightInt8": (o.SVDWeightInt8, ())}

    def tvm_kernel(self):
        from riem_compiler.methods.svd import tvm

        return tvm


METHOD = SVD()
