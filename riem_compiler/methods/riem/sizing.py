"""Sizing by search: pick (q, m, state bits) for a byte budget by the error of short pilot fits.

Candidates come from riem.size_candidates (only shapes that fit the budget and leave no state
dimension dead by construction). A single candidate is taken without a pilot. Otherwise each is
fitted for `pilot_steps` with the same settings as the real fit (same seed, so the choice is
deterministic), and the lowest error of the stored (quantised) form wins; a tie goes to the
smaller shape. The winner and the runner-up are reported.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from riem_compiler import riem

log = logging.getLogger("riem_compiler.fit")


@dataclass(frozen=True)
class SizeChoice:
    q: int
    m: int
    state_bits: int
    pilot_error: float | None = None  # None: chosen without a pilot (single candidate)
    runner_up: tuple[int, int, int, float] | None = None  # (q, m, bits, pilot error)
    pilots: int = 0

    def report(self) -> dict:
        out = {"sizing": "search", "pilots": self.pilots}
        if self.pilot_error is not None:
            out["pilot_error"] = round(self.pilot_error, 5)
        if self.runner_up is not None:
            q, m, bits, err = self.runner_up
            out["runner_up"] = f"q{q} m{m} b{bits} pilot err {err:.4f}"
        return out


def bits_options(state_bits) -> tuple[int, ...]:
    """The state widths a search tries: riem.AUTO_STATE_BITS for "auto", else the one given."""
    return riem.AUTO_STATE_BITS if state_bits == "auto" else (int(state_bits),)


def search_size(weight, ratio: float, state_bits, metric_dtype: str, fit_settings, pilot_steps: int,
                k_branches: int = riem.K_BRANCHES, wider=riem.SEARCH_WIDER) -> SizeChoice | None:
    """The best candidate shape for `weight` at `ratio` by pilot-fit error; None when nothing fits.
    wider: the metric widths tried per state width (riem.size_candidates)."""
    from riem_compiler.methods.riem.fit import fit_riem

    n_out, n_in = int(weight.shape[0]), int(math.prod(weight.shape[1:]))
    found = riem.size_candidates(n_out, n_in, ratio, bits_options(state_bits), metric_dtype, k_branches, wider)
    if not found:
        return None
    if len(found) == 1:
        return SizeChoice(*found[0])
    pilot = replace(fit_settings, steps=max(1, pilot_steps), time_budget_s=None)
    scored = []
    for q, m, bits in found:
        res = fit_riem(weight, q, m, bits, metric_dtype, pilot, k_branches)
        nbytes = riem.stored_nbytes(n_out, n_in, q, m, bits, metric_dtype, k_branches)
        scored.append((res.rel_error, nbytes, q, m, bits))
        log.debug("RieM sizing %dx%d at %g: q%d m%d b%d pilot error %.4f", n_out, n_in, ratio, q, m, bits,
                  res.rel_error)
    scored.sort(key=lambda s: (s[0] != s[0], s[0], s[1]))  # nan last, then error, then bytes
    err, _, q, m, bits = scored[0]
    second = scored[1]
    return SizeChoice(q, m, bits, err, (second[2], second[3], second[4], second[0]), len(scored))
