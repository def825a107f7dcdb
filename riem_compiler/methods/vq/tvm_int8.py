"""vq's int8-activation GEMV (up to tvm_gemv_int8.MAX_BATCH activation rows per call on an AVX-512 VNNI CPU): the codebook
rounded per call to int8 steps of max|codebook| / 127 and held as a table of 32-bit words (4 values
of an entry each, plus 128: the dot product's unsigned operand), every code's words fetched from it
and multiplied by 4 int8 activations with `vpdpbusd`. A d-vector spans ceil(d / 4) words; its slots
past d multiply activations that are zero. The float lookup-table form (vq/tvm.py) computes a table
of 2^bits dot products per vector slot of x per call and gathers from it (a table of up to
cols / d x 2^bits floats); this one gathers from a table of 2^bits words that stays in L1.

Numerics, per row i: y_i = scale_i * gain * step * sum_blocks sx_blk * (sum codes' words . xq -
128 sum xq), exact in int32 within a block of x (64, 32 or 16 codes), x rounded per block to int8
with sx = max|x_blk| / 127; the codebook's rounding adds about 0.4% of its largest value per weight
(tests/test_tvm_int8.py checks against a numpy model of the same integers).

Codes of any width up to 12 bits: each row's codes are unpacked once per row into an int32 buffer,
16 at a time (8-bit: one vector load; other widths: a 4-byte gather at each code's first byte,
then a per-lane shift and a mask; scalar reads where a vector read would pass the array's end),
padded with code 0 to whole vectors of 16 (those slots meet zero activations). The table's words
are fetched with `vpgatherdd` (measured against 16 scalar loads on a 4096x4096 weight at batch 1:
1.9-2.0 vs 2.7-3.4 ms for 5-vectors of 9-bit codes, 0.84-0.92 vs 0.64-1.18 ms for 4-vectors of 8-bit
codes).
"""
from __future__ import annotations

from tvm.script import tirx as T

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import tvm_gemv_int8 as gi
from riem_compiler.methods.rtn.layout import is_transposed

MAX_DIM = 8  # two 32-bit words per code
GATHER = "llvm.x86.avx512.mask.gather.dpi.512"  # 16 int32 at base + scale * index (vpgatherdd)
MAX_BITS = 12  # a table of 2^12 entries x 2 words: 32 KiB, the L1 of most cores


def layout(cw: CompressedWeight, batch: int) -> tuple[int, int, int, int] | str:
    """(vectors per row, words per code, padded vectors per row, codes per x block), or why not."""
    dim, bits = int(cw.meta["dim"]), int(cw.meta["bits"])
    why = gi.enabled(batch)
    if why is not None:
        return why
    if is_transposed(cw):
        return "a transposed codebook layout"
    if dim > MAX_DIM:
        return f"vectors of {dim} values span more than two 32-bit words"
    if bits > MAX_BITS:
        return f"a table of 2^{bits} entries does not stay in L1"
    v = -(-cw.matrix_shape[1] // dim)
    vpad = -(-v // 16) * 16
    return v, -(-dim // 4), vpad, next(b for b in (64, 32, 16) if vpad % b == 0)


def fused_int8_primfunc(cw: CompressedWeight, batch: int, name: str, lay, unpack_code):
    """PrimFunc(x (batch, cols), codes, codebook, scale, gain, y (batch, rows)); `unpack_code(codes,
    n, bits)` reads code n (vq/tvm.py's reader)."""
    rows, cols = cw.matrix_shape
    dim, bits = int(cw.meta["dim"]), int(cw.meta["bits"])
    v, words, vpad, blk = lay
    nb, n_entries, nblk = int(batch), 1 << bits, vpad // blk
    cb = gi.rows_per_chunk(nb)
    codes_len = int(cw.arrays["codes"].size)
    scale_shape = tuple(int(d) for d in cw.arrays["scale"].shape)
    scale_dtype = str(cw.arrays["scale"].dtype)
    cb_dtype = str(cw.arrays["codebook"].dtype)
    dot = gi.INTRINSICS[64]
    mask = (1 << bits) - 1

    def gather(base, index, scale: int):  # 16 int32 words at base + scale * index[l] (vpgatherdd)
        return T.call_llvm_pure_intrin("int32x16", T.llvm_lookup_intrinsic_id(GATHER), T.broadcast(T.int32(0), 16),
                                       base, index, T.broadcast(T.bool(True), 16), T.int32(scale))

    # with more than one chunk of activation rows, each row's words are fetched once into a buffer
    # (at 32 rows, 384x1536 d3: 0.41-0.44 -> 0.27-0.42 ms); with one, straight from the table
    prefetch = nb > cb

    def words_at(table, idx, wrow, w, g):  # word w of the codes of vectors g .. g + 15 of the row
        if prefetch:
            return wrow.vload([w * vpad + g], "int32x16")
        return gather(T.address_of(table[w * n_entries]), idx.vload([g], "int32x16"), 4)

    def codes_at(codes, first):  # codes first .. first + 15: a 4-byte read at each code's first byte, shifted, masked
        if bits == 8:
            return T.Cast("int32x16", codes.vload([first], "uint8x16"))
        pos = (T.broadcast(first, 16) + T.ramp(0, 1, 16)) * T.broadcast(T.int32(bits), 16)
        return T.bitwise_and(T.shift_right(gather(T.address_of(codes[0]), T.shift_right(pos, T.broadcast(3, 16)), 1),
                                           T.bitwise_and(pos, T.broadcast(7, 16))), T.broadcast(T.int32(mask), 16))

    def level(codebook, step, k, slot):  # entry k's value at slot (past dim: any, its x is zero) + 128
        return T.if_then_else(slot < dim, T.Cast("int64", T.round(
            T.Cast("float32", codebook[k, T.min(slot, dim - 1)]) / step)) + 128, T.int64(128))

    def x_at(x, b, g, slot):  # x's value at vector g, slot (zero past the row and past dim)
        col = g * dim + slot
        return T.if_then_else(T.And(slot < dim, col < cols), x[b, T.min(col, cols - 1)], T.float32(0))

    @T.prim_func(private=True)
    def func(x: T.Buffer((nb, cols), "float32"), codes: T.Buffer((codes_len,), "uint8"),
             codebook: T.Buffer((n_entries, dim), cb_dtype), scale_in: T.Buffer(scale_shape, scale_dtype),
             gain: T.Buffer((1,), "float32"), y: T.Buffer((nb, rows), "float32")):
        T.func_attr({"tirx.noalias": True})
        scale = T.decl_buffer((rows,), scale_dtype, data=scale_in.data)
        table = T.decl_buffer((words * n_entries,), "int32")  # word w of entry k at w * n_entries + k
        step = T.decl_buffer((1,), "float32")
        xq = T.decl_buffer((nb * words * vpad * 4,), "int8")  # (b, word, vector, 4 slots)
        sx = T.decl_buffer((nb * nblk,), "float32")
        ql = T.decl_buffer((nb * nblk * 16,), "int32")
        step[0] = T.float32(0)
        for k, j in T.grid(n_entries, dim):
            step[0] = T.max(step[0], T.fabs(T.Cast("float32", codebook[k, j])))
        step[0] = T.if_then_else(step[0] > T.float32(0), step[0] / T.float32(127), T.float32(1))
        for w, k in T.grid(words, n_entries):  # 4 unsigned bytes, little-endian, as one int32
            table[w * n_entries + k] = T.Cast("int32", level(codebook, step[0], k, w * 4)
                                              + level(codebook, step[0], k, w * 4 + 1) * T.int64(256)
                                              + level(codebook, step[0], k, w * 4 + 2) * T.int64(65536)
                                              + level(codebook, step[0], k, w * 4 + 3) * T.int64(16777216))
        for bb in T.parallel(nb * nblk):  # x's blocks to int8, their scales, their sums per lane
            amax = T.alloc_buffer((2,), "float32", annotations={"disable_lower_builtin": True})
            amax[0] = T.float32(0)
            for g, s in T.grid(blk, dim):
                amax[0] = T.max(amax[0], T.fabs(x_at(x, T.floordiv(bb, nblk), T.floormod(bb, nblk) * blk + g, s)))
            sx[bb] = amax[0] / T.float32(127)
            amax[1] = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
            for lane in range(16):
                ql[bb * 16 + lane] = 0
            for g, w, s in T.grid(blk, words, 4):
                xq[((T.floordiv(bb, nblk) * words + w) * vpad + T.floormod(bb, nblk) * blk + g) * 4 + s] = \
                    T.Cast("int8", T.round(x_at(x, T.floordiv(bb, nblk), T.floormod(bb, nblk) * blk + g, w * 4 + s)
                                           * amax[1]))
                ql[bb * 16 + T.floormod(g, 16)] = ql[bb * 16 + T.floormod(g, 16)] + T.Cast(
                    "int32", xq[((T.floordiv(bb, nblk) * words + w) * vpad + T.floormod(bb, nblk) * blk + g) * 4 + s])
        for i in T.parallel(rows):
            idx = T.alloc_buffer((vpad,), "int32", annotations={"disable_lower_builtin": True})
            wrow = T.alloc_buffer((words * vpad if prefetch else 1,), "int32", annotations={"disable_lower_builtin": True})
            acc = T.alloc_buffer((cb * 16,), "int32", annotations={"disable_lower_builtin": True})
            facc = T.alloc_buffer((cb * 16,), "float32", annotations={"disable_lower_builtin": True})
            for gv in range(vpad // 16):  # the row's codes, 16 at a time; code 0 past the row (x is zero there)
                if ((i * v + gv * 16 + 16) * bits + 31) // 8 <= codes_len:
                    idx[T.ramp(gv * 16, 1, 16)] = T.Select(T.ramp(gv * 16, 1, 16) < T.broadcast(v, 16),
                                                           codes_at(codes, i * v + gv * 16), T.broadcast(0, 16))
                else:  # the last codes of the array: a vector read would run past its end
                    for g in range(16):
                        idx[gv * 16 + g] = T.if_then_else(gv * 16 + g < v, unpack_code(
                            codes, i * v + T.min(gv * 16 + g, v - 1), bits), 0)
            if prefetch:  # the row's codebook words, fetched once for every chunk of activation rows
                for gv, w in T.grid(vpad // 16, words):
                    wrow[T.ramp(w * vpad + gv * 16, 1, 16)] = gather(T.address_of(table[w * n_entries]),
                                                                     idx.vload([gv * 16], "int32x16"), 4)
            for bc in range(nb // cb):  # the activation rows in chunks of cb, each chunk's sums in registers
                for a in T.unroll(cb):
                    facc[T.ramp(a * 16, 1, 16)] = T.broadcast(T.float32(0), 16)
                for bk in range(nblk):
                    for a in T.unroll(cb):  # - 128 * sum(xq): the unsigned levels' offset
                        acc[T.ramp(a * 16, 1, 16)] = ql[T.ramp(((bc * cb + a) * nblk + bk) * 16, 1, 16)] * \
                            T.broadcast(T.int32(-128), 16)
                    for c, w in T.grid(blk // 16, words):
                        for a in T.unroll(cb):
                            acc[T.ramp(a * 16, 1, 16)] = T.call_llvm_pure_intrin(
                                "int32x16", T.llvm_lookup_intrinsic_id(dot), acc[T.ramp(a * 16, 1, 16)],
                                T.reinterpret(words_at(table, idx, wrow, w, bk * blk + c * 16), dtype="uint8x64"),
                                xq.vload([(((bc * cb + a) * words + w) * vpad + bk * blk + c * 16) * 4], "int8x64"))
                    for a in T.unroll(cb):
                        facc[T.ramp(a * 16, 1, 16)] = facc[T.ramp(a * 16, 1, 16)] + \
                            T.Cast("float32x16", acc[T.ramp(a * 16, 1, 16)]) * \
                            T.broadcast(sx[(bc * cb + a) * nblk + bk], 16)
                for a in T.unroll(cb):
                    y[bc * cb + a, i] = gi.lane_sum(facc, a * 16, 16) * (T.Cast("float32", scale[i]) * gain[0] * step[0])
    return func.with_attr("global_symbol", name).with_attr(gi.FORM_ATTR, True)
