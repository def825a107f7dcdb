"""affine as an onnxruntime `MatMulNBits` (onnx_format "ort"), with float zero points.

MatMulNBits dequantises block b of output row n as (code - zero_points[n, b]) * scales[n, b] when
the zero points have the scales' float type (checked against onnxruntime 1.32: equal to the
function form to float32 rounding), which is affine's formula. B is (N, blocks, block * bits / 8),
each row's codes of one block packed from the low bits up: the bitpack layout of a row of the
grouped matrix when the groups run along the inputs. float16 scale and zero are stored as they are
and Cast to float32 (the product's type) in the graph. onnxruntime's CPU kernel takes 2- and 4-bit
codes with float zero points, not 8-bit ("use uint8 zero points").
"""
from __future__ import annotations

import numpy as np

from riem_compiler import bitpack
from riem_compiler.methods.base import NativeMatMul
from riem_compiler.methods.rtn.layout import is_transposed, quantised_shape
from riem_compiler.methods.rtn.native import matmulnbits_blocks

ENCODING_MATMULNBITS = "affine-matmulnbits-v1"
MATMULNBITS_BITS = (2, 4)


def matmulnbits_affine(cw, in_out: bool):
    """NativeMatMul for an affine weight used as x @ W (in_out) or x @ W.T, or why not. A row
    whose K is not a multiple of the block is padded with code 0 to whole blocks (the padded
    inputs do not exist, so they never contribute)."""
    bits, group = int(cw.meta["bits"]), cw.meta.get("group_size")
    if len(cw.shape) != 2:
        return "only 2-D weights have a MatMulNBits form"
    if bits not in MATMULNBITS_BITS:
        return f"{bits}-bit codes: onnxruntime's MatMulNBits takes {MATMULNBITS_BITS}-bit with float zero points"
    if cw.meta["axis"] != "in" or is_transposed(cw) != in_out:
        return "the codes are grouped along the weight's output axis for this use"
    got = matmulnbits_blocks(cw, bits, group, pad_code=0)
    if isinstance(got, str):
        return got
    B, attrs = got
    scale = np.asarray(cw.arrays["scale"]).reshape(B.shape[0], B.shape[1])
    zero = np.asarray(cw.arrays["zero"]).reshape(B.shape[0], B.shape[1])
    return NativeMatMul({"B": B, "scales": scale.ravel(), "zero_points": zero.ravel()}, attrs, ENCODING_MATMULNBITS,
                        cast_scales=scale.dtype != np.float32)


def affine_arrays_from_native(meta: dict, shape, encoding: str, tensors: dict) -> dict:
    """The CompressedWeight arrays (bit for bit) from the MatMulNBits initializers."""
    if encoding != ENCODING_MATMULNBITS:
        raise ValueError(f"unknown affine ONNX encoding {encoding!r}")
    bits = int(meta["bits"])
    rows, cols = quantised_shape(shape, bool(meta.get("transposed", False)))
    B = np.asarray(tensors["B"], dtype=np.uint8)
    padded = B.shape[1] * B.shape[2] * 8 // bits
    codes = bitpack.unpack(B.ravel(), bits, rows * padded).reshape(rows, padded)[:, :cols]
    return {"codes": bitpack.pack(codes.ravel(), bits),
            "scale": np.ascontiguousarray(np.asarray(tensors["scales"]).reshape(rows, -1)),
            "zero": np.ascontiguousarray(np.asarray(tensors["zero_points"]).reshape(rows, -1))}
