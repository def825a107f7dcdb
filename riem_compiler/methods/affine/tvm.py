"""TE/TIR decode kernel of affine weights, for decode-once TVM artifacts: from exactly the arrays
`fit_affine` stores, over the grouped matrix G (rows, cols) with `groups` groups per row,

    G[r, c] = (code[r * cols + c] - zero[r, c // group]) * scale[r, c // group]

written straight into the weight's shape; G is the weight's matrix view, or its transpose when
meta "transposed" / "axis" say so (then matrix element (i, j) is G[j, i]). The arithmetic is
`decode_affine`'s, in float32.

Codegen's interface: `array_names`, `decode_primfunc`, `schedule_decode_cpu`.
"""
from __future__ import annotations

from tvm import te, tirx

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import tvm_common as tc
from riem_compiler.methods.affine.layout import affine_layout, flipped
from riem_compiler.methods.rtn.layout import is_transposed

ARRAYS = ("codes", "scale", "zero")


def array_names(cw: CompressedWeight) -> list[str]:
    """Argument order of the kernel."""
    if cw.method != "affine":
        raise ValueError(f"the affine kernel decodes method 'affine', got {cw.method!r}")
    return list(ARRAYS)


def decode_te(cw: CompressedWeight) -> tuple[list[te.Tensor], te.Tensor]:
    """Inputs (in `array_names` order) and the float32 weight in cw.shape."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    flip = flipped(is_transposed(cw), cw.meta["axis"])
    _, cols, group, groups = affine_layout(cw.shape, cw.meta["group_size"], flip)
    bits = int(cw.meta["bits"])

    def element(i, j):
        r, c = (j, i) if flip else (i, j)
        k = r * groups + tirx.floordiv(c, group)
        code = tc.unpack_code(ph["codes"], r * cols + c, bits).astype("float32")
        return (code - tc.flat_load(ph["zero"], k).astype("float32")) * tc.flat_load(ph["scale"], k).astype("float32")

    return [ph[n] for n in names], tc.matrix_weight(cw, element)


def decode_primfunc(cw: CompressedWeight, name: str):
    """PrimFunc(codes, scale, zero, W) for one weight; unscheduled."""
    inputs, W = decode_te(cw)
    return te.create_prim_func(inputs + [W]).with_attr("global_symbol", name)


schedule_decode_cpu = tc.schedule_decode_cpu
