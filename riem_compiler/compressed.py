"""`CompressedWeight`: the plain data contract between fitting, rewriting, saving and codegen.

One record per compressed weight: which method made it, the original weight shape, the
method's settings (`meta`) and exactly the arrays that are stored (`arrays`). Its byte count is
the sum of those arrays' sizes, which is what every artifact writes. Decoding is the method's
business: `riem_compiler.methods.decode(cw)` (numpy) or `methods.decode_torch(cw, tensors)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
