"""riem: the Riemannian-metric neural representation (ICML 2024) of a weight matrix.

The formula, quantisation and storage live in riem_compiler/riem.py; fitting in `fit.py`; the
refinement view in `trainable.py`; ONNX decoders in `onnx.py`; the TVM (TE/TIR) decode kernels
in `tvm.py` (reached through `tvm_kernel`, imported only when a TVM artifact is built).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from riem_compiler import riem
from riem_compiler.methods.base import DecoderCall, Fitted, Method, ratios_with

ONNX_BRANCHES = 6  # riem.K_BRANCHES; the RieMMatrix ONNX body sums this many RieMBranch calls


@dataclass(frozen=True)
class RieMSettings:
    """Sizing (state_bits, metric_dtype, m, k_branches, sizing) and fitting (steps, lr, time cap,
    seed, device) of a RieM fit. sizing "wide" (default): riem.choose_size's 1.3x-wider shape of
    the balanced width, no pilot fits (on 14 MiniLM layer/budget cells at 1/16, 1/8 and 1/4 its
    1000-step fit was at or below the error of "search"'s pick in every cell, 5 strictly, in
    15-30% less time: the 100-step pilots could not tell the two widths apart); "search": short
    pilot fits (pilot_steps each; 0: steps // 10, at least 1) choose among the shapes of
    riem.size_candidates, which never leave a state dimension dead (q <= k_branches * m); with
    state_bits "auto", pilots choose among state widths 8/6/4 (at the wide shape under "wide");
    "max_q": q is the largest that fits the ratio at width m; "balanced": m grows until
    q <= k_branches * m (riem.choose_size). m is used by "max_q" and "balanced"."""

    state_bits: int | str = 8
    metric_dtype: str = "float16"
    m: int = 16
    k_branches: int = riem.K_BRANCHES
    steps: int = 1000
    lr: float = 3e-2
    time_budget_s: float | None = None
    seed: int = 0
    device: str = "cpu"
    sizing: str = "wide"
    pilot_steps: int = 0  # steps of each pilot fit of the search; 0: steps // 10 (at least 1)

    def __post_init__(self):
        from riem_compiler.errors import InputError

        if self.sizing not in riem.SIZINGS:
            raise InputError(f"riem sizing must be one of {riem.SIZINGS}; got {self.sizing!r}")
        if self.state_bits != "auto" and self.state_bits not in riem.STATE_BITS:
            raise InputError(f"riem state_bits must be one of {riem.STATE_BITS} or 'auto'; got {self.state_bits!r}")
        if isinstance(self.pilot_steps, bool) or not isinstance(self.pilot_steps, int) or self.pilot_steps < 0:
            raise InputError(f"riem pilot_steps must be a positive integer, or 0 for steps // 10; got {self.pilot_steps!r}")

    @property
    def searched(self) -> bool:
        """Whether fits choose their shape by pilot fits (sizing "search", or state_bits "auto")."""
        return self.sizing == "search" or self.state_bits == "auto"

    def pilot_budget(self) -> int:
        return self.pilot_steps or max(1, self.steps // 10)


def fit_settings(settings: RieMSettings, index: int = 0):
    from riem_compiler.methods.riem.fit import FitSettings

    return FitSettings(steps=settings.steps, time_budget_s=settings.time_budget_s, lr=settings.lr,
                       seed=settings.seed + index, device=settings.device)


def choose_shape(weight, ratio: float, settings: RieMSettings, index: int = 0) -> tuple[int, int, int, dict]:
    """(q, m, state_bits, report fields) for one weight at `ratio`: pilot-fit search when
    settings.searched (sizing.search_size: chosen and runner-up in the report), else the rule of
    riem.choose_size. Raises ValueError when nothing fits the ratio. Also for callers outside
    this method (e.g. auto's RieM candidates)."""
    n_out, n_in = int(weight.shape[0]), int(math.prod(weight.shape[1:]))
    if settings.searched:
        from riem_compiler.methods.riem.sizing import search_size

        choice = search_size(weight, ratio, settings.state_bits, settings.metric_dtype, fit_settings(settings, index),
                             settings.pilot_budget(), settings.k_branches, riem.search_widths(settings.sizing))
        if choice is None:
            raise ValueError(f"too small: even q=1 needs more than {ratio:g} of its fp32 bytes")
        return choice.q, choice.m, choice.state_bits, {**choice.report(), "sizing": settings.sizing}
    size = riem.choose_size(n_out, n_in, ratio, settings.state_bits, settings.metric_dtype, settings.m,
                            settings.k_branches, settings.sizing)
    if size is None:
        raise ValueError(f"too small: even q=1 needs more than {ratio:g} of its fp32 bytes")
    return size[0], size[1], settings.state_bits, {"sizing": settings.sizing}


def _fit_at(weight, q: int, m: int, bits: int, settings: RieMSettings, index: int = 0):
    """The FitResult of a RieM fit of `weight` at the shape choose_shape gave, with these settings."""
    from riem_compiler.methods.riem.fit import fit_riem

    return fit_riem(weight, q, m, bits, settings.metric_dtype, fit_settings(settings, index), settings.k_branches)


class RieM(Method):
    name = "riem"
    Settings = RieMSettings
    tvm_dense_reason = None

    def fit(self, spec, ratio, settings, index=0):
        q, m, bits, extra = choose_shape(spec.weight, ratio, settings, index)
        res = _fit_at(spec.weight, q, m, bits, settings, index)
        report = {"q": q, "m": m, "state_bits": bits, "steps": res.steps, **extra}
        if res.time_capped:
            report.update(steps_planned=res.steps_planned, time_capped=True)
        return Fitted(res.weight, res.rel_error, report)

    def candidate_fitter(self, settings: RieMSettings):
        """(weight, ratio) -> CompressedWeight, or None when nothing fits the ratio: auto's RieM
        candidates (its grid's riem_fit), sized and fitted as this method fits a layer."""
        def fit(weight, ratio):
            try:
                q, m, bits, _ = choose_shape(weight, ratio, settings)
            except ValueError:  # nothing fits this ratio
                return None
            return _fit_at(weight, q, m, bits, settings).weight

        return fit

    def candidates(self, spec, budget_ratio, options, attempt):
        fit = options.get("fit")  # (weight, ratio) -> CompressedWeight | None; None: no RieM candidates
        if fit is None:
            return
        for r in ratios_with(options.get("ratios", ()), budget_ratio):
            attempt(spec.name, f"riem at ratio {r:g}", fit, spec.weight, r)

    def decode_torch(self, cw, t):
        from riem_compiler import bitpack

        n_out, n_in = cw.matrix_shape
        q, bits = cw.meta["q"], cw.meta["state_bits"]
        states = []
        for name, rows in (("a", n_out), ("b", n_in)):
            if bits == 32:
                states.append(t[name].float().reshape(rows, q))
            else:
                codes = bitpack.unpack_torch(t[f"{name}_codes"], bits, rows * q).reshape(rows, q)
                states.append(codes * t[f"{name}_scale"].float() + t[f"{name}_offset"].float())
        U, beta, v, c = (t[n].float() for n in ("U", "beta", "v", "c"))
        return riem.reconstruct(states[0], states[1], U, beta, v, c.reshape(()), row_chunk=256)

    def family(self, cw):
        return f"riem{cw.meta['state_bits']}"

    def label(self, cw):
        m = cw.meta
        return f"riem{m['state_bits']} q{m['q']} m{m['m']}"

    def trainable(self, cw, param_name=""):
        from riem_compiler.methods.riem.trainable import RieMView

        return RieMView(cw, param_name)

    def onnx_call(self, cw):
        rows, cols = cw.matrix_shape
        shape = [int(s) for s in cw.shape]
        metric = ["U", "beta", "v", "c"]
        branches = int(cw.meta.get("k_branches", cw.arrays["U"].shape[0]))
        if branches != ONNX_BRANCHES or cw.arrays["U"].shape[0] != ONNX_BRANCHES:
            from riem_compiler.errors import InputError
            raise InputError(f"ONNX export of RieM weights needs {ONNX_BRANCHES} branches (the RieMMatrix body "
                             f"unrolls them); this weight has {branches}: refit it with k_branches={ONNX_BRANCHES}")
        if cw.meta["state_bits"] == 32:
            return DecoderCall("RieMMatrix", ["a", "b", *metric], {"shape": shape})
        states = ["a_codes", "a_scale", "a_offset", "b_codes", "b_scale", "b_offset"]
        return DecoderCall("RieMWeight", states + metric,
                           {"shape": shape, "rows": rows, "cols": cols, "bits": int(cw.meta["state_bits"])})

    def onnx_functions(self):
        from riem_compiler.methods.riem import onnx as o

        return {"RieMWeight": (o.RieMWeight, ("UnpackBits", "RieMStates", "RieMBranch", "RieMMatrix")),
                "RieMMatrix": (o.RieMMatrix, ("RieMBranch",)),
                "RieMStates": (o.RieMStates, ("UnpackBits",)), "RieMBranch": (o.RieMBranch, ())}

    def tvm_kernel(self):
        from riem_compiler.methods.riem import tvm

        return tvm

    def tvm_fused(self, cw, rows: int, name: str, target_kind: str, for_memory: bool = False):
        """RieM stays decode-once unless the build asks to save memory (mode "fused"): rebuilding a
        weight element costs about 6m sigmoids, 25-300x the multiply-add it feeds."""
        if not for_memory:
            return (f"RieM stays decode-once: rebuilding each weight element costs ~{6 * int(cw.meta.get('m', 16))} "
                    "sigmoids per call, far more than the matmul (mode='fused' fuses it to save memory)")
        return super().tvm_fused(cw, rows, name, target_kind, for_memory)


METHOD = RieM()
