"""affine: HQQ-style optimised asymmetric quantisation (Badri & Shaji 2023, "Half-Quadratic
Quantization"), data-free. Per group of `group_size` consecutive weights: unsigned codes
q in [0, 2**bits - 1], W_hat = (q - zero) * scale, with scale and zero (in code units) stored
float16 per group; codes bit-packed (riem_compiler/bitpack.py).

The scale and zero are not min-max: starting from min-max, a half-quadratic solver minimises the
lp-norm (p < 1) of the error W - W_hat, which lets a few large (clipped) errors stay large instead
of dragging the whole group: each iteration splits the error into a sparse outlier part (a
generalised soft-threshold of the error) and fits scale and zero in closed form to the rest,
with a penalty that grows so the split tightens. Each group keeps its iterate with the smallest
squared error (so the matrix's relative Frobenius error, what the report shows, is never worse
than min-max), always evaluated with the float16-rounded scale/zero that are stored. Updating
the scale as well as the zero (HQQ's own solver updates only the zero) is most of the gain:
MiniLM's layer-0 query at 2-bit g128, relative error 0.34 against 0.49 (zero only) and 0.51
(min-max).

Groups run along the layer's input axis by default (`axis="in"`, as rtn and MatMulNBits), or
along the output axis (`axis="out"`: groups of consecutive outputs for each input). The grouped
matrix G is the weight's (rows, cols) matrix view or its transpose: meta "transposed" (in_axis 0,
as rtn) and meta "axis" decide, and the decoder transposes back when G is the transpose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from riem_compiler import bitpack
from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.methods.affine.layout import affine_layout, flipped
from riem_compiler.methods.base import (DecoderCall, Method, fp32_bytes, matrix, row_ranges, screening_rows,
                                        within_ratio)
from riem_compiler.methods.rtn.layout import is_transposed, quantised_shape, weight_layout

BITS = (8, 4, 3, 2, 1)
GROUPS = (32, 64, 128, 256, None)  # None: one group per row of the grouped matrix
AXES = ("in", "out")
# auto's candidates, about 4.5 down to 1.1 bits per weight (codes + 4 bytes per group)
AUTO_LADDER = ((4, 64), (4, 128), (3, 64), (3, 128), (2, 64), (2, 128), (1, 128), (1, 256))
# penalty schedule of the half-quadratic split (in code units, so it does not depend on the
# weight's magnitude): beta grows geometrically from BETA0 to BETA_END over the iterations, whatever
# their number (at the default 30 iterations by KAPPA = 1.1 per iteration)
BETA0 = 1.0
BETA_END = BETA0 * 1.1 ** 30
KAPPA = 1.1
# auto's affine candidates run half the iterations along the same schedule: 0.3-0.6% more weight error
# on MiniLM and EfficientNet-Lite2 (worst layer 1.2%) than 30, for half of affine's time, which was
# two thirds of auto's candidate time on a 1B-decoder block (benchmarks/results/compress_time.md)
AUTO_ITERATIONS = 15
F16_TINY = float(np.finfo(np.float16).smallest_subnormal)


def _int_or_none(name: str, value):
    """bits / group_size: an int, None, or (from the CLI) their text."""
    if isinstance(value, str):
        text = value.strip().lower()
        value = None if text in ("none", "auto", "") else (int(text) if text.isdigit() else value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
        raise InputError(f"affine {name} must be an integer or None; got {value!r}")
    return None if value is None else int(value)


@dataclass(frozen=True)
class AffineSettings:
    """bits / group_size None: chosen per layer from the ratio (the most accurate that fits).
    axis: "in" groups along the layer's input axis, "out" along its outputs.
    iterations: half-quadratic iterations (0: plain min-max). lp_norm: p of the error norm."""

    bits: int | None = None
    group_size: int | None = None
    axis: str = "in"
    iterations: int = 30
    lp_norm: float = 0.7

    def __post_init__(self):
        object.__setattr__(self, "bits", _int_or_none("bits", self.bits))
        object.__setattr__(self, "group_size", _int_or_none("group_size", self.group_size))
        if self.bits is not None and self.bits not in BITS:
            raise InputError(f"affine bits must be one of {BITS} or None; got {self.bits!r}")
        if self.group_size is not None and self.group_size < 1:
            raise InputError(f"affine group_size must be a positive integer or None; got {self.group_size!r}")
        if self.axis not in AXES:
            raise InputError(f"affine axis must be one of {AXES}; got {self.axis!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise InputError(f"affine iterations must be an integer >= 0; got {self.iterations!r}")
        if isinstance(self.lp_norm, bool) or not isinstance(self.lp_norm, (int, float)) or not 0 < self.lp_norm <= 1:
            raise InputError(f"affine lp_norm must be a number in (0, 1]; got {self.lp_norm!r}")


# ---------------------------------------------------------------------------------- layout
def affine_nbytes(shape, bits: int, group_size: int | None, flip: bool = False) -> int:
    """Packed codes + a float16 scale and a float16 zero per group."""
    rows, cols, _, groups = affine_layout(shape, group_size, flip)
    return bitpack.packed_nbytes(rows * cols, bits) + rows * groups * 2 * 2


def _layout_of(cw: CompressedWeight) -> tuple[bool, tuple[int, int, int, int]]:
    flip = flipped(is_transposed(cw), cw.meta["axis"])
    return flip, affine_layout(cw.shape, cw.meta["group_size"], flip)


# ---------------------------------------------------------------------------------- solver
def _f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float16)


def _shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Generalised soft-threshold: the proximal step of |x|^p / beta (p = 1: soft threshold)."""
    a = np.abs(x)
    with np.errstate(divide="ignore"):
        a -= np.power(a, p - 1.0) / beta if p < 1 else 1.0 / beta
    return np.copysign(np.maximum(a, 0.0, out=a), x, out=a)


def penalty_growth(iterations: int) -> float:
    """Per-iteration growth of beta that takes it from BETA0 to BETA_END in `iterations` steps
    (exactly KAPPA at 30)."""
    return (BETA_END / BETA0) ** (1.0 / iterations) if iterations > 0 else KAPPA


# values of the grouped matrix solved at a time (whole rows): every step of the solve is per group, so
# chunks of rows give the same codes, and a whole 4096x11008 solve held 9x its bytes in temporaries
SOLVE_CHUNK_VALUES = 1 << 20


def solve_affine(G: np.ndarray, bits: int, group: int, iterations: int = 30, lp_norm: float = 0.7,
                 update_scale: bool = True):
    """Codes (rows, cols) uint8, scale and zero (rows, groups) float16 of the grouped matrix G, solved
    SOLVE_CHUNK_VALUES at a time (`solve_affine_rows`: where an iteration's scale or zero overflows
    float16, it falls back to the best so far in the chunk's rows)."""
    rows, cols = np.shape(G)
    groups = math.ceil(cols / group) if cols else 0
    ranges = row_ranges(rows, groups * group, SOLVE_CHUNK_VALUES)
    if len(ranges) <= 1:
        codes, scale, zero = solve_affine_rows(G, bits, group, iterations, lp_norm, update_scale)
        return codes.astype(np.uint8), scale, zero
    codes = np.empty((rows, cols), np.uint8)
    scale = np.empty((rows, groups), np.float16)
    zero = np.empty((rows, groups), np.float16)
    for a, b in ranges:
        codes[a:b], scale[a:b], zero[a:b] = solve_affine_rows(G[a:b], bits, group, iterations, lp_norm,
                                                              update_scale)
    return codes, scale, zero


def solve_affine_rows(G: np.ndarray, bits: int, group: int, iterations: int = 30, lp_norm: float = 0.7,
                      update_scale: bool = True):
    """Codes (rows, cols) int64, scale and zero (rows, groups) float16 of the grouped matrix G.

    Groups are `group` consecutive columns (the last may be shorter; padding is masked out).
    iterations 0 gives min-max asymmetric quantisation; update_scale False keeps the min-max
    scale and updates only the zero (HQQ's own solver). Every iteration runs: stopping once one
    gained under 1e-4 of the error cost up to 2.1% weight error on EfficientNet-Lite2's small
    convolutions (0.07% on MiniLM's), for about 25% of affine's time.

    The iterations run in float32 (scale and zero are float16 anyway): the same errors as float64
    to 5 digits on MiniLM's weights, 3.3x faster; per-group errors are summed in float64."""
    G = np.asarray(G, dtype=np.float32)
    rows, cols = G.shape
    groups = math.ceil(cols / group)
    X = np.zeros((rows, groups * group), np.float32)
    X[:, :cols] = G
    X = X.reshape(rows, groups, group)
    mask = (np.arange(groups * group) < cols).reshape(groups, group)
    m = None if mask.all() else mask.astype(np.float32)  # padding to mask out, if any
    count = mask.sum(axis=1).astype(np.float32)
    qmax = float((1 << bits) - 1)
    if not np.isfinite(X).all():
        raise ValueError("affine needs a finite weight")

    lo = np.where(mask, X, np.inf).min(axis=2).astype(np.float64)
    hi = np.where(mask, X, -np.inf).max(axis=2).astype(np.float64)
    s = (hi - lo) / qmax
    s = np.where(s > 0, s, np.abs(hi))  # a constant group: code 0 stands for the constant
    s16 = _f16(np.maximum(s, F16_TINY))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        z16 = _f16(-lo / s16.astype(np.float64))
    far = ~np.isfinite(z16)  # tiny spread far from 0: quantise the range that includes 0
    if far.any():
        lo0, hi0 = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        s16 = np.where(far, _f16(np.maximum((hi0 - lo0) / qmax, F16_TINY)), s16)
        z16 = np.where(far, _f16(-lo0 / s16.astype(np.float64)), z16)
    if not (np.isfinite(s16).all() and np.isfinite(z16).all()):
        raise ValueError("affine scale/zero exceed the float16 range for this weight")

    def masked(a):  # in place
        if m is not None:
            a *= m
        return a

    def group_sum(a):  # over each group's real (unpadded) entries
        return (a if m is None else a * m).sum(axis=2)

    def quantise(s16, z16):
        s, z = s16.astype(np.float32)[..., None], z16.astype(np.float32)[..., None]
        with np.errstate(over="ignore", invalid="ignore"):
            q = X / s
            q += z
            np.clip(np.rint(q, out=q), 0.0, qmax, out=q)
            r = (q - z) * s
            r -= X
            err = masked(np.square(r, out=r)).sum(axis=2, dtype=np.float64)
        return q, err

    q, err = quantise(s16, z16)
    best_s, best_z, best_err = s16, z16, err  # the codes follow from them: quantised once at the end
    s, z = s16.astype(np.float32), z16.astype(np.float32)
    beta, kappa = BETA0, penalty_growth(iterations)
    for _ in range(iterations):
        # error in code units, split into its sparse (lp) part and the rest
        e = X / s[..., None]
        e += z[..., None]
        e -= q
        outlier = masked(_shrink_lp(e, beta, lp_norm))
        target = X - outlier * s[..., None]  # the weights the codes should explain
        # closed-form scale and zero: least squares target ~ s * q - s * z in each group
        q_mean = group_sum(q) / count
        t_mean = group_sum(target) / count
        dq = masked(q - q_mean[..., None])
        var = np.einsum("rgk,rgk->rg", dq, dq)
        cov = np.einsum("rgk,rgk->rg", dq, target)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(var > 0, cov / np.where(var > 0, var, 1.0), 0.0)
            ok = (slope > 0) & update_scale
            s = np.where(ok, slope, s)
            z = np.where(ok, q_mean - t_mean / np.where(ok, slope, 1.0), q_mean - t_mean / s)
        beta *= kappa
        s16_new, z16_new = _f16(np.maximum(s, F16_TINY)), _f16(z)
        q, err = quantise(s16_new, z16_new)
        better = err < best_err  # nan (non-finite scale/zero) is never better
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s16_new, best_s)
        best_z = np.where(better, z16_new, best_z)
        s, z = s16_new.astype(np.float32), z16_new.astype(np.float32)
        if not (np.isfinite(s).all() and np.isfinite(z).all()):
            s, z = best_s.astype(np.float32), best_z.astype(np.float32)
            q, _ = quantise(best_s, best_z)
    best_q, _ = quantise(best_s, best_z)
    codes = best_q.reshape(rows, groups * group)[:, :cols].astype(np.int64)
    return codes, best_s, best_z


def fit_affine(weight, bits: int, group_size: int | None = 128, in_axis: int = 1, axis: str = "in",
               iterations: int = 30, lp_norm: float = 0.7) -> CompressedWeight:
    """Optimised asymmetric quantisation of `weight` at one (bits, group_size)."""
    if bits not in BITS:
        raise InputError(f"affine bits must be one of {BITS}, got {bits}")
    if group_size is not None and group_size < 1:
        raise InputError(f"affine group_size must be a positive integer or None, got {group_size}")
    shape, transposed = weight_layout(weight, in_axis, "affine")
    flip = flipped(transposed, axis)
    rows, cols, g, groups = affine_layout(shape, group_size, flip)
    M = matrix(weight)
    G = M.T if flip else M
    codes, scale, zero = solve_affine(G, bits, g, iterations, lp_norm)
    meta = {"bits": bits, "group_size": group_size, "axis": axis, "scale_dtype": "float16"}
    if transposed:
        meta["transposed"] = True
    arrays = {"codes": bitpack.pack(codes, bits), "scale": scale, "zero": zero}
    return CompressedWeight("affine", shape, meta, arrays)


def decode_affine(cw: CompressedWeight, t: dict) -> torch.Tensor:
    """The weight's (rows, cols) matrix view: (codes - zero[group]) * scale[group], transposed
    back when the grouped matrix is the transpose."""
    flip, (rows, cols, g, groups) = _layout_of(cw)
    codes = bitpack.unpack_torch(t["codes"], cw.meta["bits"], rows * cols).reshape(rows, cols)
    scale = t["scale"].to(torch.float32).reshape(rows, groups).repeat_interleave(g, dim=1)[:, :cols]
    zero = t["zero"].to(torch.float32).reshape(rows, groups).repeat_interleave(g, dim=1)[:, :cols]
    W = (codes - zero) * scale
    return W.T.contiguous() if flip else W


# ---------------------------------------------------------------------------------- choosing
def ladder(settings: AffineSettings, cols: int) -> list[tuple[int, int | None]]:
    """(bits, group) pairs to consider, most bits first: the settings' own, or every pair of
    BITS x GROUPS (groups at least as wide as a row are the per-row rung)."""
    bits = BITS if settings.bits is None else (settings.bits,)
    if settings.group_size is not None:
        group_sizes = (settings.group_size,)
    else:
        group_sizes = tuple(g for g in GROUPS if g is None or g < cols)
    return [(b, g) for b in bits for g in group_sizes]


def choose(shape, ratio: float, settings: AffineSettings, flip: bool) -> list[tuple[int, int | None]]:
    """The pairs worth solving at this ratio: for each bit width, the finest group whose exact
    bytes fit; of those, the two widest bit widths (a wider code with coarse groups against a
    narrower one with fine groups). Two solves keep a 1536x384 fit near 3 s."""
    _, cols = quantised_shape(shape, flip)
    budget = ratio * fp32_bytes(shape)
    best: dict[int, int | None] = {}
    for bits, group in ladder(settings, cols):
        if bits in best or affine_nbytes(shape, bits, group, flip) > budget:
            continue
        best[bits] = group
    return sorted(best.items(), key=lambda bg: -bg[0])[:2]


class Affine(Method):
    name = "affine"
    Settings = AffineSettings
    tvm_dense_reason = None
    screened_on_rows = True  # groups along the input axis: every output row is coded on its own

    def nbytes_for_shape(self, cw, shape):
        return affine_nbytes(tuple(shape), cw.meta["bits"], cw.meta["group_size"],
                             flipped(is_transposed(cw), cw.meta["axis"]))

    def fit(self, spec, ratio, settings, index=0):
        shape = spec.shape
        flip = flipped(spec.in_axis == 0, settings.axis)
        options = choose(shape, ratio, settings, flip)
        if not options:
            _, cols = quantised_shape(shape, flip)
            least = min(affine_nbytes(shape, b, g, flip) for b, g in ladder(settings, cols))
            raise InputError(f"ratio {ratio} is too small for affine of shape {shape} with {settings} "
                             f"({least} bytes needed at least); raise the ratio")
        best = None
        for bits, group in options:
            cw = fit_affine(spec.weight, bits, group, spec.in_axis, settings.axis, settings.iterations,
                            settings.lp_norm)
            fitted = within_ratio(spec, ratio, cw)
            if best is None or fitted.rel_error < best.rel_error:
                best = fitted
        best.report.update({"bits_per_weight": round(8 * best.weight.nbytes / int(np.prod(shape)), 3),
                            "tried": [self.label_of(b, g, settings.axis) for b, g in options]})
        return best

    def candidates(self, spec, budget_ratio, options, attempt):
        axis = options.get("axis", "in")
        weight = screening_rows(spec, options)
        for bits, group in options.get("ladder", AUTO_LADDER):
            attempt(spec.name, self.label_of(bits, group, axis), fit_affine, weight, bits, group,
                    spec.in_axis, axis, options.get("iterations", AUTO_ITERATIONS), options.get("lp_norm", 0.7))

    def decode_torch(self, cw, tensors):
        return decode_affine(cw, tensors)

    @staticmethod
    def label_of(bits, group, axis="in") -> str:
        return f"affine{bits}" + ("" if group is None else f"/g{group}") + ("" if axis == "in" else "/out")

    def label(self, cw):
        m = cw.meta
        return self.label_of(m["bits"], m["group_size"], m["axis"])

    def family(self, cw):
        return f"affine{cw.meta['bits']}"

    def trainable(self, cw, param_name=""):
        # scale and zero train (rounded to float16); the packed codes stay fixed buffers
        from riem_compiler.methods.trainable import FloatArraysView

        return FloatArraysView(cw, param_name)

    def onnx_call(self, cw):
        flip, (rows, cols, g, _) = _layout_of(cw)
        attrs = {"shape": [int(s) for s in cw.shape], "rows": rows, "cols": cols, "bits": int(cw.meta["bits"]),
                 "group": g}
        return DecoderCall("AffineWeightT" if flip else "AffineWeight", ["codes", "scale", "zero"], attrs)

    def onnx_matmul(self, cw, in_out):
        from riem_compiler.methods.affine.native import matmulnbits_affine

        return matmulnbits_affine(cw, in_out)

    def onnx_native_arrays(self, meta, shape, encoding, tensors):
        from riem_compiler.methods.affine.native import affine_arrays_from_native

        return affine_arrays_from_native(meta, shape, encoding, tensors)

    def onnx_functions(self):
        from riem_compiler.methods.affine import onnx as o

        return {name: (getattr(o, name), ("UnpackBits",)) for name in ("AffineWeight", "AffineWeightT")}

    def tvm_kernel(self):
        from riem_compiler.methods.affine import tvm

        return tvm


METHOD = Affine()
