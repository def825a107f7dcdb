"""TE/TIR decode kernel of vq weights, for decode-once TVM artifacts: from exactly the arrays
`fit_vq` stores,

    W[i, j] = codebook[code[i * vectors + j // dim], j % dim] * (scale[i] * gain[0])

over the matrix view (rows, cols), written straight into the weight's shape; `decode_vq`'s
arithmetic in float32. Codes in the bitpack.py layout: tvm_common's reader up to 9 bits, a
three-byte window for 10..15 (a code of up to 15 bits spans at most three bytes).

`fused_linear_primfunc`: y = x W^T with the codebook lookup inside the reduction (tvm_gemv.py's
element form), so only the codes, the codebook and the scales are resident.
"""
from __future__ import annotations

from tvm import te, tirx

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import tvm_common as tc
from riem_compiler.methods import tvm_gemv as tg

ARRAYS = ("codes", "codebook", "scale", "gain")


def array_names(cw: CompressedWeight) -> list[str]:
    """Argument order of the kernel."""
    return tc.checked_array_names(cw, "vq", ARRAYS, rows_cols_only=True)


def unpack_code(packed: te.Tensor, n, bits: int):
    """Code number n (int32) in the bitpack.py layout, for any width up to 16."""
    if bits in (8, 16) or bits <= 9:
        return tc.unpack_code(packed, n, bits)
    last = int(packed.shape[0]) - 1  # bytes past the end are never needed: clamp, no branch
    pos = n * bits
    byte = tirx.floordiv(pos, 8)
    word = (packed[byte].astype("int32") + packed[tirx.min(byte + 1, last)].astype("int32") * 256
            + packed[tirx.min(byte + 2, last)].astype("int32") * 65536)
    return tirx.bitwise_and(tirx.shift_right(word, tirx.floormod(pos, 8).astype("int32")), (1 << bits) - 1)


def decode_te(cw: CompressedWeight) -> tuple[list[te.Tensor], te.Tensor]:
    """Inputs (in `array_names` order) and the float32 weight in cw.shape."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    return [ph[n] for n in names], tc.matrix_weight(cw, decode_element(cw, ph))


def decode_element(cw: CompressedWeight, ph: dict):
    """element(i, j): the float32 matrix-view element from the stored arrays (placeholders `ph`)."""
    names = array_names(cw)
    _, cols = cw.matrix_shape
    dim, bits = int(cw.meta["dim"]), int(cw.meta["bits"])
    vectors = -(-cols // dim)
    codes, codebook, scale, gain = (ph[n] for n in names)

    def element(i, j):
        code = unpack_code(codes, i * vectors + tirx.floordiv(j, dim), bits)
        row_scale = scale[i].astype("float32") * gain[0]
        return codebook[code, tirx.floormod(j, dim)].astype("float32") * row_scale

    return element


def decode_primfunc(cw: CompressedWeight, name: str):
    """PrimFunc(codes, codebook, scale, gain, W) for one weight; unscheduled."""
    inputs, W = decode_te(cw)
    return te.create_prim_func(inputs + [W]).with_attr("global_symbol", name)


schedule_decode_cpu = tc.schedule_decode_cpu


def fused_linear_primfunc(cw: CompressedWeight, rows: int, name: str, target_kind: str = "llvm"):
    """PrimFunc(x (rows, cols), codes, codebook, scale, gain, y (rows, out)) = x W^T with the
    codebook lookup inside the reduction; scheduled for LLVM, left to dlight's GPU rules for cuda."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    n_out, cols = cw.matrix_shape
    x = te.placeholder((int(rows), cols), "float32", name="x")
    y = tg.element_linear_te(x, n_out, cols, decode_element(cw, ph))
    func = tg.primfunc([x] + [ph[n] for n in names], y, name)
    return tg.schedule_element_cpu(func, along_rows=False) if target_kind == "llvm" else func
