"""The one bit-packing layout of stored integer codes, in numpy (write and read) and torch (read).

Layout (every backend reads exactly this; the ONNX form is `methods/onnx_common.UnpackBits`,
the TVM form `methods/tvm_common.unpack_code`):
- codes are unsigned integers < 2**bits, in the array's flat (row-major) order;
- bits == 8: one byte per code; bits == 16: one little-endian uint16 per code;
- other widths (1..7): one little-endian bit stream: bit i of code j is stream bit j*bits + i,
  and stream bit s is bit (s % 8) of byte s // 8. The last byte is zero-padded.
"""
from __future__ import annotations

import math

import numpy as np

LAYOUT = "little-endian bit stream; 8 bits: bytes; 16 bits: little-endian uint16"


def packed_nbytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def pack(codes, bits: int) -> np.ndarray:
    """Unsigned integer codes (< 2**bits) -> flat uint8 array."""
    flat = np.asarray(codes, dtype=np.uint32).ravel()
    if bits == 8:
        return flat.astype(np.uint8)
    if bits == 16:
        return flat.astype("<u2").view(np.uint8)
    bit_matrix = ((flat[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.ravel(), bitorder="little")


def unpack(packed, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack`: the first `count` codes as int64."""
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    if bits == 8:
        return packed[:count].astype(np.int64)
    if bits == 16:
        return packed.view("<u2")[:count].astype(np.int64)
    bit_stream = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits)
    return (bit_stream.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(axis=1)


def unpack_torch(packed, bits: int, count: int):
    """Torch form of `unpack`, float32 codes. Written with floor division and remainder only
    (no bit shifts), so torch.export and torch.onnx trace it. When bits divides 8, code j of a
    byte is (byte // 2**(j*bits)) % 2**bits; otherwise the bit stream is read bit by bit."""
    import torch

    p = packed.reshape(-1, 1).to(torch.int32)
    if bits == 8:
        return p.reshape(-1)[:count].to(torch.float32)
    if bits == 16:
        pairs = p.reshape(-1, 2)
        return (pairs[:, 0] + 256 * pairs[:, 1])[:count].to(torch.float32)
    if 8 % bits == 0:
        per_byte = 8 // bits
        div = 2 ** (bits * torch.arange(per_byte, dtype=torch.int32, device=p.device))
        codes = torch.remainder(torch.div(p, div, rounding_mode="floor"), 2 ** bits)
        return codes.reshape(-1)[:count].to(torch.float32)
    div = 2 ** torch.arange(8, dtype=torch.int32, device=p.device)
    stream = torch.remainder(torch.div(p, div, rounding_mode="floor"), 2).reshape(-1)[: count * bits]
    place = 2.0 ** torch.arange(bits, dtype=torch.float32, device=p.device)
    return (stream.reshape(count, bits).to(torch.float32) * place).sum(dim=1)
