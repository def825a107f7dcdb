"""ONNX decoders of svd weights."""
from __future__ import annotations

from riem_compiler.methods.onnx_common import FLOAT, RIEM, _F, op, script


@script(RIEM)
def SVDWeight(left, right, shape: list[int]) -> FLOAT:
    """left @ right (float16/float32 factors)."""
    return op.Reshape(op.MatMul(op.Cast(left, to=_F), op.Cast(right, to=_F)), op.Constant(value_ints=shape))


@script(RIEM)
def SVDWeightInt8(left_codes, left_scale: FLOAT, right_codes, right_scale: FLOAT, shape: list[int]) -> FLOAT:
    """Int8 factors with one float32 scale per row."""
    col = op.Constant(value_ints=[1])
    left = op.Cast(left_codes, to=_F) * op.Unsqueeze(left_scale, col)
    right = op.Cast(right_codes, to=_F) * op.Unsqueeze(right_scale, col)
    return op.Reshape(op.MatMul(left, right), op.Constant(value_ints=shape))
