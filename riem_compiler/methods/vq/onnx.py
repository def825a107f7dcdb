"""ONNX decoders of vq weights: UnpackBits -> Gather(codebook rows) -> (rows, vectors * dim) ->
crop the padding -> times the row scale -> the weight's shape (or transposed back)."""
from __future__ import annotations

from riem_compiler.methods.onnx_common import FLOAT, RIEM, UINT8, UnpackBits, _F, op, script

_I64 = 7  # TensorProto.INT64


@script(RIEM)
def VQWeight(codes: UINT8, codebook, scale, gain: FLOAT, shape: list[int], rows: int, cols: int, vectors: int,
             dim: int, bits: int) -> FLOAT:
    """codebook[codes] laid out row by row, first `cols` columns, times scale[row] * gain."""
    n = op.Reshape(op.Constant(value_int=rows), op.Constant(value_ints=[1]))
    v = op.Reshape(op.Constant(value_int=vectors), op.Constant(value_ints=[1]))
    width = op.Mul(v, op.Reshape(op.Constant(value_int=dim), op.Constant(value_ints=[1])))
    count = op.Mul(n, v)
    index = op.Cast(UnpackBits(codes, count, bits=bits), to=_I64)
    entries = op.Gather(op.Cast(codebook, to=_F), index, axis=0)  # (rows * vectors, dim)
    padded = op.Reshape(entries, op.Concat(n, width, axis=0))
    M = op.Slice(padded, op.Constant(value_ints=[0]), op.Reshape(op.Constant(value_int=cols), op.Constant(value_ints=[1])),
                 op.Constant(value_ints=[1]))
    s = op.Unsqueeze(op.Cast(scale, to=_F) * gain, op.Constant(value_ints=[1]))
    return op.Reshape(M * s, op.Constant(value_ints=shape))


@script(RIEM)
def VQWeightT(codes: UINT8, codebook, scale, gain: FLOAT, rows: int, cols: int, vectors: int, dim: int,
              bits: int) -> FLOAT:
    """VQWeight of W.T, transposed back: the 2-D (cols, rows) weight of a MatMul's right operand."""
    n = op.Reshape(op.Constant(value_int=rows), op.Constant(value_ints=[1]))
    v = op.Reshape(op.Constant(value_int=vectors), op.Constant(value_ints=[1]))
    width = op.Mul(v, op.Reshape(op.Constant(value_int=dim), op.Constant(value_ints=[1])))
    count = op.Mul(n, v)
    index = op.Cast(UnpackBits(codes, count, bits=bits), to=_I64)
    entries = op.Gather(op.Cast(codebook, to=_F), index, axis=0)
    padded = op.Reshape(entries, op.Concat(n, width, axis=0))
    M = op.Slice(padded, op.Constant(value_ints=[0]), op.Reshape(op.Constant(value_int=cols), op.Constant(value_ints=[1])),
                 op.Constant(value_ints=[1]))
    s = op.Unsqueeze(op.Cast(scale, to=_F) * gain, op.Constant(value_ints=[1]))
    return op.Transpose(M * s, perm=[1, 0])
