"""ONNX decoders of affine weights: (codes - zero[group]) * scale[group] (codes through UnpackBits)."""
from __future__ import annotations

from riem_compiler.methods.onnx_common import FLOAT, RIEM, UINT8, UnpackBits, _F, op, script


@script(RIEM)
def AffineWeight(codes: UINT8, scale, zero, shape: list[int], rows: int, cols: int, bits: int, group: int) -> FLOAT:
    """The grouped (rows, cols) matrix is the weight's matrix view; the last group may be shorter.

    The per-column scale and zero come from one Gather each of their columns (as RTNWeightGrouped)."""
    n = op.Reshape(op.Constant(value_int=rows), op.Constant(value_ints=[1]))
    d = op.Reshape(op.Constant(value_int=cols), op.Constant(value_ints=[1]))
    matrix = op.Reshape(UnpackBits(codes, op.Mul(n, d), bits=bits), op.Concat(n, d, axis=0))
    column_group = op.Div(op.Range(op.Constant(value_int=0), op.Constant(value_int=cols), op.Constant(value_int=1)),
                          op.Constant(value_int=group))
    z = op.Gather(op.Cast(zero, to=_F), column_group, axis=1)  # (rows, cols)
    s = op.Gather(op.Cast(scale, to=_F), column_group, axis=1)
    return op.Reshape((matrix - z) * s, op.Constant(value_ints=shape))


@script(RIEM)
def AffineWeightT(codes: UINT8, scale, zero, shape: list[int], rows: int, cols: int, bits: int, group: int) -> FLOAT:
    """AffineWeight of the transposed matrix view, transposed back (then reshaped to `shape`)."""
    n = op.Reshape(op.Constant(value_int=rows), op.Constant(value_ints=[1]))
    d = op.Reshape(op.Constant(value_int=cols), op.Constant(value_ints=[1]))
    matrix = op.Reshape(UnpackBits(codes, op.Mul(n, d), bits=bits), op.Concat(n, d, axis=0))
    column_group = op.Div(op.Range(op.Constant(value_int=0), op.Constant(value_int=cols), op.Constant(value_int=1)),
                          op.Constant(value_int=group))
    z = op.Gather(op.Cast(zero, to=_F), column_group, axis=1)  # (rows, cols)
    s = op.Gather(op.Cast(scale, to=_F), column_group, axis=1)
    return op.Reshape(op.Transpose((matrix - z) * s, perm=[1, 0]), op.Constant(value_ints=shape))
