"""The one bit-packing layout of stored integer codes, in numpy (write and read) and torch (read).

Layout (every backend reads exactly this; the ONNX form is `methods/onnx_common.UnpackBits`,
the TVM form `methods/tvm_common.unpack_code`):
- codes are unsigned integers < 2**bits, in the array's flat (row-major) order;
- bits == 8: one byte per code; bits == 16: one little-endian uint16 per code;
- other widths (1..7): one little-endian bit stream: bit i of code j is stream bit j*bits + i,
  and stream bit s is bit (s % 8) of byte s // 8. The last byte is zero-padded.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np

# set by `eager_numpy()`: unpack_torch may then read through numpy (4-8x faster), which tracing
# for torch.export / ONNX could not follow
_EAGER_NUMPY = contextvars.ContextVar("riem_compiler_bitpack_eager_numpy", default=False)

LAYOUT = "little-endian bit stream; 8 bits: bytes; 16 bits: little-endian uint16"


def packed_nbytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


# codes packed or unpacked at once: the bit matrix takes 5 bytes per bit of every code in flight
# (a 4-bit weight: 20 bytes per weight), unpack's index and window arrays ~30 bytes per code, so
# long arrays go in chunks (a multiple of 8 codes: whole bytes)
PACK_CHUNK = 1 << 20


def pack(codes, bits: int) -> np.ndarray:
    """Unsigned integer codes (< 2**bits) -> flat uint8 array."""
    flat = np.asarray(codes).ravel()
    if bits == 8:
        return flat.astype(np.uint8)
    if bits == 16:
        return flat.astype("<u2").view(np.uint8)
    if len(flat) > PACK_CHUNK:
        return np.concatenate([pack(flat[a:a + PACK_CHUNK], bits) for a in range(0, len(flat), PACK_CHUNK)])
    flat = flat.astype(np.uint32)
    bit_matrix = ((flat[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.ravel(), bitorder="little")


def unpack(packed, bits: int, count: int, dtype=np.int64) -> np.ndarray:
    """Inverse of `pack`: the first `count` codes, as `dtype`. Long arrays are read in chunks of
    PACK_CHUNK codes into the one output array, so the index and window temporaries stay small
    (whole, they took ~30 bytes per code: 1.4 GB for a 4096x11008 3-bit weight)."""
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    out = aligned_empty(count, dtype)
    if bits == 8:
        out[:] = packed[:count]
    elif bits == 16:
        out[:] = packed.view("<u2")[:count]
    else:
        for a in range(0, count, PACK_CHUNK):  # a chunk starts on a whole byte (PACK_CHUNK % 8 == 0)
            b = min(a + PACK_CHUNK, count)
            out[a:b] = _unpack_bits(packed[a * bits // 8: packed_nbytes(b, bits)], bits, b - a)
    return out


def aligned_empty(count: int, dtype, alignment: int = 64) -> np.ndarray:
    """np.empty(count, dtype) starting on an `alignment`-byte boundary, as torch's allocator gives: a
    decode written into it (rtn's, in place) is swapped into a model as it is, where numpy's own large
    arrays start 16 bytes into a page and would be copied once more."""
    dtype = np.dtype(dtype)
    raw = np.empty(count * dtype.itemsize + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + count * dtype.itemsize].view(dtype)


def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` codes of a stream that starts on code 0, for widths other than 8 and 16."""
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        return ((packed[:, None] >> shifts) & mask).ravel()[:count]
    # code j starts at stream bit j*bits and spans at most 3 bytes (bits <= 16, offset <= 7)
    start = np.arange(count, dtype=np.int64) * bits
    first = start >> 3
    padded = np.zeros(len(packed) + 3, np.uint32)
    padded[: len(packed)] = packed
    window = padded[first] | (padded[first + 1] << 8) | (padded[first + 2] << 16)
    return (window >> (start & 7).astype(np.uint32)) & mask


@contextlib.contextmanager
def eager_numpy():
    """Within this block `unpack_torch` of CPU tensors reads through numpy (for eager decodes only,
    e.g. scoring candidates; never around torch.export / ONNX tracing)."""
    token = _EAGER_NUMPY.set(True)
    try:
        yield
    finally:
        _EAGER_NUMPY.reset(token)


def is_eager() -> bool:
    """Inside `eager_numpy()`: decoders may also work in place (nothing is being traced)."""
    return _EAGER_NUMPY.get()


def unpack_torch(packed, bits: int, count: int):
    """Torch form of `unpack`, float32 codes. Written with floor division and remainder only
    (no bit shifts), so torch.export and torch.onnx trace it. When bits divides 8, code j of a
    byte is (byte // 2**(j*bits)) % 2**bits; otherwise the bit stream is read bit by bit."""
    import torch

    if _EAGER_NUMPY.get() and packed.device.type == "cpu":
        return torch.from_numpy(unpack(packed.numpy(), bits, count, np.float32))
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
