"""TE/TIR kernels that reconstruct RieM weights inside a TVM module.

One kernel per compressed weight, built from exactly the arrays `riem.store` writes:
unpack the state codes (8/16 bits directly, 4/6 bits by reading two bytes and shifting),
dequantise, project the states through every branch, then

    W[i, j] = c + sum_{k, r} v_r * sigmoid(A_k[i, r] + B_k[r, j])

with A_k = a U_k^T + beta_k and B_k = (S^{s_k} b) U_k^T stored as (K, m, N_in) so the inner
loop runs over contiguous j. The sigmoid uses an exp built from a range reduction plus a
polynomial (the `fast_exp` idea): it vectorises, while `te.sigmoid` lowers to a scalar expf
call per element (about 9x slower here, see TOOLCHAIN.md). Relative error of the exp is ~1e-7.

`decode_primfunc` gives the whole weight (decode-once mode, run when the artifact loads);
`fused_linear_primfunc` computes y = x W^T while reconstructing W one tile of rows at a time,
so the full weight never exists in memory (fused mode).
"""
from __future__ import annotations

import math

import numpy as np
from tvm import te, tirx

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods.tvm_common import unpack_code
from riem_compiler.riem import K_BRANCHES

STATE_NAMES_FLOAT = ("a", "b")
METRIC_NAMES = ("U", "beta", "v", "c")

# Cephes-style expf: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial,
# 2**n assembled in the float exponent bits. Constants are the standard minimax ones.
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)
_EXP_CLAMP = 87.0


def riem_array_names(cw: CompressedWeight) -> list[str]:
    """Argument order of the kernels: state arrays, then the metric network."""
    if cw.method != "riem":
        raise ValueError(f"TVM kernels exist for method 'riem' only, got {cw.method!r}")
    if int(cw.meta["state_bits"]) == 32:
        states = list(STATE_NAMES_FLOAT)
    else:
        states = [f"{s}_{p}" for s in "ab" for p in ("codes", "scale", "offset")]
    return states + list(METRIC_NAMES)


array_names = riem_array_names  # the name codegen asks every method's TVM kernel for


def fast_exp(x):
    """exp(x) for a float32 TIR expression, vectorisable (no libm call)."""
    f32 = "float32"
    x = tirx.max(tirx.min(x, tirx.const(_EXP_CLAMP, f32)), tirx.const(-_EXP_CLAMP, f32))
    n = tirx.floor(x * tirx.const(_LOG2E, f32) + tirx.const(0.5, f32))
    r = x - n * tirx.const(_LN2_HI, f32) - n * tirx.const(_LN2_LO, f32)
    p = tirx.const(_EXP_POLY[0], f32)
    for coef in _EXP_POLY[1:]:
        p = p * r + tirx.const(coef, f32)
    p = p * r * r + r + tirx.const(1.0, f32)
    bits = tirx.shift_left(n.astype("int32") + 127, tirx.const(23, "int32"))
    return p * tirx.reinterpret(f32, bits)


def fast_sigmoid(z):
    return tirx.const(1.0, "float32") / (tirx.const(1.0, "float32") + fast_exp(-z))


def _placeholders(cw: CompressedWeight) -> dict[str, te.Tensor]:
    out = {}
    for name in riem_array_names(cw):
        arr = np.asarray(cw.arrays[name])
        out[name] = te.placeholder(tuple(int(s) for s in arr.shape), str(arr.dtype), name=name)
    return out


def _states(ph: dict[str, te.Tensor], prefix: str, rows: int, q: int, bits: int) -> te.Tensor:
    if bits == 32:
        x = ph[prefix]
        return te.compute((rows, q), lambda i, d: x[i, d].astype("float32"), name=f"{prefix}_f")
    packed, scale, offset = ph[f"{prefix}_codes"], ph[f"{prefix}_scale"], ph[f"{prefix}_offset"]
    return te.compute(
        (rows, q),
        lambda i, d: unpack_code(packed, i * q + d, bits).astype("float32") * scale[d] + offset[d],
        name=f"{prefix}_f",
    )


def _projections(cw: CompressedWeight, ph: dict[str, te.Tensor]):
    """A (K, N_out, m) with beta folded in, and B (K, m, N_in) from the shifted b states."""
    n_out, n_in = cw.matrix_shape
    q, m = int(cw.meta["q"]), int(cw.meta["m"])
    k_br = int(cw.meta.get("k_branches", K_BRANCHES))
    bits = int(cw.meta["state_bits"])
    a = _states(ph, "a", n_out, q, bits)
    b = _states(ph, "b", n_in, q, bits)
    U, beta = ph["U"], ph["beta"]
    d1 = te.reduce_axis((0, q), name="d")
    a_proj = te.compute(
        (k_br, n_out, m),
        lambda k, i, r: te.sum(a[i, d1] * U[k, r, d1].astype("float32"), axis=d1),
        name="a_proj",
    )
    A = te.compute((k_br, n_out, m), lambda k, i, r: a_proj[k, i, r] + beta[k, r].astype("float32"), name="A")
    d2 = te.reduce_axis((0, q), name="d")
    # S^{s_k} b moves coordinate d + s_k to d; s_k = floor(k q / K).
    B = te.compute(
        (k_br, m, n_in),
        lambda k, r, j: te.sum(
            b[j, tirx.floormod(d2 + tirx.floordiv(k * q, k_br), q)] * U[k, r, d2].astype("float32"), axis=d2
        ),
        name="B",
    )
    return A, B, k_br, m


def _readout(ph: dict[str, te.Tensor]) -> tuple[te.Tensor, te.Tensor]:
    """v and c converted to float32 once, outside the hot loop (a float16 load per element
    costs a conversion in the innermost loop)."""
    v, c = ph["v"], ph["c"]
    v_f = te.compute(v.shape, lambda r: v[r].astype("float32"), name="v_f")
    c_f = te.compute(c.shape, lambda r: c[r].astype("float32"), name="c_f")
    return v_f, c_f


def _branch_sum(A, B, v, k_br: int, m: int, n_out: int, n_in: int) -> te.Tensor:
    """W0[i, j] = sum_k sum_r v_r sigmoid(A_k[i, r] + B_k[r, j]): the RieM weight before c."""
    kk = te.reduce_axis((0, k_br), name="k")
    rr = te.reduce_axis((0, m), name="r")
    return te.compute(
        (n_out, n_in),
        lambda i, j: te.sum(v[rr] * fast_sigmoid(A[kk, i, rr] + B[kk, rr, j]), axis=[kk, rr]),
        name="W0",
    )


def decode_te(cw: CompressedWeight) -> tuple[list[te.Tensor], te.Tensor]:
    """Inputs (in `riem_array_names` order) and the float32 weight in its original shape."""
    ph = _placeholders(cw)
    n_out, n_in = cw.matrix_shape
    A, B, k_br, m = _projections(cw, ph)
    v, c = _readout(ph)
    W0 = _branch_sum(A, B, v, k_br, m, n_out, n_in)
    tail = [int(s) for s in cw.shape[1:]]
    strides = [int(np.prod(tail[t + 1:])) for t in range(len(tail))]

    def out(o, *rest):
        j = 0
        for idx, stride in zip(rest, strides):
            j = j + idx * stride
        return W0[o, j] + c[0]

    W = te.compute(tuple(int(s) for s in cw.shape), out, name="W")
    return [ph[n] for n in riem_array_names(cw)], W


def decode_primfunc(cw: CompressedWeight, name: str):
    """PrimFunc(compact arrays..., W) for one weight; unscheduled (tuning or a default schedule follows)."""
    inputs, W = decode_te(cw)
    return te.create_prim_func(inputs + [W]).with_attr("global_symbol", name)


def schedule_decode_cpu(func, vector: int = 16):
    """Default CPU schedule when no tuning records exist: rows in parallel, the inner j loop
    vectorised over the (k, r) reduction, small projection stages in parallel."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for name in ("a_f", "b_f", "A"):
        sch.compute_inline(sch.get_sblock(name))
    for name in ("a_proj", "B"):
        loops = sch.get_loops(sch.get_sblock(name))
        sch.parallel(sch.fuse(loops[0], loops[1]))
    w_loops = sch.get_loops(sch.get_sblock("W"))
    sch.parallel(sch.fuse(*w_loops) if len(w_loops) > 1 else w_loops[0])
    blk = sch.get_sblock("W0")
    i, j, k, r = sch.get_loops(blk)
    n_in = int(sch.get(j).extent)
    vec = vector if n_in % vector == 0 else 1
    if vec > 1:
        jo, ji = sch.split(j, [None, vec])
        sch.reorder(i, jo, k, r, ji)
        sch.parallel(i)
        sch.vectorize(ji)
        sch.decompose_reduction(blk, k)
    else:
        sch.parallel(i)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def fused_linear_te(cw: CompressedWeight, rows: int | tirx.Var) -> tuple[list[te.Tensor], te.Tensor]:
    """y (rows, N_out) = x (rows, N_in) @ W^T with W reconstructed inside the kernel."""
    if len(cw.shape) != 2:
        raise ValueError(f"fused linear needs a 2-D weight, got shape {cw.shape}")
    ph = _placeholders(cw)
    n_out, n_in = cw.matrix_shape
    A, B, k_br, m = _projections(cw, ph)
    v, c = _readout(ph)
    x = te.placeholder((rows, n_in), "float32", name="x")
    W0 = _branch_sum(A, B, v, k_br, m, n_out, n_in)
    jj = te.reduce_axis((0, n_in), name="j")
    y = te.compute(
        (rows, n_out),
        lambda b, i: te.sum(x[b, jj] * (W0[i, jj] + c[0]), axis=jj),
        name="y",
    )
    return [x] + [ph[n] for n in riem_array_names(cw)], y


def fused_linear_primfunc(cw: CompressedWeight, rows: int, name: str, target_kind: str = "llvm",
                          row_tile: int = 8):
    """Fused kernel with a hand schedule: for each tile of `row_tile` output features, build
    that tile of W (row_tile x N_in floats) and multiply it into every input row."""
    from tvm import s_tir

    inputs, y = fused_linear_te(cw, rows)
    func = te.create_prim_func(inputs + [y])
    sch = s_tir.Schedule(func)
    for blk in ("a_f", "b_f", "A"):
        sch.compute_inline(sch.get_sblock(blk))
    n_out, n_in = cw.matrix_shape
    if target_kind == "cuda":  # keep the shared-memory W tile within 32 KiB
        row_tile = max(1, min(row_tile, 8192 // n_in))
    tile = math.gcd(n_out, row_tile)
    y_blk = sch.get_sblock("y")
    b_loop, i_loop, j_loop = sch.get_loops(y_blk)
    io, ii = sch.split(i_loop, [None, tile])
    sch.reorder(io, b_loop, ii, j_loop)
    w_blk = sch.get_sblock("W0")
    sch.compute_at(w_blk, io)
    if target_kind == "cuda":
        _bind_fused_cuda(sch, io, b_loop, ii, w_blk, y_blk)
    else:
        for blk in ("a_proj", "B"):
            loops = sch.get_loops(sch.get_sblock(blk))
            sch.parallel(sch.fuse(loops[0], loops[1]))
        sch.parallel(io)
        wl = sch.get_loops(w_blk)  # io, i, j, k, r
        if n_in % 16 == 0:
            jo, ji = sch.split(wl[2], [None, 16])
            sch.reorder(wl[1], jo, wl[3], wl[4], ji)
            sch.vectorize(ji)
            sch.decompose_reduction(w_blk, wl[3])
    return sch.mod["main"].with_attr("global_symbol", name).with_attr("tir.is_scheduled", True)


def _bind_fused_cuda(sch, io, b_loop, ii, w_blk, y_blk, threads: int = 128):
    """One CUDA kernel per call: a block per tile of output features builds its W tile in
    shared memory, then each thread computes outputs for its share of the input rows."""
    # projections and readout casts: their own small kernels (A is inlined; these are tiny)
    for blk, n_spatial in (("a_proj", 3), ("B", 3), ("v_f", 1), ("c_f", 1)):
        loops = sch.get_loops(sch.get_sblock(blk))
        fused = sch.fuse(*loops[:n_spatial]) if n_spatial > 1 else loops[0]
        bx, tx = sch.split(fused, [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    sch.bind(io, "blockIdx.x")
    sch.set_scope(w_blk, 0, "shared")
    wl = sch.get_loops(w_blk)  # io, i, j, k, r
    wf = sch.fuse(wl[1], wl[2])
    _, wt = sch.split(wf, [None, threads])
    sch.bind(wt, "threadIdx.x")
    yf = sch.fuse(b_loop, ii)
    _, yt = sch.split(yf, [None, threads])
    sch.bind(yt, "threadIdx.x")


def scratch_bytes(func) -> int:
    """Bytes a scheduled kernel allocates for its intermediates (after TVM compacts each buffer
    to the region one iteration of its enclosing loop touches): what a call needs on top of its
    arguments. For the fused kernel this is the per-call weight memory (projections + W tile)."""
    import tvm
    from tvm import s_tir

    mod = tvm.IRModule({"main": func})
    mod = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
    ])(mod)
    total = 0
    stack = [mod["main"].body]
    while stack:  # walk the statement tree (TVM 0.27 has no Python TIR visitor)
        node = stack.pop()
        if node is None:
            continue
        for buf in getattr(node, "alloc_buffers", None) or []:
            n = 1
            for dim in buf.shape:
                n *= int(dim)
            total += n * tvm.runtime.DataType(buf.dtype).bits // 8
        for attr in ("block", "body", "init", "then_case", "else_case"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (int, float)):
                stack.append(child)
        stack.extend(getattr(node, "seq", None) or [])
    return int(total)
