"""tucker2: Tucker-2 on the two channel modes of a KxK conv weight (out, in, *kernel):
W ~ core x0 out_factor x1 in_factor, float16; exports as 1x1 conv, KxK conv, 1x1 conv."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.methods.base import DecoderCall, Method, fp32_bytes, ratios_with, within_ratio
from riem_compiler.methods.svd import matrix_svd
from riem_compiler.metrics import tail_sums


@dataclass(frozen=True)
class Tucker2Settings:
    iterations: int = 5
    rank_rule: str = "energy"

    def __post_init__(self):
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise InputError(f"tucker2 iterations must be an integer >= 0; got {self.iterations!r}")
        if self.rank_rule not in ("energy", "proportional"):
            raise InputError(f"tucker2 rank_rule must be 'energy' or 'proportional'; got {self.rank_rule!r}")


def tucker2_nbytes(shape, ranks: tuple[int, int]) -> int:
    """Stored bytes (float16) of a Tucker-2 of a conv weight (out, in, *kernel)."""
    out_ch, in_ch, kernel = shape[0], shape[1], int(np.prod(shape[2:]))
    r_out, r_in = ranks
    return 2 * (out_ch * r_out + in_ch * r_in + r_out * r_in * kernel)


def tucker2_ranks_for_ratio(shape, ratio: float) -> tuple[int, int] | None:
    """Largest channel ranks, kept proportional to the channel counts, that fit ratio * fp32 bytes."""
    out_ch, in_ch, kernel = shape[0], shape[1], int(np.prod(shape[2:]))
    budget = ratio * fp32_bytes(shape)
    max_out, max_in = min(out_ch, in_ch * kernel), min(in_ch, out_ch * kernel)
    for r_out in range(max_out, 0, -1):
        r_in = max(1, min(max_in, round(r_out * in_ch / out_ch)))
        feasible = r_out <= r_in * kernel and r_in <= r_out * kernel
        if feasible and tucker2_nbytes(shape, (r_out, r_in)) <= budget:
            return r_out, r_in
    return None


def _leading_left_vectors(unfolded: np.ndarray, rank: int) -> np.ndarray:
    return matrix_svd(unfolded)[0][:, :rank]


def channel_svds(weight) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(U, S) of the output-channel and of the input-channel unfolding of a conv weight: what
    the Tucker-2 rank choice and its HOSVD start both need (compute once per weight)."""
    w = np.asarray(weight, dtype=np.float64)
    u_out, s_out, _ = matrix_svd(w.reshape(w.shape[0], -1))
    u_in, s_in, _ = matrix_svd(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1))
    return (u_out, s_out), (u_in, s_in)


def tucker2_ranks_by_energy(weight, ratio: float, svds=None) -> tuple[int, int] | None:
    """Channel ranks that fit ratio * fp32 bytes and discard the least energy: the sum of the
    dropped squared singular values of the two channel unfoldings (an upper bound on the
    squared error of the truncated HOSVD). Ties go to the smaller pair. `svds`: channel_svds(weight)."""
    shape = np.shape(weight)
    out_ch, in_ch, kernel = shape[0], shape[1], int(np.prod(shape[2:]))
    (_, s_out), (_, s_in) = svds or channel_svds(weight)
    s_out, s_in = s_out ** 2, s_in ** 2
    tail_out, tail_in = tail_sums(s_out), tail_sums(s_in)  # tail_out[r] = sum s_out[r:]
    r_out = np.arange(1, len(s_out) + 1)[:, None]
    r_in = np.arange(1, len(s_in) + 1)[None, :]
    nbytes = 2 * (out_ch * r_out + in_ch * r_in + r_out * r_in * kernel)
    dropped = tail_out[r_out] + tail_in[r_in]
    # HOOI projects one mode onto the other's factor: a rank above r_other * kernel cannot exist
    feasible = (r_out <= r_in * kernel) & (r_in <= r_out * kernel)
    fits = (nbytes <= ratio * fp32_bytes(shape)) & feasible
    if not fits.any():
        return None
    score = np.where(fits, dropped, np.inf)
    best = np.flatnonzero(score == score.min())
    i, j = np.unravel_index(best[np.argmin(nbytes.ravel()[best])], score.shape)
    return int(i) + 1, int(j) + 1


def fit_tucker2(weight, ratio: float, groups: int = 1, iterations: int = 5,
                rank_rule: str = "energy", svds=None) -> CompressedWeight:
    """Tucker-2 on the output/input channel modes of a conv weight (HOSVD start, then HOOI).

    Only for ungrouped convs with a kernel of more than one tap: a 1x1 or grouped conv is a
    matrix (use "svd") or a set of small matrices. rank_rule "energy" picks the rank pair by
    `tucker2_ranks_by_energy`; "proportional" keeps ranks proportional to the channel counts.
    `svds`: channel_svds(weight), when the caller already has it.
    """
    w = np.asarray(weight, dtype=np.float64)
    shape = tuple(w.shape)
    if w.ndim < 3 or int(np.prod(shape[2:])) <= 1:
        raise InputError(f"tucker2 needs a conv weight (out, in, *kernel) with more than one tap, "
                         f"got shape {shape}; use method 'svd' for matrices and 1x1 convs")
    if groups != 1:
        raise InputError(f"tucker2 supports groups == 1 only, got groups={groups}; use 'svd' or 'rtn'")
    svds = svds or channel_svds(w)
    if rank_rule == "energy":
        ranks = tucker2_ranks_by_energy(w, ratio, svds)
    elif rank_rule == "proportional":
        ranks = tucker2_ranks_for_ratio(shape, ratio)
    else:
        raise InputError(f"rank_rule must be 'energy' or 'proportional', got {rank_rule!r}")
    if ranks is None:
        raise InputError(f"ratio {ratio} is too small for a rank-(1, 1) Tucker-2 of shape {shape} "
                         f"({tucker2_nbytes(shape, (1, 1))} bytes needed); raise the ratio")
    r_out, r_in = ranks
    out_ch, in_ch = shape[0], shape[1]
    (u_out, _), (u_in, _) = svds
    out_f, in_f = u_out[:, :r_out], u_in[:, :r_in]
    for _ in range(iterations):
        y = np.einsum("oi...,is->os...", w, in_f)
        out_f = _leading_left_vectors(y.reshape(out_ch, -1), r_out)
        z = np.einsum("oi...,or->ir...", w, out_f)
        in_f = _leading_left_vectors(z.reshape(in_ch, -1), r_in)
    out_16, in_16 = out_f.astype(np.float16), in_f.astype(np.float16)
    # core against the stored (rounded) factors; least squares through their pseudo-inverses
    p_out = np.linalg.pinv(out_16.astype(np.float64))
    p_in = np.linalg.pinv(in_16.astype(np.float64))
    core = np.einsum("ro,oi...,si->rs...", p_out, w, p_in)
    arrays = {"out_factor": out_16, "core": core.astype(np.float16), "in_factor": in_16}
    meta = {"ranks": [r_out, r_in], "iterations": iterations, "rank_rule": rank_rule}
    return CompressedWeight("tucker2", shape, meta, arrays)


def decode_tucker2(cw: CompressedWeight, t: dict) -> torch.Tensor:
    out_f = t["out_factor"].to(torch.float32)
    in_f = t["in_factor"].to(torch.float32)
    core = t["core"].to(torch.float32)
    r_out, r_in = cw.meta["ranks"]
    kernel = int(np.prod(cw.shape[2:]))
    mixed = (out_f @ core.reshape(r_out, r_in * kernel)).reshape(-1, r_in, kernel)  # (out, r_in, k)
    return torch.einsum("osk,is->oik", mixed, in_f)


def applies(spec) -> bool:
    """An ungrouped conv with more than one kernel tap."""
    w = spec.weight
    return (spec.kind in ("conv1d", "conv2d") and spec.groups == 1
            and w.ndim >= 3 and int(np.prod(w.shape[2:])) > 1)


class Tucker2(Method):
    name = "tucker2"
    Settings = Tucker2Settings
    tvm_dense_reason = None

    def fit(self, spec, ratio, settings, index=0):
        cw = fit_tucker2(spec.weight, ratio, groups=spec.groups, iterations=settings.iterations,
                         rank_rule=settings.rank_rule)  # InputError (a ValueError) when it cannot apply
        return within_ratio(spec, ratio, cw)

    def candidates(self, spec, budget_ratio, options, attempt):
        if not applies(spec):
            return
        w = np.asarray(spec.weight, dtype=np.float32)
        svds = attempt(spec.name, "tucker2 (channel SVDs)", channel_svds, w, keep=False)
        if svds is None:
            return
        seen = set()
        for r in ratios_with(options.get("ratios", ()), budget_ratio):
            ranks = tucker2_ranks_by_energy(w, r, svds)
            if ranks is not None and ranks not in seen:
                seen.add(ranks)
                attempt(spec.name, f"tucker2 r{ranks}", fit_tucker2, w, r, groups=1, svds=svds)

    def decode_torch(self, cw, tensors):
        return decode_tucker2(cw, tensors)

    def label(self, cw):
        return f"tucker2 r({cw.meta['ranks'][0]},{cw.meta['ranks'][1]})"

    def trainable(self, cw, param_name=""):
        from riem_compiler.methods.trainable import FloatArraysView

        return FloatArraysView(cw, param_name)

    def onnx_call(self, cw):
        return DecoderCall("TuckerWeight", ["out_factor", "core", "in_factor"], {"shape": [int(s) for s in cw.shape]})

    def onnx_functions(self):
        from riem_compiler.methods.tucker2 import onnx as o

        return {"TuckerWeight": (o.TuckerWeight, ())}

    def tvm_kernel(self):
        from riem_compiler.methods.tucker2 import tvm

        return tvm


METHOD = Tucker2()
