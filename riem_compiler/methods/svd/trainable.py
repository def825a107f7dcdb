"""Refinement view of svd weights with int8 factors: float factors, re-quantised per row
(straight-through) on every pass."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import decode_torch
from riem_compiler.methods.trainable import TrainableWeight, int8_rows


class SvdInt8View(TrainableWeight):
    """svd with int8 factors: float factors, re-quantised per row (straight-through) on every pass."""

    def __init__(self, cw, param_name):
        super().__init__(cw, param_name)
        for side in ("left", "right"):
            x = cw.arrays[f"{side}_codes"].astype(np.float32) * cw.arrays[f"{side}_scale"].astype(np.float32)[:, None]
            self.register_parameter(side, nn.Parameter(torch.from_numpy(x)))

    def _tensors(self):
        t = {}
        for side in ("left", "right"):
            x = getattr(self, side)
            t[f"{side}_codes"], t[f"{side}_scale"] = (x, torch.ones(x.shape[0])) if self.exact else int8_rows(x)
        return t

    def weight(self):
        return decode_torch(self.cw, self._tensors())

    def to_compressed(self):
        arrays = {}
        for k, v in self._tensors().items():
            v = v.detach().cpu()
            arrays[k] = torch.round(v).to(torch.int8).numpy() if k.endswith("codes") else v.numpy().astype(np.float32)
        return CompressedWeight("svd", self.cw.shape, dict(self.cw.meta), arrays)
