"""The compression pass proper: fit every detected layer with the configured method.

Frontend-agnostic: it takes `LayerSpec`s and returns `CompressedWeight`s keyed by weight name,
plus one `LayerRecord` per layer. A layer that cannot be compressed well (too small for the
ratio, non-finite weights or fit, error above the ceiling) stays dense and its record says why.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from riem_compiler import methods
from riem_compiler.compressed import CompressedWeight
from riem_compiler.config import Config
from riem_compiler.frontend.layers import LayerSpec
from riem_compiler.report import LayerRecord

log = logging.getLogger("riem_compiler.compress")


def fit_layer(spec: LayerSpec, config: Config, index: int = 0) -> tuple[CompressedWeight, float, dict]:
    """Fit one layer with config.method; returns (compressed, rel_error, settings shown in the report).

    Raises ValueError with a reason when the layer cannot be represented at this ratio.
    """
    if config.method not in methods.SELECTABLE:
        raise ValueError(f"method {config.method!r} is not a per-layer method")
    method = methods.get(config.method)
    fitted = method.fit(spec, config.ratio, method.settings(config), index)
    return fitted.weight, fitted.rel_error, fitted.report


@dataclass
class FitOutcome:
    """What fitting one layer produced; `reason` is non-empty when the layer stays dense."""

    name: str
    weight: CompressedWeight | None
    rel_error: float | None
    settings: dict
    seconds: float
    reason: str = ""


def fit_job(spec: LayerSpec, config: Config, index: int) -> FitOutcome:
    """Fit one layer and judge the result. Pure function of its arguments: executors run it
    in-process or on remote workers."""
    t0 = time.perf_counter()
    if not np.all(np.isfinite(spec.weight)):
        return FitOutcome(spec.name, None, None, {}, 0.0, "weight contains NaN or inf; left unchanged")
    try:
        cw, err, settings = fit_layer(spec, config, index)
    except ValueError as exc:
        return FitOutcome(spec.name, None, None, {}, time.perf_counter() - t0, f"not compressed: {exc}")
    seconds = time.perf_counter() - t0
    if not np.isfinite(err):
        return FitOutcome(spec.name, None, err, settings, seconds, "fit produced non-finite values; left unchanged")
    if err > config.error_ceiling:
        return FitOutcome(spec.name, None, err, settings, seconds,
                          f"rel. error {err:.3f} above error_ceiling {config.error_ceiling:g}; left unchanged")
    return FitOutcome(spec.name, cw, err, settings, seconds)


def fit_failed(args: tuple, exc: BaseException) -> FitOutcome:
    """The outcome of a fit_job that raised (on a worker, after its retries): that layer
    alone stays dense and the report says why."""
    spec = args[0]
    return FitOutcome(spec.name, None, None, {}, 0.0, f"fit failed ({type(exc).__name__}: {exc}); left unchanged")


def compress_specs(specs: list[LayerSpec], config: Config, executor=None, sensitivity=None,
                   plan: dict | None = None) -> tuple[dict[str, CompressedWeight], list[LayerRecord]]:
    """Fit every spec (through `executor`, default in-process) and build the report records.
    method="auto": `sensitivity` (passes/sensitivity.py) and `plan` go to `compress_auto`."""
    from riem_compiler.fit_cache import open_cache

    cache = open_cache(config)
    if config.method == methods.PLANNER:
        from riem_compiler.passes.auto import compress_auto, default_grid

        return compress_auto(specs, config, default_grid(config, cache), sensitivity, executor, plan)
    from riem_compiler.passes.executors import make_executor

    executor = executor or make_executor(config)
    outcomes: dict[str, FitOutcome] = {}
    total = sum(s.weight.size for s in specs)
    sizes = {s.name: s.weight.size for s in specs}
    jobs, keys = _cache_lookup(specs, config, cache, outcomes)
    with tqdm(total=total, initial=sum(sizes[n] for n in outcomes), unit="w", unit_scale=True,
              desc=f"fitting {config.method}", disable=config.quiet or not specs, leave=False) as bar:
        for outcome in executor.map(fit_job, jobs, on_error=fit_failed):
            outcomes[outcome.name] = outcome
            if cache is not None and outcome.weight is not None and not outcome.settings.get("time_capped"):
                cache.put(keys[outcome.name], outcome.weight, outcome.rel_error, outcome.settings,
                          outcome.seconds, outcome.name)
            bar.set_postfix_str(outcome.name, refresh=False)
            bar.update(sizes[outcome.name])
    compressed: dict[str, CompressedWeight] = {}
    records: list[LayerRecord] = []
    for spec in specs:
        o = outcomes[spec.name]
        record = LayerRecord(spec.name, spec.kind, spec.shape, config.method, "skipped", spec.fp32_bytes,
                             spec.fp32_bytes, o.rel_error, o.seconds, o.reason, o.settings)
        if o.settings.get("time_capped"):
            record.reason = "; ".join(filter(None, [record.reason, f"time cap hit: {o.settings['steps']} of "
                                                    f"{o.settings['steps_planned']} steps"]))
        if o.weight is not None:
            record.status, record.bytes_after = "compressed", o.weight.nbytes
            compressed[spec.name] = o.weight
            log.info("%s %s: rel. error %.4f, %d -> %d bytes, %.1f s", spec.name, spec.shape,
                     o.rel_error, record.bytes_before, record.bytes_after, o.seconds)
        else:
            log.warning("%s: %s", spec.name, o.reason)
        records.append(record)
    return compressed, records


def _cache_lookup(specs, config, cache, outcomes: dict) -> tuple[list[tuple], dict[str, str]]:
    """Fill `outcomes` with cached fits; return the (spec, config, index) jobs still to run and
    each spec's cache key."""
    if cache is None:
        return [(spec, config, i) for i, spec in enumerate(specs)], {}
    from riem_compiler.fit_cache import layer_key

    jobs, keys = [], {}
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        keys[spec.name] = layer_key(spec, config, i)
        hit = cache.get(keys[spec.name])
        if hit is None:
            jobs.append((spec, config, i))
            continue
        outcomes[spec.name] = FitOutcome(spec.name, hit.weight, hit.rel_error, hit.settings,
                                         time.perf_counter() - t0, f"from fit cache (fitted in {hit.seconds:.1f} s)")
    if outcomes:
        log.info("fit cache %s: %d of %d layers found", cache.root, len(outcomes), len(specs))
    return jobs, keys
