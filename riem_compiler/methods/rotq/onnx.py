"""ONNX decoders of rotq weights: UnpackBits -> Gather(grid) -> times the group scale -> blockwise
MatMul with H_B / sqrt(B) -> times the column signs. The Hadamard matrix and the signs are
regenerated in the graph from attributes (block, seed offset), as `rotation.py` defines them:
int64 Mul/Add/Mod/Div only, no stored rotation and no RNG op."""
from __future__ import annotations

import numpy as np

from riem_compiler.methods.onnx_common import FLOAT, RIEM, UINT8, UnpackBits, _F, op, script

_I64 = 7  # TensorProto.INT64


@script(RIEM)
def RotQSigns(count: int, seed_offset: int) -> FLOAT:
    """+-1 for columns 0..count-1: rotation.signs_numpy's hash (three rounds mod P = 2^31 - 1,
    constants as in rotation.ROUNDS; every product stays below 2^62)."""
    p = op.Constant(value_int=2147483647)
    x = op.Mod(op.Range(op.Constant(value_int=0), op.Constant(value_int=count), op.Constant(value_int=1))
               + op.Constant(value_int=seed_offset), p)
    x = op.Mod(x * op.Constant(value_int=1103515245) + op.Constant(value_int=12345), p)
    x = op.Mod(x * x + op.Constant(value_int=1013904223), p)
    x = op.Mod(x * op.Constant(value_int=48271) + op.Constant(value_int=11), p)
    x = op.Mod(x * x + op.Constant(value_int=374761393), p)
    x = op.Mod(x * op.Constant(value_int=16807) + op.Constant(value_int=7), p)
    x = op.Mod(x * x + op.Constant(value_int=668265263), p)
    bit = op.Mod(op.Div(x, op.Constant(value_int=65536)), op.Constant(value_int=2))
    return op.Cast(op.Constant(value_int=1) - op.Constant(value_int=2) * bit, to=_F)


@script(RIEM)
def RotQHadamard(block: int, inv_sqrt_block: float) -> FLOAT:
    """H_B / sqrt(B): H[i, j] = (-1)^(sum_k bit_k(i) bit_k(j)), bit_k(i) = (i // 2^k) mod 2. The sum
    is one (B, 12) x (12, B) float MatMul (small integers, exact in float32), so no (B, B, 12)
    tensor is made: onnxruntime keeps every folded intermediate until its constant folding ends."""
    pow2 = op.Constant(value=np.array([1 << k for k in range(12)], dtype=np.int64))
    two = op.Constant(value_int=2)
    i = op.Range(op.Constant(value_int=0), op.Constant(value_int=block), op.Constant(value_int=1))
    bits = op.Cast(op.Mod(op.Div(op.Unsqueeze(i, op.Constant(value_ints=[1])),
                                 op.Unsqueeze(pow2, op.Constant(value_ints=[0]))), two), to=_F)  # (B, 12)
    shared = op.MatMul(bits, op.Transpose(bits, perm=[1, 0]))
    parity = op.Mod(shared, op.Constant(value_float=2.0), fmod=1)
    sign = op.Constant(value_float=1.0) - op.Constant(value_float=2.0) * parity
    return sign * op.Constant(value_float=inv_sqrt_block)


@script(RIEM)
def RotQMatrix(codes: UINT8, scale, grid, rows: int, cols: int, padded: int, bits: int, group: int, block: int,
               seed_offset: int, inv_sqrt_block: float) -> FLOAT:
    """The (rows, cols) quantised matrix: (grid[codes] * scale) R^T, padded columns dropped."""
    one = op.Constant(value_ints=[1])
    n = op.Reshape(op.Constant(value_int=rows), one)
    dp = op.Reshape(op.Constant(value_int=padded), one)
    g = op.Reshape(op.Constant(value_int=group), one)
    b = op.Reshape(op.Constant(value_int=block), one)
    index = op.Cast(UnpackBits(codes, op.Mul(n, dp), bits=bits), to=_I64)
    values = op.Reshape(op.Gather(op.Cast(grid, to=_F), index), op.Concat(n, op.Div(dp, g), g, axis=0))
    s = op.Reshape(op.Cast(scale, to=_F), op.Concat(n, op.Div(dp, g), one, axis=0))
    blocks = op.Reshape(values * s, op.Concat(n, op.Div(dp, b), b, axis=0))
    turned = op.MatMul(blocks, RotQHadamard(block=block, inv_sqrt_block=inv_sqrt_block))
    W = op.Reshape(turned, op.Concat(n, dp, axis=0)) * RotQSigns(count=padded, seed_offset=seed_offset)
    return op.Slice(W, op.Constant(value_ints=[0]), op.Reshape(op.Constant(value_int=cols), one), one)


@script(RIEM)
def RotQWeight(codes: UINT8, scale, grid, shape: list[int], rows: int, cols: int, padded: int, bits: int,
               group: int, block: int, seed_offset: int, inv_sqrt_block: float) -> FLOAT:
    """RotQMatrix reshaped to the weight's shape (a linear or convolution weight)."""
    W = RotQMatrix(codes, scale, grid, rows=rows, cols=cols, padded=padded, bits=bits, group=group, block=block,
                   seed_offset=seed_offset, inv_sqrt_block=inv_sqrt_block)
    return op.Reshape(W, op.Constant(value_ints=shape))


@script(RIEM)
def RotQWeightT(codes: UINT8, scale, grid, rows: int, cols: int, padded: int, bits: int, group: int, block: int,
                seed_offset: int, inv_sqrt_block: float) -> FLOAT:
    """RotQMatrix of W.T, transposed back: the 2-D (cols, rows) weight of a MatMul's right operand."""
    W = RotQMatrix(codes, scale, grid, rows=rows, cols=cols, padded=padded, bits=bits, group=group, block=block,
                   seed_offset=seed_offset, inv_sqrt_block=inv_sqrt_block)
    return op.Transpose(W, perm=[1, 0])
