"""rtn in standard ONNX: one `DequantizeLinear` (opset 21 for int4 / float16 scales / blocks).

The stored codes are unsigned with offset 2**(bits-1) (bitpack layout). Standard ONNX needs a
zero point of the same shape as the scale (one per row or per block), which would add bytes the
CompressedWeight does not hold; signed codes (code - offset) with the zero point left out (0)
need none, so the file holds exactly `cw.nbytes`:
- 8 bits: int8 codes (the stored byte XOR 0x80);
- 4 bits: int4 codes, packed two per byte with the first element in the low nibble, which is the
  bitpack layout of 4-bit codes, so the bytes are the stored bytes XOR 0x88.
Per row (group_size None, float32 scale): per-axis, axis=0, on the weight's own shape (no
Reshape). Per group (float16 scales): blocked, axis=1, block_size=group on the (rows, cols) view
(a last partial block is allowed: the scale has ceil(cols / group) columns), output float16
(the scale's type), a Reshape when the weight is not 2-D; the rewrite adds the Cast to the
weight's dtype. The float16 product rounds once to float16 (the torch decode is float32).
3/2-bit codes do not map (no int3/int2 in ONNX) and keep the function form.
"""
from __future__ import annotations

import numpy as np

from riem_compiler import bitpack
from riem_compiler.methods.base import NativeDecoder

ENCODING = "rtn-signed-v1"
XOR = {8: 0x80, 4: 0x88}


def native_rtn(cw, onnx_format: str):
    """NativeDecoder for `cw`, or the reason it keeps the function form."""
    if onnx_format != "standard":
        return f"onnx_format {onnx_format!r} has no rtn form"
    bits, group = int(cw.meta["bits"]), cw.meta.get("group_size")
    if bits not in XOR:
        return f"{bits}-bit codes have no standard ONNX integer type (int8/int4 only)"
    if int(cw.meta["offset"]) != 1 << (bits - 1):
        return "codes offset is not 2**(bits-1)"
    rows, cols = cw.matrix_shape
    packed = np.asarray(cw.arrays["codes"], dtype=np.uint8).ravel()
    scale = np.asarray(cw.arrays["scale"])
    if bits == 8:
        codes = (packed ^ np.uint8(XOR[8])).view(np.int8)  # u - 128
    else:
        import ml_dtypes

        nib = np.empty(2 * packed.size, dtype=np.int16)
        nib[0::2], nib[1::2] = packed & 0x0F, packed >> 4
        codes = (nib[: rows * cols] - 8).astype(ml_dtypes.int4)  # serialises as the stored bytes XOR 0x88
    if group is None:
        if scale.dtype != np.float32:
            return "per-row scale is not float32"
        shape = tuple(int(s) for s in cw.shape)
        # int8 + float32 per-axis exists since opset 13; int4 needs 21
        return NativeDecoder(13 if bits == 8 else 21, {"codes": codes.reshape(shape), "scale": scale.reshape(rows)},
                             [("DequantizeLinear", ["codes", "scale"], {"axis": 0})], str(scale.dtype), ENCODING)
    nodes = [("DequantizeLinear", ["codes", "scale"], {"axis": 1, "block_size": int(group)})]
    constants = {}
    if len(cw.shape) != 2:
        constants["shape"] = np.array(cw.shape, dtype=np.int64)
        nodes.append(("Reshape", [None, "shape"], {}))
    return NativeDecoder(21, {"codes": codes.reshape(rows, cols), "scale": scale.reshape(rows, -1)}, nodes,
                         str(scale.dtype), ENCODING, constants)


def rtn_arrays_from_native(meta: dict, shape, encoding: str, tensors: dict) -> dict:
    """The CompressedWeight arrays (bit for bit) from the native initializers read as numpy."""
    if encoding != ENCODING:
        raise ValueError(f"unknown rtn ONNX encoding {encoding!r}")
    bits = int(meta["bits"])
    signed = np.asarray(tensors["codes"]).astype(np.int64).ravel()
    codes = bitpack.pack(signed + int(meta["offset"]), bits)
    scale = np.asarray(tensors["scale"])
    rows = int(shape[0])
    scale = scale.reshape(rows) if meta.get("group_size") is None else scale.reshape(rows, -1)
    return {"codes": codes, "scale": np.ascontiguousarray(scale)}
