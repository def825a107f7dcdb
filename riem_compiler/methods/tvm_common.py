"""TE/TIR pieces every method's TVM decode kernel (methods/<name>/tvm.py) uses.

Imported only from those kernel modules, which `Method.tvm_kernel()` imports when a TVM
artifact is built, so TVM stays out of `import riem_compiler`. Here: placeholders for exactly
the arrays a CompressedWeight stores, the reader of the one bit layout (bitpack.py), index
helpers that write an element of the matrix view straight into the weight's own shape (no
separate reshape stage), and the plain CPU schedule of a decode-once kernel.
"""
from __future__ import annotations

import numpy as np
from tvm import te, tirx

from riem_compiler.compressed import CompressedWeight

VECTOR_CHOICES = (16, 8, 4)  # float32 lanes tried for the innermost decode loop, widest first


def checked_array_names(cw: CompressedWeight, method: str, arrays, rows_cols_only: bool = False) -> list[str]:
    """A kernel's `array_names`: `arrays` (its argument order) once cw is checked to be `method`'s,
    and, for a kernel that reads the (rows, cols) layout only, not stored transposed."""
    if cw.method != method:
        raise ValueError(f"the {method} kernel decodes method {method!r}, got {cw.method!r}")
    if rows_cols_only and cw.meta.get("transposed"):
        raise ValueError(f"this {method} weight is stored transposed (codes of W.T, from an ONNX MatMul constant); "
                         "the TVM kernel decodes the (rows, cols) layout only, and build_tvm takes torch results")
    return list(arrays)


def placeholders(cw: CompressedWeight, names) -> dict[str, te.Tensor]:
    """One placeholder per stored array, with the array's own shape and dtype."""
    out = {}
    for name in names:
        arr = np.asarray(cw.arrays[name])
        out[name] = te.placeholder(tuple(int(s) for s in arr.shape), str(arr.dtype), name=name)
    return out


def unpack_code(packed: te.Tensor, n, bits: int):
    """Integer code number n (int32) of a flat uint8 array in the bitpack.py layout: 8 bits one
    byte, 16 bits a little-endian pair, other widths (up to 9) a little-endian bit stream read
    as two bytes and shifted, so a code that straddles a byte boundary (3, 6 bits) costs no branch."""
    if bits == 8:
        return packed[n].astype("int32")
    if bits == 16:
        return packed[n * 2].astype("int32") + packed[n * 2 + 1].astype("int32") * 256
    if not 1 <= bits <= 9:
        raise ValueError(f"bit width {bits} is not readable from two bytes")
    if 8 % bits == 0:  # a code never straddles a byte: one byte read (a plain access for dlight)
        pos = n * bits
        byte = packed[tirx.floordiv(pos, 8)].astype("int32")
        return tirx.bitwise_and(tirx.shift_right(byte, tirx.floormod(pos, 8).astype("int32")), (1 << bits) - 1)
    # When the second byte would run past the end it is never needed (the code fits in the
    # first), so clamping the index keeps the read in bounds without a branch.
    last = int(packed.shape[0]) - 1
    pos = n * bits
    byte = tirx.floordiv(pos, 8)
    shift = tirx.floormod(pos, 8)
    lo = packed[byte].astype("int32")
    hi = packed[tirx.min(byte + 1, last)].astype("int32")
    word = lo + hi * 256
    return tirx.bitwise_and(tirx.shift_right(word, shift.astype("int32")), (1 << bits) - 1)


def flat_index(indices, dims):
    """Row-major flat index of `indices` in an array of shape `dims` (0 for no dims)."""
    flat = 0
    for idx, dim in zip(indices, dims):
        flat = flat * int(dim) + idx
    return flat


def flat_load(tensor: te.Tensor, k):
    """tensor's element number k in row-major order, whatever its stored shape (a per-row
    scale may be stored as (n,) or (n, 1))."""
    idx = []
    for dim in reversed([int(s) for s in tensor.shape[1:]]):
        idx.insert(0, tirx.floormod(k, dim))
        k = tirx.floordiv(k, dim)
    return tensor[(k, *idx)]


def matrix_weight(cw: CompressedWeight, element, name: str = "W") -> te.Tensor:
    """The float32 weight in cw.shape whose matrix-view element (i, j) is element(i, j)
    (a te.sum is allowed: the reduction then belongs to this one block)."""
    tail = [int(s) for s in cw.shape[1:]]
    return te.compute(tuple(int(s) for s in cw.shape),
                      lambda i, *rest: element(i, flat_index(rest, tail)), name=name)


def vectorize_inner(sch, loop) -> bool:
    """Vectorise `loop` over the widest of VECTOR_CHOICES that divides its extent (split off as the
    inner loop); False, leaving the loop alone, where none does."""
    n = int(sch.get(loop).extent)
    vec = next((v for v in VECTOR_CHOICES if n % v == 0), None)
    if vec is None:
        return False
    sch.vectorize(sch.split(loop, [None, vec])[1])
    return True


def _spatial(sch, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def schedule_decode_cpu(func, out_block: str = "W"):
    """Plain CPU schedule of a decode kernel whose block `out_block` writes the weight. Decode
    runs once at load, so this only avoids naive scalar loops: elementwise producer stages
    (casts, dequantisation) are inlined, reduction producers run in parallel over their first
    loop; the weight runs in parallel over its output rows, with the other dimensions fused and
    vectorised when they divide into float32 lanes (a reduction moves outside the lanes)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(blk).name_hint == out_block:
            continue
        if _spatial(sch, blk):
            sch.compute_inline(blk)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(blk).name_hint != out_block:
            sch.parallel(sch.get_loops(blk)[0])
    w = sch.get_sblock(out_block)
    n_spatial = sum(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(w).iter_vars)
    loops = sch.get_loops(w)
    rows, rest, red = loops[0], loops[1:n_spatial], loops[n_spatial:]
    sch.parallel(rows)  # before decompose_reduction: the split init block would forbid it
    if rest:
        cols = sch.fuse(*rest) if len(rest) > 1 else rest[0]
        n_cols = int(sch.get(cols).extent)
        vec = next((v for v in VECTOR_CHOICES if n_cols % v == 0), 1)
        if vec > 1:
            outer, lanes = sch.split(cols, [None, vec])
            if red:
                sch.reorder(outer, *red, lanes)
            sch.vectorize(lanes)
            if red:
                sch.decompose_reduction(w, red[0])
    return sch.mod["main"].with_attr("tir.is_scheduled", True)
