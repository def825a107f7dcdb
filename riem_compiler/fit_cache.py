"""A disk cache of fitted layers, so an interrupted run resumes and a repeat run is fast.

One entry per fit: `<dir>/<key[:2]>/<key>.safetensors` (the stored arrays) and `<key>.json`
(method, shape, meta, error, settings, and the sha256 of the safetensors file). The key is the
sha256 of the weight's bytes, dtype and shape plus every option that changes the fit (method,
ratio, bit widths, steps, time budget, seed, device, threads, ...) and the package version, so a
hit is always the fit this run would have produced. A fit that a time budget cut short depends on
machine load and is not stored.

Entries are written through temporary files and renamed, arrays first and JSON last: a run
killed mid-write leaves no entry, never a half one. A damaged entry is reported and ignored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from riem_compiler import __version__
from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.files import atomic_write

log = logging.getLogger("riem_compiler.fit_cache")

CACHE_FORMAT = "riem-fit-cache"
# 2 (2026-12-07): RieM's faster step rounds differently, so fits cached by the old code are not reused
# 3 (2026-12-07): so does its sigmoid as e^a / (e^a + e^-b)
CACHE_VERSION = 3
# Config fields outside the methods' own settings that change a fit (or whether it is accepted)
FIT_FIELDS = ("method", "ratio", "error_ceiling", "threads")
TAG_NAME = "CACHEDIR.TAG"
TAG_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
            "# This directory is a riem_compiler fit cache (riem-compile --clear-cache empties it).\n")


def default_cache_dir() -> Path:
    """$RIEM_CACHE_DIR, else $XDG_CACHE_HOME/riem_compiler/fits, else ~/.cache/riem_compiler/fits."""
    if os.environ.get("RIEM_CACHE_DIR"):
        return Path(os.environ["RIEM_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "riem_compiler" / "fits"


def fit_fields(config) -> dict:
    """What decides a fit: FIT_FIELDS plus the hash of the settings of the method that fits
    (for auto: of every registered method, since auto asks them all for candidates)."""
    from riem_compiler import methods
    from riem_compiler.methods.base import settings_key

    names = list(methods.MODULES) if config.method == methods.PLANNER else [config.method]
    fields = {name: getattr(config, name) for name in FIT_FIELDS}
    fields["threads"] = fields["threads"] or 1  # None means 1 thread per fit job
    return {**fields,
            "settings": {n: settings_key(methods.get(n).settings(config)) for n in names}}


def fit_key(weight: np.ndarray, fields: dict) -> str:
    """sha256 over the cache format, package version, the fit options and the weight itself."""
    w = np.ascontiguousarray(weight)
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "riem_compiler": __version__,
                         "fields": fields, "dtype": str(w.dtype), "shape": list(w.shape)},
                        sort_keys=True, default=str).encode())
    h.update(w.tobytes())
    return h.hexdigest()


def layer_key(spec, config, index: int) -> str:
    """Key of one per-layer fit in `compress_specs` (the index offsets the seed)."""
    fields = {**fit_fields(config), "purpose": "layer", "kind": spec.kind, "index": int(index),
              "groups": int(spec.groups), "in_axis": int(spec.in_axis)}
    return fit_key(spec.weight, fields)


@dataclass
class CachedFit:
    weight: CompressedWeight
    rel_error: float | None
    settings: dict
    seconds: float  # how long the original fit took


class FitCache:
    """Directory of fitted layers keyed by content hash. Safe to share between runs and processes."""

    def __init__(self, directory):
        self.root = Path(directory).expanduser()
        self.hits = 0
        self.misses = 0

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.safetensors", d / f"{key}.json"

    def get(self, key: str) -> CachedFit | None:
        arrays_path, meta_path = self._paths(key)
        if not meta_path.is_file():
            self.misses += 1
            return None
        try:
            entry = self._read(arrays_path, meta_path)
        except Exception as exc:  # damaged entry: say so, drop it, fit again
            log.warning("fit cache entry %s is damaged (%s); ignoring it", meta_path, exc)
            for p in (arrays_path, meta_path):
                p.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def _read(self, arrays_path: Path, meta_path: Path) -> CachedFit:
        from safetensors.numpy import load

        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
            raise ValueError(f"format {meta.get('format')!r} v{meta.get('version')!r}")
        blob = arrays_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["arrays_sha256"]:
            raise ValueError("arrays file does not match its checksum")
        arrays = load(blob)
        if sorted(arrays) != sorted(meta["arrays"]):
            raise ValueError("arrays file holds other arrays than listed")
        cw = CompressedWeight(meta["method"], tuple(meta["shape"]), meta["meta"], arrays)
        return CachedFit(cw, meta["rel_error"], meta["settings"], float(meta["seconds"]))

    def put(self, key: str, weight: CompressedWeight, rel_error: float | None, settings: dict,
            seconds: float, name: str = "") -> None:
        """Store one fit. A failure to write (full disk, read-only cache, anything else) is logged,
        not raised: the cache only ever saves time, and a finished fit is never lost to it."""
        from safetensors.numpy import save

        arrays_path, meta_path = self._paths(key)
        try:
            self._ensure_root()
            arrays_path.parent.mkdir(parents=True, exist_ok=True)
            blob = save({k: np.ascontiguousarray(v) for k, v in weight.arrays.items()})
            meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "riem_compiler": __version__,
                    "name": name, "method": weight.method, "shape": list(weight.shape), "meta": weight.meta,
                    "arrays": sorted(weight.arrays), "arrays_sha256": hashlib.sha256(blob).hexdigest(),
                    "rel_error": None if rel_error is None else float(rel_error),
                    "settings": settings, "seconds": float(seconds), "created": time.time()}
            text = json.dumps(meta, indent=1, default=_json_default) + "\n"
            _atomic_write(arrays_path, blob)
            _atomic_write(meta_path, text.encode())
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("could not write fit cache entry under %s (%s: %s); continuing without it", self.root,
                        type(exc).__name__, exc)

    def _ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tag = self.root / TAG_NAME
        if not tag.exists():
            _atomic_write(tag, TAG_TEXT.encode())

    def entries(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob("??/*.json"))

    def clear(self) -> int:
        """Delete every entry; returns how many. Refuses a non-empty directory that is not a
        fit cache, so a mistyped --cache-dir cannot wipe unrelated files."""
        if not self.root.exists():
            return 0
        if not self.root.is_dir():
            raise InputError(f"cache directory {self.root} is a file; pass a directory to --cache-dir")
        if not (self.root / TAG_NAME).is_file() and any(self.root.iterdir()):
            raise InputError(f"{self.root} is not empty and not a riem_compiler fit cache (no {TAG_NAME}); "
                             "refusing to clear it")
        count = len(self.entries())
        for sub in self.root.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                shutil.rmtree(sub)
        log.info("cleared %d fit cache entries from %s", count, self.root)
        return count


def open_cache(config) -> FitCache | None:
    directory = getattr(config, "cache_dir", None)
    return FitCache(directory) if directory else None


def cached_riem_fit(fit, cache: FitCache, config):
    """Wrap an auto-mode RieM fitter (weight, ratio) -> CompressedWeight | None with the cache."""
    base = {**fit_fields(config), "purpose": "auto-riem"}

    def wrapped(weight: np.ndarray, ratio: float):
        key = fit_key(np.asarray(weight, dtype=np.float32), {**base, "ratio": float(ratio)})
        hit = cache.get(key)
        if hit is not None:
            return hit.weight
        t0 = time.perf_counter()
        cw = fit(weight, ratio)
        if cw is not None:
            cache.put(key, cw, None, {}, time.perf_counter() - t0)
        return cw

    return wrapped


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data), suffix=".tmp")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

