"""Refinement view of RieM weights: float states and metric network, fake-quantised
straight-through to the stored bit width and dtype."""
from __future__ import annotations

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from riem_compiler import riem
from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods.trainable import TrainableWeight, round_dtype


class RieMView(TrainableWeight):
    def __init__(self, cw, param_name):
        super().__init__(cw, param_name)
        f = riem.load_stored(cw.arrays, cw.matrix_shape, cw.meta["q"], cw.meta["state_bits"])
        for name in ("a", "b", "U", "beta", "v", "c"):
            setattr(self, name, nn.Parameter(getattr(f, name).detach().clone().float()))

    def _parts(self):
        bits, dt = self.cw.meta["state_bits"], self.cw.meta["metric_dtype"]
        if self.exact:
            bits, dt = 32, "float32"
        a = riem.fake_quantize_states(self.a, bits)
        b = riem.fake_quantize_states(self.b, bits)
        return (a, b) + tuple(round_dtype(getattr(self, n), dt) for n in ("U", "beta", "v", "c"))

    def weight(self):
        # checkpointed: the (N_out, N_in, m) sigmoid features are recomputed in backward, not kept
        W = checkpoint(lambda *p: riem.reconstruct(*p, row_chunk=256), *self._parts(), use_reentrant=False)
        return W.reshape(self.cw.shape)

    def to_compressed(self):
        f = riem.RieMFactors(*(getattr(self, n).detach().cpu() for n in ("a", "b", "U", "beta", "v")),
                             self.c.detach().cpu().reshape(()))
        arrays = riem.store(f, self.cw.meta["state_bits"], self.cw.meta["metric_dtype"])
        return CompressedWeight("riem", self.cw.shape, dict(self.cw.meta), arrays)
