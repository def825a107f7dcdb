"""`CompressedWeight`: the plain data contract between fitting, rewriting, saving and codegen.

One record per compressed weight: which method made it, the original weight shape, the
method's settings (`meta`) and exactly the arrays that are stored (`arrays`). Its byte count is
the sum of those arrays' sizes, which is what every artifact writes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from riem_compiler import riem


@dataclass
class CompressedWeight:
    method: str
    shape: tuple[int, ...]
    meta: dict
    arrays: dict[str, np.ndarray] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.shape[0], int(np.prod(self.shape[1:])))

    def reconstruct(self) -> np.ndarray:
        """Float32 weight in the original shape."""
        return decode_torch(self, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.arrays.items()}).numpy()


def decode_torch(cw: CompressedWeight, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Decode stored tensors (as torch tensors, e.g. module buffers) to the float32 weight.

    Written with torch ops only, so it traces under torch.export.
    """
    decoder = DECODERS.get(cw.method)
    if decoder is None:
        raise ValueError(f"unknown compression method {cw.method!r}; known: {sorted(DECODERS)}")
    return decoder(cw, tensors).reshape(cw.shape)


def unpack_codes_torch(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Torch twin of `riem.unpack_codes` (little-endian bit order), returns float32 codes."""
    if bits == 8:
        return packed[:count].to(torch.float32)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bit_stream = ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[: count * bits]
    weights = (2.0 ** torch.arange(bits, device=packed.device)).to(torch.float32)
    return (bit_stream.reshape(count, bits).to(torch.float32) * weights).sum(dim=1)


def _decode_riem(cw: CompressedWeight, t: dict[str, torch.Tensor]) -> torch.Tensor:
    n_out, n_in = cw.matrix_shape
    q, bits = cw.meta["q"], cw.meta["state_bits"]
    states = []
    for name, rows in (("a", n_out), ("b", n_in)):
        if bits == 32:
            states.append(t[name].to(torch.float32).reshape(rows, q))
        else:
            codes = unpack_codes_torch(t[f"{name}_codes"], bits, rows * q).reshape(rows, q)
            states.append(codes * t[f"{name}_scale"].float() + t[f"{name}_offset"].float())
    U, beta, v, c = (t[n].to(torch.float32) for n in ("U", "beta", "v", "c"))
    return riem.reconstruct(states[0], states[1], U, beta, v, c.reshape(()), row_chunk=256)


DECODERS = {"riem": _decode_riem}

# the baseline methods register their decoders on import
from riem_compiler.passes import baselines  # noqa: E402,F401
