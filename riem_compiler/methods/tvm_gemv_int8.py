"""The int8-activation GEMV: y = x W^T for up to MAX_BATCH activation rows, W's codes multiplied by an int8
copy of x with the CPU's 8-bit dot-product instruction (x86 AVX-512 VNNI `vpdpbusd`), the way
onnxruntime's MatMulNBits does at accuracy_level 4.

Why: the float forms of tvm_gemv.py spend five vector operations per weight (extract the code,
convert, subtract the zero point, scale, multiply-add) and run at a fraction of memory bandwidth
at batch 1. Here one `vpdpbusd` multiplies 64 codes by 64 int8 activations and adds them into 16
int32 sums, so the kernel streams the codes from memory instead of waiting on arithmetic.

Numerics: per group g of the weight (its row split into groups of `group` columns), x's group is
quantised symmetrically to int8 with sx_g = max|x_g| / 127 (computed per call, in the same
function), and

    y_i = sum_g scale_ig * sx_g * (sum_k code_ik * xq_k  -  zero_ig * sum_k xq_k)

with exact integer dot products. Against the float kernels this adds x's rounding error (about
0.3-0.7% of the output's norm for normal-like activations; `error` in benchmarks/tvm_kernels.md),
the same trade as onnxruntime's MatMulNBits at accuracy_level 4, which the `ort` ONNX form uses.

Layout: the codes in the bitpack layout of the weight's (rows, cols) matrix view, 2, 4 or 8 bits,
groups along the reduction holding a multiple of 16 bytes (4-bit: group 32, 64, 128, ...). A
vector of VW bytes (64, 32 or 16: the largest dividing the group's bytes) holds 8 / bits codes a
byte; code t of each byte is taken with a shift and a mask and multiplied by the activations of
the columns it stands for (x de-interleaved once per call, as in tvm_gemv.packed_rows_te).
Schedule: parallel over output rows (blocks of 2-4 rows measured slower: 0.13-0.24 ms vs 0.15 ms on
4096x4096, 0.72-1.10 vs 0.44 ms on 11008x4096); per row, the activation rows in chunks of up to 4,
per chunk and group one int32 accumulator vector per activation row, converted and scaled into
float32 accumulators once per group, whose lanes are summed as a balanced tree at the end. x is
quantised in a parallel pass first. Up to MAX_BATCH rows (a sequence of 32 tokens at batch 1):
measured against the float tiled form at 8-256 rows on MiniLM's shapes, int8 was faster up to 32
(rtn 4-bit 1536x384: 0.07 vs 0.12 ms at 8 rows, 0.22 vs 0.36 at 32) and mixed beyond.

Written in TVMScript (one PrimFunc, decode inside the reduction): TE cannot express the
instruction's vector operands.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

from tvm.script import tirx as T

# activation rows per call up to which this form replaces the float GEMV
MAX_BATCH = 32
INTRINSICS = {64: "llvm.x86.avx512.vpdpbusd.512", 32: "llvm.x86.avx512.vpdpbusd.256",
              16: "llvm.x86.avx512.vpdpbusd.128"}
# byte lookup in a 16-byte table per 128-bit lane (rotq's grid levels)
PSHUFB = {64: "llvm.x86.avx512.pshuf.b.512", 32: "llvm.x86.avx2.pshuf.b", 16: "llvm.x86.ssse3.pshuf.b.128"}
# PrimFunc attribute naming this form (the build's manifest reports it per layer)
FORM_ATTR = "riem.int8_activations"
# the CPU features the kernel needs (LLVM names)
FEATURES = ("avx512vnni", "avx512bw", "avx512vl")
_ENABLED: ContextVar[bool] = ContextVar("riem_int8_activations", default=True)


@contextmanager
def int8_activations(enabled: bool):
    """Within this block, kernels are built with (True) or without (False) this form."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def target_supports() -> bool:
    """Whether the current TVM target (`with target:`) is an LLVM CPU with VNNI."""
    from tvm.target import Target, codegen

    target = Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return False
    return all(bool(codegen.target_has_features(f, target)) for f in FEATURES)


def enabled(batch: int) -> str | None:
    """None when an int8-activation kernel may be built for `batch` rows here, else why not."""
    if not _ENABLED.get():
        return "int8 activations are switched off for this build"
    if int(batch) > MAX_BATCH:
        return f"{batch} activation rows per call take the tiled form"
    if not target_supports():
        return "the target CPU has no AVX-512 VNNI"
    return None


def rows_per_chunk(batch: int) -> int:
    """Activation rows whose int32 sums a kernel keeps in registers at once (4, 2 or 1, dividing batch)."""
    return next(c for c in (4, 2, 1) if int(batch) % c == 0)


def layout(bits: int, cols: int, group: int | None, batch: int) -> tuple[int, int, int] | str:
    """(group, bytes per group, vector bytes) where this form applies, else why not."""
    why = enabled(batch)
    if why is not None:
        return why
    if bits not in (2, 4, 8):
        return f"{bits}-bit codes do not fill whole bytes"
    g = cols if group is None else int(group)
    if cols % g:
        return f"group {g} does not divide the row ({cols})"
    group_bytes = g * bits // 8
    vw = next((v for v in (64, 32, 16) if group_bytes % v == 0), None)
    if vw is None:
        return f"a group's {group_bytes} bytes are not a multiple of 16"
    return g, group_bytes, vw


def gemv_int8_primfunc(name: str, batch: int, rows: int, cols: int, bits: int, lay, scale, zero=None,
                       offset: float = 0, grid=None, rotation=None):
    """PrimFunc(x (batch, in), codes, scale[, zero | grid], y (batch, rows)) over the (rows, cols)
    matrix of codes; `scale`, `zero`, `grid` the method's placeholders of its stored arrays (one
    scale / zero per row and group, any float dtype), `lay` from `layout`.

    - rtn: code - `offset` (a constant integer);
    - affine: code - the stored `zero`;
    - rotq: `grid`[code] (2^bits float32 levels; bits <= 4), the levels rounded per call to int8
      steps of max|grid| / 127 and looked up in a register (`vpshufb`) as level + 128 (unsigned,
      the dot product's unsigned operand), so the offset is 128; `rotation` = (sign(c), block, in):
      x (batch, in) is first padded to `cols` columns, multiplied by sign(c) (an expression of the
      column: the scaled signs) and put through the butterflies of each block (rotq/tvm.py's
      rotation), in the same function."""
    group, bg, vw = lay
    ng = cols // group
    lanes = vw // 4
    chunks = bg // vw
    cpb = 8 // bits
    row_bytes = cols * bits // 8
    mask = (1 << bits) - 1
    nb = int(batch)
    cb = rows_per_chunk(nb)
    intrin = INTRINSICS[vw]
    u8v, i8v, i32v, f32v = f"uint8x{vw}", f"int8x{vw}", f"int32x{lanes}", f"float32x{lanes}"
    n_scale = rows * ng
    scale_shape, scale_dtype = _spec(scale)
    if grid is not None:
        if bits > 4:
            raise ValueError(f"a {bits}-bit grid does not fit one 16-byte lookup")
        offset, x_cols = 128, int(rotation[2])
    else:
        x_cols = cols
    if float(offset) != int(offset):
        raise ValueError(f"an integer zero point is needed, got {offset}")
    off = int(offset)
    lookup = PSHUFB[vw] if grid is not None else None

    def code_vec(v, t, table):  # code t of every byte of the vector v (uint8), through the table if any
        shifted = v if t == 0 else T.shift_right(v, T.broadcast(T.uint8(t * bits), vw))
        code = shifted if (t + 1) * bits == 8 else T.bitwise_and(shifted, T.broadcast(T.uint8(mask), vw))
        if table is None:
            return code
        return T.call_llvm_pure_intrin(u8v, T.llvm_lookup_intrinsic_id(lookup), table.vload([0], u8v), code)

    rotation_sign, rotation_stages = (rotation[0], int(rotation[1]).bit_length() - 1) if rotation else (None, 0)

    has_grid, has_zero = grid is not None, zero is not None

    # x, scale, extra: flat views; extra the grid (rotq), the zero points (affine) or None (rtn)
    @T.macro
    def body(x, codes, scale, extra, y):
        xf = T.decl_buffer((nb * cols if rotation is not None else 1,), "float32")
        xt = T.decl_buffer((nb * cols if rotation is not None else 1,), "float32")
        xq = T.decl_buffer((nb * cpb * row_bytes,), "int8")
        sx = T.decl_buffer((nb * ng,), "float32")
        ql = T.decl_buffer((nb * ng * lanes,), "int32")
        table = T.decl_buffer((vw,), "uint8")
        level_step = T.decl_buffer((1,), "float32")
        level_step[0] = T.float32(1)
        if has_grid:  # the levels as unsigned int8 steps, replicated in every 16-byte lane
            level_step[0] = T.float32(0)
            for v in range(1 << bits):
                level_step[0] = T.max(level_step[0], T.fabs(extra[v]))
            level_step[0] = T.if_then_else(level_step[0] > T.float32(0), level_step[0] / T.float32(127), T.float32(1))
            for j in range(vw):
                table[j] = T.Cast("uint8", T.Cast("int32", T.round(extra[T.floormod(j, 16) % (1 << bits)] /
                                                                    level_step[0])) + 128)
        if rotation is None:
            _quantise(x, xq, sx, ql, nb, ng, group, bg, cpb, row_bytes, vw, lanes, cols)
        else:  # x R: x padded with zeros, signs and 1/sqrt(B), then the butterflies of each block of B
            for b in T.parallel(nb):
                for c in range(cols):
                    xf[b * cols + c] = T.Select(c < x_cols, x[b * x_cols + T.min(c, x_cols - 1)],
                                                T.float32(0)) * rotation_sign(c)
                for stage in T.unroll(rotation_stages):  # as rotq/tvm.py's hadamard_stages, h = 2^stage
                    for c in range(cols):
                        xt[b * cols + c] = T.Select(
                            T.floormod(T.floordiv(c, 1 << stage), 2) == 0,
                            xf[b * cols + c + (1 << stage)] + xf[b * cols + c],
                            xf[b * cols + c - (1 << stage)] - xf[b * cols + c])
                    for c in range(cols):
                        xf[b * cols + c] = xt[b * cols + c]
            _quantise(xf, xq, sx, ql, nb, ng, group, bg, cpb, row_bytes, vw, lanes, cols)
        for i in T.parallel(rows):
            acc = T.alloc_buffer((cb * lanes,), "int32", annotations={"disable_lower_builtin": True})
            facc = T.alloc_buffer((cb * lanes,), "float32", annotations={"disable_lower_builtin": True})
            for bc in range(nb // cb):  # the activation rows in chunks of cb, each chunk's sums in registers
                for a in T.unroll(cb):
                    facc[T.ramp(a * lanes, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                for g in range(ng):
                    for a in T.unroll(cb):  # the constant zero point's term, - offset * sum(xq), is the start
                        acc[T.ramp(a * lanes, 1, lanes)] = ql[T.ramp(((bc * cb + a) * ng + g) * lanes, 1, lanes)] * \
                            T.broadcast(T.int32(-off), lanes)
                    for c in range(chunks):
                        for t in T.unroll(cpb):
                            for a in T.unroll(cb):
                                acc[T.ramp(a * lanes, 1, lanes)] = T.call_llvm_pure_intrin(
                                    i32v, T.llvm_lookup_intrinsic_id(intrin), acc[T.ramp(a * lanes, 1, lanes)],
                                    code_vec(codes.vload([i * row_bytes + g * bg + c * vw], u8v), t,
                                             table if has_grid else None),
                                    xq.vload([((bc * cb + a) * cpb + t) * row_bytes + g * bg + c * vw], i8v))
                    for a in T.unroll(cb):
                        if not has_zero:
                            facc[T.ramp(a * lanes, 1, lanes)] = facc[T.ramp(a * lanes, 1, lanes)] + \
                                T.Cast(f32v, acc[T.ramp(a * lanes, 1, lanes)]) * T.broadcast(
                                    T.Cast("float32", scale[i * ng + g]) * sx[(bc * cb + a) * ng + g] * level_step[0],
                                    lanes)
                        else:
                            facc[T.ramp(a * lanes, 1, lanes)] = facc[T.ramp(a * lanes, 1, lanes)] + \
                                (T.Cast(f32v, acc[T.ramp(a * lanes, 1, lanes)]) -
                                 T.Cast(f32v, ql[T.ramp(((bc * cb + a) * ng + g) * lanes, 1, lanes)]) *
                                 T.broadcast(T.Cast("float32", extra[i * ng + g]), lanes)) * \
                                T.broadcast(T.Cast("float32", scale[i * ng + g]) * sx[(bc * cb + a) * ng + g], lanes)
                for a in T.unroll(cb):
                    y[bc * cb + a, i] = lane_sum(facc, a * lanes, lanes)

    if has_grid or has_zero:  # one stored array beside the scales: rotq's grid, affine's zero points
        extra_shape, extra_dtype = _spec(grid if has_grid else zero)
        extra_len = (1 << bits) if has_grid else n_scale

        @T.prim_func(private=True)
        def func(x: T.Buffer((nb, x_cols), "float32"), codes: T.Buffer((rows * row_bytes,), "uint8"),
                 scale_in: T.Buffer(scale_shape, scale_dtype), extra_in: T.Buffer(extra_shape, extra_dtype),
                 y: T.Buffer((nb, rows), "float32")):
            T.func_attr({"tirx.noalias": True})
            x_flat = T.decl_buffer((nb * x_cols,), "float32", data=x.data)
            scale_flat = T.decl_buffer((n_scale,), scale_dtype, data=scale_in.data)
            extra_flat = T.decl_buffer((extra_len,), extra_dtype, data=extra_in.data)
            body(x_flat, codes, scale_flat, extra_flat, y)
    else:
        @T.prim_func(private=True)
        def func(x: T.Buffer((nb, x_cols), "float32"), codes: T.Buffer((rows * row_bytes,), "uint8"),
                 scale_in: T.Buffer(scale_shape, scale_dtype), y: T.Buffer((nb, rows), "float32")):
            T.func_attr({"tirx.noalias": True})
            x_flat = T.decl_buffer((nb * x_cols,), "float32", data=x.data)
            scale_flat = T.decl_buffer((n_scale,), scale_dtype, data=scale_in.data)
            body(x_flat, codes, scale_flat, None, y)
    return func.with_attr("global_symbol", name).with_attr(FORM_ATTR, True)


def lane_sum(buf, start: int, count: int):
    """buf[start] + ... + buf[start + count - 1] as a balanced tree of adds (depth log2(count)): a
    running sum is a chain of count dependent adds, which bounded the kernels at few activation rows
    (16 lanes: 64 cycles of latency per output)."""
    if count == 1:
        return buf[start]
    half = count // 2
    return lane_sum(buf, start, half) + lane_sum(buf, start + half, count - half)


def _spec(t) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) of a placeholder."""
    return tuple(int(d) for d in t.shape), str(t.dtype)


@T.macro
def _quantise(x, xq, sx, ql, nb, ng, group, bg, cpb, row_bytes, vw, lanes, cols):
    """x's groups (x flat, nb rows of `cols`) to int8 (xq, de-interleaved: code t of byte j stands for
    column j * cpb + t), their scales sx, and per group the activations' sums in the accumulator's
    lanes (ql)."""
    for bg_ in T.parallel(nb * ng):
        amax = T.alloc_buffer((2,), "float32", annotations={"disable_lower_builtin": True})
        amax[0] = T.float32(0)
        for k in range(group):
            amax[0] = T.max(amax[0], T.fabs(x[T.floordiv(bg_, ng) * cols + T.floormod(bg_, ng) * group + k]))
        sx[bg_] = amax[0] / T.float32(127)
        amax[1] = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
        for lane in range(lanes):
            ql[bg_ * lanes + lane] = 0
        for j, t in T.grid(bg, cpb):
            xq[(T.floordiv(bg_, ng) * cpb + t) * row_bytes + T.floormod(bg_, ng) * bg + j] = T.Cast("int8", T.round(
                x[T.floordiv(bg_, ng) * cols + T.floormod(bg_, ng) * group + j * cpb + t] * amax[1]))
            ql[bg_ * lanes + T.floordiv(T.floormod(j, vw), 4)] = ql[bg_ * lanes + T.floordiv(T.floormod(j, vw), 4)] + \
                T.Cast("int32", xq[(T.floordiv(bg_, ng) * cpb + t) * row_bytes + T.floormod(bg_, ng) * bg + j])
