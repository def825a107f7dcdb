"""TE/TIR decode kernel of rtn weights, for decode-once TVM artifacts (and per-call decode in
fused mode): from exactly the arrays `fit_rtn` stores,

    W[i, j] = (code[i * cols + j] - offset) * scale[i]              (one scale per row)
    W[i, j] = (code[i * cols + j] - offset) * scale[i, j // group]  (grouped; last group may be shorter)

over the matrix view (rows, cols) of the weight, written straight into the weight's shape.
Codes are read in the bitpack.py layout (8 bits a byte; 4/3/2 bits from a two-byte window, so
3-bit codes that straddle bytes need no branch); the arithmetic is `decode_rtn`'s, in float32.

Codegen's interface (as for every method's kernel module): `array_names`, `decode_primfunc`,
`schedule_decode_cpu`.
"""
from __future__ import annotations

from tvm import te, tirx

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import tvm_common as tc

ARRAYS = ("codes", "scale")


def array_names(cw: CompressedWeight) -> list[str]:
    """Argument order of the kernel."""
    if cw.method != "rtn":
        raise ValueError(f"the rtn kernel decodes method 'rtn', got {cw.method!r}")
    if cw.meta.get("transposed"):
        raise ValueError("this rtn weight is stored transposed (codes of W.T, from an ONNX MatMul constant); "
                         "the TVM kernel decodes the (rows, cols) layout only, and build_tvm takes torch results")
    return list(ARRAYS)


def decode_te(cw: CompressedWeight) -> tuple[list[te.Tensor], te.Tensor]:
    """Inputs (in `array_names` order) and the float32 weight in cw.shape."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
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

    return [ph[n] for n in names], tc.matrix_weight(cw, element)


def decode_primfunc(cw: CompressedWeight, name: str):
    """PrimFunc(codes, scale, W) for one weight; unscheduled."""
    inputs, W = decode_te(cw)
    return te.create_prim_func(inputs + [W]).with_attr("global_symbol", name)


schedule_decode_cpu = tc.schedule_decode_cpu
