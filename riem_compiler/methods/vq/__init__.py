"""vq: data-free vector (codebook) quantisation. Each row (output) of the quantised matrix is cut
into vectors of `dim` consecutive inputs (the last one zero-padded), divided by the row's scale,
and replaced by the index of its nearest entry in ONE codebook of 2**bits vectors per layer,
learnt by k-means over those vectors (no data: the weight's own vectors are the training set).

Stored arrays (all counted): "codes" (one index per vector, bit-packed, riem_compiler/bitpack.py),
"codebook" (2**bits, dim) float16, "scale" (rows,) float16 relative row scales, and "gain" (1,)
float32, the largest row scale, so that float16 scales hold weights of any magnitude (1e-30 or
1e30). Bytes = ceil(rows * ceil(cols / dim) * bits / 8) + 2 * 2**bits * dim + 2 * rows + 4.

As in rtn, vectors run along the layer's input axis: a 2-D weight stored (in, out) is quantised
as its transpose (meta "transposed")."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from riem_compiler import bitpack
from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.methods.base import DecoderCall, Method, fp32_bytes, matrix, row_ranges, within_ratio
from riem_compiler.methods.rtn.layout import is_transposed, quantised_shape, weight_layout

# a 4096-entry codebook, by explicit setting only: k-means time grows linearly with it (dim 4,
# 12 bits: 7-20 s on a 1536x384 weight here), so the ladder stops at 10 bits (1-4 s)
MAX_BITS = 12
# (dim, bits) from most to fewest code bits per weight (bits / dim): 5 ... 0.75; a longer vector
# beats a shorter one at the same code bits (measured on MiniLM: (3,9) 0.162 vs (2,6) 0.178 at 3)
LADDER = ((2, 10), (2, 9), (2, 8), (2, 7), (3, 9), (3, 8), (4, 10), (4, 9), (4, 8), (5, 9), (6, 10), (5, 8),
          (6, 9), (6, 8), (7, 9), (8, 10), (7, 8), (8, 9), (8, 8), (8, 7), (10, 8), (8, 6))
# fit() runs k-means for this many of the first LADDER rungs that fit and keeps the best (on
# MiniLM's query and intermediate weights at 1/8..1/32 the first won 9 times in 10; the second
# won once, when a longer vector's larger codebook still fit)
FIT_TRIES = 2
# auto's candidates: about 4, 3, 2.5, 2, 1.5 and 1 code bits per weight
AUTO_LADDER = ((2, 8), (3, 9), (4, 10), (4, 8), (6, 9), (8, 8))
# k-means++ seeds from this many (shuffled) vectors per codebook entry
SEEDING = 8
# auto's screening estimates learn the codebook from this many vectors per entry (a whole fit: `sample`)
SCREEN_SAMPLE_PER_CODE = 16
SCREEN_SEEDING = 2  # ... and seed k-means++ from this many per entry (a whole fit: SEEDING)


def _choice(value, name: str):
    """None, or a positive int (a CLI flag arrives as a string; "none" means choose)."""
    if isinstance(value, str):
        value = None if value.strip().lower() in ("", "none", "auto") else value.strip()
        if value is not None and not value.isdigit():
            raise InputError(f"vq {name} must be a positive integer or None; got {value!r}")
        value = None if value is None else int(value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"vq {name} must be a positive integer or None; got {value!r}")
    return value


@dataclass(frozen=True)
class VQSettings:
    """dim, bits: vector length and codebook index bits (None: chosen from LADDER by the ratio).
    iterations: k-means (Lloyd) passes; sample: most vectors the codebook is trained on."""

    dim: int | None = None
    bits: int | None = None
    iterations: int = 8
    seed: int = 0
    sample: int = 65536

    def __post_init__(self):
        object.__setattr__(self, "dim", _choice(self.dim, "dim"))
        object.__setattr__(self, "bits", _choice(self.bits, "bits"))
        if self.bits is not None and self.bits > MAX_BITS:
            raise InputError(f"vq bits must be at most {MAX_BITS}; got {self.bits}")
        for name in ("iterations", "seed", "sample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "sample" else 0):
                raise InputError(f"vq {name} must be a non-negative integer (sample >= 1); got {value!r}")


def vq_layout(shape, dim: int, transposed: bool = False) -> tuple[int, int, int]:
    """(rows, cols, vectors per row) of the quantised matrix."""
    n, d = quantised_shape(shape, transposed)
    return n, d, math.ceil(d / dim)


def vq_nbytes(shape, dim: int, bits: int, transposed: bool = False) -> int:
    n, _, v = vq_layout(shape, dim, transposed)
    return bitpack.packed_nbytes(n * v, bits) + 2 * (1 << bits) * dim + 2 * n + 4


def vq_rungs(shape, ratio: float, settings: VQSettings, transposed: bool = False) -> list[tuple[int, int]]:
    """The (dim, bits) that fit ratio * fp32 bytes, most accurate first. With both settings
    given, just that one; with one given, the best value of the other (more bits, or a shorter
    vector, is always more accurate); with neither, the LADDER rungs that fit."""
    budget = ratio * fp32_bytes(shape)

    def fits(dim, bits):
        return vq_nbytes(shape, dim, bits, transposed) <= budget

    if settings.dim is not None and settings.bits is not None:
        rungs = [(settings.dim, settings.bits)]
    elif settings.dim is not None:
        rungs = [(settings.dim, b) for b in range(MAX_BITS, 0, -1)]
    elif settings.bits is not None:
        rungs = [(d, settings.bits) for d in range(1, 65)]
    else:
        rungs = list(LADDER)
    return [r for r in rungs if fits(*r)]


# ---------------------------------------------------------------------------------------- k-means
# distances per BLAS product of `nearest`
NEAREST_CHUNK = 1 << 17


def nearest(X: np.ndarray, C: np.ndarray, chunk: int = NEAREST_CHUNK, distances: bool = True):
    """Index of the nearest row of C for each row of X, and (distances) that squared distance minus
    ||x||^2 (float32 BLAS: [x, 1] [-2 C^T; ||c||^2], one product instead of a product and a pass adding
    ||c||^2, in chunks of about `chunk` distances: 512 KiB chunks stay in cache, 2.5-4x faster than
    16 MiB ones for the same labels; against 256 KiB ones they halve the Python steps between the
    kernels, which two fit jobs side by side wait on each other for). Without distances, only the
    labels (the gather of each row's minimum was 10-20% of a call with a small codebook)."""
    K, d = C.shape
    step = max(1, chunk // K)
    B = np.empty((d + 1, K), np.float32)
    B[:d] = -2.0 * C.T
    B[d] = (C * C).sum(axis=1)
    Xa = np.ones((min(step, len(X)), d + 1), np.float32)
    labels = np.empty(len(X), np.int64)
    dist = np.empty(len(X), np.float32) if distances else None
    index = np.arange(len(Xa)) if distances else None
    for s in range(0, len(X), step):
        m = min(step, len(X) - s)
        Xa[:m, :d] = X[s:s + m]
        p = Xa[:m] @ B
        a = p.argmin(axis=1)
        labels[s:s + m] = a
        if distances:
            dist[s:s + m] = p[index[:m], a]
    return (labels, dist) if distances else labels


def squared_distances(XT: np.ndarray, c: np.ndarray) -> np.ndarray:
    """((X - c) ** 2).sum(axis=1), bit for bit, from X's columns (XT = X.T, contiguous): numpy
    reduces a short row slowly (0.5 ms for 8192 rows of 2-8 values here, 10-100x the column form).
    The sum replays numpy's order: sequential below 8 terms, 8 interleaved accumulators combined
    pairwise up to 128 (its pairwise block); longer vectors use numpy itself."""
    d = len(XT)
    if d < 8:  # numpy reduces the outer axis row after row: the same sequential order, 3 calls instead of 2d
        return np.square(XT - c[:, None]).sum(axis=0)
    if d > 128:
        return ((np.ascontiguousarray(XT.T) - c) ** 2).sum(axis=1)
    terms = [np.square(XT[j] - c[j]) for j in range(d)]
    acc = terms[:8]
    full = d - d % 8
    for i in range(8, full, 8):
        for j in range(8):
            acc[j] += terms[i + j]
    total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    for t in terms[full:]:
        total += t
    return total


def kmeans_pp(X: np.ndarray, K: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (each new centre drawn with probability ~ squared distance)."""
    C = np.empty((K, X.shape[1]), np.float32)
    XT = np.ascontiguousarray(X.T)
    C[0] = X[rng.integers(len(X))]
    d2 = squared_distances(XT, C[0])
    draws = rng.random(K)
    for k in range(1, K):
        total = np.cumsum(d2)
        # the key in the array's dtype: a float64 key would cast (copy) the whole array per centre
        i = int(np.searchsorted(total, total.dtype.type(draws[k] * total[-1]))) if total[-1] > 0 else k % len(X)
        C[k] = X[min(i, len(X) - 1)]
        np.minimum(d2, squared_distances(XT, C[k]), out=d2)
    return C


def kmeans(X: np.ndarray, K: int, iterations: int, seed: int, seeding: int = SEEDING) -> np.ndarray:
    """Lloyd's k-means from a k-means++ start on up to seeding*K of the (already shuffled) rows (its
    cost grows with K times that); an empty cluster takes the point farthest from its centre.
    Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    C = kmeans_pp(X[: seeding * K], K, rng)
    for _ in range(iterations):
        labels = nearest(X, C, distances=False)
        count = np.bincount(labels, minlength=K)
        full = count > 0
        empty = np.flatnonzero(~full)
        # rare: the distances to this pass's centres, computed again (the same products) only now
        dist = nearest(X, C)[1] if len(empty) else None
        for j in range(X.shape[1]):
            C[full, j] = np.bincount(labels, weights=X[:, j], minlength=K)[full] / count[full]
        if len(empty):
            far = np.argsort(-(dist + (X * X).sum(axis=1)), kind="stable")[: len(empty)]
            C[empty[: len(far)]] = X[far]
    return C


# -------------------------------------------------------------------------------------- fit, decode
# output rows at a time for the float64 work of a fit (normalising, the least-squares row scales): whole,
# the float64 matrix, its decoded copy and their products held ~10x a 4096x11008 weight's fp32 bytes
ROW_CHUNK_VALUES = 1 << 20


class Normalised:
    """A weight's RMS-normalised float32 rows (rows = outputs, C order), a chunk of rows or some vectors at
    a time, and the RMS of every row, made on first use and kept for every (dim, bits) fitted on it, with
    the last permutation drawn (consecutive rungs of one vector length share it). `M` is the weight's
    matrix view (no copy). The normalised rows are not kept: a float32 copy of the layer (plus an int64
    permutation of all its vectors) per fitting worker was most of the peak of compressing the
    4096x11008 layers of a 7B block. Each value is the float64 row / RMS in float32, as a fit that
    normalised the whole layer at once. Not shared between threads."""

    def __init__(self, weight, in_axis: int = 1):
        self.weight, self.in_axis = weight, in_axis
        self._order: tuple[tuple[int, int], np.ndarray] | None = None
        self._made = False

    def ready(self) -> "Normalised":
        if not self._made:
            self.shape, self.transposed = weight_layout(self.weight, self.in_axis, "vq")
            M = matrix(self.weight)
            self.M = M.T if self.transposed else M
            self.rms = np.empty(self.M.shape[0])
            for a, b in row_chunks(self.M.shape):
                part = self.M[a:b].astype(np.float64)
                self.rms[a:b] = np.sqrt((part * part).mean(axis=1))
            self._divisor = np.where(self.rms > 0, self.rms, 1.0)
            self._made = True
        return self

    def rows(self, which) -> np.ndarray:
        """The normalised rows `which` (a slice or an index array) as a float32 array."""
        return self._normalised(self.M[which], self._divisor[which][:, None])

    @staticmethod
    def _normalised(values: np.ndarray, divisor: np.ndarray) -> np.ndarray:
        """values / their rows' RMS (broadcast divisor), divided in float64 and stored as float32."""
        return (values.astype(np.float64) / divisor).astype(np.float32)

    def order(self, seed: int, count: int, first: int) -> np.ndarray:
        """The first `first` of the seeded random order of `count` vectors (only a prefix is kept), the
        values of `np.random.default_rng(seed).permutation(count)`: the same draws shuffle a 4-byte
        arange (the int64 one held 8 bytes a vector, as much as a d2 layer's float32 weight)."""
        if self._order is None or self._order[0] != (seed, count) or len(self._order[1]) < min(first, count):
            order = np.arange(count, dtype=np.int32 if count < 2**31 else np.int64)
            np.random.default_rng(seed).shuffle(order)
            self._order = ((seed, count), order[:first].astype(np.int64))
        return self._order[1][:first]

    def vectors(self, index: np.ndarray, dim: int) -> np.ndarray:
        """The normalised rows' vectors of length `dim` at these flat indices (row-major, zero-padded
        at each row's end), without a padded copy of every row."""
        n, d = self.M.shape
        v = -(-d // dim)
        row, at = np.divmod(index, v)
        cols = at[:, None] * dim + np.arange(dim)
        inside = cols < d
        out = np.zeros((len(index), dim), np.float32)
        rows = np.broadcast_to(row[:, None], cols.shape)[inside]
        out[inside] = self._normalised(self.M[rows, cols[inside]], self._divisor[rows])
        return out


def padded_rows(rows: np.ndarray, dim: int) -> np.ndarray:
    """The rows as vectors of length `dim` (each row zero-padded to a whole number): (rows * v, dim)."""
    n, d = rows.shape
    v = -(-d // dim)
    if d == v * dim:
        return rows.reshape(n * v, dim)
    out = np.zeros((n, v * dim), np.float32)
    out[:, :d] = rows
    return out.reshape(n * v, dim)


def row_chunks(shape):
    """(start, stop) of consecutive row ranges of about ROW_CHUNK_VALUES values (at least one row)."""
    return row_ranges(shape[0], int(np.prod(shape[1:])), ROW_CHUNK_VALUES)


def fit_vq(weight, dim: int, bits: int, in_axis: int = 1, iterations: int = 8, seed: int = 0,
           sample: int = 65536, rows=None, normalised: Normalised | None = None) -> CompressedWeight:
    """One codebook of 2**bits vectors of length `dim` for the whole weight (see the module
    docstring). The codebook is trained on a seeded sample of up to `sample` vectors of the
    RMS-normalised rows; then every vector gets its nearest (float16) entry and each row the
    least-squares scale for its decoded row. rows: code only these output rows (an estimate for
    auto's screening: the codebook is learnt from every row, so the rows' error is a held-out one).
    normalised: `Normalised(weight, in_axis)` when several fits share it."""
    if not isinstance(dim, int) or dim < 1:
        raise InputError(f"vq dim must be a positive integer, got {dim!r}")
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise InputError(f"vq bits must be in 1..{MAX_BITS}, got {bits!r}")
    norm = (normalised if normalised is not None else Normalised(weight, in_axis)).ready()
    shape, transposed, M, rms = norm.shape, norm.transposed, norm.M, norm.rms
    n, d, v = vq_layout(shape, dim, transposed)
    train = norm.vectors(norm.order(seed, n * v, sample), dim)  # random order: kmeans seeds on its first rows
    codebook = kmeans(train, 1 << bits, iterations, seed, SEEDING if rows is None else SCREEN_SEEDING)
    codebook = codebook.astype(np.float16)
    del train
    if rows is not None:
        M, rms, n = M[rows], rms[rows], len(rows)
        shape = (shape[0], n) if transposed else (n, *shape[1:])
    centres, wide = codebook.astype(np.float32), codebook.astype(np.float64)
    labels = np.empty(n * v, np.uint16)  # codes of at most MAX_BITS bits
    # the vectors in chunks that fill whole steps of `nearest` (the same products as one call)
    step = max(1, NEAREST_CHUNK // (1 << bits))
    chunk = max(1, ROW_CHUNK_VALUES // dim // step) * step
    for s in range(0, n * v, chunk):
        e = min(s + chunk, n * v)
        first, last = s // v, -(-e // v)
        part = norm.rows(slice(first, last) if rows is None else rows[first:last])
        labels[s:e] = nearest(padded_rows(part, dim)[s - first * v:e - first * v], centres, distances=False)
    row_scale = np.empty(n)
    for a, b in row_chunks((n, v * dim)):
        Q = wide[labels[a * v:b * v]].reshape(b - a, v * dim)[:, :d]
        qq = (Q * Q).sum(axis=1)
        row_scale[a:b] = np.where(qq > 0, (M[a:b].astype(np.float64) * Q).sum(axis=1) / np.where(qq > 0, qq, 1.0),
                                  rms[a:b])
    gain = float(np.abs(row_scale).max())
    gain = gain if gain > 0 and np.isfinite(np.float32(gain)) and np.float32(gain) > 0 else 1.0
    arrays = {"codes": bitpack.pack(labels, bits), "codebook": codebook,
              "scale": (row_scale / np.float32(gain)).astype(np.float16),
              "gain": np.array([gain], np.float32)}
    meta = {"dim": dim, "bits": bits, "iterations": iterations, "seed": seed, "sample": sample}
    if transposed:
        meta["transposed"] = True
    return CompressedWeight("vq", shape, meta, arrays)


def decode_vq(cw: CompressedWeight, t: dict) -> torch.Tensor:
    """codebook[codes] row by row, cropped to the columns, times the row scale (the matrix view)."""
    transposed = is_transposed(cw)
    dim, bits = cw.meta["dim"], cw.meta["bits"]
    n, d, v = vq_layout(cw.shape, dim, transposed)
    if bitpack.is_eager() and t["codes"].device.type == "cpu":
        return _decode_vq_in_chunks(cw, t, n, d, v, transposed)
    codes = bitpack.unpack_torch(t["codes"], bits, n * v).to(torch.int64)
    vectors = torch.index_select(t["codebook"].to(torch.float32), 0, codes)
    rows = vectors.reshape(n, v * dim)[:, :d]
    scale = t["scale"].to(torch.float32) * t["gain"].to(torch.float32)
    W = rows * scale.reshape(n, 1)
    return W.T.contiguous() if transposed else W


def _decode_vq_in_chunks(cw: CompressedWeight, t: dict, n: int, d: int, v: int, transposed: bool) -> torch.Tensor:
    """decode_vq's values, bit for bit, written a chunk of rows at a time into the one output (eager
    decodes only: scoring, the rewritten model's cached weight). Whole, the int64 codes, the gathered
    vectors and the scaled rows held 3-4x a d2 weight's float32 bytes."""
    dim, bits = cw.meta["dim"], cw.meta["bits"]
    book = t["codebook"].to(torch.float32)
    scale = t["scale"].to(torch.float32) * t["gain"].to(torch.float32)
    packed = t["codes"].numpy().reshape(-1)
    out = torch.empty((d, n) if transposed else (n, d))
    whole = 8 // math.gcd(8, v * bits)  # rows per chunk start on a whole byte of the codes
    step = max(1, ROW_CHUNK_VALUES // (v * dim) // whole) * whole
    for a in range(0, n, step):
        b = min(a + step, n)
        start = a * v * bits // 8
        codes = bitpack.unpack(packed[start:bitpack.packed_nbytes(b * v, bits)], bits, (b - a) * v)
        rows = torch.index_select(book, 0, torch.from_numpy(codes)).reshape(b - a, v * dim)[:, :d]
        rows = rows * scale[a:b].reshape(-1, 1)
        if transposed:
            out[:, a:b] = rows.T
        else:
            out[a:b] = rows
    return out


class VQ(Method):
    name = "vq"
    Settings = VQSettings
    tvm_dense_reason = None
    # screened: the codebook learnt from a small sample of every row, the error of the screening rows
    screened_on_rows = True

    def nbytes_for_shape(self, cw, shape):
        return vq_nbytes(tuple(shape), cw.meta["dim"], cw.meta["bits"], is_transposed(cw))

    def fit(self, spec, ratio, settings, index=0):
        transposed = spec.in_axis == 0
        rungs = vq_rungs(spec.shape, ratio, settings, transposed)
        if not rungs:
            raise InputError(f"ratio {ratio} is too small for vq of shape {spec.shape}: even the "
                             f"smallest codebook needs more bytes; raise the ratio or use rtn")
        best, tried = None, {}
        for dim, bits in rungs[:FIT_TRIES]:
            cw = fit_vq(spec.weight, dim, bits, spec.in_axis, settings.iterations, settings.seed + index,
                        settings.sample)
            fitted = within_ratio(spec, ratio, cw)
            tried[self.label(cw)] = round(fitted.rel_error, 6)
            if best is None or fitted.rel_error < best.rel_error:
                best = fitted
        best.report["tried"] = tried
        return best

    def candidates(self, spec, budget_ratio, options, attempt):
        transposed = spec.in_axis == 0
        settings = VQSettings(**options.get("settings", {}))
        ladder = list(options.get("ladder", AUTO_LADDER))
        at_budget = vq_rungs(spec.shape, budget_ratio, VQSettings(), transposed)[:1]
        rows = options.get("rows")
        normalised = Normalised(spec.weight, spec.in_axis)  # made by the first fit, shared by the rest
        for dim, bits in dict.fromkeys(ladder + at_budget):
            # above half the fp32 bytes, dense float16 is smaller and exact to 1e-3: skip
            if vq_nbytes(spec.shape, dim, bits, transposed) <= 0.5 * spec.fp32_bytes:
                sample = settings.sample if rows is None else min(settings.sample, SCREEN_SAMPLE_PER_CODE << bits)
                attempt(spec.name, f"vq{bits}/d{dim}", fit_vq, spec.weight, dim, bits, spec.in_axis,
                        settings.iterations, settings.seed, sample, rows, normalised)

    def decode_torch(self, cw, tensors):
        return decode_vq(cw, tensors)

    def family(self, cw):
        return "vq"

    def label(self, cw):
        return f"vq{cw.meta['bits']}/d{cw.meta['dim']}"

    def trainable(self, cw, param_name=""):
        # the codebook, scales and gain are float arrays that train; the packed codes stay fixed
        from riem_compiler.methods.trainable import FloatArraysView

        return FloatArraysView(cw, param_name)

    def onnx_call(self, cw):
        transposed = is_transposed(cw)
        n, d, v = vq_layout(cw.shape, cw.meta["dim"], transposed)
        attrs = {"rows": n, "cols": d, "vectors": v, "dim": int(cw.meta["dim"]), "bits": int(cw.meta["bits"])}
        if transposed:
            return DecoderCall("VQWeightT", ["codes", "codebook", "scale", "gain"], attrs)
        return DecoderCall("VQWeight", ["codes", "codebook", "scale", "gain"],
                           {**attrs, "shape": [int(s) for s in cw.shape]})

    def onnx_functions(self):
        from riem_compiler.methods.vq import onnx as o

        return {"VQWeight": (o.VQWeight, ("UnpackBits",)), "VQWeightT": (o.VQWeightT, ("UnpackBits",))}

    def tvm_kernel(self):
        from riem_compiler.methods.vq import tvm

        return tvm


METHOD = VQ()
