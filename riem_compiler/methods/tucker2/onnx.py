"""ONNX decoder of tucker2 weights."""
from __future__ import annotations

from riem_compiler.methods.onnx_common import FLOAT, RIEM, _F, op, script


@script(RIEM)
def TuckerWeight(out_factor, core, in_factor, shape: list[int]) -> FLOAT:
    """W[o, i, k] = sum_rs out_factor[o, r] core[r, s, k] in_factor[i, s]."""
    out_f = op.Cast(out_factor, to=_F)
    in_f = op.Cast(in_factor, to=_F)
    core_f = op.Cast(core, to=_F)
    r_out = op.Gather(op.Shape(core_f), op.Constant(value_ints=[0]))
    r_in = op.Gather(op.Shape(core_f), op.Constant(value_ints=[1]))
    flat_core = op.Reshape(core_f, op.Concat(r_out, op.Constant(value_ints=[-1]), axis=0))
    mixed = op.Reshape(op.MatMul(out_f, flat_core),
                       op.Concat(op.Constant(value_ints=[0]), r_in, op.Constant(value_ints=[-1]), axis=0))
    by_tap = op.MatMul(op.Transpose(mixed, perm=[0, 2, 1]), op.Transpose(in_f, perm=[1, 0]))  # (out, k, in)
    return op.Reshape(op.Transpose(by_tap, perm=[0, 2, 1]), op.Constant(value_ints=shape))
