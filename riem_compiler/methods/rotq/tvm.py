"""TE/TIR kernels of rotq weights, from exactly the arrays `fit_rotq` stores (codes, float16 group
scales, float32 grid) and the rotation regenerated in the kernel (rotation.py: no stored bytes).

With Q[i, c] = grid[code(i * padded + c)] * scale[i, c // group] over the padded columns and
R = diag(s) blockdiag(Hn), Hn = H_B / sqrt(B) (symmetric), the weight is W = (Q R^T)[:, :cols].

- decode-once (`decode_primfunc`): per row, Q's row, a fast Walsh-Hadamard transform per block of
  B columns (log2 B butterfly stages, O(padded * log B) per row instead of O(padded * B)), then
  the column signs and 1/sqrt(B); padded columns dropped, written straight into the weight's shape.
- fused (`fused_linear_primfunc`): y = x W^T = (x_pad R) Q^T, since W^T = R Q^T restricted to
  the real columns and x_pad is x with zero padded columns. The rotation moves to the activation
  (signs, 1/sqrt(B) and the same butterflies on x: O(batch * padded * log B) per call), then a
  GEMV whose reduction decodes Q from the codes (tvm_gemv.py: packed rows for codes with
  byte-aligned groups, the grid lookup in place of rtn's offset; else the element form). Q and W
  are never written to memory.

The column signs (rotation.py's hash: three rounds mod P = 2^31 - 1, exact in int64) are one
small stage of `padded` values, computed once per call (fused) or once at load (decode-once).
"""
from __future__ import annotations

import math

from tvm import te, tirx

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import tvm_common as tc
from riem_compiler.methods import tvm_gemv as tg
from riem_compiler.methods import tvm_gemv_int8 as gi
from riem_compiler.methods.rotq import rotation

ARRAYS = ("codes", "scale", "grid")
F32 = "float32"


def array_names(cw: CompressedWeight) -> list[str]:
    """Argument order of the kernels."""
    return tc.checked_array_names(cw, "rotq", ARRAYS, rows_cols_only=True)


# ----------------------------------------------------------------------------- the rotation in TIR

def sign_at(seed: int, c):
    """rotation.signs_numpy(seed, .)[c] as a float32 expression of the column index c: int64
    floormod by the constant P (LLVM turns it into multiplies and shifts); every product stays
    below 2^63 as in rotation.py."""
    p = tirx.const(rotation.P, "int64")
    x = tirx.floormod(c.astype("int64") + tirx.const(rotation.seed_offset(seed), "int64"), p)
    for a, inc, inc2 in rotation.ROUNDS:
        x = tirx.floormod(x * tirx.const(a, "int64") + tirx.const(inc, "int64"), p)
        x = tirx.floormod(x * x + tirx.const(inc2, "int64"), p)
    bit = tirx.floormod(tirx.floordiv(x, tirx.const(rotation.SIGN_BIT, "int64")), tirx.const(2, "int64"))
    return (tirx.const(1, "int64") - bit * 2).astype(F32)


def signs_te(seed: int, count: int, scale: float) -> te.Tensor:
    """scale times the column signs 0..count-1, one small stage ("signs") computed once per call."""
    return te.compute((count,), lambda c: sign_at(seed, c) * tirx.const(scale, F32), name="signs")


def hadamard_stages(u: te.Tensor, block: int, tag: str) -> tuple[te.Tensor, list[str]]:
    """u H_B per block of `block` columns along u's last axis (rows of u are independent), as log2(B)
    butterfly stages: stage h maps column c with partner p = c xor h to u[p] + u[c] (bit h of c clear)
    or u[p] - u[c] (set), no branch and no read outside the block. Returns the last stage and the
    stage block names."""
    names = []
    h = 1
    while h < block:
        name = f"{tag}_h{h}"
        u = te.compute(tuple(u.shape), _butterfly(u, h), name=name)
        names.append(name)
        h *= 2
    return u, names


def _butterfly(u: te.Tensor, h: int):
    """One stage's element (te.compute takes no default arguments, so u and h are bound here)."""
    def element(r, c):
        bit = tirx.floormod(tirx.floordiv(c, h), 2)
        return u[r, c + h - 2 * h * bit] + (1 - 2 * bit).astype(F32) * u[r, c]

    return element


def grid_level(grid: te.Tensor, code, bits: int):
    """grid[code] as a tree of selects on the code's bits over the 2^bits levels (each a load at a
    constant index, hoisted out of the loop): vector blends in the packed-rows GEMV, where a
    lookup at a data-dependent index would be a gather per lane."""
    levels = [grid[v] for v in range(1 << bits)]
    for b in range(bits):
        bit = tirx.bitwise_and(tirx.shift_right(code, b), 1) == 1
        levels = [tirx.Select(bit, levels[v + 1], levels[v]) for v in range(0, len(levels), 2)]
    return levels[0]


def _q_element(cw: CompressedWeight, ph: dict):
    """Q(i, c): grid[code] times the group scale, over the padded columns."""
    m = cw.meta
    dp, g, bits = int(m["padded_cols"]), int(m["group_size"]), int(m["bits"])
    codes, scale, grid = ph["codes"], ph["scale"], ph["grid"]

    def element(i, c):
        code = tc.unpack_code(codes, i * dp + c, bits)
        return grid[code] * tc.flat_load(scale, i * (dp // g) + tirx.floordiv(c, g)).astype(F32)

    return element


# ----------------------------------------------------------------------------- decode once

def decode_te(cw: CompressedWeight) -> tuple[list[te.Tensor], te.Tensor]:
    """Inputs (in `array_names` order) and the float32 weight in cw.shape."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    m = cw.meta
    n, _ = cw.matrix_shape
    dp, block, seed = int(m["padded_cols"]), int(m["block"]), int(m["seed"])
    q = te.compute((n, dp), _q_element(cw, ph), name="q")
    last, _ = hadamard_stages(q, block, "dec")
    signs = signs_te(seed, dp, 1.0 / math.sqrt(block))
    W = tc.matrix_weight(cw, lambda i, j: last[i, j] * signs[j])
    return [ph[k] for k in names], W


def decode_primfunc(cw: CompressedWeight, name: str):
    """PrimFunc(codes, scale, grid, W) for one weight; unscheduled."""
    inputs, W = decode_te(cw)
    return te.create_prim_func(inputs + [W]).with_attr("global_symbol", name)


def schedule_decode_cpu(func, out_block: str = "W"):
    """Parallel over the weight's rows, every stage computed per row (Q's row and the butterfly
    stages then need one padded row of scratch each, not a dense matrix; the signs once), the
    innermost loops vectorised where they split into float32 lanes. (tvm_common's generic schedule would inline the
    stages into W: B reads per element.)"""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    w = sch.get_sblock(out_block)
    rows = sch.get_loops(w)[0]
    producers = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                 if sch.get(b).name_hint not in (out_block, "signs")]
    for blk in reversed(producers):
        sch.compute_at(blk, rows, preserve_unit_loops=True)
    sch.parallel(rows)
    for blk in sch.get_child_blocks(rows) + [sch.get_sblock("signs")]:
        tc.vectorize_inner(sch, sch.get_loops(blk)[-1])
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


# ----------------------------------------------------------------------------- fused

def fused_linear_primfunc(cw: CompressedWeight, rows: int, name: str, target_kind: str = "llvm"):
    """PrimFunc(x (rows, cols), codes, scale, grid, y (rows, out)) = (x_pad R) Q^T: the rotation on
    x (signs, butterflies), then a GEMV decoding Q inside the reduction; scheduled for LLVM, left
    to dlight's GPU rules for cuda (there the element form). Up to 32 rows on a VNNI CPU, 2- and
    4-bit codes: the int8-activation GEMV (tvm_gemv_int8.py), the grid looked up in a register."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    m = cw.meta
    n_out, cols = cw.matrix_shape
    dp, g, bits = int(m["padded_cols"]), int(m["group_size"]), int(m["bits"])
    block, seed = int(m["block"]), int(m["seed"])
    batch = int(rows)
    x = te.placeholder((batch, cols), F32, name="x")
    signs = signs_te(seed, dp, 1.0 / math.sqrt(block))

    def rot_in(b, c):  # zero padded columns, signs, 1/sqrt(B); min() keeps the unused read in bounds
        return tirx.Select(c < cols, x[b, tirx.min(c, cols - 1)], tirx.const(0.0, F32)) * signs[c]

    if target_kind == "llvm" and bits <= 4:
        lay = gi.layout(bits, dp, g, batch)
        if not isinstance(lay, str):
            return gi.gemv_int8_primfunc(name, batch, n_out, dp, bits, lay, ph["scale"], grid=ph["grid"],
                                         rotation=(lambda c: sign_at(seed, c) * tirx.const(1.0 / math.sqrt(block), F32),
                                                   block, cols))
    xr, stages = hadamard_stages(te.compute((batch, dp), rot_in, name="rot_in"), block, "rot")
    inputs = [x] + [ph[k] for k in names]
    layout = tg.packed_rows_layout(bits, dp, g)
    if not isinstance(layout, str) and target_kind == "llvm":
        groups = dp // g

        def scale_at(i, grp):
            return tc.flat_load(ph["scale"], i * groups + grp).astype(F32)

        y = tg.packed_rows_te(xr, ph["codes"], bits, n_out, dp, layout, scale_at, None,
                              level=lambda code: grid_level(ph["grid"], code, bits))
        func = tg.schedule_packed_rows_cpu(tg.primfunc(inputs, y, name))
        return _schedule_rotation_cpu(func, ["signs", "rot_in"] + stages)
    y = tg.element_linear_te(xr, n_out, dp, _q_element(cw, ph), target_kind)
    func = tg.primfunc(inputs, y, name)
    if target_kind != "llvm":
        return func
    func = tg.schedule_element_cpu(func, along_rows=False, keep=["signs", "rot_in"] + stages)
    return _schedule_rotation_cpu(func, ["signs", "rot_in"] + stages)


def _schedule_rotation_cpu(func, blocks):
    """The rotation blocks of a scheduled fused kernel (batch x padded work per stage, small next to
    the GEMV): the column loop of each stage vectorised where it splits into lanes, the batch loop
    parallel where the kernel takes the tiled form (many rows)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for name in blocks:
        loops = sch.get_loops(sch.get_sblock(name))
        tc.vectorize_inner(sch, loops[-1])
        if len(loops) > 1 and tg.is_tiled(int(sch.get(loops[0]).extent)):  # many rows of x: parallel over them
            sch.parallel(loops[0])
    return tg.scheduled(sch)
