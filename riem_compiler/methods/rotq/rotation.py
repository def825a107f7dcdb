"""The rotation of rotq: R = diag(s) blockdiag(H_B / sqrt(B)), a randomized Hadamard transform
that costs no stored bytes.

Both factors are regenerated from their definitions, identically in numpy (the fit), torch (the
decoder) and ONNX (`rotq/onnx.py`):
- H_B[i, j] = (-1)^popcount(i & j), with popcount(i & j) mod 2 = sum_k bit_k(i) bit_k(j) mod 2 and
  bit_k(i) = (i // 2^k) mod 2 (no bit ops, so every backend computes it with Div/Mod/Mul/Add);
- the sign of column j is a hash of (seed, j) in int64 Mul/Add/Mod/Div only: three rounds of an
  affine step and a squaring, both mod the prime P = 2^31 - 1. Every operand is below 2^31, so
  each product is below 2^62 and nothing overflows int64. The sign is bit 16 of the result.
"""
from __future__ import annotations

import functools
import math

import numpy as np

P = 2**31 - 1  # hash modulus (a prime)
SEED_MULT = 7919
# (multiplier, increment, squaring increment) of each hash round
ROUNDS = ((1103515245, 12345, 1013904223), (48271, 11, 374761393), (16807, 7, 668265263))
SIGN_BIT = 65536  # the sign is (x // SIGN_BIT) mod 2
MAX_BLOCK = 4096  # 12 bits of a column index inside a block


def seed_offset(seed: int) -> int:
    """The seed's term of the hash's start value (below P): what the decoders get as attribute."""
    return (int(seed) % P) * SEED_MULT % P


def signs_numpy(seed: int, count: int) -> np.ndarray:
    """+-1 (float64) for columns 0..count-1."""
    x = (np.arange(count, dtype=np.int64) + seed_offset(seed)) % P
    for a, c, c2 in ROUNDS:
        x = (x * a + c) % P
        x = (x * x + c2) % P
    return (1 - 2 * ((x // SIGN_BIT) % 2)).astype(np.float64)


def signs_torch(seed: int, count: int, device=None):
    """`signs_numpy` in torch int64 ops (traceable: arange, mul, add, remainder, floor div)."""
    import torch

    x = torch.remainder(torch.arange(count, dtype=torch.int64, device=device) + seed_offset(seed), P)
    for a, c, c2 in ROUNDS:
        x = torch.remainder(x * a + c, P)
        x = torch.remainder(x * x + c2, P)
    bit = torch.remainder(torch.div(x, SIGN_BIT, rounding_mode="floor"), 2)
    return (1 - 2 * bit).to(torch.float32)


@functools.lru_cache(maxsize=16)
def hadamard_numpy(block: int) -> np.ndarray:
    """H_B / sqrt(B) (float64, symmetric and orthogonal; read-only, made once per block: building it
    took 1.8 ms at B = 256, and a fit rotates a chunk of rows at a time, twice or more)."""
    i = np.arange(block, dtype=np.int64)
    bits = (i[:, None] // (2 ** np.arange(12, dtype=np.int64))[None, :]) % 2
    parity = (bits[:, None, :] * bits[None, :, :]).sum(axis=2) % 2
    H = (1 - 2 * parity).astype(np.float64) / math.sqrt(block)
    H.flags.writeable = False
    return H


def hadamard_torch(block: int, device=None):
    """`hadamard_numpy` in torch (float32), built from arange (traceable)."""
    import torch

    i = torch.arange(block, dtype=torch.int64, device=device)
    pow2 = 2 ** torch.arange(12, dtype=torch.int64, device=device)
    bits = torch.remainder(torch.div(i[:, None], pow2[None, :], rounding_mode="floor"), 2)
    parity = torch.remainder((bits[:, None, :] * bits[None, :, :]).sum(dim=2), 2)
    return (1 - 2 * parity).to(torch.float32) * (1.0 / math.sqrt(block))


def rotate_numpy(M: np.ndarray, block: int, seed: int, overwrite: bool = False) -> np.ndarray:
    """M R for M (rows, padded cols) in float64: signs on columns, then H_B / sqrt(B) per block.
    overwrite: the signs are applied to M in place (a working copy the caller drops)."""
    n, dp = M.shape
    signs = signs_numpy(seed, dp)[None, :]
    X = (np.multiply(M, signs, out=M) if overwrite else M * signs).reshape(n, dp // block, block)
    return (X @ hadamard_numpy(block)).reshape(n, dp)


def unrotate_torch(Q, block: int, seed: int, in_place: bool = False):
    """Q R^T = (Q blockdiag(H_B / sqrt(B))) diag(s) for Q (rows, padded cols), float32 torch.
    in_place: the signs multiply the product where it is (eager decodes; the same values)."""
    n, dp = Q.shape
    X = (Q.reshape(n, dp // block, block) @ hadamard_torch(block, Q.device)).reshape(n, dp)
    signs = signs_torch(seed, dp, Q.device)[None, :]
    return X.mul_(signs) if in_place else X * signs


def choose_block(cols: int, max_block: int = 256, max_padding: float = 1 / 16) -> int:
    """Largest power-of-two block <= max_block whose zero padding of `cols` adds at most
    max_padding of the columns (every padded column costs stored codes)."""
    block = 1 << int(math.log2(max_block))
    while block > 1 and math.ceil(cols / block) * block > cols * (1 + max_padding):
        block //= 2
    return block


def padded_cols(cols: int, block: int) -> int:
    return math.ceil(cols / block) * block
