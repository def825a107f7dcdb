"""TE/TIR decode kernel of svd weights, for decode-once TVM artifacts (and per-call decode in
fused mode): W = left @ right over the matrix view, written straight into the weight's shape,
from exactly the arrays `fit_svd` stores: float32 or float16 factors, or int8 factor codes
with one float32 scale per factor row (left = codes * scale[:, None], likewise right), as
`decode_svd` computes them in float32.

Codegen's interface (as for every method's kernel module): `array_names`, `decode_primfunc`,
`schedule_decode_cpu`, and `fused_linear_primfunc`: y = x W^T as two thin matmuls,
t = x right^T then y = t left^T, with the factors dequantised inside each reduction, so W is
never formed and only the factors are resident.
"""
from __future__ import annotations

from tvm import te

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import tvm_common as tc
from riem_compiler.methods import tvm_gemv as tg

INT8_ARRAYS = ("left_codes", "left_scale", "right_codes", "right_scale")
FLOAT_ARRAYS = ("left", "right")


def array_names(cw: CompressedWeight) -> list[str]:
    """Argument order of the kernel."""
    return tc.checked_array_names(cw, "svd", INT8_ARRAYS if int(cw.meta["factor_bits"]) == 8 else FLOAT_ARRAYS)


def _factor(ph: dict, side: str, int8: bool) -> te.Tensor:
    """One factor in float32 (a cast, or int8 codes times the row scale)."""
    if int8:
        codes, scale = ph[f"{side}_codes"], ph[f"{side}_scale"]
        return te.compute(codes.shape, lambda r, c: codes[r, c].astype("float32") * scale[r].astype("float32"),
                          name=f"{side}_f")
    x = ph[side]
    return te.compute(x.shape, lambda r, c: x[r, c].astype("float32"), name=f"{side}_f")


def decode_te(cw: CompressedWeight) -> tuple[list[te.Tensor], te.Tensor]:
    """Inputs (in `array_names` order) and the float32 weight in cw.shape."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    int8 = int(cw.meta["factor_bits"]) == 8
    left, right = _factor(ph, "left", int8), _factor(ph, "right", int8)
    k = te.reduce_axis((0, int(left.shape[1])), name="k")
    W = tc.matrix_weight(cw, lambda i, j: te.sum(left[i, k] * right[k, j], axis=k))
    return [ph[n] for n in names], W


def decode_primfunc(cw: CompressedWeight, name: str):
    """PrimFunc(factor arrays..., W) for one weight; unscheduled."""
    inputs, W = decode_te(cw)
    return te.create_prim_func(inputs + [W]).with_attr("global_symbol", name)


schedule_decode_cpu = tc.schedule_decode_cpu


def fused_linear_primfunc(cw: CompressedWeight, rows: int, name: str, target_kind: str = "llvm"):
    """PrimFunc(x (rows, cols), factor arrays..., y (rows, out)) = (x right^T) left^T; scheduled
    for LLVM (each thin matmul parallel over its outputs, vector lanes over its reduction), left
    to dlight's GPU rules for cuda."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    int8 = int(cw.meta["factor_bits"]) == 8
    left, right = _factor(ph, "left", int8), _factor(ph, "right", int8)
    rank, cols = (int(s) for s in right.shape)
    n_out = int(left.shape[0])
    x = te.placeholder((int(rows), cols), "float32", name="x")
    k = te.reduce_axis((0, cols), name="k")
    t = te.compute((int(rows), rank), lambda b, r: te.sum(x[b, k] * right[r, k], axis=k), name="t")
    r = te.reduce_axis((0, rank), name="r")
    y = te.compute((int(rows), n_out), lambda b, i: te.sum(t[b, r] * left[i, r], axis=r), name="y")
    func = tg.primfunc([x] + [ph[n] for n in names], y, name)
    if target_kind != "llvm":
        return func
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for blk in ("left_f", "right_f"):
        sch.compute_inline(sch.get_sblock(blk))
    tg.schedule_row_reduction(sch, "t")
    tg.schedule_row_reduction(sch, "y")
    return tg.scheduled(sch)
