"""ONNX decoders of rtn weights (codes through UnpackBits)."""
from __future__ import annotations

from riem_compiler.methods.onnx_common import FLOAT, RIEM, UINT8, UnpackBits, _F, op, script


@script(RIEM)
def RTNWeight(codes: UINT8, scale, shape: list[int], rows: int, cols: int, bits: int, offset: float) -> FLOAT:
    """(codes - offset) * scale[row]."""
    n = op.Reshape(op.Constant(value_int=rows), op.Constant(value_ints=[1]))
    d = op.Reshape(op.Constant(value_int=cols), op.Constant(value_ints=[1]))
    values = UnpackBits(codes, op.Mul(n, d), bits=bits) - op.Constant(value_float=offset)
    matrix = op.Reshape(values, op.Concat(n, d, axis=0))
    W = matrix * op.Unsqueeze(op.Cast(scale, to=_F), op.Constant(value_ints=[1]))
    return op.Reshape(W, op.Constant(value_ints=shape))


@script(RIEM)
def RTNWeightGrouped(codes: UINT8, scale, shape: list[int], rows: int, cols: int, bits: int,
                     offset: float, group: int) -> FLOAT:
    """(codes - offset) * scale[row, col // group]; the last group may be shorter.

    The per-column scale comes from one Gather of scale's columns (no Expand/Reshape/Slice copies).
    """
    n = op.Reshape(op.Constant(value_int=rows), op.Constant(value_ints=[1]))
    d = op.Reshape(op.Constant(value_int=cols), op.Constant(value_ints=[1]))
    values = UnpackBits(codes, op.Mul(n, d), bits=bits) - op.Constant(value_float=offset)
    matrix = op.Reshape(values, op.Concat(n, d, axis=0))
    column_group = op.Div(op.Range(op.Constant(value_int=0), op.Constant(value_int=cols), op.Constant(value_int=1)),
                          op.Constant(value_int=group))
    s = op.Gather(op.Cast(scale, to=_F), column_group, axis=1)  # (rows, cols)
    return op.Reshape(matrix * s, op.Constant(value_ints=shape))


@script(RIEM)
def RTNWeightT(codes: UINT8, scale, rows: int, cols: int, bits: int, offset: float) -> FLOAT:
    """RTNWeight of W.T, transposed back: the 2-D (cols, rows) weight of a MatMul's right operand."""
    n = op.Reshape(op.Constant(value_int=rows), op.Constant(value_ints=[1]))
    d = op.Reshape(op.Constant(value_int=cols), op.Constant(value_ints=[1]))
    values = UnpackBits(codes, op.Mul(n, d), bits=bits) - op.Constant(value_float=offset)
    matrix = op.Reshape(values, op.Concat(n, d, axis=0))
    W = matrix * op.Unsqueeze(op.Cast(scale, to=_F), op.Constant(value_ints=[1]))
    return op.Transpose(W, perm=[1, 0])


@script(RIEM)
def RTNWeightGroupedT(codes: UINT8, scale, rows: int, cols: int, bits: int, offset: float, group: int) -> FLOAT:
    """RTNWeightGrouped of W.T, transposed back (see RTNWeightT)."""
    n = op.Reshape(op.Constant(value_int=rows), op.Constant(value_ints=[1]))
    d = op.Reshape(op.Constant(value_int=cols), op.Constant(value_ints=[1]))
    values = UnpackBits(codes, op.Mul(n, d), bits=bits) - op.Constant(value_float=offset)
    matrix = op.Reshape(values, op.Concat(n, d, axis=0))
    column_group = op.Div(op.Range(op.Constant(value_int=0), op.Constant(value_int=cols), op.Constant(value_int=1)),
                          op.Constant(value_int=group))
    s = op.Gather(op.Cast(scale, to=_F), column_group, axis=1)  # (rows, cols)
    return op.Transpose(matrix * s, perm=[1, 0])
