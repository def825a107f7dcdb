"""TE/TIR decode kernel of rtn weights, for decode-once TVM artifacts (and per-call decode in
fused mode): from exactly the arrays `fit_rtn` stores,

    W[i, j] = (code[i * cols + j] - offset) * scale[i]              (one scale per row)
    W[i, j] = (code[i * cols + j] - offset) * scale[i, j // group]  (grouped; last group may be shorter)

over the matrix view (rows, cols) of the weight, written straight into the weight's shape.
Codes are read in the bitpack.py layout (8 bits a byte; 4/3/2 bits from a two-byte window, so
3-bit codes that straddle bytes need no branch); the arithmetic is `decode_rtn`'s, in float32.

Codegen's interface (as for every method's kernel module): `array_names`, `decode_primfunc`,
`schedule_decode_cpu`, and `fused_linear_primfunc`: y = x W^T with the dequantisation inside the
reduction (tvm_gemv.py: the packed-rows form for byte-aligned rows and groups of 1-8-bit codes,
else the element form), so the weight stays in its stored bytes at run time.
"""
from __future__ import annotations

from tvm import te, tirx

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import tvm_common as tc
from riem_compiler.methods import tvm_gemv as tg
from riem_compiler.methods import tvm_gemv_int8 as gi

ARRAYS = ("codes", "scale")


def array_names(cw: CompressedWeight) -> list[str]:
    """Argument order of the kernel."""
    return tc.checked_array_names(cw, "rtn", ARRAYS, rows_cols_only=True)


def decode_te(cw: CompressedWeight) -> tuple[list[te.Tensor], te.Tensor]:
    """Inputs (in `array_names` order) and the float32 weight in cw.shape."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    return [ph[n] for n in names], tc.matrix_weight(cw, decode_element(cw, ph))


def decode_element(cw: CompressedWeight, ph: dict):
    """element(i, j): the float32 matrix-view element from the stored arrays (placeholders `ph`)."""
    _, cols = cw.matrix_shape
    bits = int(cw.meta["bits"])
    group = cw.meta.get("group_size")
    codes, scale = ph["codes"], ph["scale"]
    offset = tirx.const(float(cw.meta["offset"]), "float32")
    n_groups = 1 if group is None else -(-cols // int(group))

    def element(i, j):
        code = tc.unpack_code(codes, i * cols + j, bits).astype("float32") - offset
        g = 0 if group is None else tirx.floordiv(j, int(group))
        return code * tc.flat_load(scale, i * n_groups + g).astype("float32")

    return element


def decode_primfunc(cw: CompressedWeight, name: str):
    """PrimFunc(codes, scale, W) for one weight; unscheduled."""
    inputs, W = decode_te(cw)
    return te.create_prim_func(inputs + [W]).with_attr("global_symbol", name)


schedule_decode_cpu = tc.schedule_decode_cpu


def fused_linear_primfunc(cw: CompressedWeight, rows: int, name: str, target_kind: str = "llvm"):
    """PrimFunc(x (rows, cols), codes, scale, y (rows, out)) = x W^T with W decoded inside the
    reduction; scheduled for LLVM (up to 32 rows on a VNNI CPU: the int8-activation GEMV of
    tvm_gemv_int8.py), left to dlight's GPU rules for cuda (there the element form, the pattern
    those rules recognise). A str says why not."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    n_out, cols = cw.matrix_shape
    bits = int(cw.meta["bits"])
    group = cw.meta.get("group_size")
    n_groups = 1 if group is None else -(-cols // int(group))
    offset = tirx.const(float(cw.meta["offset"]), "float32")
    codes, scale = ph["codes"], ph["scale"]
    x = te.placeholder((int(rows), cols), "float32", name="x")

    def scale_at(i, g):
        return tc.flat_load(scale, i * n_groups + g).astype("float32")

    if target_kind == "llvm":
        lay = gi.layout(bits, cols, group, rows)
        if not isinstance(lay, str) and float(cw.meta["offset"]).is_integer():  # an integer zero point
            return gi.gemv_int8_primfunc(name, rows, n_out, cols, bits, lay, scale, offset=cw.meta["offset"])
    layout = tg.packed_rows_layout(bits, cols, group)
    if not isinstance(layout, str) and target_kind == "llvm":
        y = tg.packed_rows_te(x, codes, bits, n_out, cols, layout, scale_at, lambda i, g: offset)
        return tg.schedule_packed_rows_cpu(tg.primfunc([x, codes, scale], y, name))
    y = tg.element_linear_te(x, n_out, cols, decode_element(cw, ph), target_kind)
    func = tg.primfunc([x, codes, scale], y, name)
    return tg.schedule_element_cpu(func, along_rows=False) if target_kind == "llvm" else func

