"""TE/TIR decode kernel of vq weights, for decode-once TVM artifacts: from exactly the arrays
`fit_vq` stores,

    W[i, j] = codebook[code[i * vectors + j // dim], j % dim] * (scale[i] * gain[0])

over the matrix view (rows, cols), written straight into the weight's shape; `decode_vq`'s
arithmetic in float32. Codes in the bitpack.py layout: tvm_common's reader up to 9 bits, a
three-byte window for 10..15 (a code of up to 15 bits spans at most three bytes).

`fused_linear_primfunc`: y = x W^T with only the codes, the codebook and the scales resident.
For many activation rows per call (tvm_gemv.is_tiled) on LLVM, the tiled form: a tile of output
rows decoded once per call from a float32 copy of the codebook, then a blocked matmul. For few, a
table lookup (as AQLM's kernels do): per batch row and vector slot g,
lut[b, g, k] = x[b, g*dim:(g+1)*dim] . codebook[k] (cols * 2**bits multiply-adds, the size of a
small matmul), then y[b, i] = scale_i * sum_g lut[b, g, code(i, g)]: one gather-add per code, dim
times fewer than the weights, instead of decoding every weight inside the reduction (the element
form, 4x slower than decoding once on the 4x4096 MLP). CUDA keeps the element form for dlight.
"""
from __future__ import annotations

from tvm import te, tirx

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import tvm_common as tc
from riem_compiler.methods import tvm_gemv as tg
from riem_compiler.methods.vq import tvm_int8 as vq_int8

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
    """PrimFunc(x (rows, cols), codes, codebook, scale, gain, y (rows, out)) = x W^T: for LLVM, the
    int8-activation GEMV on a VNNI CPU up to 32 rows (vq/tvm_int8.py), else the lookup-table form or
    the tiled form, scheduled; the codebook lookup inside the reduction, left to dlight's GPU rules,
    for cuda."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    n_out, cols = cw.matrix_shape
    x = te.placeholder((int(rows), cols), "float32", name="x")
    if target_kind != "llvm":
        y = tg.element_linear_te(x, n_out, cols, decode_element(cw, ph), target_kind)
        return tg.primfunc([x] + [ph[n] for n in names], y, name)
    lay = vq_int8.layout(cw, rows)
    if not isinstance(lay, str):
        return vq_int8.fused_int8_primfunc(cw, rows, name, lay, unpack_code)
    if tg.is_tiled(rows):
        return tg.schedule_tiled_cpu(tg.primfunc([x] + [ph[n] for n in names], _tiled_linear_te(cw, ph, x), name))
    return _schedule_lookup_cpu(tg.primfunc([x] + [ph[n] for n in names], _lookup_linear_te(cw, ph, x), name))


def _tiled_linear_te(cw: CompressedWeight, ph: dict, x: te.Tensor) -> te.Tensor:
    """y = x W^T in the tiled form (many activation rows): per tile of output rows, each row's codes
    looked up in a float32 copy of the codebook (made once per call), `dim` consecutive weights per
    code. The row of vectors is padded with zero vectors to whole groups of 4 weights (x is zero
    there), so the product splits into vector lanes."""
    codes, codebook, scale, gain = (ph[n] for n in array_names(cw))
    n_out, cols = cw.matrix_shape
    dim, bits = int(cw.meta["dim"]), int(cw.meta["bits"])
    vectors = -(-cols // dim)
    slots = next(v for v in range(vectors, vectors + 4) if (v * dim) % 4 == 0)
    padded = slots * dim
    lanes = next(v for v in tg.LANE_CHOICES if padded % v == 0)
    cb = te.compute((1 << bits, dim), lambda k, j: codebook[k, j].astype("float32"), name="codebook_f32")

    def element(i, g, j):
        w = cb[unpack_code(codes, i * vectors + tirx.min(g, vectors - 1), bits), j] * (scale[i].astype("float32") * gain[0])
        return w if slots == vectors else tirx.Select(g < vectors, w, tirx.const(0.0, "float32"))

    return tg.tiled_linear_te(tg.zero_padded(x, padded), n_out, element, lanes, decode_shape=(slots, dim))


def _lookup_linear_te(cw: CompressedWeight, ph: dict, x: te.Tensor) -> te.Tensor:
    """y = x W^T through lut[b, g, k] = x_g . codebook[k] (x zero past the last column)."""
    codes, codebook, scale, gain = (ph[n] for n in array_names(cw))
    n_out, cols = cw.matrix_shape
    dim, bits = int(cw.meta["dim"]), int(cw.meta["bits"])
    vectors = -(-cols // dim)
    batch = int(x.shape[0])

    def x_at(b, c):  # min() keeps the unused read of a padded column in bounds
        return tirx.if_then_else(c < cols, x[b, tirx.min(c, cols - 1)], tirx.const(0.0, "float32"))

    def entry(b, g, k):  # the dot product written out (dim is small): a spatial block, lanes over k
        total = x_at(b, g * dim) * codebook[k, 0].astype("float32")
        for j in range(1, dim):
            total = total + x_at(b, g * dim + j) * codebook[k, j].astype("float32")
        return total

    lut = te.compute((batch, vectors, 1 << bits), entry, name="lut")
    g = te.reduce_axis((0, vectors), name="g")
    acc = te.compute((batch, n_out), lambda b, i: te.sum(lut[b, g, unpack_code(codes, i * vectors + g, bits)], axis=g),
                     name="acc")
    return te.compute((batch, n_out), lambda b, i: acc[b, i] * (scale[i].astype("float32") * gain[0]), name="y")


def _schedule_lookup_cpu(func):
    """The table in one parallel pass over (b, g), lanes over its entries; the gather-add parallel
    over output rows with per-row vector partial sums (tvm_gemv.schedule_row_reduction); the scale
    in a parallel pass."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    b, g, k = sch.get_loops(sch.get_sblock("lut"))
    sch.parallel(sch.fuse(b, g))
    lanes = next((v for v in tg.LANE_CHOICES if int(sch.get(k).extent) % v == 0), None)
    if lanes is not None:
        sch.vectorize(sch.split(k, [None, lanes])[1])
    tg.schedule_row_reduction(sch, "acc", batch_outer=True)  # one 2**bits x vectors table in cache at a time
    y = sch.get_sblock("y")
    sch.parallel(sch.fuse(*sch.get_loops(y)))
    return tg.scheduled(sch)
