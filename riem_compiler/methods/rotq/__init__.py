"""rotq: rotated quantisation, data-free (the incoherence idea of QuIP# / HIGGS).

Each row of the quantised matrix (rows = outputs, columns = the layer's input axis; zero-padded to
a multiple of the block B) is rotated by R = diag(s) blockdiag(H_B / sqrt(B)) (`rotation.py`:
regenerated from a seed, no stored bytes). Rotated rows are close to Gaussian whatever the
original outliers, so each group of `group_size` consecutive rotated entries is stored as
scale * grid[code], with `grid` the 2^bits Lloyd-Max levels of a standard normal ("gaussian"), or
those levels refined by Lloyd iterations on this layer's entries ("fitted").

Stored arrays (every one counted):
- codes: n * padded_cols codes of `bits` bits, bit-packed (riem_compiler/bitpack.py);
- scale: (n, padded_cols / group_size) float16, relative to the layer's RMS;
- grid: 2^bits float32 levels times the layer's RMS (so float16 scales never over/underflow,
  even for weights of magnitude 1e30 or 1e-30).
Bytes: ceil(n * padded_cols * bits / 8) + 2 * n * padded_cols / group_size + 4 * 2^bits.

Decode: W_hat = (grid[codes] * scale) R^T, padded columns dropped, transposed back for a weight
stored (in, out) (meta "transposed", as rtn), reshaped for convolutions.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from riem_compiler import bitpack
from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.metrics import streamed_sum_of_squares
from riem_compiler.methods.base import (DecoderCall, Method, fp32_bytes, matrix, row_ranges, screening_rows,
                                        within_ratio)
from riem_compiler.methods.rotq import rotation
from riem_compiler.methods.rtn.layout import is_transposed, quantised_shape, weight_layout

BITS = (4, 3, 2, 1)
GRIDS = ("gaussian", "fitted")
# groups `fit` may choose (those dividing the padded columns), plus one scale per row
GROUPS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# auto's candidates (bits, group; None: per row): about 4.1 down to 1.1 bits per weight
AUTO_LADDER = ((4, 128), (3, 64), (2, 32), (2, 128), (1, 32), (1, 128))
SCALE_MULTS = np.linspace(0.7, 1.3, 13)  # group scale search: multiples of the group's RMS
LLOYD_ITERATIONS = 4  # per-layer grid refinement ("fitted")


def _optional_int(name: str, value):
    """None, an int, or a CLI string of one ("none"/"auto" mean None)."""
    if isinstance(value, str):
        value = None if value.strip().lower() in ("", "none", "auto") else value
        try:
            value = None if value is None else int(value)
        except ValueError:
            raise InputError(f"rotq {name} must be an integer or None; got {value!r}") from None
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
        raise InputError(f"rotq {name} must be an integer or None; got {value!r}")
    return None if value is None else int(value)


@dataclass(frozen=True)
class RotQSettings:
    """bits: 1-4, None chooses from the ratio. group_size: rotated entries per scale, None chooses
    (a group of at least the row length means one scale per row). block: Hadamard block, a power
    of two (1: no rotation), None chooses. seed: the rotation's signs (plus the layer index).
    grid: "gaussian" (Lloyd-Max levels of N(0, 1)) or "fitted" (refined on the layer)."""

    bits: int | None = None
    group_size: int | None = None
    block: int | None = None
    seed: int = 0
    grid: str = "gaussian"

    def __post_init__(self):
        for name in ("bits", "group_size", "block"):
            object.__setattr__(self, name, _optional_int(name, getattr(self, name)))
        if self.bits is not None and self.bits not in BITS:
            raise InputError(f"rotq bits must be one of {BITS} or None; got {self.bits!r}")
        if self.group_size is not None and self.group_size < 1:
            raise InputError(f"rotq group_size must be a positive integer or None; got {self.group_size!r}")
        b = self.block
        if b is not None and (b < 1 or b > rotation.MAX_BLOCK or b & (b - 1)):
            raise InputError(f"rotq block must be a power of two <= {rotation.MAX_BLOCK} or None; got {b!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise InputError(f"rotq seed must be a non-negative integer; got {self.seed!r}")
        if self.grid not in GRIDS:
            raise InputError(f"rotq grid must be one of {GRIDS}; got {self.grid!r}")


@functools.lru_cache(maxsize=None)
def lloyd_max_normal(count: int) -> tuple[float, ...]:
    """The `count` MSE-optimal levels for a standard normal, by Lloyd's algorithm: thresholds at
    midpoints, each level the conditional mean (pdf(a) - pdf(b)) / (cdf(b) - cdf(a)) of its cell."""
    def pdf(t):
        return 0.0 if math.isinf(t) else math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)

    def cdf(t):
        return 0.5 * (1.0 + math.erf(t / math.sqrt(2)))

    levels = np.linspace(-2.0, 2.0, count) if count > 1 else np.zeros(1)
    for _ in range(20000):
        t = [-math.inf] + [(a + b) / 2 for a, b in zip(levels[:-1], levels[1:])] + [math.inf]
        new = np.array([(pdf(a) - pdf(b)) / (cdf(b) - cdf(a)) for a, b in zip(t[:-1], t[1:])])
        done = np.max(np.abs(new - levels)) < 1e-14
        levels = new
        if done:
            break
    return tuple(float(v) for v in levels)


# ----------------------------------------------------------------------------- layout and bytes

@dataclass(frozen=True)
class Layout:
    """The quantised matrix: rows, cols (before padding), block, padded cols, group."""

    rows: int
    cols: int
    block: int
    padded: int
    group: int


def layout(shape, transposed: bool, group_size: int | None, block: int | None) -> Layout:
    """group_size None or >= the padded columns: one group per row. A group must divide the
    padded columns (no ragged last group)."""
    n, d = quantised_shape(shape, transposed)
    B = rotation.choose_block(d) if block is None else int(block)
    dp = rotation.padded_cols(d, B)
    g = dp if group_size is None or group_size >= dp else int(group_size)
    if dp % g:
        raise InputError(f"rotq group_size {group_size} does not divide the {dp} padded columns (block {B}) "
                         f"of shape {tuple(shape)}")
    return Layout(n, d, B, dp, g)


def rotq_nbytes(lay: Layout, bits: int) -> int:
    """codes + float16 group scales + float32 grid."""
    return (bitpack.packed_nbytes(lay.rows * lay.padded, bits) + 2 * lay.rows * (lay.padded // lay.group)
            + 4 * (1 << bits))


# ----------------------------------------------------------------------------- fitting

def _to_f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float64)


def _nearest(X, scale, levels) -> tuple[np.ndarray, np.ndarray]:
    """Codes of the nearest levels of x / scale (scale 0: any code, the group decodes to 0) and
    the squared error per group."""
    y = X / np.where(scale > 0, scale, 1.0)[:, None]
    # searchsorted(mid, y) as a count of the midpoints below y: a few compares per weight are
    # 2x faster than a binary search per weight (at most 255 midpoints: 8-bit codes)
    codes = np.zeros(y.shape, np.uint8 if len(levels) <= 256 else np.int64)
    for m in (levels[1:] + levels[:-1]) / 2:
        codes += y > m
    return codes, np.square(X - scale[:, None] * levels[codes]).sum(axis=1)


def _least_squares_scale(X, codes, levels) -> np.ndarray:
    """Per group, the float16 scale s minimising sum (x - s * level)^2 for these codes."""
    q = levels[codes]
    qq = np.square(q).sum(axis=1)
    return _to_f16(np.where(qq > 0, (X * q).sum(axis=1) / np.where(qq > 0, qq, 1.0), 0.0))


# groups coded at once: every step works group by group, so blocks of them give the same codes
# while bounding the float64 temporaries (several per weight) to a few MB instead of the layer's size
CODE_BLOCK_VALUES = 1 << 20


def _code_groups(X: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group (rows of X): the float16 scale minimising its squared error over multiples of
    the group's RMS, then one least-squares rescale (kept when better); codes are nearest levels
    of x / scale with the stored scale. Returns (scale, codes, squared error per group)."""
    step = max(1, CODE_BLOCK_VALUES // max(1, X.shape[1]))
    if len(X) <= step:
        return _code_block(X, levels)
    parts = [_code_block(X[a:a + step], levels) for a in range(0, len(X), step)]
    return tuple(np.concatenate(p) for p in zip(*parts))


def _code_block(X: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rms = np.sqrt(np.mean(np.square(X), axis=1))
    best_s = np.zeros(len(X))
    best_c, best_e = _nearest(X, best_s, levels)
    for s in [_to_f16(m * rms) for m in SCALE_MULTS] + [None]:
        s = _least_squares_scale(X, best_c, levels) if s is None else s
        c, e = _nearest(X, s, levels)
        better = e < best_e
        best_s[better], best_c[better], best_e[better] = s[better], c[better], e[better]
    return best_s, best_c, best_e


class _LevelSums:
    """The Lloyd update of the grid, summed a block of groups at a time: each level the least-squares
    value of its entries x ~ s * level. np.add.at adds in the entries' order, as one np.bincount over
    the whole layer did: the same sums bit for bit."""

    def __init__(self, count: int):
        self.num, self.den = np.zeros(count), np.zeros(count)

    def add(self, X, scale, codes) -> None:
        s = np.broadcast_to(scale[:, None], X.shape).ravel()
        np.add.at(self.num, codes.ravel(), s * X.ravel())
        np.add.at(self.den, codes.ravel(), s * s)

    def levels(self, old: np.ndarray) -> np.ndarray:
        den = self.den
        return np.sort(np.where(den > 0, self.num / np.where(den > 0, den, 1.0), old))


class _RotatedRows:
    """The weight's rows zero-padded and rotated (float64), made a chunk of rows at a time and never
    whole: the whole rotated matrix was 2x the float32 weight beside it, and with the codes the largest
    part of compressing a 4096x11008 layer. Each row is rotated on its own, so a chunk's values are the
    whole matrix's bit for bit; a fit rotates every row once per pass over the groups."""

    def __init__(self, weight, lay: Layout, seed: int, transposed: bool):
        src = matrix(weight)
        self.src, self.lay, self.seed = (src.T if transposed else src), lay, seed

    def rows(self, a: int, b: int) -> np.ndarray:
        padded = np.zeros((b - a, self.lay.padded))
        padded[:, :self.lay.cols] = self.src[a:b]
        return rotation.rotate_numpy(padded, self.lay.block, self.seed, overwrite=True)

    def layer_rms(self) -> float:
        """sqrt(mean of the squared rotated values), the bits of np.sum over the whole matrix: the pairwise
        sum asks for pieces in increasing order, served from the last chunk of rows rotated."""
        dp, size = self.lay.padded, self.lay.rows * self.lay.padded
        held = [0, 0, None]  # rows [a, b) of the last chunk, and its values

        def values(lo: int, n: int) -> np.ndarray:
            a, b, chunk = held
            if lo < a * dp or lo + n > b * dp:
                a = lo // dp
                b = min(self.lay.rows, max(-(-(lo + n) // dp), a + max(1, CODE_BLOCK_VALUES // dp)))
                held[:] = a, b, self.rows(a, b)
                chunk = held[2]
            return chunk.reshape(-1)[lo - a * dp:lo - a * dp + n]

        return float(np.sqrt(streamed_sum_of_squares(values, size) / size)) if size else float("nan")

    def groups(self, layer_rms: float):
        """(slice of groups, their rotated values / layer_rms as (groups, group)) a chunk of rows at a time."""
        per_row = self.lay.padded // self.lay.group
        for a, b in row_ranges(self.lay.rows, self.lay.padded, CODE_BLOCK_VALUES):
            X = self.rows(a, b)
            if layer_rms > 0:
                X /= layer_rms
            yield slice(a * per_row, b * per_row), X.reshape(-1, self.lay.group)


def fit_rotq(weight, bits: int = 2, group_size: int | None = 64, block: int | None = None, seed: int = 0,
             grid: str = "gaussian", in_axis: int = 1) -> CompressedWeight:
    """Rotate, then quantise each group to scale * grid levels (see the module docstring). The rotated
    rows are made a chunk at a time (`_RotatedRows`): once for the layer's RMS, once for the codes, and
    for "fitted" once per Lloyd iteration and once more for the final codes."""
    if bits not in BITS:
        raise InputError(f"rotq bits must be one of {BITS}, got {bits}")
    if grid not in GRIDS:
        raise InputError(f"rotq grid must be one of {GRIDS}, got {grid!r}")
    shape, transposed = weight_layout(weight, in_axis, "rotq")
    lay = layout(shape, transposed, group_size, block)
    rotated = _RotatedRows(weight, lay, seed, transposed)
    layer_rms = rotated.layer_rms()
    if not np.isfinite(layer_rms):
        raise InputError(f"rotq: weight of shape {shape} has non-finite values or overflows float64")
    levels = np.array(lloyd_max_normal(1 << bits))
    count = lay.rows * lay.padded // lay.group
    sums = _LevelSums(len(levels)) if grid == "fitted" else None
    scale, codes, err = np.empty(count), np.empty((count, lay.group), np.uint8), np.empty(count)
    for groups, X in rotated.groups(layer_rms):
        scale[groups], codes[groups], err[groups] = _code_groups(X, levels)
        if sums is not None:
            sums.add(X, scale[groups], codes[groups])
    best = (float(err.sum()), levels, scale, codes)
    if grid == "fitted":
        # alternate: grid for these codes and scales, codes, scales; then a full search with the last grid
        # (the last iteration's codes and scales were never used: only its grid is)
        scale, codes = scale.copy(), codes.copy()
        for _ in range(LLOYD_ITERATIONS - 1):
            levels, sums = sums.levels(levels), _LevelSums(len(levels))
            for groups, X in rotated.groups(layer_rms):
                c, _ = _nearest(X, scale[groups], levels)
                scale[groups] = _least_squares_scale(X, c, levels)
                codes[groups], _ = _nearest(X, scale[groups], levels)
                sums.add(X, scale[groups], codes[groups])
        levels = sums.levels(levels)
        for groups, X in rotated.groups(layer_rms):
            scale[groups], codes[groups], err[groups] = _code_groups(X, levels)
        if float(err.sum()) < best[0]:
            best = (float(err.sum()), levels, scale, codes)
    _, levels, scale, codes = best
    arrays = {"codes": bitpack.pack(codes.reshape(-1), bits),
              "scale": scale.astype(np.float16).reshape(lay.rows, lay.padded // lay.group),
              "grid": (levels * layer_rms).astype(np.float32)}
    meta = {"bits": bits, "group_size": lay.group, "block": lay.block, "padded_cols": lay.padded,
            "seed": int(seed), "grid": grid}
    if transposed:
        meta["transposed"] = True
    return CompressedWeight("rotq", shape, meta, arrays)


def decode_rotq(cw: CompressedWeight, t: dict) -> torch.Tensor:
    """(grid[codes] * scale) R^T, padded columns dropped; the weight's (rows, cols) matrix view."""
    m = cw.meta
    transposed = is_transposed(cw)
    n, d = quantised_shape(cw.shape, transposed)
    dp, g = m["padded_cols"], m["group_size"]
    if bitpack.is_eager() and t["codes"].device.type == "cpu":
        Q = _scaled_levels_in_chunks(t, m["bits"], n, dp, g)
    else:
        codes = bitpack.unpack_torch(t["codes"], m["bits"], n * dp).to(torch.int64)
        values = t["grid"].to(torch.float32)[codes].reshape(n, dp // g, g)
        Q = (values * t["scale"].to(torch.float32).reshape(n, dp // g, 1)).reshape(n, dp)
    W = rotation.unrotate_torch(Q, m["block"], m["seed"], in_place=bitpack.is_eager())[:, :d]
    return W.T.contiguous() if transposed else W


# codes per chunk of an eager decode's gather: whole, the int64 codes and the gathered levels held 3x the
# weight's float32 bytes beside the scaled matrix
DECODE_CHUNK_CODES = 1 << 20


def _scaled_levels_in_chunks(t: dict, bits: int, n: int, dp: int, g: int) -> torch.Tensor:
    """grid[codes] * scale as (n, dp) float32, the traced form's values bit for bit (elementwise), a
    chunk of rows at a time into the one output, from codes unpacked once as uint8."""
    codes = bitpack.unpack(t["codes"].numpy(), bits, n * dp, np.uint8)
    grid = t["grid"].to(torch.float32)
    scale = t["scale"].to(torch.float32).reshape(n, dp // g, 1)
    out = torch.empty((n, dp))
    for a, b in row_ranges(n, dp, DECODE_CHUNK_CODES):
        index = torch.from_numpy(codes[a * dp:b * dp]).to(torch.int64)
        out[a:b] = (grid[index].reshape(b - a, dp // g, g) * scale[a:b]).reshape(b - a, dp)
    return out


def _label(bits: int, group: int | None, padded: int | None = None) -> str:
    return f"rotq{bits}/" + ("row" if group is None or group == padded else f"g{group}")


def choose_settings(spec, ratio: float, settings) -> list[tuple[int, int]]:
    """(bits, group) pairs to try: for each bit width, the finest group whose exact bytes fit;
    a width is skipped when a wider one already fits with a group at least as fine (it would
    only be worse). Empty when nothing fits."""
    transposed = spec.in_axis == 0
    base = layout(spec.shape, transposed, None, settings.block)
    groups = ((settings.group_size,) if settings.group_size is not None
              else tuple(g for g in GROUPS if g < base.padded and base.padded % g == 0) + (None,))
    budget = ratio * fp32_bytes(spec.shape)
    picks, finest = [], math.inf
    for bits in ((settings.bits,) if settings.bits is not None else BITS):
        for group in groups:
            lay = layout(spec.shape, transposed, group, settings.block)
            if rotq_nbytes(lay, bits) <= budget:
                if lay.group < finest:
                    picks.append((bits, lay.group))
                    finest = lay.group
                break
    return picks


class RotQ(Method):
    name = "rotq"
    Settings = RotQSettings
    tvm_dense_reason = None
    screened_on_rows = True  # rotated and scaled row by row (the grid's overall scale cancels in the codes)

    def nbytes_for_shape(self, cw, shape):
        m = cw.meta
        return rotq_nbytes(layout(tuple(shape), is_transposed(cw), m["group_size"], m["block"]), m["bits"])

    def fit(self, spec, ratio, settings, index=0):
        picks = choose_settings(spec, ratio, settings)
        if not picks:
            lay = layout(spec.shape, spec.in_axis == 0, settings.group_size, settings.block)
            raise InputError(f"ratio {ratio} is too small for rotq of shape {spec.shape}: "
                             f"{rotq_nbytes(lay, settings.bits or 1)} bytes at the fewest bits "
                             f"({ratio * fp32_bytes(spec.shape):.0f} allowed); raise the ratio")
        best, tried = None, []
        for bits, group in picks:
            cw = fit_rotq(spec.weight, bits, group, settings.block, settings.seed + index, settings.grid,
                          spec.in_axis)
            fitted = within_ratio(spec, ratio, cw)
            tried.append(f"{self.label(cw)} {fitted.rel_error:.4f}")
            if best is None or fitted.rel_error < best.rel_error:
                best = fitted
        best.weight.meta["fit_rel_error"] = best.rel_error
        best.report = {**best.weight.meta, "tried": ", ".join(tried)}
        return best

    def candidates(self, spec, budget_ratio, options, attempt):
        seed = options.get("seed", 0)
        grid = options.get("grid", "gaussian")
        padded = layout(spec.shape, spec.in_axis == 0, None, None).padded
        weight = screening_rows(spec, options)
        seen = set()
        for bits, group in options.get("ladder", AUTO_LADDER):
            # a group that does not divide this layer's padded columns becomes the largest one that does
            group = padded if group is None else max(g for g in range(1, min(group, padded) + 1) if padded % g == 0)
            if (bits, group) not in seen:
                seen.add((bits, group))
                attempt(spec.name, _label(bits, group, padded), fit_rotq, weight, bits, group, None, seed, grid,
                        spec.in_axis)

    def decode_torch(self, cw, tensors):
        return decode_rotq(cw, tensors)

    def label(self, cw):
        return _label(cw.meta["bits"], cw.meta["group_size"], cw.meta["padded_cols"])

    def trainable(self, cw, param_name=""):
        # the float16 scales and the float32 grid train; the packed codes stay fixed buffers
        from riem_compiler.methods.trainable import FloatArraysView

        return FloatArraysView(cw, param_name)

    def onnx_call(self, cw):
        m = cw.meta
        transposed = is_transposed(cw)
        rows, cols = quantised_shape(cw.shape, transposed)
        attrs = {"rows": rows, "cols": cols, "padded": int(m["padded_cols"]), "bits": int(m["bits"]),
                 "group": int(m["group_size"]), "block": int(m["block"]),
                 "seed_offset": rotation.seed_offset(m["seed"]), "inv_sqrt_block": 1.0 / math.sqrt(m["block"])}
        if transposed:
            return DecoderCall("RotQWeightT", ["codes", "scale", "grid"], attrs)
        return DecoderCall("RotQWeight", ["codes", "scale", "grid"], {**attrs, "shape": [int(s) for s in cw.shape]})

    def onnx_functions(self):
        from riem_compiler.methods.rotq import onnx as o

        return {"RotQSigns": (o.RotQSigns, ()), "RotQHadamard": (o.RotQHadamard, ()),
                "RotQMatrix": (o.RotQMatrix, ("UnpackBits", "RotQSigns", "RotQHadamard")),
                "RotQWeight": (o.RotQWeight, ("RotQMatrix",)), "RotQWeightT": (o.RotQWeightT, ("RotQMatrix",))}

    def tvm_kernel(self):
        from riem_compiler.methods.rotq import tvm

        return tvm


METHOD = RotQ()
