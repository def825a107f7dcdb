"""method="auto": pick one compression per layer under a global byte budget, without data.

Each layer gets a list of candidate `CompressedWeight`s (RTN at several bit widths, SVD at several
sizes, Tucker-2 for KxK convs, RieM through a fitting callable, and dense float16/float32).
A data-free proxy scores a plan: sum over layers of w_l * rel_error_l**2, with w_l the layer's
share of fp32 bytes ("size_weighted"), of squared weight norm ("energy": total squared weight
error over total weight energy) or 1/L ("uniform"). A multiple-choice knapsack solved by dynamic
programming over bytes (rounded up, so the budget holds exactly) picks one candidate per layer.

Every "single method" plan (each layer gets that method's best candidate within budget_ratio of
its own fp32 bytes) is also scored, and the knapsack's plan is replaced by the best of them if
that one is better, so auto is never worse on the proxy than any single method at the same budget.

With a sensitivity (`passes/sensitivity.py`, `Config.sensitivity="output"`, the default for torch
models with example inputs) a candidate's cost is instead its predicted contribution to the MODEL's
relative squared output error, from the layer's input second moments on synthetic inputs and a
measured per-layer gain. The knapsack plan and the MEASURED_SINGLES single-method plans predicted
best are also measured end to end on held-out synthetic inputs, for the report only: the predicted
cost still picks the plan.
Far from the original the measured squared error saturates near 1 and favours plans that shrink
the outputs (low rank) over noisier ones that keep them, and the task metrics side with the
prediction (MiniLM at 1/24: the measurement preferred svd8, WS353 0.491, over the knapsack plan,
0.676; benchmarks/results/auto_proxy.md has the rank correlations).

Screening (the default grid, `CandidateGrid.screen_rows`): the candidates of methods that code rows
on their own (rtn, affine, rotq; vq, whose shared codebook is learnt from a small sample of every
row) are first fitted as estimates on one output row in 8 of each large layer: errors of those
rows, bytes of the whole weight. The probe is fitted whole, and its whole fit rescales its family's
estimates in the layer. svd's candidates (`screened_by_rank`) are first the errors of the truncated
SVD of their rank, from the layer's spectrum (`metrics.spectrum`; no factors and no fits: a quarter
of the time of its SVD and fits on a 4096x11008 layer). A second pass fits whole only the
estimates near the knapsack's pick on the layer's (bytes, cost) front; the others leave the pool.
Layers too small to gain, grouped convolutions and gathered tables are fitted whole from the start, as
is everything under a plan target.

With a deployment target (`Config.plan_for`, "onnx" or "tvm") a candidate enters the pool only if that
target runs it in a compressed form, and it costs its run-time weight bytes instead of its stored bytes
(`methods/targets.py` asks the methods' codegen hooks); the others are counted per layer as
"off target". The budget then bounds the bytes the deployed model holds for these weights.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.frontend.layers import LayerSpec
from riem_compiler.heap import release_freed_heap
from riem_compiler import methods
from riem_compiler.methods.base import RankEstimate
from riem_compiler.methods.dense import fit_dense
from riem_compiler.methods.rtn import LADDER as RTN_LADDER
from riem_compiler.passes.candidate_store import CandidateStore, in_memory
from riem_compiler.metrics import relative_error

log = logging.getLogger("riem_compiler.auto")

PROXIES = ("size_weighted", "energy", "uniform")
# single-method plans measured end to end beside the knapsack's (those predicted best)
MEASURED_SINGLES = 3
# screening's second pass (_worth_fitting_whole) fits whole the estimates near the knapsack's pick
# on each layer's (bytes, cost) front and within SCREEN_MARGIN of that front
SCREEN_MARGIN = 0.1
# ... then again around the layers' picks that are still estimates, until the knapsack picks none
# (a plan of whole fits that is optimal among the estimates too); a bound on the rounds, not a time
# cap: estimates left after it leave the pool as always
SCREEN_ROUNDS = 4

# (weight, ratio) -> a fitted RieM CompressedWeight, or None when that ratio cannot hold one
RiemFit = Callable[[np.ndarray, float], "CompressedWeight | None"]
# (spec, budget_ratio) -> candidate CompressedWeights for that layer
CandidateSource = Callable[[LayerSpec, float], list[CompressedWeight]]


def family(cw: CompressedWeight) -> str:
    """Method plus the setting that defines a "single method" (svd8 and svd16 are different)."""
    return methods.get(cw.method).family(cw)


def label(cw: CompressedWeight) -> str:
    """Short human name of a candidate, e.g. rtn4/g128, svd8 r93, tucker2 r(18,9), riem8 q12 m16."""
    return methods.get(cw.method).label(cw)


@dataclass
class CandidateGrid:
    """The default candidate source: every registered method adds its candidates (in registry
    order) with its options below; `options` holds those of methods without a field here. The
    budget ratio itself is added to every ratio list, so each single method at the global ratio
    is one of the candidates."""

    rtn: tuple = RTN_LADDER
    rtn_group_size: int = 128
    svd_ratios: tuple = (0.5, 0.25, 0.125, 0.0625)
    svd_factor_bits: tuple = (16, 8)
    tucker_ratios: tuple = (0.5, 0.25, 0.125, 0.0625)
    riem_ratios: tuple = (0.25, 0.125, 0.0625)
    riem_fit: RiemFit | None = None  # None: no RieM candidates (fitting takes seconds per layer)
    dense: tuple = ("float16", "float32")
    options: dict = field(default_factory=dict)  # method name -> its candidate options
    # screening (choose_methods_detailed): the screened_on_rows methods' candidates are fitted on one
    # output row in `screen_rows` (at least screen_min_weights weights) first, and whole only where
    # they can matter to the plan; 1: every candidate is fitted whole
    screen_rows: int = 8
    screen_min_weights: int = 16384

    def method_options(self) -> dict[str, dict]:
        return {"dense": {"dtypes": self.dense}, "rtn": {"ladder": self.rtn, "group_size": self.rtn_group_size},
                "svd": {"ratios": self.svd_ratios, "factor_bits": self.svd_factor_bits},
                "tucker2": {"ratios": self.tucker_ratios}, "riem": {"ratios": self.riem_ratios, "fit": self.riem_fit},
                **self.options}

    def __call__(self, spec: LayerSpec, budget_ratio: float, rows: np.ndarray | None = None,
                 only: set[str] | None = None) -> "CandidateList":
        """The layer's candidates. rows (screening's first pass): the screened_on_rows methods fit
        their candidates on these output rows only (those of the rows' shape are estimates), and the
        screened_by_rank methods give `RankEstimate`s instead of fits. only: just the screened methods'
        candidates of these labels, fitted whole."""
        out = CandidateList()
        out.only = only
        options = self.method_options()
        # each fit is attempted on its own: one that raises is dropped (and counted), not the layer
        for method in methods.all_methods():
            if only is not None and not (method.screened_on_rows or method.screened_by_rank):
                continue
            opts = options.get(method.name, {})
            if rows is not None and method.screened_on_rows:
                opts = {**opts, "rows": rows}
            elif rows is not None and method.screened_by_rank:
                opts = {**opts, "rank_estimates": True}
            t0 = time.perf_counter()
            method.candidates(spec, budget_ratio, opts, out.attempt)
            out.seconds[method.name] = out.seconds.get(method.name, 0.0) + time.perf_counter() - t0
        out.only = None
        return out

    def screen_subset(self, spec: LayerSpec) -> np.ndarray | None:
        """The output rows this layer's screening fits use (evenly spread), or None where it is fitted
        whole: too small to gain, grouped (its moments are per group) or a gathered table."""
        if self.screen_rows <= 1 or spec.groups != 1 or spec.kind == "embedding":
            return None
        n = spec.weight.shape[spec.output_axis]
        k = max(math.ceil(n / self.screen_rows), math.ceil(self.screen_min_weights / (spec.weight.size // n)))
        return None if 2 * k > n else np.linspace(0, n - 1, k).round().astype(np.int64)


class CandidateList(list):
    """A layer's candidates, plus `dropped`: how many candidate fits raised and were left out, and
    `seconds`: the fit time per method."""

    dropped: int = 0

    def __init__(self, *args):
        super().__init__(*args)
        self.seconds: dict[str, float] = {}
        self.only: set[str] | None = None  # attempt only these labels

    def attempt(self, layer: str, what: str, fit: Callable, *args, keep: bool = True, **kwargs):
        """fit(*args, **kwargs), appended when keep and not None; on any Exception the candidate
        is dropped with a debug log and counted, and None is returned. With `only`, a label not
        in it is not fitted."""
        if self.only is not None and what not in self.only:
            return None
        try:
            result = fit(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one failing candidate must never sink the run
            self.dropped += 1
            log.debug("%s: candidate %s dropped: %s: %s", layer, what, type(exc).__name__, exc)
            return None
        if keep and result is not None:
            self.append(result)
        return result


@dataclass
class Candidate:
    weight: CompressedWeight | None = field(repr=False)  # None: freed, no plan can pick it
    label: str
    family: str
    nbytes: int
    rel_error: float
    cost: float = math.nan  # what the planner minimises: proxy weight * rel_error**2, or predicted output error
    layer_error: float | None = None  # E||(W - W_hat) x||^2 on the sensitivity's moments (None: not measured)
    runs_as: str = ""  # with a plan target: how that target runs it (methods/targets.py)
    estimated: bool = False  # screened: errors from a fit on a subset of the rows, weight None, whole bytes


@dataclass
class Choice:
    """The pick for one layer and why."""

    name: str
    method: str
    label: str
    settings: dict
    nbytes: int
    fp32_bytes: int
    rel_error: float
    proxy: float  # this layer's term of the planner's objective (its candidate's cost)
    reason: str
    weight: CompressedWeight = field(repr=False)
    candidates: list[Candidate] = field(default_factory=list, repr=False)
    dropped: int = 0  # candidates left out: their fit raised or their error is not finite
    over_ceiling: int = 0  # candidates left out: relative error above error_ceiling
    seconds: float = 0.0  # candidate fits and scoring, plus this layer's sensitivity probe
    off_target: int = 0  # candidates left out: the plan's target does not run them compressed
    runs_as: str = ""  # with a plan target: how it runs there (MatMulNBits, DequantizeLinear, fused, ...)
    screened: int = 0  # candidates screened out: estimated on a subset of the rows, not fitted whole

    @property
    def ratio(self) -> float:
        return self.nbytes / self.fp32_bytes

    def to_dict(self) -> dict:
        return {
            "name": self.name, "method": self.method, "label": self.label, "settings": self.settings,
            "nbytes": self.nbytes, "fp32_bytes": self.fp32_bytes, "ratio": self.ratio,
            "rel_error": self.rel_error, "proxy": self.proxy, "reason": self.reason,
            "candidates": [{"label": c.label, "nbytes": c.nbytes, "rel_error": c.rel_error, "cost": c.cost}
                           for c in self.candidates],
            "dropped": self.dropped, "over_ceiling": self.over_ceiling, "screened": self.screened,
            "seconds": round(self.seconds, 4),
            **({"off_target": self.off_target, "runs_as": self.runs_as} if self.runs_as else {}),
        }


@dataclass
class AutoResult:
    choices: list[Choice]
    budget_bytes: int
    fp32_bytes: int
    proxy: float
    source: str  # "knapsack" or "single method <family>"
    single_method: dict[str, dict] = field(default_factory=dict)  # family -> {proxy, nbytes[, measured]}
    objective: str = "size_weighted"  # the proxy's name, or "output" (predicted output error)
    measured: dict[str, float] = field(default_factory=dict)  # plan -> held-out output error (with sensitivity)
    sensitivity: dict = field(default_factory=dict)  # TorchSensitivity.summary()
    seconds: float = 0.0
    # where the seconds went: "candidates" (method -> fit seconds summed over layers), "scoring",
    # "candidate_jobs_wall", "probes" (sensitivity gains), "planning", "measurement" (plans end to end)
    timing: dict = field(default_factory=dict)
    plan_for: str | None = None  # the deployment target planned for (Config.plan_for); bytes are then run-time bytes
    held_on_disk: int = 0  # bytes of held candidates' arrays written to files while planning (candidate_store.py)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.choices)

    @property
    def dropped(self) -> int:
        """Candidates left out over all layers (fit raised or non-finite error)."""
        return sum(c.dropped for c in self.choices)

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "fp32_bytes": self.fp32_bytes, "nbytes": self.nbytes,
                "plan_for": self.plan_for,
                "objective": self.objective, "proxy": self.proxy, "source": self.source,
                "single_method": self.single_method, "measured": self.measured, "sensitivity": self.sensitivity,
                "seconds": round(self.seconds, 3), "timing": self.timing, "dropped": self.dropped,
                "held_on_disk_bytes": self.held_on_disk,
                "choices": [c.to_dict() for c in self.choices]}

    def table(self) -> str:
        return format_choices(self.choices, self)


def default_grid(config, cache=None) -> CandidateGrid:
    """auto's default candidates: the grid; with config.auto_riem also RieM fitted at config.ratio / 2
    (and the budget), sized and fitted as method="riem" would with the config's settings, through
    the fit cache when one is given."""
    if not config.auto_riem:
        return CandidateGrid()
    riem = methods.get("riem")
    fitter = riem.candidate_fitter(riem.settings(config))
    if cache is not None:
        from riem_compiler.fit_cache import cached_riem_fit

        fitter = cached_riem_fit(fitter, cache, config)
    return CandidateGrid(riem_fit=fitter, riem_ratios=(config.ratio / 2,))


def compress_auto(specs: list[LayerSpec], config, candidates: CandidateSource | None = None,
                  sensitivity=None, executor=None, plan: dict | None = None):
    """method="auto" inside the compression pass: (dict name -> CompressedWeight, LayerRecords).

    config.ratio is the budget over all given layers; candidates over config.error_ceiling are
    left out; candidate fits run on config's executor (or `executor`). `sensitivity` (a
    TorchSensitivity) makes the plan minimise predicted output error instead of weight error.
    `plan`, when given, receives the plan (AutoResult.to_dict, candidates and costs per layer).
    A layer whose best plan is "dense32" is kept as it is.
    """
    from riem_compiler.passes.executors import make_executor
    from riem_compiler.report import LayerRecord

    if candidates is None:
        candidates = default_grid(config)
    usable = [s for s in specs if np.all(np.isfinite(s.weight))]
    records: dict[str, LayerRecord] = {}
    for s in specs:
        if not np.all(np.isfinite(s.weight)):
            records[s.name] = LayerRecord(s.name, s.kind, s.shape, "auto", "skipped", s.fp32_bytes,
                                          s.fp32_bytes, reason="weight contains NaN or inf; left unchanged")
    compressed: dict[str, CompressedWeight] = {}
    if usable:
        plan_for = getattr(config, "plan_for", None)
        result = choose_methods_detailed(usable, config.ratio, candidates, progress=not config.quiet,
                                         sensitivity=sensitivity, executor=executor or make_executor(config),
                                         error_ceiling=config.error_ceiling, plan_for=plan_for)
        log.info("auto plan:\n%s", result.table())
        if plan is not None:
            plan.update(result.to_dict())
        for spec, c in zip(usable, result.choices):
            kept = c.nbytes >= spec.fp32_bytes  # the float32 candidate (or worse): keep the layer as it is
            settings = dict(c.settings)
            if plan_for is not None:  # c.nbytes are run-time bytes; the artifact stores c.weight.nbytes (<=)
                settings.update(plan_for=plan_for, runs_as=c.runs_as, stored_bytes=int(c.weight.nbytes),
                                runtime_bytes=int(c.nbytes))
            record = LayerRecord(spec.name, spec.kind, spec.shape, c.method, "skipped" if kept else "compressed",
                                 spec.fp32_bytes, spec.fp32_bytes if kept else c.nbytes, rel_error=c.rel_error,
                                 fit_seconds=c.seconds, reason=f"auto: {c.label}: {c.reason}", settings=settings)
            if not kept:
                compressed[spec.name] = c.weight
            records[spec.name] = record
    return compressed, [records[s.name] for s in specs]


def proxy_weights(specs: list[LayerSpec], proxy: str) -> np.ndarray:
    """Per-layer weights w_l of the proxy sum w_l * rel_error_l**2 (they sum to 1)."""
    if proxy == "size_weighted":
        w = np.array([s.fp32_bytes for s in specs], dtype=np.float64)
    elif proxy == "energy":
        w = np.array([float(np.sum(np.asarray(s.weight, np.float64) ** 2)) for s in specs])
    elif proxy == "uniform":
        w = np.ones(len(specs))
    else:
        raise InputError(f"proxy must be one of {PROXIES}, got {proxy!r}")
    return w / max(w.sum(), 1e-300)


def choose_methods(
    specs: list[LayerSpec], budget_ratio: float, candidates: CandidateSource | None = None,
    proxy: str = "size_weighted", resolution: int = 4096,
) -> list[Choice]:
    """One Choice per spec (same order), total bytes <= budget_ratio * fp32 bytes of the specs."""
    return choose_methods_detailed(specs, budget_ratio, candidates, proxy, resolution).choices


def layer_candidates(spec: LayerSpec, source: CandidateSource, budget_ratio: float,
                     error_ceiling: float | None = None, moment_error=None, plan_for: str | None = None,
                     screen: bool = False, only: set[str] | None = None) -> tuple:
    """One layer's scored candidates (an executor job): (name, pool, dropped, over ceiling, seconds,
    timing: seconds per method's candidate fits and "scoring", off target). moment_error: the
    sensitivity's `MomentError` of this layer, scored from the same decode. plan_for: keep only
    the candidates that target runs compressed, at their run-time bytes (off target: the others).
    screen (a CandidateGrid source): the screened_on_rows methods' candidates are estimates from
    the layer's screening rows, except the probe, which is fitted whole. only: just these labels,
    fitted whole (a screened layer's second pass; no fallback is added)."""
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    rows = source.screen_subset(spec) if screen else None
    pool, dropped, off_target = _evaluate_candidates(spec, source, budget_ratio, moment_error, timing, plan_for,
                                                     rows, only)
    refitted: list[Candidate] = []
    while rows is not None:  # the probe is swapped into the model: it must be a whole fit
        probe = _probe(pool, spec, budget_ratio)
        if not probe.estimated:
            break
        whole, more, _ = _evaluate_candidates(spec, source, budget_ratio, moment_error, timing, plan_for,
                                              only={probe.label})
        dropped += more
        refitted += whole
        _calibrate_estimates(pool, probe, whole)
        pool = sorted([c for c in pool if c is not probe] + whole, key=lambda c: (c.nbytes, c.rel_error))
    over = 0
    if error_ceiling is not None:
        kept = [c for c in pool if c.rel_error <= error_ceiling]
        over = len(pool) - len(kept)
        pool = kept or ([] if only is not None else [_dense_candidate(spec)])
    if only is None:  # a second pass's fits are freed with the rest of the layer's pool (the caller's)
        # whole fits among estimates may yet be their family's single-method pick: kept
        _free_unpickable(pool, spec, budget_ratio, also_keep=refitted)
    _share_original(pool, spec)
    return spec.name, pool, dropped, over, time.perf_counter() - t0, timing, off_target


def _calibrate_estimates(pool: list[Candidate], estimate: Candidate, whole: list[Candidate]) -> None:
    """Scale the errors of `estimate`'s family's estimates in the pool by how far its own estimate
    was from its whole fit: a vq codebook learnt from a small sample makes every rung's estimate a
    few percent pessimistic (3-9% on MiniLM), rows coded on their own are unbiased (ratio ~1)."""
    fit = next((c for c in whole if c.label == estimate.label), None)
    if fit is None or not estimate.rel_error > 0:
        return
    rel = fit.rel_error / estimate.rel_error
    layer = fit.layer_error / estimate.layer_error if fit.layer_error is not None and estimate.layer_error else None
    for c in pool:
        if c.estimated and c.family == estimate.family:
            c.rel_error *= rel
            if layer is not None and c.layer_error is not None:
                c.layer_error *= layer


def _share_original(pool: list[Candidate], spec: LayerSpec) -> None:
    """Make the float32 candidate hold the layer's own weight instead of a copy: once scored it is
    only ever "keep the layer as it is" (never swapped in, measured or written), and a copy per
    layer held the whole model once more for the run (called again where a remote job's pool
    arrives, whose copy came back with it)."""
    for c in pool:
        if c.family == "dense32" and c.weight is not None:
            c.weight = CompressedWeight(c.weight.method, c.weight.shape, dict(c.weight.meta),
                                        {"weight": np.asarray(spec.weight, np.float32)})


def _free_unpickable(pool: list[Candidate], spec: LayerSpec, budget_ratio: float, also_keep=()) -> None:
    """Drop the encoded arrays (weight None) of the candidates no plan can pick, so that a run
    holds each layer's few useful candidates, not all ~40 (peak RSS was 20x the fp32 weights).

    A candidate's cost is a per-layer gain >= 0 times its weight error squared or its layer error,
    so one that an earlier candidate of the pool (sorted by bytes, then error) matches or beats on
    bytes, weight error and layer error never costs less, and the knapsack (strict improvement,
    earlier candidate on ties) never picks it. Kept besides: the probe, each family's single-method
    pick, and `also_keep`. The freed ones stay in the pool for the report (label, bytes, errors)."""
    if not pool:
        return
    keep = {id(_probe(pool, spec, budget_ratio)), *map(id, also_keep)}
    for fam in {c.family for c in pool}:
        j = _single_method_pick(pool, spec, fam, budget_ratio)
        if j is not None:
            keep.add(id(pool[j]))

    def no_worse(d: Candidate, c: Candidate) -> bool:  # an estimate may yet be dropped: it frees nothing
        layer = (d.layer_error is not None and c.layer_error is not None and d.layer_error <= c.layer_error) \
            or (d.layer_error is None and c.layer_error is None)
        return not d.estimated and d.nbytes <= c.nbytes and d.rel_error <= c.rel_error and layer

    for j, c in enumerate(pool):
        if id(c) not in keep and any(no_worse(d, c) for d in pool[:j]):
            c.weight = None


def _free_over_budget(pools: list[list[Candidate]], budget: int) -> None:
    """Drop the encoded arrays of the candidates that no plan within `budget` bytes can hold: their
    bytes plus the fewest bytes of every other layer exceed it (e.g. a large layer's float16 copy
    at 1/8, kept by the layer's job as the front's most accurate point). A plan within the budget,
    single-method ones included, passes that test in every layer, so no plan changes; the freed
    candidates stay in the pools for the report. The float32 candidate holds the layer's own weight
    (_share_original): nothing to free."""
    least = [min((c.nbytes for c in pool), default=0) for pool in pools]
    floor = sum(least)
    for pool, own in zip(pools, least):
        for c in pool:
            if c.weight is not None and c.family != "dense32" and floor - own + c.nbytes > budget:
                c.weight = None


def choose_methods_detailed(
    specs: list[LayerSpec], budget_ratio: float, candidates: CandidateSource | None = None,
    proxy: str = "size_weighted", resolution: int = 4096, progress: bool = False,
    sensitivity=None, executor=None, error_ceiling: float | None = None, plan_for: str | None = None,
) -> AutoResult:
    """`choose_methods` plus the plan's totals and every single-method plan's score.

    sensitivity: a TorchSensitivity; candidates then cost their predicted output error, and the
    plans compared are also measured end to end on held-out inputs (reported, not deciding).
    executor: runs the per-layer candidate fits (default in-process). error_ceiling: candidates
    with a larger relative weight error are left out (dense float32 stays as the fallback).
    plan_for: a deployment target (config.PLAN_TARGETS): only candidates it runs compressed, costed at
    their run-time bytes (methods/targets.py); None: every candidate at its stored bytes."""
    store = CandidateStore()  # the held candidates' arrays, in files until the plan is made
    try:
        return _choose_methods_detailed(specs, budget_ratio, candidates, proxy, resolution, progress, sensitivity,
                                        executor, error_ceiling, plan_for, store)
    finally:
        store.close()


def _choose_methods_detailed(specs, budget_ratio, candidates, proxy, resolution, progress, sensitivity, executor,
                             error_ceiling, plan_for, store: CandidateStore) -> AutoResult:
    from riem_compiler.passes.executors import LocalExecutor

    if not specs:
        raise InputError("choose_methods needs at least one layer")
    if not budget_ratio > 0:
        raise InputError(f"budget_ratio must be > 0 (a fraction of fp32 bytes), got {budget_ratio}")
    t0 = time.perf_counter()
    source = candidates if candidates is not None else CandidateGrid()
    weights = proxy_weights(specs, proxy)
    total_fp32 = sum(s.fp32_bytes for s in specs)
    budget = int(math.floor(budget_ratio * total_fp32))

    found: dict[str, tuple] = {}
    bar = tqdm(total=sum(s.weight.size for s in specs), unit="w", unit_scale=True,
               desc="auto: candidates", disable=not progress, leave=False)
    sizes = {s.name: s.weight.size for s in specs}
    if plan_for is not None:
        from riem_compiler.methods.targets import PLAN_TARGETS

        if plan_for not in PLAN_TARGETS:
            raise InputError(f"plan_for must be one of {PLAN_TARGETS} or None; got {plan_for!r}")
    # largest layers first, so that no big fit starts last and runs alone (results do not depend on the order)
    order = sorted(specs, key=lambda s: -s.weight.size)
    by_name = {s.name: s for s in specs}
    errors_of = {s.name: sensitivity.moment_error(s) if sensitivity else None for s in specs}
    screen = isinstance(source, CandidateGrid) and plan_for is None and any(source.screen_subset(s) is not None
                                                                             for s in specs)
    jobs = [(spec, source, budget_ratio, error_ceiling, errors_of[spec.name], plan_for, screen) for spec in order]
    timing = {"candidates": {}, "scoring": 0.0}  # seconds summed over layers (over workers, not wall time)
    run = executor or LocalExecutor()

    def run_jobs(jobs, each):
        for name, pool, n_dropped, over, sec, layer_timing, n_off in run.map(layer_candidates, jobs):
            _share_original(pool, by_name[name])
            for c in pool:
                if c.weight is not None and c.family != "dense32":  # dense32 holds the layer's own weight
                    c.weight = store.hold(c.weight)
            timing["scoring"] += layer_timing.pop("scoring", 0.0)
            for method_name, x in layer_timing.items():
                timing["candidates"][method_name] = timing["candidates"].get(method_name, 0.0) + x
            each(name, pool, n_dropped, over, sec, n_off)

    def first_pass(name, pool, n_dropped, over, sec, n_off):
        found[name] = (pool, n_dropped, over, sec, n_off)
        bar.set_postfix_str(name, refresh=False)
        bar.update(sizes[name])
        log.debug("%s: %d candidates (%d dropped, %d over the error ceiling)", name, len(pool), n_dropped, over)

    t_jobs = time.perf_counter()
    run_jobs(jobs, first_pass)
    bar.close()
    release_freed_heap()  # the jobs' temporaries (per phase, not per job: heap.py)
    timing["candidate_jobs_wall"] = time.perf_counter() - t_jobs
    pools = [found[s.name][0] for s in specs]
    dropped = [found[s.name][1] for s in specs]
    over_ceiling = [found[s.name][2] for s in specs]
    seconds = [found[s.name][3] for s in specs]
    off_target = [found[s.name][4] for s in specs]

    def set_costs(i: int, pool: list[Candidate]) -> None:
        for c in pool:
            c.cost = float(weights[i] * c.rel_error ** 2) if sensitivity is None else \
                float(sensitivity.cost(specs[i], c.weight, c.rel_error, c.layer_error))

    t_probes = time.perf_counter()
    # a probe runs the whole model once per layer (a minute or more on an ImageNet CNN)
    probe_bar = tqdm(total=len(specs), unit="layer", desc="auto: sensitivity probes",
                     disable=not progress or sensitivity is None, leave=False)
    for i, (spec, pool) in enumerate(zip(specs, pools)):
        if sensitivity is not None:
            probe = _probe(pool, spec, budget_ratio)
            info = sensitivity.calibrate(spec, probe.weight, probe.label, probe.layer_error)
            seconds[i] += info.seconds
            probe_bar.update()
        set_costs(i, pool)
    probe_bar.close()
    timing["probes"] = time.perf_counter() - t_probes
    _free_over_budget(pools, budget)

    screened = [0] * len(specs)  # estimates not fitted whole
    if screen:  # fit whole the estimates near what the knapsack picks, until it picks near none
        t_refit = time.perf_counter()
        index = {s.name: i for i, s in enumerate(specs)}
        whole_fits = rounds = 0

        def second_pass(name, whole, n_dropped, over, sec, n_off):
            i = index[name]
            set_costs(i, whole)
            fitted = {c.label for c in whole} | wanted[name]
            pools[i] = sorted([c for c in pools[i] if not (c.estimated and c.label in fitted)] + whole,
                              key=lambda c: (c.nbytes, c.rel_error))
            dropped[i] += n_dropped
            over_ceiling[i] += over
            seconds[i] += sec

        refit_bar = tqdm(unit="layer", desc="auto: whole fits", disable=not progress, leave=False)
        while rounds < SCREEN_ROUNDS:
            wanted = _worth_fitting_whole(pools, specs, budget, resolution, every_layer=rounds == 0)
            refits = [(spec, source, budget_ratio, error_ceiling, errors_of[spec.name], plan_for, False,
                       wanted[spec.name]) for spec in order if wanted[spec.name]]
            if not refits:
                break
            rounds += 1
            whole_fits += sum(len(w) for w in wanted.values())
            refit_bar.total = (refit_bar.total or 0) + len(refits)
            run_jobs(refits, lambda *result: (second_pass(*result), refit_bar.update()))
        refit_bar.close()
        release_freed_heap()
        for i, spec in enumerate(specs):
            screened[i] = sum(c.estimated for c in pools[i])
            pools[i] = [c for c in pools[i] if not c.estimated]
            _free_unpickable(pools[i], spec, budget_ratio)
        _free_over_budget(pools, budget)
        timing["screening"] = {"whole_fits": whole_fits, "rounds": rounds, "left_out": sum(screened),
                               "whole_fits_wall": round(time.perf_counter() - t_refit, 3)}
    if sum(dropped):
        log.info("auto: %d candidate(s) dropped in %d layer(s) (fit raised or non-finite error)",
                 sum(dropped), sum(1 for n in dropped if n))
    if sum(over_ceiling):
        log.info("auto: %d candidate(s) above error_ceiling %g left out", sum(over_ceiling), error_ceiling)

    t_plan = time.perf_counter()
    plan = _knapsack(pools, budget, resolution)
    plans = {"knapsack": plan} if plan is not None else {}
    singles: dict[str, dict] = {}
    for fam in sorted({c.family for pool in pools for c in pool}):
        single = _single_method_plan(pools, specs, fam, budget_ratio)
        if single is None:
            continue
        nbytes = sum(pools[i][j].nbytes for i, j in enumerate(single))
        singles[fam] = {"proxy": _cost(pools, single), "nbytes": nbytes}
        if nbytes <= budget:
            plans[f"single method {fam}"] = single
    if not plans:
        cheapest = sum(pool[0].nbytes for pool in pools)
        which = (f"the cheapest candidates {plan_for} runs compressed need {cheapest} run-time bytes "
                 f"(ratio {cheapest / total_fp32:.4f}); raise the ratio or plan for any target (plan_for=None)"
                 if plan_for is not None else f"the cheapest candidates need {cheapest} bytes; raise the ratio")
        raise InputError(f"budget {budget} bytes ({budget_ratio} of {total_fp32} fp32 bytes) is too small: {which}")
    timing["planning"] = time.perf_counter() - t_plan
    t_measure = time.perf_counter()
    measured: dict[str, float] = {}
    if sensitivity is not None:  # measured end to end on held-out synthetic inputs, for the report
        for key in _plans_to_measure(plans, pools):
            p = plans[key]
            measured[key] = sensitivity.plan_error({s.name: pools[i][p[i]].weight for i, s in enumerate(specs)
                                                    if pools[i][p[i]].nbytes < s.fp32_bytes})
            if key.startswith("single method "):
                singles[key[len("single method "):]]["measured"] = measured[key]
    timing["measurement"] = time.perf_counter() - t_measure
    plan_source = min(plans, key=lambda k: (_cost(pools, plans[k]), k != "knapsack"))  # knapsack wins ties
    plan = plans[plan_source]
    best_cost = _cost(pools, plan)

    choices = []
    for i, (spec, pool) in enumerate(zip(specs, pools)):
        c = pool[plan[i]]
        c.weight = in_memory(c.weight)  # the pick outlives the store's files
        notes = [f"{dropped[i]} candidate(s) dropped (fit failed or non-finite error)"] if dropped[i] else []
        if over_ceiling[i]:
            notes.append(f"{over_ceiling[i]} candidate(s) above error_ceiling {error_ceiling:g} left out")
        if screened[i]:
            notes.append(f"{screened[i]} candidate(s) screened out on a subset of the rows, not fitted whole")
        # scored with the candidate; the dense float32 fallback (_dense_candidate) runs as the original
        runs_as = (c.runs_as or "dense float32") if plan_for is not None else ""
        if plan_for is not None:
            notes.append(f"{plan_for}: runs as {runs_as}, {c.nbytes} run-time bytes"
                         + (f"; {off_target[i]} candidate(s) it does not run compressed left out" if off_target[i] else ""))
        choices.append(Choice(
            name=spec.name, method=c.weight.method, label=c.label, settings=dict(c.weight.meta),
            nbytes=c.nbytes, fp32_bytes=spec.fp32_bytes, rel_error=c.rel_error, proxy=c.cost,
            reason="; ".join([_reason(pool, c, plan_source, sensitivity is not None), *notes]),
            weight=c.weight, candidates=pool, dropped=dropped[i], over_ceiling=over_ceiling[i],
            seconds=seconds[i], off_target=off_target[i], runs_as=runs_as, screened=screened[i]))
    result = AutoResult(choices, budget, total_fp32, best_cost, plan_source, singles,
                        objective="output" if sensitivity is not None else proxy, measured=measured,
                        sensitivity=sensitivity.summary() if sensitivity is not None else {},
                        seconds=time.perf_counter() - t0,
                        timing={k: (round(v, 3) if isinstance(v, float) else {m: round(x, 3) for m, x in v.items()})
                                for k, v in timing.items()}, plan_for=plan_for, held_on_disk=store.spilled_bytes)
    log.info("auto: %d layers, %d / %d %sbytes (budget %d), %s %.4g via %s%s", len(specs), result.nbytes,
             total_fp32, f"{plan_for} run-time " if plan_for else "", budget, result.objective, best_cost, plan_source,
             f", measured output error {measured[plan_source]:.4g}" if measured else "")
    return result


def _probe(pool: list[Candidate], spec: LayerSpec, budget_ratio: float) -> Candidate:
    """The candidate whose measured output error calibrates the layer's gain: the most accurate
    compressed one within the layer's share of the budget (else the cheapest), never an exact one."""
    inexact = [c for c in pool if c.rel_error > 0 and c.family not in ("dense32",)] or pool
    within = [c for c in inexact if c.nbytes <= budget_ratio * spec.fp32_bytes]
    if within:
        return min(within, key=lambda c: (c.rel_error, c.nbytes))
    return min(inexact, key=lambda c: (c.nbytes, c.rel_error))


def _dense_candidate(spec: LayerSpec) -> Candidate:
    dense = fit_dense(spec.weight, "float32")
    return Candidate(dense, label(dense), family(dense), dense.nbytes, methods.relative_error(spec.weight, dense))


def _add_fit_seconds(timing: dict | None, cands) -> None:
    """Add a CandidateList's fit seconds per method into `timing` (a plain list has none)."""
    if timing is not None:
        for key, sec in getattr(cands, "seconds", {}).items():
            timing[key] = timing.get(key, 0.0) + sec


def _difference(weight: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """weight - decoded in float32, in decoded's memory where it may be written (it is not used after):
    one layer-sized array less per candidate job, the same bits."""
    diff = decoded.reshape(weight.shape)
    if diff.dtype != np.float32 or not diff.flags.writeable or np.may_share_memory(diff, weight):
        return np.asarray(weight, np.float32) - diff
    return np.subtract(np.asarray(weight, np.float32), diff, out=diff)


def _evaluate_candidates(spec: LayerSpec, source: CandidateSource, budget_ratio: float,
                         moment_error=None, timing: dict | None = None, plan_for: str | None = None,
                         rows: np.ndarray | None = None,
                         only: set[str] | None = None) -> tuple[list[Candidate], int, int]:
    """(the layer's scored candidates sorted by (bytes, error), how many were dropped, how many
    `plan_for` does not run compressed and were left out before scoring).

    With plan_for a candidate's bytes are its run-time bytes on that target (methods/targets.py).

    Each candidate is decoded once, for its relative error and (with moment_error) its layer error.
    rows / only: passed to a CandidateGrid source. A candidate fitted on the screening `rows` is an
    estimate: its errors are those of the rows (the layer error scaled up to all of them), its
    bytes those of its settings on the whole weight, and it keeps no weight. So is a `RankEstimate`:
    the errors of the truncated SVD of its rank (the layer error's from moment_error.truncation_errors),
    or, where those cannot be had, its whole fit.

    A candidate is dropped, with a debug log, when the source could not fit it (CandidateGrid
    counts those), when scoring it raises, or when its error is not finite (e.g. float16
    factors of a huge weight overflow). A source that raises as a whole leaves the layer only
    the dense float32 fallback, which is also added whenever nothing else is left (not with `only`)."""
    try:
        cands = source(spec, budget_ratio) if rows is None and only is None else \
            source(spec, budget_ratio, rows=rows, only=only)
        n_dropped = int(getattr(cands, "dropped", 0))
    except Exception as exc:  # noqa: BLE001 - one layer's candidates must never sink the run
        log.warning("%s: candidate source failed (%s: %s); only dense float32 is left",
                    spec.name, type(exc).__name__, exc)
        cands, n_dropped = [], 1
    _add_fit_seconds(timing, cands)
    t_score = time.perf_counter()
    if rows is not None:
        subset = np.take(spec.weight, rows, axis=spec.output_axis)
        scale_up = spec.weight.shape[spec.output_axis] / len(rows)
        subset_error = moment_error.for_rows(rows) if moment_error is not None else None
    pool = []
    off_target = 0
    truncated = {}  # id(spectrum) -> the layer error of the truncated SVD per rank
    queue, refit = list(cands), set()  # refit: labels of estimates to fit whole instead, after the rest
    while queue or refit:
        if not queue:
            more = source(spec, budget_ratio, only=refit)
            n_dropped += int(getattr(more, "dropped", 0))
            _add_fit_seconds(timing, more)
            queue, refit = list(more), set()
            continue
        cw = queue.pop(0)
        if isinstance(cw, RankEstimate):
            try:
                layer = None
                if moment_error is not None:
                    if id(cw.spectrum) not in truncated:
                        truncated[id(cw.spectrum)] = moment_error.truncation_errors(spec.weight, cw.spectrum)
                    layer = float(truncated[id(cw.spectrum)][cw.rank])
                rel = cw.spectrum.relative_error(cw.rank)
            except Exception as exc:  # noqa: BLE001 - not estimated (e.g. folded input scales): fitted whole
                log.debug("%s: candidate %s fitted whole: its estimate raised %s: %s", spec.name, cw.label,
                          type(exc).__name__, exc)
                refit.add(cw.label)
                continue
            pool.append(Candidate(None, cw.label, cw.family, cw.nbytes, rel, layer_error=layer, estimated=True))
            continue
        is_estimate = rows is not None and tuple(cw.shape) == subset.shape
        weight = subset if is_estimate else spec.weight
        if tuple(cw.shape) != tuple(weight.shape):
            raise InputError(f"candidate {cw.method} for {spec.name} has shape {cw.shape}, "
                             f"expected {tuple(weight.shape)}")
        nbytes, runs_as = cw.nbytes, ""
        if is_estimate:
            nbytes = methods.get(cw.method).nbytes_for_shape(cw, spec.shape)
        elif plan_for is not None:
            from riem_compiler.methods.targets import runtime

            got = runtime(spec, cw, plan_for)
            if isinstance(got, str):
                off_target += 1
                log.debug("%s: candidate %s left out for %s: %s", spec.name, label(cw), plan_for, got)
                continue
            nbytes, runs_as = got
        try:
            decoded = methods.decode(cw)
            err = relative_error(weight, decoded)
            cand = Candidate(None if is_estimate else cw, label(cw), family(cw), nbytes, err, runs_as=runs_as,
                             estimated=is_estimate)
            error_of = subset_error if is_estimate else moment_error
            if error_of is not None and math.isfinite(err):
                cand.layer_error = error_of(_difference(weight, decoded))
                cand.layer_error *= scale_up if is_estimate else 1.0
            del decoded
        except Exception as exc:  # noqa: BLE001
            n_dropped += 1
            log.debug("%s: candidate %s dropped: scoring it raised %s: %s", spec.name, cw.method,
                      type(exc).__name__, exc)
            continue
        if not math.isfinite(err):
            n_dropped += 1
            log.debug("%s: candidate %s dropped: non-finite error %s", spec.name, cand.label, err)
            continue
        pool.append(cand)
    if not pool and only is None:
        pool.append(_dense_candidate(spec))
    pool.sort(key=lambda c: (c.nbytes, c.rel_error))
    if timing is not None:
        timing["scoring"] = timing.get("scoring", 0.0) + time.perf_counter() - t_score
    return pool, n_dropped, off_target


def _plans_to_measure(plans: dict, pools) -> list[str]:
    """The plans measured end to end for the report: the knapsack's and the MEASURED_SINGLES
    single-method plans with the lowest predicted cost (each measurement is a pass over the
    held-out inputs: measuring all ~20 single-method plans took 34 s of MiniLM's auto)."""
    singles = sorted((k for k in plans if k != "knapsack"), key=lambda k: (_cost(pools, plans[k]), k))
    return [k for k in plans if k == "knapsack"] + singles[:MEASURED_SINGLES]


def _cost(pools, plan) -> float:
    return float(sum(pools[i][j].cost for i, j in enumerate(plan)))


def _knapsack(pools: list[list[Candidate]], budget: int, resolution: int):
    """Multiple-choice knapsack over the candidates' costs by DP over bytes in units of
    budget/resolution (exact bytes when the budget is smaller), each candidate's bytes rounded UP
    to whole units so any plan it returns fits the byte budget exactly."""
    if budget <= 0:
        return None
    R = int(min(resolution, budget))
    inf = math.inf
    best = np.zeros(R + 1)  # best[b]: min cost of the layers so far within b units
    picks = np.zeros((len(pools), R + 1), dtype=np.int64)
    units_of = []
    for i, pool in enumerate(pools):
        units = [-(-c.nbytes * R // budget) for c in pool]  # ceil, exact integer arithmetic
        units_of.append(units)
        new = np.full(R + 1, inf)
        pick = np.full(R + 1, -1, dtype=np.int64)
        for j, (c, u) in enumerate(zip(pool, units)):
            if u > R:
                continue
            cand = np.full(R + 1, inf)
            cand[u:] = best[: R + 1 - u] + c.cost
            better = cand < new  # strict: pools are sorted by bytes, so ties keep the cheaper one
            new[better], pick[better] = cand[better], j
        best, picks[i] = new, pick
    if not np.isfinite(best[R]):
        return None
    plan, b = [0] * len(pools), R
    for i in range(len(pools) - 1, -1, -1):
        j = int(picks[i, b])
        plan[i] = j
        b -= units_of[i][j]
    return plan


def _front(pool: list[Candidate]) -> list[int]:
    """Indices of the pool's (bytes, cost) front: bytes ascending, each costing less than all before."""
    front, best = [], math.inf
    for j in sorted(range(len(pool)), key=lambda j: (pool[j].nbytes, pool[j].cost)):
        if pool[j].cost < best:
            front.append(j)
            best = pool[j].cost
    return front


def _worth_fitting_whole(pools: list[list[Candidate]], specs: list[LayerSpec], budget: int,
                         resolution: int, every_layer: bool = True) -> dict[str, set[str]]:
    """Per layer, the labels of the estimates a screened run fits whole: the knapsack's pick at the
    budget and the front points next to it on the layer's (bytes, cost) front, and, between those,
    every candidate within SCREEN_MARGIN of the front (an estimate is a few percent off).
    every_layer False: only in the layers where the knapsack picks an estimate.

    Measured on MiniLM at 1/8 and 1/16: 114-131 whole fits in 2-3 rounds instead of 970, and the
    plan of fitting every candidate whole, layer for layer."""
    plan = _knapsack(pools, budget, resolution) or []
    out = {}
    for spec, pool, j in zip(specs, pools, plan):
        if not (every_layer or pool[j].estimated):
            out[spec.name] = set()
            continue
        front = _front(pool)
        k = max((k for k, f in enumerate(front) if pool[f].nbytes <= pool[j].nbytes), default=0)
        near = front[max(k - 1, 0):k + 2]
        lo, hi = min(pool[f].nbytes for f in near), max(pool[f].nbytes for f in near)
        want = set(near)
        for i, c in enumerate(pool):
            if lo <= c.nbytes <= hi:
                best = min(pool[f].cost for f in front if pool[f].nbytes <= c.nbytes)
                if c.cost <= (1 + SCREEN_MARGIN) * best:
                    want.add(i)
        out[spec.name] = {pool[i].label for i in want if pool[i].estimated}
    for spec in specs[len(plan):]:  # no plan fits the budget: the caller reports it
        out[spec.name] = set()
    return out


def _single_method_pick(pool: list[Candidate], spec: LayerSpec, fam: str, budget_ratio: float) -> int | None:
    """Index of the layer's lowest-error candidate of `fam` within budget_ratio of its fp32 bytes."""
    fits = [j for j, c in enumerate(pool) if c.family == fam and c.nbytes <= budget_ratio * spec.fp32_bytes]
    return min(fits, key=lambda j: (pool[j].rel_error, pool[j].nbytes)) if fits else None


def _single_method_plan(pools, specs, fam: str, budget_ratio: float):
    """Each layer's `_single_method_pick` of `fam` (None when a layer has none)."""
    plan = [_single_method_pick(pool, spec, fam, budget_ratio) for spec, pool in zip(specs, pools)]
    return None if None in plan else plan


def _reason(pool: list[Candidate], c: Candidate, plan_source: str, predicted: bool = False) -> str:
    n = len(pool)
    what = "predicted output error" if predicted else "error"
    best = min(pool, key=lambda x: (x.cost, x.nbytes))
    head = f"{plan_source} beat the knapsack plan; " if plan_source != "knapsack" else ""
    if c.cost <= best.cost:
        return head + f"lowest {what} among {n} candidates"
    # the next better candidate and what it would have cost
    better = [x for x in pool if x.cost < c.cost]
    nxt = min(better, key=lambda x: x.nbytes)
    note = f"best {what} per byte among {n} candidates"
    note += f"; {nxt.label} ({_score(nxt, predicted)}) costs {nxt.nbytes - c.nbytes:+d} bytes"
    smaller = [x for x in pool if x.nbytes < c.nbytes]
    if smaller:
        cheaper = min(smaller, key=lambda x: x.cost)
        note += f"; the best smaller one, {cheaper.label}, has {_score(cheaper, predicted)}"
    return head + note


def _score(c: Candidate, predicted: bool) -> str:
    return f"rel {c.rel_error:.3g}, output {c.cost:.3g}" if predicted else f"rel {c.rel_error:.3g}"


def format_choices(choices: list[Choice], result: AutoResult | None = None) -> str:
    """A plain-text table of every choice and its reason, with totals."""
    rows = [("layer", "choice", "bytes", "ratio", "rel err", "why")]
    for c in choices:
        rows.append((c.name, c.label, str(c.nbytes), f"{c.ratio:.4f}", f"{c.rel_error:.4f}", c.reason))
    widths = [max(len(r[k]) for r in rows) for k in range(5)]
    lines = ["  ".join(r[k].ljust(widths[k]) for k in range(5)) + "  " + r[5] for r in rows]
    total, fp32 = sum(c.nbytes for c in choices), sum(c.fp32_bytes for c in choices)
    lines.append(f"total {total} bytes = {total / max(fp32, 1):.4f} of fp32 ({fp32} bytes)")
    if result is not None:
        if result.plan_for:
            lines.append(f"planned for {result.plan_for}: only candidates it runs compressed; bytes are run-time bytes")
        lines.append(f"budget {result.budget_bytes} bytes; {result.objective} {result.proxy:.4g} via {result.source}"
                     + (f" (measured output error {result.measured[result.source]:.4g})" if result.measured else ""))
        if "knapsack" in result.measured:
            lines.append(f"  knapsack plan: measured output error {result.measured['knapsack']:.4g}")
        for fam, s in sorted(result.single_method.items(), key=lambda kv: kv[1]["proxy"]):
            lines.append(f"  single method {fam}: {result.objective} {s['proxy']:.4g}, {s['nbytes']} bytes"
                         + (f", measured output error {s['measured']:.4g}" if "measured" in s else ""))
        if result.dropped:
            lines.append(f"{result.dropped} candidate(s) dropped (fit failed or non-finite error)")
    return "\n".join(lines)
