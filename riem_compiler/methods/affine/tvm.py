"""TE/TIR decode kernel of affine weights, for decode-once TVM artifacts: from exactly the arrays
`fit_affine` stores, over the grouped matrix G (rows, cols) with `groups` groups per row,

    G[r, c] = (code[r * cols + c] - zero[r, c // group]) * scale[r, c // group]

written straight into the weight's shape; G is the weight's matrix view, or its transpose when
meta "transposed" / "axis" say so (then matrix element (i, j) is G[j, i]). The arithmetic is
`decode_affine`'s, in float32.

Codegen's interface: `array_names`, `decode_primfunc`, `schedule_decode_cpu`, and
`fused_linear_primfunc` (y = x W^T, dequantised inside the reduction, tvm_gemv.py): groups
along the reduction axis with byte-aligned rows and groups (1-8 bits) take the packed-rows form; grouping
along the output axis (the grouped matrix is W^T) takes the element form vectorised over output
rows, along which its codes, scales and zero points are contiguous.
"""
from __future__ import annotations

from tvm import te, tirx

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import tvm_common as tc
from riem_compiler.methods import tvm_gemv as tg
from riem_compiler.methods import tvm_gemv_int8 as gi
from riem_compiler.methods.affine.layout import affine_layout, flipped
from riem_compiler.methods.rtn.layout import is_transposed

ARRAYS = ("codes", "scale", "zero")


def array_names(cw: CompressedWeight) -> list[str]:
    """Argument order of the kernel."""
    return tc.checked_array_names(cw, "affine", ARRAYS)


def decode_te(cw: CompressedWeight) -> tuple[list[te.Tensor], te.Tensor]:
    """Inputs (in `array_names` order) and the float32 weight in cw.shape."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    return [ph[n] for n in names], tc.matrix_weight(cw, decode_element(cw, ph))


def decode_element(cw: CompressedWeight, ph: dict):
    """element(i, j): the float32 matrix-view element from the stored arrays (placeholders `ph`)."""
    flip = flipped(is_transposed(cw), cw.meta["axis"])
    _, cols, group, groups = affine_layout(cw.shape, cw.meta["group_size"], flip)
    bits = int(cw.meta["bits"])

    def element(i, j):
        r, c = (j, i) if flip else (i, j)
        k = r * groups + tirx.floordiv(c, group)
        code = tc.unpack_code(ph["codes"], r * cols + c, bits).astype("float32")
        return (code - tc.flat_load(ph["zero"], k).astype("float32")) * tc.flat_load(ph["scale"], k).astype("float32")

    return element


def decode_primfunc(cw: CompressedWeight, name: str):
    """PrimFunc(codes, scale, zero, W) for one weight; unscheduled."""
    inputs, W = decode_te(cw)
    return te.create_prim_func(inputs + [W]).with_attr("global_symbol", name)


schedule_decode_cpu = tc.schedule_decode_cpu


def fused_linear_primfunc(cw: CompressedWeight, rows: int, name: str, target_kind: str = "llvm"):
    """PrimFunc(x (rows, cols), codes, scale, zero, y (rows, out)) = x W^T with W dequantised
    inside the reduction; scheduled for LLVM, left to dlight's GPU rules for cuda."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    n_out, cols = cw.matrix_shape
    x = te.placeholder((int(rows), cols), "float32", name="x")
    inputs = [x] + [ph[n] for n in names]
    flip = flipped(is_transposed(cw), cw.meta["axis"])
    bits = int(cw.meta["bits"])
    if not flip and target_kind == "llvm":
        lay = gi.layout(bits, cols, cw.meta["group_size"], rows)
        if not isinstance(lay, str):
            return gi.gemv_int8_primfunc(name, rows, n_out, cols, bits, lay, ph["scale"], ph["zero"])
        _, _, group, groups = affine_layout(cw.shape, cw.meta["group_size"], flip)
        layout = tg.packed_rows_layout(bits, cols, cw.meta["group_size"])
        if not isinstance(layout, str):
            def at(arr):
                return lambda i, g: tc.flat_load(ph[arr], i * groups + g).astype("float32")

            y = tg.packed_rows_te(x, ph["codes"], bits, n_out, cols, layout, at("scale"), at("zero"))
            return tg.schedule_packed_rows_cpu(tg.primfunc(inputs, y, name))
    y = tg.element_linear_te(x, n_out, cols, decode_element(cw, ph), target_kind)
    func = tg.primfunc(inputs, y, name)
    return tg.schedule_element_cpu(func, along_rows=flip) if target_kind == "llvm" else func
