"""Trainable views of stored weights, for data-free refinement (passes/refine.py).

A view holds float shadow parameters of one `CompressedWeight`; forward() returns the weight the
stored arrays would decode to, with the storage rounding applied straight-through, and
`to_compressed()` stores them again at the same byte count. Each method builds its own view
(`Method.trainable`); this module has the base and the view shared by float-array methods.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import decode_torch


def round_dtype(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round to the stored float dtype in the forward pass; identity gradient."""
    if dtype == "float32":
        return x
    return x + (x.to(getattr(torch, dtype)).float() - x).detach()


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes (straight-through) and per-row float32 scale, as methods.svd stores."""
    scale = (x.detach().abs().amax(dim=1) / 127.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = x / scale[:, None]
    codes = scaled + (torch.clamp(torch.round(scaled), -127, 127) - scaled).detach()
    return codes, scale



class TrainableWeight(nn.Module):
    """Float shadow parameters of one stored weight. forward() returns the weight the stored
    arrays would decode to (rounding applied straight-through); `to_compressed()` stores them."""

    def __init__(self, cw: CompressedWeight, param_name: str):
        super().__init__()
        self.cw = CompressedWeight(cw.method, tuple(cw.shape), dict(cw.meta), dict(cw.arrays))
        self.param_name = param_name
        self.active = True
        self.exact = False  # True: skip the storage rounding (used to measure sensitivities)
        self._frozen: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def to_compressed(self) -> CompressedWeight:
        raise NotImplementedError

    def invalidate(self) -> None:
        self._frozen = None

    def forward(self) -> torch.Tensor:
        if self.active:
            return self.weight()
        if self._frozen is None:
            with torch.no_grad():
                self._frozen = self.weight().detach()
        return self._frozen



class FloatArraysView(TrainableWeight):
    """Methods whose stored arrays are float factors (svd16/32, tucker2, dense): every float array
    trains, rounded to its stored dtype; decoding goes through the method's own decoder."""

    def __init__(self, cw, param_name):
        super().__init__(cw, param_name)
        self._names = [n for n, a in cw.arrays.items() if np.issubdtype(a.dtype, np.floating)]
        self._dtypes = {n: str(cw.arrays[n].dtype) for n in self._names}
        for n in self._names:
            self.register_parameter("p_" + n, nn.Parameter(torch.from_numpy(cw.arrays[n].astype(np.float32))))
        for n, a in cw.arrays.items():
            if n not in self._names:
                self.register_buffer("f_" + n, torch.from_numpy(np.ascontiguousarray(a)).clone())

    def _tensors(self) -> dict[str, torch.Tensor]:
        t = {n: round_dtype(getattr(self, "p_" + n), "float32" if self.exact else self._dtypes[n]) for n in self._names}
        t.update({n: getattr(self, "f_" + n) for n in self.cw.arrays if n not in self._names})
        return t

    def weight(self):
        return decode_torch(self.cw, self._tensors())

    def to_compressed(self):
        arrays = dict(self.cw.arrays)
        for n in self._names:
            arrays[n] = getattr(self, "p_" + n).detach().cpu().numpy().astype(self._dtypes[n])
        return CompressedWeight(self.cw.method, self.cw.shape, dict(self.cw.meta), arrays)
