"""rtn: round-to-nearest symmetric integer codes, a scale per output row (per channel) or per
group of `group_size` consecutive inputs; codes bit-packed (riem_compiler/bitpack.py) with an
offset of 2**(bits-1) (the ONNX DequantizeLinear zero point for unsigned codes).

Groups run along the layer's input axis (`LayerSpec.in_axis`), as the runtimes' fused low-bit
matmuls (onnxruntime MatMulNBits) need.

At a ratio, `fit` takes per layer the setting with the lowest weight error whose stored bytes fit
(`best_rtn`): every bit width 2-8, one scale per row (float32, or float16 where that is what fits)
or float16 scales per group of 16-1024 inputs (for each width the finest grouping that fits). The
old first-fit ladder (8-bit per row, then 4-bit groups of `group_size`, ...) wasted budgets that
miss a rung by a hair: int8 per row is 1/4 of fp32 plus its scales, so ratio 1/4 fell to 4 bits;
now it gets 7-bit codes. Codes of 5-7 bits (and 3/2) have no standard ONNX integer type, so with
onnx_format "standard" or "ort" the choice is first among the 8/4-bit settings those formats write
natively (float32 row scales or float16 groups along the inputs, the reduction axis of a MatMul), and
only where none fits among all of them. onnx_format "auto" (the default) and "functions" take the
lowest-error setting of all; "auto" then writes it natively where its layout maps (4/8-bit). What
the native preference costs: benchmarks/results/onnx_default.md (at 1/4, 4-bit groups of 16 instead
of 7-bit codes: about 9x the weight error).
`choose="ladder"` keeps the old first fit. For a weight stored (in, out), e.g. the right operand of
an ONNX MatMul, the quantised matrix is its transpose: meta "transposed" is True and the codes
and scales describe W.T, rows = outputs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from riem_compiler import bitpack
from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.methods.base import (DecoderCall, Method, fp32_bytes, matrix, row_ranges, screening_rows,
                                        within_ratio)
from riem_compiler.methods.rtn.layout import is_transposed, quantised_shape, weight_layout
from riem_compiler.metrics import sum_of_squares

BITS = (8, 7, 6, 5, 4, 3, 2)
# (bits, group_size) from most to fewest bytes; `rtn_settings_for_ratio` takes the first that fits.
LADDER = ((8, None), (4, 128), (4, None), (3, 128), (3, None), (2, 128), (2, None))
# the groups `best_rtn` tries (float16 scales), finest first
GROUPS = (16, 32, 64, 128, 256, 512, 1024)
NATIVE_BITS = (8, 4)  # the widths with a standard ONNX integer type (rtn/native.py)
CHOICES = ("best", "ladder")
NATIVE_FIRST = ("standard", "ort")  # the onnx_format values that make "best" prefer natively written settings


@dataclass(frozen=True)
class RTNSettings:
    """choose: "best" (the lowest-error setting that fits the ratio, `best_rtn`) or "ladder" (the
    first LADDER rung that fits; 8/4-bit rungs have native ONNX forms). group_size: the group of
    the ladder's grouped rungs. onnx_format (from rc.Config): "standard"/"ort" make "best" prefer
    the settings those formats write natively; "auto" and "functions" do not."""

    group_size: int = 128
    choose: str = "best"
    onnx_format: str = "auto"

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise InputError(f"rtn group_size must be a positive integer; got {self.group_size!r}")
        if self.choose not in CHOICES:
            raise InputError(f"rtn choose must be one of {CHOICES}; got {self.choose!r}")


def _rtn_layout(shape, group_size: int | None, transposed: bool = False) -> tuple[int, int, int]:
    """(rows, cols, group) of the quantised matrix; per-channel means one group of all columns."""
    n, d = quantised_shape(shape, transposed)
    return n, d, (d if group_size is None else int(group_size))


def rtn_scale_dtype(group_size: int | None, scale_dtype: str | None = None) -> str:
    """The given scale dtype, else float32 for one scale per row (negligible bytes on wide rows),
    float16 per group."""
    if scale_dtype is not None:
        if scale_dtype not in ("float32", "float16"):
            raise InputError(f"rtn scale_dtype must be 'float32' or 'float16'; got {scale_dtype!r}")
        return scale_dtype
    return "float32" if group_size is None else "float16"


def rtn_nbytes(shape, bits: int, group_size: int | None = 128, transposed: bool = False,
               scale_dtype: str | None = None) -> int:
    n, d, g = _rtn_layout(shape, group_size, transposed)
    groups = math.ceil(d / g)
    return (bitpack.packed_nbytes(n * d, bits)
            + n * groups * np.dtype(rtn_scale_dtype(group_size, scale_dtype)).itemsize)


def rtn_settings_for_ratio(ratio: float, shape=None, group_size: int = 128,
                          transposed: bool = False) -> tuple[int, int | None] | None:
    """Most precise (bits, group_size) from LADDER whose stored bytes fit ratio * fp32 bytes
    (`choose="ladder"`; the default fit takes `best_rtn`, which does not waste these margins).

    With `shape` the exact bytes of that weight are used: 4-bit codes plus float16 group scales
    cost a little over 1/8 of fp32, and int8 per channel a little over 1/4, so ratio 0.25 gets
    4-bit groups and 0.125 gets 3-bit groups. Without it, the per-row scale of a very wide matrix
    is taken as free (so 0.25 gives int8 per channel), which can overshoot a real weight's budget.
    None when not even 2 bits per channel fits.
    """
    if not isinstance(ratio, (int, float, np.floating)):
        raise InputError(f"rtn_settings_for_ratio(ratio, shape=None, group_size=128): ratio must be a "
                         f"number, got {type(ratio).__name__}")
    for bits, group in LADDER:
        group = None if group is None else group_size
        if shape is not None:
            fits = rtn_nbytes(shape, bits, group, transposed) <= ratio * fp32_bytes(shape)
        else:
            per_weight = bits / 8 + (0.0 if group is None else np.dtype(rtn_scale_dtype(group)).itemsize / group)
            fits = per_weight <= 4 * ratio
        if fits:
            return bits, group
    return None


# values quantised at once: the grouped copy, its absolute values and the quotients are made for a
# chunk of rows into whole-layer codes and scales (whole, they held 2x a weight's float32 bytes)
QUANTISE_CHUNK_VALUES = 1 << 20


def _quantise(M: np.ndarray, bits: int, g: int, sdtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signed codes int16, scale (rows, groups) in sdtype, the float32 scales as (rows, groups, 1))
    of the (rows, cols) matrix M with groups of g columns (the last may be shorter).

    Works on the (rows, groups, g) view of a chunk of rows at a time (every step is per row): int64
    codes and float64 temporaries had made a fit take 9x its weight's bytes, whole-layer float32 ones 2x."""
    n, d = M.shape
    groups = math.ceil(d / g)
    qmax = (1 << (bits - 1)) - 1
    tiny = np.finfo(sdtype).smallest_subnormal
    codes = np.empty((n, d), np.int16)
    scale = np.empty((n, groups), sdtype)
    for a, b in row_ranges(n, groups * g, QUANTISE_CHUNK_VALUES):
        if groups * g == d:
            grouped = np.asarray(M[a:b], np.float32).reshape(b - a, groups, g)
        else:
            grouped = np.zeros((b - a, groups, g), dtype=np.float32)
            grouped.reshape(b - a, groups * g)[:, :d] = M[a:b]
        absmax = np.abs(grouped).max(axis=2)
        scale[a:b] = np.maximum(absmax / qmax, tiny).astype(sdtype)  # codes use the stored (rounded) scale
        q = grouped / scale[a:b].astype(np.float32)[:, :, None]
        np.rint(q, out=q)
        np.clip(q, -qmax, qmax, out=q)
        codes[a:b] = q.reshape(b - a, groups * g)[:, :d]
    return codes, scale, scale.astype(np.float32)[:, :, None]


def _rounding_error(M: np.ndarray, codes: np.ndarray, scale_groups: np.ndarray, g: int, rows: int = 256) -> float:
    """||codes * scale - M||_F (groups of g columns) in float64, a block of rows at a time (no
    full-size float64 copy)."""
    n, d = M.shape
    total = 0.0
    for a in range(0, n, rows):
        cols = np.repeat(scale_groups[a:a + rows, :, 0], g, axis=1)[:, :d]
        total += float(np.sum(np.square(codes[a:a + rows] * cols.astype(np.float64) - M[a:a + rows])))
    return math.sqrt(total)


def fit_rtn(weight, bits: int = 8, group_size: int | None = None, in_axis: int = 1,
            scale_dtype: str | None = None) -> CompressedWeight:
    """Round-to-nearest symmetric quantisation: codes in [-(2**(bits-1)-1), 2**(bits-1)-1],
    scale = max|w| / (2**(bits-1)-1) per output (group_size None) or per group of consecutive
    inputs (the last group may be shorter). in_axis 0 (a 2-D (in, out) weight) quantises W.T.
    scale_dtype None: float32 per row, float16 per group (`rtn_scale_dtype`)."""
    if bits not in BITS:
        raise InputError(f"rtn bits must be one of {BITS}, got {bits}")
    if group_size is not None and group_size < 1:
        raise InputError(f"group_size must be a positive integer or None, got {group_size}")
    shape, transposed = weight_layout(weight, in_axis, "rtn")
    M = np.ascontiguousarray(matrix(weight).T) if transposed else matrix(weight)
    n, d, g = _rtn_layout(shape, group_size, transposed)
    sdtype = rtn_scale_dtype(group_size, scale_dtype)
    codes, scale, _ = _quantise(M, bits, g, sdtype)
    offset = 1 << (bits - 1)
    codes += offset  # in place: the codes are this fit's own
    arrays = {"codes": bitpack.pack(codes, bits),
              "scale": scale.reshape(n) if group_size is None else scale}
    meta = {"bits": bits, "group_size": group_size, "offset": offset, "scale_dtype": sdtype}
    if transposed:
        meta["transposed"] = True
    return CompressedWeight("rtn", shape, meta, arrays)


def rtn_layouts_within(shape, ratio: float, transposed: bool = False, widths: int = 2, bits_allowed=BITS,
                       row_scales=("float32", "float16")):
    """The (bits, group_size, scale_dtype) settings `best_rtn` compares: for each bit width of
    `bits_allowed` from the most, one scale per row (the first of `row_scales` that fits) and the
    finest GROUPS grouping (narrower than the row) whose bytes fit ratio * fp32 bytes; the first
    `widths` bit widths that have any. Lower widths are not tried: one bit less doubles the
    rounding error, which finer scales do not win back."""
    from riem_compiler.methods.base import fp32_bytes as fp32

    budget = ratio * fp32(shape)
    _, d = quantised_shape(shape, transposed)
    out, seen = [], 0
    for bits in sorted(bits_allowed, reverse=True):
        found = []
        for sdtype in row_scales:
            if rtn_nbytes(shape, bits, None, transposed, sdtype) <= budget:
                found.append((bits, None, sdtype))
                break
        group = next((g for g in GROUPS if g < d and rtn_nbytes(shape, bits, g, transposed) <= budget), None)
        if group is not None:
            found.append((bits, group, "float16"))
        if found:
            out += found
            seen += 1
            if seen == widths:
                break
    return out


def best_rtn(weight, ratio: float, in_axis: int = 1, native: bool = False) -> CompressedWeight | None:
    """The rtn fit with the lowest relative weight error among `rtn_layouts_within` (fewer bytes
    on a tie); None when not even 2 bits per row fits. native: among the settings with a standard
    ONNX form first (NATIVE_BITS, float32 row scales), all of them only when none of those fits."""
    shape, transposed = weight_layout(weight, in_axis, "rtn")
    layouts = rtn_layouts_within(shape, ratio, transposed, bits_allowed=NATIVE_BITS,
                                 row_scales=("float32",)) if native else []
    layouts = layouts or rtn_layouts_within(shape, ratio, transposed)
    M = np.ascontiguousarray(matrix(weight).T) if transposed else matrix(weight)
    norm = math.sqrt(sum_of_squares(M))  # no float64 copy of the layer (2x its bytes, on every worker)
    best = None
    for bits, group, sdtype in layouts:
        with np.errstate(over="ignore", invalid="ignore"):
            g = M.shape[1] if group is None else group
            codes, _, scale_groups = _quantise(M, bits, g, sdtype)
            err = _rounding_error(M, codes, scale_groups, g)
            del codes, scale_groups  # before the next setting's (or the final fit's) codes
        err = err / norm if norm > 0 else err
        if not np.isfinite(err):  # float16 scales overflow on weights beyond ~4e6
            continue
        key = (err, rtn_nbytes(shape, bits, group, transposed, sdtype))
        if best is None or key < best[0]:
            best = (key, (bits, group, sdtype))
    if best is None:
        return None
    bits, group, sdtype = best[1]
    return fit_rtn(weight, bits, group, in_axis, sdtype)


def decode_rtn(cw: CompressedWeight, t: dict) -> torch.Tensor:
    """The quantised matrix, as the weight's (rows, cols) matrix view."""
    transposed = is_transposed(cw)
    n, d, g = _rtn_layout(cw.shape, cw.meta["group_size"], transposed)
    bits = cw.meta["bits"]
    codes = bitpack.unpack_torch(t["codes"], bits, n * d).reshape(n, d)
    scale = t["scale"].to(torch.float32).reshape(n, -1)
    span = d if cw.meta["group_size"] is None else g  # columns per scale
    if bitpack.is_eager() and span * scale.shape[1] == d:  # in place: the decode holds the matrix once
        codes.sub_(float(cw.meta["offset"]))
        codes.view(n, -1, span).mul_(scale.unsqueeze(2))
        W = codes
    else:
        if cw.meta["group_size"] is not None:
            scale = scale.repeat_interleave(g, dim=1)[:, :d]
        W = (codes - float(cw.meta["offset"])) * scale
    return W.T.contiguous() if transposed else W


class RTN(Method):
    name = "rtn"
    Settings = RTNSettings
    tvm_dense_reason = None
    screened_on_rows = True  # every row scaled on its own (the budget's own setting is fitted whole)

    def nbytes_for_shape(self, cw, shape):
        m = cw.meta
        return rtn_nbytes(tuple(shape), m["bits"], m["group_size"], is_transposed(cw), m.get("scale_dtype"))

    def fit(self, spec, ratio, settings, index=0):
        shape = spec.shape
        if settings.choose == "best":
            cw = best_rtn(spec.weight, ratio, spec.in_axis, native=settings.onnx_format in NATIVE_FIRST)
        else:
            setting = rtn_settings_for_ratio(ratio, shape, settings.group_size, spec.in_axis == 0)
            cw = None if setting is None else fit_rtn(spec.weight, *setting, in_axis=spec.in_axis)
        if cw is None:
            raise InputError(f"ratio {ratio} is too small for 2-bit RTN of shape {shape} "
                             f"({rtn_nbytes(shape, 2, None, spec.in_axis == 0, 'float16')} bytes needed); "
                             "raise the ratio")
        return within_ratio(spec, ratio, cw)

    def candidates(self, spec, budget_ratio, options, attempt):
        group_size = options.get("group_size", 128)
        weight = screening_rows(spec, options)
        for bits, group in options.get("ladder", LADDER):
            group = None if group is None else group_size
            attempt(spec.name, f"rtn{bits}" + ("" if group is None else f"/g{group}"), fit_rtn, weight, bits,
                    group, spec.in_axis)
        # the lowest-error setting that fits the budget itself (what fit gives at this ratio)
        attempt(spec.name, f"rtn best@{budget_ratio:g}", best_rtn, spec.weight, budget_ratio, spec.in_axis)

    def decode_torch(self, cw, tensors):
        return decode_rtn(cw, tensors)

    def label(self, cw):
        m = cw.meta
        half = m["group_size"] is None and m.get("scale_dtype") == "float16"
        return f"rtn{m['bits']}" + ("/f16" if half else "" if m["group_size"] is None else f"/g{m['group_size']}")

    def trainable(self, cw, param_name=""):
        # only the float scales train; the packed codes stay fixed buffers
        from riem_compiler.methods.trainable import FloatArraysView

        return FloatArraysView(cw, param_name)

    def onnx_call(self, cw):
        transposed = is_transposed(cw)
        rows, cols = quantised_shape(cw.shape, transposed)
        attrs = {"rows": rows, "cols": cols, "bits": int(cw.meta["bits"]), "offset": float(cw.meta["offset"])}
        if not transposed:
            attrs["shape"] = [int(s) for s in cw.shape]
        suffix = "T" if transposed else ""  # the T decoders end with a Transpose of the (rows, cols) matrix
        if cw.meta.get("group_size") is None:
            return DecoderCall("RTNWeight" + suffix, ["codes", "scale"], attrs)
        return DecoderCall("RTNWeightGrouped" + suffix, ["codes", "scale"], {**attrs, "group": int(cw.meta["group_size"])})

    def onnx_native(self, cw, onnx_format, table=False):
        from riem_compiler.methods.rtn.native import native_rtn

        return native_rtn(cw, onnx_format, table)

    def onnx_matmul(self, cw, in_out):
        from riem_compiler.methods.rtn.native import matmulnbits_rtn

        return matmulnbits_rtn(cw, in_out)

    def onnx_gather(self, cw):
        from riem_compiler.methods.rtn.native import gather_rtn

        return gather_rtn(cw)

    def onnx_native_arrays(self, meta, shape, encoding, tensors):
        from riem_compiler.methods.rtn.native import rtn_arrays_from_native

        return rtn_arrays_from_native(meta, shape, encoding, tensors)

    def onnx_functions(self):
        from riem_compiler.methods.rtn import onnx as o

        return {name: (getattr(o, name), ("UnpackBits",))
                for name in ("RTNWeight", "RTNWeightGrouped", "RTNWeightT", "RTNWeightGroupedT")}

    def tvm_kernel(self):
        from riem_compiler.methods.rtn import tvm

        return tvm


METHOD = RTN()
