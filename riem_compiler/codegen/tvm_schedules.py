"""Default CPU schedules for the dense kernels of a TVM build, good without tuning.

TVM 0.27's CPU pipeline schedules nothing and dlight's CPU rules cover GEMV/reductions only,
so legalized matmuls run as naive scalar triple loops (~1 GFLOP/s here). This module is a
small module pass over PrimFuncs with recognisable structure:

- matmul-like blocks, C[..., i, j] (+)= A[..., i, k] * B[..., k, j] (the NN layout, which is
  what a Linear layer becomes once its weight transpose is lifted out of `main`): a register
  tile of `ti` rows x `tj` columns kept in an accumulator (tj a multiple of the vector width),
  the k loop outside the tile, A broadcast and B loaded as vectors; the bias/activation
  epilogue is fused into the write-back; outer loops in parallel;
- NCHW conv2d blocks (dense, grouped, depthwise): output channels x rows tiled the same way,
  output columns vectorised, the BatchNorm/bias epilogue fused;
- everything else that is a plain elementwise loop nest: innermost loop vectorised, outer loops
  in parallel.

A function already scheduled (tuning record, RieM hand schedule) is left alone, and a function
whose schedule raises is left to the later defaults: this pass only ever replaces naive loops.
"""
from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad as _Load  # what _Load(...) builds in TVM 0.27
from tvm.tirx.stmt import BufferStore as _Store

log = logging.getLogger("riem_compiler.tvm_schedules")

VECTOR = 16  # float32 lanes of one AVX-512 register; LLVM splits for narrower ISAs


def _largest_divisor(n: int, choices) -> int:
    for c in choices:
        if n % c == 0:
            return c
    return 1


def _strip_cast(e):
    while isinstance(e, tirx.Cast):
        e = e.value
    return e


def _var_indices(load) -> list | None:
    out = []
    for idx in load.indices:
        if not isinstance(idx, tirx.Var):
            return None
        out.append(idx)
    return out


def _matmul_vars(block_stmt):
    """(batch vars, i, j, k) of `C[.., i, j] = C[.., i, j] + A[.., i, k] * B[.., k, j]`, else None."""
    body = block_stmt.body
    if not isinstance(body, _Store) or block_stmt.init is None:
        return None
    iters = list(block_stmt.iter_vars)
    red = [iv.var for iv in iters if iv.iter_type == tirx.IterVar.CommReduce]
    spatial = [iv.var for iv in iters if iv.iter_type == tirx.IterVar.DataPar]
    if len(red) != 1 or len(spatial) < 2 or len(spatial) + 1 != len(iters):
        return None
    value = body.value
    if not isinstance(value, tirx.Add):
        return None
    acc, prod = value.a, _strip_cast(value.b)
    if not isinstance(acc, _Load) or not isinstance(prod, tirx.Mul):
        return None
    a, b = _strip_cast(prod.a), _strip_cast(prod.b)
    if not (isinstance(a, _Load) and isinstance(b, _Load)):
        return None
    c_idx = _var_indices(body)
    a_idx, b_idx = _var_indices(a), _var_indices(b)
    if c_idx is None or a_idx is None or b_idx is None or len(a_idx) < 2 or len(b_idx) < 2:
        return None
    k = red[0]
    i, j = c_idx[-2], c_idx[-1]
    if [v.same_as(s) for v, s in zip(c_idx, spatial)] != [True] * len(spatial) or len(c_idx) != len(spatial):
        return None
    if not (a_idx[-1].same_as(k) and a_idx[-2].same_as(i) and b_idx[-2].same_as(k) and b_idx[-1].same_as(j)):
        return None
    return spatial[:-2], i, j, k


def _extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def schedule_matmul(sch: s_tir.Schedule, block) -> bool:
    """Register-tiled NN matmul with the epilogue fused into the write-back. True if applied."""
    info = _matmul_vars(sch.get(block))
    if info is None:
        return False
    batch, _, _, _ = info
    loops = sch.get_loops(block)
    if len(loops) != len(batch) + 3:
        return False
    *b_loops, li, lj, lk = loops
    n_i, n_j, n_k = (_extent(sch, x) for x in (li, lj, lk))
    if None in (n_i, n_j, n_k):
        return False
    tj = _largest_divisor(n_j, (2 * VECTOR, VECTOR, 8, 4))
    ti = _largest_divisor(n_i, (8, 6, 4, 3, 2)) if tj >= VECTOR else _largest_divisor(n_i, (4, 2))
    io, ii = sch.split(li, [None, ti])
    jo, ji = sch.split(lj, [None, tj])
    sch.reorder(*b_loops, jo, io, lk, ii, ji)
    # accumulator tile written back once per (jo, io); epilogue (bias, activation) fused there
    _finish_register_tile(sch, block, io, lambda: sch.fuse(*b_loops, jo) if b_loops else jo,
                          ii, ji, tj >= 4, lk, tj)
    return True


def _finish_register_tile(sch, block, write_at, parallel_loop, unroll_loop, inner_loop, vectorize_inner: bool,
                          reduce_loop, tail_width: int) -> None:
    """Shared tail of the matmul and conv schedules: write the accumulator tile back at `write_at`
    with the elementwise consumers fused, parallelise, unroll/vectorise the tile, then split off
    the initialisation. `parallel_loop` is a callable because the fuse must follow the write-back."""
    copy = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(copy, write_at, preserve_unit_loops=True)
    _inline_consumers(sch, copy)
    sch.parallel(parallel_loop())  # before decompose_reduction, which the check for parallel rejects
    _vectorize_tail(sch, copy, tail_width)
    sch.unroll(unroll_loop)
    if vectorize_inner:
        sch.vectorize(inner_loop)
    init = sch.decompose_reduction(block, reduce_loop)
    if vectorize_inner:
        sch.vectorize(sch.get_loops(init)[-1])


def _inline_consumers(sch, block) -> None:
    """Fold elementwise consumers (bias add, activation, reshape) into `block`, repeatedly."""
    while True:
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:
            return


def _vectorize_tail(sch, block, width: int) -> None:
    loops = sch.get_loops(block)
    ext = _extent(sch, loops[-1])
    if ext is None or ext < 4:
        return
    if ext > width and ext % width == 0:
        _, inner = sch.split(loops[-1], [None, width])
        sch.vectorize(inner)
    else:
        sch.vectorize(loops[-1])


def _conv_loops(sch, block):
    """The 7 loops (n, f, y, x, rc, ry, rx) of an NCHW (grouped/depthwise) conv2d block, else None."""
    stmt = sch.get(block)
    if "conv2d_nchw" not in stmt.name_hint or stmt.init is None:
        return None
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if kinds != [tirx.IterVar.DataPar] * 4 + [tirx.IterVar.CommReduce] * 3:
        return None
    loops = sch.get_loops(block)
    if len(loops) != 7 or any(_extent(sch, lp) is None for lp in loops):
        return None
    return loops


def schedule_conv(sch: s_tir.Schedule, block, acc_limit: int = 256) -> bool:
    """NCHW conv2d: per tile of `tf` output channels and `ty` output rows, an accumulator of
    tf x ty x W outputs stays in registers while the reduction (in-channels, kernel window)
    runs outside it; output columns vectorised; BatchNorm/bias/activation epilogue fused."""
    loops = _conv_loops(sch, block)
    if loops is None:
        return False
    n, f, y, x, rc, ry, rx = loops
    n_f, n_y, n_x = (_extent(sch, lp) for lp in (f, y, x))
    if n_x > acc_limit:
        return False
    tf = _largest_divisor(n_f, (4, 2))
    ty = max(d for d in range(1, n_y + 1) if n_y % d == 0 and tf * d * n_x <= acc_limit)
    fo, fi = sch.split(f, [None, tf])
    yo, yi = sch.split(y, [None, ty])
    sch.reorder(n, fo, yo, rc, ry, rx, fi, yi, x)
    _finish_register_tile(sch, block, yo, lambda: sch.fuse(n, fo), fi, x, n_x >= 4, rc, VECTOR)
    return True


def _is_spatial(sch, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def schedule_elementwise(sch: s_tir.Schedule, min_parallel: int = 4096) -> bool:
    """A nest of spatial (elementwise/injective) blocks: inline into the output, one flat loop,
    vector inner part, parallel outer part. False if any block is a reduction."""
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    if not blocks or not all(_is_spatial(sch, b) for b in blocks):
        return False
    names = [sch.get(b).name_hint for b in blocks]
    for name in names[:-1]:
        try:
            sch.compute_inline(sch.get_sblock(name))
        except Exception:
            pass
    outputs = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
    applied = False
    for name in outputs:
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        if not loops:
            continue
        flat = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        n = _extent(sch, flat)
        if n is None:
            continue
        if n % VECTOR == 0 and n >= 2 * VECTOR:
            outer, inner = sch.split(flat, [None, VECTOR])
            if n >= min_parallel:
                sch.parallel(outer)
            sch.vectorize(inner)
        elif n >= min_parallel:
            sch.parallel(flat)
        applied = True
    return applied


def schedule_func(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """A scheduled copy of `func` (matmul tiles, or a vectorised elementwise nest), else None."""
    sch = s_tir.Schedule(func)
    if not _has_root(sch):
        return None
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    done = False
    for name in names:
        try:
            blk = sch.get_sblock(name)
        except Exception:  # inlined by an earlier step
            continue
        done = schedule_matmul(sch, blk) or schedule_conv(sch, blk) or done
    if not done:
        sch = s_tir.Schedule(func)
        done = schedule_elementwise(sch)
    if not done:
        return None
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


@tvm.transform.module_pass(opt_level=0, name="RiemDefaultCpuSchedules")
def default_cpu_schedules(mod, _ctx):
    """Module pass: schedule every unscheduled PrimFunc this module knows how to schedule."""
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tir.is_scheduled", False):
            continue
        try:
            new = schedule_func(func)
        except Exception as err:  # a structure we misread: leave the naive loops
            log.debug("no default schedule for %s: %s", gv.name_hint, err)
            continue
        if new is not None:
            updates[gv] = new
    for gv, func in updates.items():
        mod[gv] = func
    log.debug("default CPU schedules for %d functions", len(updates))
    return mod


# ----------------------------------------------------------------------------- fast gelu

def _gelu_te(x):
    """gelu(x) = x * (0.5 + 0.5 erf(x / sqrt 2)) with topi's polynomial erf (vectorises; the
    `erf` intrinsic that legalized gelu uses is a scalar libm call, ~20 ns/element here)."""
    from tvm import topi

    inner = topi.fast_erf(topi.multiply(x, 0.7071067811865476))
    return topi.multiply(x, topi.add(topi.multiply(inner, 0.5), 0.5))


def _make_gelu_mutator():
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class _FastGelu(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) == "relax.nn.gelu":
                return self.builder_.call_te(_gelu_te, call.args[0], primfunc_name_hint="fast_gelu")
            return call

    return _FastGelu


@tvm.transform.module_pass(opt_level=0, name="RiemFastGelu")
def fast_gelu(mod, _ctx):
    """Module pass: relax.nn.gelu -> a TE gelu over topi.fast_erf (max abs error ~1e-7)."""
    from tvm import relax

    mutator = _make_gelu_mutator()(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
