"""The compression pass proper: fit every detected layer with the configured method.

Frontend-agnostic: it takes `LayerSpec`s and returns `CompressedWeight`s keyed by weight name,
plus one `LayerRecord` per layer. A layer that cannot be compressed well (too small for the
ratio, non-finite weights or fit, error above the ceiling) stays dense and its record says why.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from tqdm.auto import tqdm

from riem_compiler import riem
from riem_compiler.compressed import CompressedWeight
from riem_compiler.config import Config
from riem_compiler.errors import InputError
from riem_compiler.frontend.layers import LayerSpec
from riem_compiler.passes.fit import FitSettings, fit_riem
from riem_compiler.report import LayerRecord

log = logging.getLogger("riem_compiler.compress")


def fit_settings(config: Config, seed_offset: int = 0) -> FitSettings:
    return FitSettings(steps=config.steps, time_budget_s=config.time_budget_s, lr=config.lr,
                       seed=config.seed + seed_offset, device=config.device)


def rel_error(weight: np.ndarray, cw: CompressedWeight) -> float:
    w = np.asarray(weight, dtype=np.float64)
    denom = np.linalg.norm(w)
    diff = np.linalg.norm(w - cw.reconstruct().astype(np.float64))
    return float(diff / denom) if denom > 0 else float(diff)


def fit_layer(spec: LayerSpec, config: Config, index: int = 0) -> tuple[CompressedWeight, float, dict]:
    """Fit one layer with config.method; returns (compressed, rel_error, settings shown in the report).

    Raises ValueError with a reason when the layer cannot be represented at this ratio.
    """
    n_out, n_in = spec.matrix_shape
    if config.method == "riem":
        size = riem.choose_size(n_out, n_in, config.ratio, config.state_bits, config.metric_dtype,
                                config.m, config.k_branches)
        if size is None:
            raise ValueError(f"too small: even q=1 needs more than {config.ratio:g} of its fp32 bytes")
        q, m = size
        res = fit_riem(spec.weight, q, m, config.state_bits, config.metric_dtype,
                       fit_settings(config, index), config.k_branches)
        return res.weight, res.rel_error, {"q": q, "m": m, "state_bits": config.state_bits, "steps": res.steps}
    from riem_compiler.passes import baselines  # registers their decoders

    if config.method not in ("svd", "rtn", "tucker2"):
        raise ValueError(f"method {config.method!r} is not a per-layer method")
    try:
        cw = baselines.fit_for_ratio(config.method, spec.weight, config.ratio, groups=spec.attrs.get("groups", 1))
    except InputError as exc:
        raise ValueError(str(exc)) from exc
    if cw.nbytes > config.ratio * spec.fp32_bytes:
        raise ValueError(f"{config.method} cannot meet ratio {config.ratio:g} for shape {spec.shape}")
    return cw, rel_error(spec.weight, cw), dict(cw.meta)


def compress_specs(specs: list[LayerSpec], config: Config) -> tuple[dict[str, CompressedWeight], list[LayerRecord]]:
    if config.method == "auto":
        from riem_compiler.passes.auto import compress_auto

        return compress_auto(specs, config)
    compressed: dict[str, CompressedWeight] = {}
    records: list[LayerRecord] = []
    total = sum(s.weight.size for s in specs)
    with tqdm(total=total, unit="w", unit_scale=True, desc=f"fitting {config.method}",
              disable=config.quiet or not specs, leave=False) as bar:
        for index, spec in enumerate(specs):
            bar.set_postfix_str(spec.name, refresh=False)
            record = LayerRecord(spec.name, spec.kind, spec.shape, config.method, "skipped",
                                 spec.fp32_bytes, spec.fp32_bytes)
            t0 = time.perf_counter()
            if not np.all(np.isfinite(spec.weight)):
                record.reason = "weight contains NaN or inf; left unchanged"
            else:
                try:
                    cw, err, settings = fit_layer(spec, config, index)
                except ValueError as exc:
                    record.reason = f"not compressed: {exc}"
                else:
                    record.fit_seconds = time.perf_counter() - t0
                    record.rel_error, record.settings = err, settings
                    if not np.isfinite(err):
                        record.reason = "fit produced non-finite values; left unchanged"
                    elif err > config.error_ceiling:
                        record.reason = f"rel. error {err:.3f} above error_ceiling {config.error_ceiling:g}; left unchanged"
                    else:
                        record.status, record.bytes_after = "compressed", cw.nbytes
                        compressed[spec.name] = cw
            if record.status != "compressed":
                log.warning("%s: %s", spec.name, record.reason)
            else:
                log.info("%s %s: rel. error %.4f, %d -> %d bytes, %.1f s", spec.name, spec.shape,
                         record.rel_error, record.bytes_before, record.bytes_after, record.fit_seconds)
            records.append(record)
            bar.update(spec.weight.size)
    return compressed, records
