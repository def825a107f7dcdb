"""TE/TIR decode kernel of tucker2 conv weights, for decode-once TVM artifacts (and per-call
decode in fused mode), from exactly the float16 arrays `fit_tucker2` stores, in float32 as
`decode_tucker2` computes them:

    mixed[o, s, t] = sum_r out_factor[o, r] * core[r, s, t]      (t: flat kernel tap)
    W[o, i, *tap]  = sum_s mixed[o, s, t] * in_factor[i, s]

Codegen's interface (as for every method's kernel module): `array_names`, `decode_primfunc`,
`schedule_decode_cpu`.
"""
from __future__ import annotations

import numpy as np
from tvm import te

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import tvm_common as tc

ARRAYS = ("out_factor", "core", "in_factor")


def array_names(cw: CompressedWeight) -> list[str]:
    """Argument order of the kernel."""
    return tc.checked_array_names(cw, "tucker2", ARRAYS)


def decode_te(cw: CompressedWeight) -> tuple[list[te.Tensor], te.Tensor]:
    """Inputs (in `array_names` order) and the float32 weight in cw.shape."""
    names = array_names(cw)
    ph = tc.placeholders(cw, names)
    out_ch = int(cw.shape[0])
    taps = [int(s) for s in cw.shape[2:]]
    kernel = int(np.prod(taps))
    out_f, core, in_f = ph["out_factor"], ph["core"], ph["in_factor"]
    r_out, r_in = int(out_f.shape[1]), int(in_f.shape[1])
    out32 = te.compute(out_f.shape, lambda o, r: out_f[o, r].astype("float32"), name="out_f")
    in32 = te.compute(in_f.shape, lambda i, s: in_f[i, s].astype("float32"), name="in_f")
    core32 = te.compute((r_out, r_in, kernel),
                        lambda r, s, t: tc.flat_load(core, (r * r_in + s) * kernel + t).astype("float32"),
                        name="core_f")
    rr = te.reduce_axis((0, r_out), name="r")
    mixed = te.compute((out_ch, r_in, kernel),
                       lambda o, s, t: te.sum(out32[o, rr] * core32[rr, s, t], axis=rr), name="mixed")
    ss = te.reduce_axis((0, r_in), name="s")
    W = te.compute(tuple(int(s) for s in cw.shape),
                   lambda o, i, *tap: te.sum(mixed[o, ss, tc.flat_index(tap, taps)] * in32[i, ss], axis=ss),
                   name="W")
    return [ph[n] for n in names], W


def decode_primfunc(cw: CompressedWeight, name: str):
    """PrimFunc(out_factor, core, in_factor, W) for one weight; unscheduled."""
    inputs, W = decode_te(cw)
    return te.create_prim_func(inputs + [W]).with_attr("global_symbol", name)


schedule_decode_cpu = tc.schedule_decode_cpu
