"""riemq: a RieM fit plus affine quantisation of what it leaves, W_hat = R + Q, at one byte budget.

RieM (riem_compiler/methods/riem) captures a smooth, low-entropy part of W in very few bytes;
affine (methods/affine, HQQ-style) quantises the residual W - R with the bytes left. The order
can be swapped ("quant_first": affine on W first, RieM fitted to the quantisation residual).
`riem_share` is the least fraction of the budget RieM gets (riem_first: affine's candidate
rungs are those that fit the rest, and RieM grows into what the largest of them leaves; a
share that leaves affine no rung is capped to what affine's cheapest rung leaves), or the
fraction left to RieM after affine (quant_first); the part fitted second gets every byte the
first one did not use, choosing its most accurate setting as its own `fit` does.

Stored: RieM's arrays under "riem_*" and affine's under "q_*" (no dots: keys become torch
buffer names) in one CompressedWeight; meta "riem" and "q" are the two parts' metas. Decoders
(torch, ONNX) are the two methods' own, added. Affine's cheapest rung needs about 1.1 bits per
weight (1-bit codes plus a float16 scale and zero per row), so ratio 1/32 (1 bit) never fits.

Measured on MiniLM layer 0 (500 steps): it beats both parts at 1/16 and 1/24, where affine is
down to 1-bit codes (query 1/16: 0.491 at riem_share 0.5, 0.500 at 0.4, 0.525 at 0.25, vs
affine 0.575, riem 0.655); at 1/8 and 1/10 affine alone is better (RieM's bytes cost affine a
whole bit width). The default share 0.5 is capped at 1/16 and below to what affine's cheapest
rung leaves, the best of the shares measured.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from riem_compiler import riem
from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.methods.affine import METHOD as AFFINE
from riem_compiler.methods.affine import AffineSettings, affine_nbytes, choose, ladder
from riem_compiler.methods.affine.layout import flipped
from riem_compiler.methods.base import DecoderCall, Method, ratios_with, within_ratio
from riem_compiler.methods.riem import METHOD as RIEM
from riem_compiler.methods.riem import RieMSettings
from riem_compiler.methods.rtn.layout import quantised_shape

ORDERS = ("riem_first", "quant_first")


@dataclass(frozen=True)
class RieMQSettings(RieMSettings):
    """riem_share: fraction of the budget RieM is sized to (riem_first), or the fraction left
    to RieM after affine took the rest (quant_first). order: which part is fitted to W itself.
    The RieM fields are riem's own (inherited; sizing defaults to "balanced", the better fit per
    README Limits); affine_iterations / affine_lp_norm are affine's solver settings (its bits
    and group are chosen from the bytes left)."""

    sizing: str = "balanced"
    riem_share: float = 0.5
    order: str = "riem_first"
    affine_iterations: int = 30
    affine_lp_norm: float = 0.7

    def __post_init__(self):
        super().__post_init__()  # validates sizing
        share = self.riem_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise InputError(f"riemq riem_share must be a number in (0, 1); got {share!r}")
        if self.order not in ORDERS:
            raise InputError(f"riemq order must be one of {ORDERS}; got {self.order!r}")
        if self.state_bits == 32:  # the ONNX body reuses RieMWeight (bit-packed states)
            raise InputError("riemq needs quantised RieM states (state_bits < 32)")
        self.affine_settings()  # validates iterations / lp_norm

    def riem_settings(self) -> RieMSettings:
        """The RieM part's settings: the inherited fields as a plain RieMSettings."""
        return RieMSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RieMSettings)})

    def affine_settings(self) -> AffineSettings:
        return AffineSettings(iterations=self.affine_iterations, lp_norm=self.affine_lp_norm)


def riem_nbytes(shape, ratio: float, s: RieMSettings) -> int | None:
    """Bytes of the RieM part `riem.fit` would store at this ratio (None: not even q=1 fits)."""
    n_out, n_in = shape[0], int(np.prod(shape[1:]))
    size = riem.choose_size(n_out, n_in, ratio, s.state_bits, s.metric_dtype, s.m, s.k_branches, s.sizing)
    return None if size is None else riem.stored_nbytes(n_out, n_in, *size, s.state_bits, s.metric_dtype,
                                                          s.k_branches)


def least_riem_nbytes(shape, s: RieMSettings) -> int:
    """Bytes of the smallest RieM (q = 1, metric width 1)."""
    return riem.stored_nbytes(shape[0], int(np.prod(shape[1:])), 1, 1, s.state_bits, s.metric_dtype, s.k_branches)


def cheapest_rung(shape, s: AffineSettings, flip: bool) -> tuple[int, int | None]:
    """Affine's (bits, group) with the fewest bytes for this shape."""
    _, cols = quantised_shape(shape, flip)
    return min(ladder(s, cols), key=lambda bg: affine_nbytes(shape, bg[0], bg[1], flip))


def combine(riem_cw: CompressedWeight, q_cw: CompressedWeight, settings: RieMQSettings) -> CompressedWeight:
    """One riemq weight holding both parts' arrays (prefixed) and metas."""
    arrays = {f"riem_{k}": v for k, v in riem_cw.arrays.items()}
    arrays.update({f"q_{k}": v for k, v in q_cw.arrays.items()})
    meta = {"order": settings.order, "riem_share": float(settings.riem_share), "riem": riem_cw.meta, "q": q_cw.meta}
    return CompressedWeight("riemq", tuple(riem_cw.shape), meta, arrays)


def part(cw: CompressedWeight, name: str, arrays: dict | None = None) -> CompressedWeight:
    """The "riem" or "q" (affine) part of a riemq weight, over `arrays` (default: cw's own)."""
    source = cw.arrays if arrays is None else arrays
    prefix = f"{name}_"
    own = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    return CompressedWeight("riem" if name == "riem" else "affine", tuple(cw.shape), cw.meta[name], own)


def fit_riemq(spec, ratio: float, settings: RieMQSettings, index: int = 0) -> CompressedWeight:
    """RieM and affine parts within ratio * fp32 bytes; ValueError before any RieM fit when the
    share leaves the other part nothing that fits."""
    from riem_compiler.methods import decode

    fp32 = spec.fp32_bytes
    budget = ratio * fp32
    rs, qs = settings.riem_settings(), settings.affine_settings()
    flip = flipped(spec.in_axis == 0, qs.axis)
    W = np.asarray(spec.weight, dtype=np.float32)

    def residual(cw):
        return dataclasses.replace(spec, weight=(W - decode(cw)).astype(np.float32))

    if settings.order == "riem_first":
        riem_bytes = riem_nbytes(W.shape, ratio * settings.riem_share, rs) or least_riem_nbytes(W.shape, rs)
        rungs = choose(W.shape, (budget - riem_bytes) / fp32, qs, flip)
        if not rungs:  # the share leaves affine no rung: RieM is capped to what the cheapest leaves
            rungs = [cheapest_rung(W.shape, qs, flip)]
        # affine's rungs are coarse: RieM also takes the bytes the largest candidate rung leaves
        rung_bytes = max(affine_nbytes(W.shape, bits, group, flip) for bits, group in rungs)
        if riem_nbytes(W.shape, (budget - rung_bytes) / fp32, rs) is None:
            raise ValueError(f"riemq: ratio {ratio:g} is too few bytes for affine's cheapest rung plus the "
                             f"smallest RieM (shape {W.shape}); raise the ratio")
        riem_cw = RIEM.fit(spec, (budget - rung_bytes) / fp32, rs, index).weight
        q_cw = AFFINE.fit(residual(riem_cw), (budget - riem_cw.nbytes) / fp32, qs).weight
    else:
        if not choose(W.shape, ratio * (1 - settings.riem_share), qs, flip):
            raise ValueError(f"riemq: affine does not fit {1 - settings.riem_share:g} of ratio {ratio:g} "
                             f"for shape {W.shape}")
        q_cw = AFFINE.fit(spec, ratio * (1 - settings.riem_share), qs).weight
        left = (budget - q_cw.nbytes) / fp32
        if riem_nbytes(W.shape, left, rs) is None:
            raise ValueError(f"riemq: the bytes affine leaves at ratio {ratio:g} are too few for RieM "
                             f"(shape {W.shape})")
        riem_cw = RIEM.fit(residual(q_cw), left, rs, index).weight
    return combine(riem_cw, q_cw, settings)


class RieMQ(Method):
    name = "riemq"
    Settings = RieMQSettings
    tvm_dense_reason = ("no riemq TVM kernel (it would be RieM's and affine's kernels summed): TVM "
                        "artifacts store the decoded weight dense")

    def fit(self, spec, ratio, settings, index=0):
        fitted = within_ratio(spec, ratio, fit_riemq(spec, ratio, settings, index))
        cw = fitted.weight
        riem_bytes = part(cw, "riem").nbytes
        fitted.report = {"label": self.label(cw), "riem_bytes": riem_bytes, "q_bytes": cw.nbytes - riem_bytes,
                         "order": settings.order,
                         "bits_per_weight": round(8 * cw.nbytes / int(np.prod(cw.shape)), 3)}
        return fitted

    def candidates(self, spec, budget_ratio, options, attempt):
        # a RieM fit per candidate is expensive: none unless the caller provides a fitter
        # (weight, ratio) -> CompressedWeight, as riem's own candidates
        fit = options.get("fit")
        if fit is None:
            return
        for r in ratios_with(options.get("ratios", ()), budget_ratio):
            attempt(spec.name, f"riemq at ratio {r:g}", fit, spec.weight, r)

    def decode_torch(self, cw, tensors):
        """RieM's decode plus affine's, both as the (shape[0], rest) matrix view."""
        r, q = part(cw, "riem", tensors), part(cw, "q", tensors)
        rows, cols = cw.matrix_shape
        return RIEM.decode_torch(r, r.arrays).reshape(rows, cols) + AFFINE.decode_torch(q, q.arrays).reshape(rows, cols)

    def label(self, cw):
        return f"{RIEM.label(part(cw, 'riem'))} + {AFFINE.label(part(cw, 'q'))}"

    def family(self, cw):
        return f"riemq+{AFFINE.family(part(cw, 'q'))}"

    def onnx_call(self, cw):
        """One RieMQWeight(T) node whose body calls RieMWeight and AffineWeight(T) with the
        attributes the two methods' own DecoderCalls carry (renamed per part)."""
        r, q = RIEM.onnx_call(part(cw, "riem")), AFFINE.onnx_call(part(cw, "q"))
        attrs = {"shape": r.attrs["shape"], "riem_rows": r.attrs["rows"], "riem_cols": r.attrs["cols"],
                 "riem_bits": r.attrs["bits"], "q_rows": q.attrs["rows"], "q_cols": q.attrs["cols"],
                 "q_bits": q.attrs["bits"], "q_group": q.attrs["group"]}
        op_type = "RieMQWeightT" if q.op_type == "AffineWeightT" else "RieMQWeight"
        return DecoderCall(op_type, [f"riem_{k}" for k in r.inputs] + [f"q_{k}" for k in q.inputs], attrs)

    def onnx_functions(self):
        from riem_compiler.methods.riemq import onnx as o

        return {"RieMQWeight": (o.RieMQWeight, ("RieMWeight", "AffineWeight")),
                "RieMQWeightT": (o.RieMQWeightT, ("RieMWeight", "AffineWeightT"))}


METHOD = RieMQ()
