"""Shared pieces of the fused dequantise-matmul kernels (`fused_linear_primfunc` in a method's
`<method>/tvm.py`): y[b, i] = sum_k x[b, k] * W[i, k], with W decoded inside the reduction from
the stored arrays, never written to memory. One TIR PrimFunc per weight and batch size.

Two forms:

- packed rows (`packed_rows_te`), the fast form: codes of 1 to 8 bits whose rows and groups hold
  whole units (a unit: one byte of 8 / bits codes for 1/2/4/8 bits, else `bits` bytes of 8 codes),
  the grouped matrix being the weight's (out, in) view, groups along the reduction. The reduction
  runs over (group, unit block, code within the unit): a vector of `lanes` consecutive units of one
  row is loaded once, each code is taken with a constant shift (the loop over the codes of a unit
  is unrolled), and the activation is read de-interleaved (x_split[b, t, u] = x[b, u *
  codes_per_unit + t], built in the same function), so every load is contiguous. The group's scale
  and zero point are loaded once per group (rotq: a code's value is its grid level, `level`, in
  place of code - zero). Schedule (LLVM): parallel over output rows, batch inside (one decode feeds
  every row of x), lanes vectorised, a per-row accumulator of `lanes` partial sums reduced at the end.
- element form (`element_linear_te`), for everything else (tails that do not fill a unit, groups
  that do not divide the row or hold whole units, grouping along the output axis, codebooks): the
  method's decode expression W(i, k) is a spatial block inlined into the matmul's reduction.
  Schedule (LLVM): parallel over output rows; vectorised over output rows where the stored
  layout is contiguous along them (grouping along the output axis), else over the reduction
  (per row `lanes` partial sums, then their sum).

Many activation rows per call (at least TILED_FROM_ROWS: a sequence, a batch), the tiled form
(`tiled_linear_te`, built by the two forms above for such a batch): per tile of output rows, the
tile's weights are decoded once into a local buffer (the same decode expressions), then a
register-blocked product runs over every activation row against it: below TILED_NN_FROM_ROWS rows
`part[b, i, lane]` (a block of batch rows x tile rows of `lanes`-wide partial sums, reduced once at
the end), from there on an outer product over the tile decoded transposed (its rows are the vector
lanes, x broadcast: a dense matmul's register tile). The decode then costs once per weight per call,
amortised over the rows, where the GEMV forms above repeat it or keep one accumulator set per batch
row. The activation is read in the reduction order the decode writes (de-interleaved for packed
rows, zero padded), computed once per call.

CUDA: the same PrimFuncs, unscheduled; the build's dlight GPU rules (GEMV, LowBatchGEMV, Matmul)
schedule them.
"""
from __future__ import annotations

import math

from tvm import te, tirx

from riem_compiler.methods import tvm_common as tc

LANE_CHOICES = (16, 8, 4)
# PrimFunc attribute of a CPU kernel that gathers codes per weight (the element form along the
# reduction: rows or groups that do not start on a byte boundary): measured slower than decoding
# once (vq in that form, before its lookup-table kernel: 155 ms fused vs 39 ms decode-once on
# tvm_lowbit's 4x4096 MLP at batch 1; tiled, rtn 3-bit at 32 rows: 0.92-1.0 ms vs 0.26-0.31 ms for the dense matmul),
# so mode "auto" decodes such weights once at load
SLOW_ON_CPU = "riem.fused_slower_than_decode_once"
F32 = "float32"
# activation rows per call from which the CPU kernels take the tiled form (a tile of the weight
# decoded once per call, then a blocked matmul; below it the GEMV forms). Measured on 1536x384 rtn
# 4-bit g128 here: 32 rows 0.34 ms tiled vs 0.77 ms in the packed-rows GEMV and 0.28 ms for a dense
# float32 matmul; at 4 rows and fewer the GEMV forms read each code once per call anyway
TILED_FROM_ROWS = 5
# from this many rows the tiled form's product is an outer-product register tile over a transposed
# tile (tiled_linear_te). Measured, rtn 4-bit g128, 1536x384 and 384x1536: 32 rows 0.30-0.33 ms dot
# vs 0.35-0.36 ms outer-product; 256 rows 2.3-2.5 ms dot vs 1.66-1.74 ms (dense float32: 1.63-1.66)
TILED_NN_FROM_ROWS = 64
# the dot form's tile of output rows and its register block (batch rows x tile rows), largest
# dividing choice first: 16 / 4 / 4 measured best of 8-32 / 2-8 / 2-8 at 32 and 256 rows
TILE_ROWS, TILE_BATCH, TILE_INNER = (16, 8, 4, 2), (4, 2), (4, 2)


def is_tiled(batch: int, target_kind: str = "llvm") -> bool:
    """True when a CPU kernel for `batch` activation rows takes the tiled form."""
    return target_kind == "llvm" and int(batch) >= TILED_FROM_ROWS


def packed_rows_layout(bits: int, cols: int, group: int | None):
    """(codes per unit, group, groups, units per group, lanes, bytes per unit) when the packed-rows
    form applies, else a str saying why not. A unit is the smallest run of whole bytes holding whole
    codes: one byte of 8 // bits codes for 1/2/4/8 bits, `bits` bytes of 8 codes otherwise (3, 5, 6,
    7 bits); rows and groups must hold whole units."""
    if not 1 <= bits <= 8:
        return f"{bits}-bit codes are wider than a byte"
    cpu, bpu = (8 // bits, 1) if 8 % bits == 0 else (8, bits)
    g = cols if group is None else int(group)
    if cols % g:
        return f"group {g} does not divide the row ({cols})"
    if g % cpu:
        return f"a group of {g} does not fill whole {bpu}-byte units of {cpu} codes"
    gu = g // cpu
    lanes = next((v for v in LANE_CHOICES if gu % v == 0), None)
    if lanes is None:
        return f"a group's {gu} units do not split into vector lanes"
    return cpu, g, cols // g, gu, lanes, bpu


def packed_rows_te(x: te.Tensor, codes: te.Tensor, bits: int, rows: int, cols: int, layout, scale_at, zero_at,
                   level=None):
    """y (batch, rows) = x W^T with W[i, k] = (code(i, k) - zero_at(i, g)) * scale_at(i, g), g = k // group,
    codes in the bitpack layout over the (rows, cols) matrix. `layout` from packed_rows_layout.
    With `level` (a code's float32 value, e.g. a grid lookup), W[i, k] = level(code(i, k)) * scale_at(i, g)
    and zero_at is unused.

    Code t of a unit starts at bit t * bits of the unit (little-endian), so its byte and shift are
    constants once the loop over t is unrolled; a code that crosses into the unit's next byte (3, 5,
    6, 7 bits) reads both. Partial sums acc[b, i, c, t, lane]: `chains` independent vector
    accumulators (c) per code position in the unit (t), so consecutive fused multiply-adds do not
    wait on each other."""
    cpb, _, n_groups, gb, lanes, bpu = layout  # codes per unit, units per group (a unit is a byte for 1/2/4/8 bits)
    blocks = gb // lanes
    batch = int(x.shape[0])
    row_bytes = cols // cpb * bpu
    mask = (1 << bits) - 1

    def decode(i, t, grp, kk):
        at = i * row_bytes + (grp * gb + kk) * bpu
        if bpu == 1:
            byte = codes[at].astype("int32")
            code = byte if bits == 8 else tirx.bitwise_and(tirx.shift_right(byte, t * bits), mask)
        else:  # the code's first byte, and the next one where the code crosses into it
            first, shift = tirx.floordiv(t * bits, 8), tirx.floormod(t * bits, 8)
            low = codes[at + first].astype("int32")
            high = tirx.if_then_else(shift + bits > 8, codes[at + tirx.min(first + 1, bpu - 1)].astype("int32"), 0)
            code = tirx.bitwise_and(tirx.shift_right(low + high * 256, shift), mask)
        if level is not None:
            return level(code) * scale_at(i, grp)
        return (code.astype(F32) - zero_at(i, grp)) * scale_at(i, grp)

    if is_tiled(batch):  # x in the decode's order: x_red[b, t, g, kk] = x[b, (g * gb + kk) * cpb + t]
        x_red = te.compute((batch, cpb, n_groups, gb), lambda b, t, grp, kk: x[b, (grp * gb + kk) * cpb + t],
                           name="x_red")
        return tiled_linear_te(x_red, rows, decode, lanes)
    chains = next(c for c in (4, 2, 1) if blocks % c == 0 and (c * cpb * batch <= 8 or c == 1))
    xs = te.compute((batch, cpb, cols // cpb), lambda b, t, kb: x[b, kb * cpb + t], name="x_split")
    g = te.reduce_axis((0, n_groups), name="g")
    ko = te.reduce_axis((0, blocks // chains), name="ko")
    dec = te.compute((rows, cpb, n_groups, gb), decode, name="decode")

    def acc(b, i, c, t, lane):
        kk = (ko * chains + c) * lanes + lane
        return te.sum(xs[b, t, g * gb + kk] * dec[i, t, g, kk], axis=[g, ko])

    part = te.compute((batch, rows, chains, cpb, lanes), acc, name="acc")
    rc = te.reduce_axis((0, chains), name="rc")
    rt = te.reduce_axis((0, cpb), name="rt")
    lane_sums = te.compute((batch, rows, lanes), lambda b, i, lane: te.sum(part[b, i, rc, rt, lane], axis=[rc, rt]),
                           name="lanes")
    rl = te.reduce_axis((0, lanes), name="rl")
    return te.compute((batch, rows), lambda b, i: te.sum(lane_sums[b, i, rl], axis=rl), name="y")


def schedule_packed_rows_cpu(func):
    """LLVM schedule of a packed_rows_te PrimFunc (see the module docstring). With more than one
    batch row, a tile of `tile` output rows shares each activation vector (loaded once for the
    tile), so x is streamed rows/tile times instead of once per output row."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    if _is_tiled_func(sch):
        return schedule_tiled_cpu(func)
    y, acc, lanes = sch.get_sblock("y"), sch.get_sblock("acc"), sch.get_sblock("lanes")
    b, i = sch.get_loops(y)[:2]
    batch, rows = int(sch.get(b).extent), int(sch.get(i).extent)
    tile = 1 if batch == 1 else next((t for t in (8, 4, 2) if rows % t == 0), 1)
    io, ii = sch.split(i, [None, tile])
    sch.reorder(io, ii, b)
    sch.parallel(io)
    sch.compute_at(lanes, io, preserve_unit_loops=True)
    _, lb, li, ll, lc, lt = sch.get_loops(lanes)
    sch.reorder(lb, li, lc, lt, ll)
    sch.vectorize(ll)
    sch.decompose_reduction(lanes, lc)
    sch.compute_at(acc, io, preserve_unit_loops=True)
    # under io: batch, rows of the tile, chains, code in byte, lanes; then the reductions
    _, ab, ai, ac, at, al, g, ko = sch.get_loops(acc)
    sch.reorder(g, ko, ac, at, ab, ai, al)  # one decode per (row, byte vector) feeds every batch row
    sch.unroll(ac)
    sch.unroll(at)
    sch.unroll(ai)
    sch.vectorize(al)
    # the decoded vectors of one (group, byte block) for the tile's rows: decoded once, then used
    # by every batch row
    dec = sch.get_sblock("decode")
    sch.compute_at(dec, ko, preserve_unit_loops=True)
    dl = sch.get_loops(dec)[-4:]  # rows of the tile, code in byte, unit group, bytes
    dlo, dli = sch.split(dl[3], [None, int(sch.get(al).extent)])
    sch.unroll(dl[0])
    sch.unroll(dl[1])
    sch.unroll(dlo)
    sch.vectorize(dli)
    sch.set_scope(dec, 0, "local")
    init = sch.decompose_reduction(acc, g)
    sch.vectorize(sch.get_loops(init)[-1])
    # accumulators on the stack: registers for LLVM (or L1), which then sees that they alias
    # neither the codes nor x and keeps one decode for every batch row
    sch.set_scope(acc, 0, "local")
    sch.set_scope(lanes, 0, "local")
    xs = sch.get_sblock("x_split")
    sch.fuse(*sch.get_loops(xs))
    return scheduled(sch)


def element_linear_te(x: te.Tensor, rows: int, cols: int, element, target_kind: str = "llvm"):
    """y (batch, rows) = x W^T with W[i, k] = element(i, k), a spatial block ("decode") that the
    schedule inlines into the reduction (the tiled form on CPU for many rows: decoded per tile)."""
    batch = int(x.shape[0])
    if is_tiled(batch, target_kind):  # the reduction padded to whole vector lanes, x zero there
        lanes = 16 if cols >= 64 else 8
        padded = -(-cols // lanes) * lanes
        if padded == cols:
            return tiled_linear_te(x, rows, element, lanes)
        return tiled_linear_te(zero_padded(x, padded), rows, lambda i, k: tirx.Select(
            k < cols, element(i, tirx.min(k, cols - 1)), tirx.const(0.0, F32)), lanes)
    w = te.compute((rows, cols), lambda i, k: element(i, k), name="decode")
    k = te.reduce_axis((0, cols), name="k")
    return te.compute((batch, rows), lambda b, i: te.sum(x[b, k] * w[i, k], axis=k), name="y")


def schedule_element_cpu(func, along_rows: bool, keep=()):
    """LLVM schedule of an element_linear_te PrimFunc: the decode inlined into the reduction,
    parallel over output rows; with `along_rows` (codes contiguous along the output rows) a
    block of output rows is vectorised and the reduction runs outside it. Blocks named in `keep`
    (a transform of x computed before the matmul, as rotq's rotation) stay blocks of their own."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    if _is_tiled_func(sch):  # the generic element decode per weight: 1.8-3.5x the dense matmul
        return schedule_tiled_cpu(func).with_attr(SLOW_ON_CPU, True)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(blk).name_hint not in ("y", *keep):
            sch.compute_inline(blk)
    y = sch.get_sblock("y")
    b, i, k = sch.get_loops(y)
    rows = int(sch.get(i).extent)
    if not along_rows:  # vector lanes over the reduction: per row, `lanes` partial sums, then their sum
        sch.mod["main"] = sch.mod["main"].with_attr(SLOW_ON_CPU, True)
        schedule_row_reduction(sch, "y")
        return scheduled(sch)
    lanes = next((v for v in LANE_CHOICES if rows % v == 0), None)
    if lanes is None:
        sch.reorder(i, b)
        sch.parallel(i)
        return scheduled(sch)
    io, ii = sch.split(i, [None, lanes])
    sch.reorder(io, b, k, ii)
    sch.parallel(io)
    sch.vectorize(ii)
    sch.decompose_reduction(y, k)
    return scheduled(sch)


def zero_padded(x: te.Tensor, width: int) -> te.Tensor:
    """x (batch, cols) with zero columns up to `width`: the tiled form's x_red for a reduction padded to
    whole lanes (min() keeps the unused read in bounds)."""
    cols = int(x.shape[1])
    return te.compute((int(x.shape[0]), width), lambda b, k: tirx.Select(
        k < cols, x[b, tirx.min(k, cols - 1)], tirx.const(0.0, F32)), name="x_red")


def tiled_linear_te(x_red: te.Tensor, rows: int, element, lanes: int, decode_shape=None) -> te.Tensor:
    """y (batch, rows) = x W^T in the tiled form. x_red (batch, *dims): the activation in the
    reduction order the decode writes; element(i, *idx): the decoded weight at that position, a
    spatial block over (rows, *dims) that the schedule places per tile of output rows; dims[-1] %
    lanes == 0. decode_shape: the decoded block's own dims where they differ from x_red's (one flat
    dim there, e.g. a codebook's vectors x dim).

    Below TILED_NN_FROM_ROWS activation rows the dot form: the tile is decoded row-major ("decode")
    and part[b, i, lane] keeps `lanes` partial sums per output. From there on the outer-product form:
    the tile is decoded transposed ("decode_t", output rows innermost) and y[b, i] accumulates with
    the tile's rows as vector lanes and x broadcast (a dense matmul's register tile), which reads x
    and the tile fewer times per multiply-add."""
    batch, *dims = (int(d) for d in x_red.shape)
    assert dims[-1] % lanes == 0, (dims, lanes)
    dshape = list(dims if decode_shape is None else decode_shape)
    strides = [math.prod(dshape[j + 1:]) for j in range(len(dshape))]
    if batch >= TILED_NN_FROM_ROWS:
        dec_t = te.compute((*dshape, rows), lambda *a: element(a[-1], *a[:-1]), name="decode_t")
        red = [te.reduce_axis((0, d), name=f"r{j}") for j, d in enumerate(dshape)]
        if decode_shape is None:
            x_at = red
        else:  # x_red is flat: its position is the decoded block's index, raveled
            x_at = [sum(r * st for r, st in zip(red, strides))]
        return te.compute((batch, rows), lambda b, i: te.sum(x_red[(b, *x_at)] * dec_t[(*red, i)], axis=red),
                          name="y")
    dec = te.compute((rows, *dshape), element, name="decode")
    if decode_shape is None:
        w_at = dec.__getitem__
    else:
        def w_at(idx):  # the flat position k unravelled (the first dim needs no modulo: k < its product)
            i, k = idx
            return dec[(i, tirx.floordiv(k, strides[0]),
                        *(tirx.floormod(tirx.floordiv(k, st), int(n)) for st, n in zip(strides[1:], dshape[1:])))]
    outer = [te.reduce_axis((0, d), name=f"r{j}") for j, d in enumerate(dims[:-1])]
    kb = te.reduce_axis((0, dims[-1] // lanes), name="kb")

    def partial(b, i, lane):
        idx = (*outer, kb * lanes + lane)
        return te.sum(x_red[(b, *idx)] * w_at((i, *idx)), axis=[*outer, kb])

    part = te.compute((batch, rows, lanes), partial, name="part")
    rl = te.reduce_axis((0, lanes), name="rl")
    return te.compute((batch, rows), lambda b, i: te.sum(part[b, i, rl], axis=rl), name="y")


def _has_block(sch, name: str) -> bool:
    return any(sch.get(b).name_hint == name for b in sch.get_child_blocks(sch.get_sblock("root")))


def _divisor(n: int, choices) -> int:
    return next((c for c in choices if n % c == 0), 1)


def _is_tiled_func(sch) -> bool:
    return _has_block(sch, "part") or _has_block(sch, "decode_t")


def schedule_tiled_cpu(func):
    """LLVM schedule of a tiled_linear_te PrimFunc (see the module docstring): parallel over tiles of
    output rows, the tile's decoded block in a local buffer per tile (its innermost dim vectorised
    where it splits into lanes, else unrolled). Dot form: `tb` batch rows x `tj` tile rows of
    `lanes`-wide partial sums (one vector each), the lanes summed once per output. Outer-product
    form: `tb` batch rows x the tile's rows (vector lanes) accumulated in a local tile, x broadcast.
    The per-call passes the tiled builders add (x_red, codebook_f32) are vectorised where their
    innermost loop splits into lanes; other blocks (rotq's rotation of x) are left to their method."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    y = sch.get_sblock("y")
    b, i = sch.get_loops(y)[:2]
    batch, rows = int(sch.get(b).extent), int(sch.get(i).extent)
    if _has_block(sch, "decode_t"):
        dec = sch.get_sblock("decode_t")
        tile = _divisor(rows, (32, 16, 8, 4, 2))
        tb = _divisor(batch, (8, 4, 2))
        _, _, *red = sch.get_loops(y)
        jo, ji = sch.split(i, [None, tile])
        bo, bi = sch.split(b, [None, tb])
        sch.reorder(jo, bo, *red, bi, ji)
        acc = sch.cache_write(y, 0, "local")
        sch.reverse_compute_at(acc, bo, preserve_unit_loops=True)
        sch.parallel(jo)
        sch.unroll(bi)
        sch.vectorize(ji)
        sch.vectorize(sch.get_loops(acc)[-1])
        sch.decompose_reduction(y, red[0])
    else:
        dec = sch.get_sblock("decode")
        part = sch.get_sblock("part")
        tile = _divisor(rows, TILE_ROWS)
        tb, tj = _divisor(batch, TILE_BATCH), _divisor(tile, TILE_INNER)
        jo, ji = sch.split(i, [None, tile])
        sch.reorder(jo, b, ji)
        sch.parallel(jo)
        sch.compute_at(part, jo, preserve_unit_loops=True)
        pb, pi, pl, *red = sch.get_loops(part)[1:]
        bo, bi = sch.split(pb, [None, tb])
        jio, jii = sch.split(pi, [None, tj])
        sch.reorder(bo, jio, *red, bi, jii, pl)
        sch.unroll(bi)
        sch.unroll(jii)
        sch.vectorize(pl)
        sch.decompose_reduction(part, red[0])
        sch.set_scope(part, 0, "local")
    sch.compute_at(dec, jo, preserve_unit_loops=True)
    sch.set_scope(dec, 0, "local")
    last = sch.get_loops(dec)[-1]
    if not tc.vectorize_inner(sch, last):
        sch.unroll(last)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(blk).name_hint in ("x_red", "codebook_f32"):
            tc.vectorize_inner(sch, sch.get_loops(blk)[-1])
    return scheduled(sch)


def scheduled(sch):
    """The schedule's PrimFunc, marked scheduled for this project's passes ("tir.is_scheduled") and
    for dlight ("tirx.is_scheduled" in TVM 0.27), so neither reschedules it."""
    return sch.mod["main"].with_attr("tir.is_scheduled", True).with_attr("tirx.is_scheduled", True)


def schedule_row_reduction(sch, block: str, batch_outer: bool = False) -> None:
    """A block out[b, i] = sum_k ...: parallel over i; where the reduction splits into vector lanes,
    per row `lanes` contiguous partial sums (rfactor) reduced at the end. batch_outer: one pass
    over the rows per batch row (when what a row reads depends on b, as a per-b lookup table)."""
    blk = sch.get_sblock(block)
    b, i, k = sch.get_loops(blk)
    if not batch_outer:
        sch.reorder(i, b)
    sch.parallel(i)
    cols = int(sch.get(k).extent)
    lanes = next((v for v in LANE_CHOICES if cols % v == 0), None)
    if lanes is None:
        return
    ko, ki = sch.split(k, [None, lanes])
    rf = sch.rfactor(ki, factor_axis=2)  # rf[b, i, lane]: lanes contiguous
    outer, inner, rko, rki = sch.get_loops(rf)
    sch.parallel(inner if batch_outer else outer)
    sch.vectorize(rki)
    init = sch.decompose_reduction(rf, rko)
    sch.vectorize(sch.get_loops(init)[-1])


def primfunc(inputs, y, name: str):
    """te.create_prim_func named `name` (TVM names it "main")."""
    return te.create_prim_func(list(inputs) + [y]).with_attr("global_symbol", name)
