"""Fit cache: keys, round trips, resume after interruption, damaged entries, clearing, auto mode."""
import dataclasses
import json

import numpy as np
import pytest

from riem_compiler import fit_cache
from riem_compiler.config import Config
from riem_compiler.errors import InputError
from riem_compiler.fit_cache import FitCache, fit_key, layer_key
from riem_compiler.frontend.layers import LayerSpec
from riem_compiler.passes import compress
from riem_compiler.methods import decode


def _specs(n=3, seed=0):
    g = np.random.default_rng(seed)
    return [LayerSpec(f"l{i}.weight", "linear", g.standard_normal((24, 32)).astype(np.float32), module=f"l{i}")
            for i in range(n)]


def _config(tmp_path, **kw):
    base = dict(method="riem", steps=20, time_budget_s=30.0, quiet=True, min_weight_size=0,
                cache_dir=str(tmp_path / "cache"))
    return Config(**{**base, **kw})


@pytest.fixture
def count_fits(monkeypatch):
    """Count fit_job calls made by compress_specs (the real fit still runs)."""
    calls = []
    real = compress.fit_job

    def counting(spec, config, index):
        calls.append(spec.name)
        return real(spec, config, index)

    monkeypatch.setattr(compress, "fit_job", counting)
    return calls


def test_key_depends_on_weight_shape_and_every_fit_field(tmp_path):
    spec = _specs(1)[0]
    cfg = _config(tmp_path)
    key = layer_key(spec, cfg, 0)
    assert key == layer_key(dataclasses.replace(spec, weight=spec.weight.copy()), cfg, 0)
    w2 = spec.weight.copy()
    w2[0, 0] = np.nextafter(w2[0, 0], np.float32(np.inf))  # one ulp
    assert layer_key(dataclasses.replace(spec, weight=w2), cfg, 0) != key
    # same bytes, other shape
    assert layer_key(dataclasses.replace(spec, weight=spec.weight.reshape(32, 24)), cfg, 0) != key
    assert layer_key(spec, cfg, 1) != key  # the index offsets the seed
    changed = {"ratio": 0.2, "method": "svd", "state_bits": 4, "metric_dtype": "float32", "m": 8,
               "k_branches": 4, "steps": 31, "time_budget_s": 5.0, "lr": 1e-2, "error_ceiling": 0.5, "seed": 1}
    keys = {layer_key(spec, dataclasses.replace(cfg, **{k: v}), 0) for k, v in changed.items()}
    assert len(keys) == len(changed) and key not in keys
    # options that do not change a fit do not change the key
    assert layer_key(spec, dataclasses.replace(cfg, quiet=False, ignore=("x*",), cache_dir="/elsewhere"), 0) == key


def test_put_get_round_trip(tmp_path):
    from riem_compiler.methods.svd import fit_svd

    w = _specs(1)[0].weight
    cw = fit_svd(w, 0.25, 8)
    cache = FitCache(tmp_path / "c")
    key = fit_key(w, {"any": 1})
    assert cache.get(key) is None and cache.misses == 1
    cache.put(key, cw, 0.123, {"rank": 3}, 4.5, "l0.weight")
    hit = cache.get(key)
    assert hit is not None and cache.hits == 1
    assert hit.weight.method == cw.method and hit.weight.shape == cw.shape
    assert hit.weight.meta == json.loads(json.dumps(cw.meta))
    assert sorted(hit.weight.arrays) == sorted(cw.arrays)
    for k, a in cw.arrays.items():
        assert hit.weight.arrays[k].dtype == a.dtype
        np.testing.assert_array_equal(hit.weight.arrays[k], a)
    np.testing.assert_array_equal(decode(hit.weight), decode(cw))
    assert (hit.rel_error, hit.settings, hit.seconds) == (0.123, {"rank": 3}, 4.5)
    assert (cache.root / fit_cache.TAG_NAME).is_file()


def test_repeat_run_uses_cache_and_gives_identical_weights(tmp_path, count_fits):
    specs, cfg = _specs(3), _config(tmp_path)
    first, rec1 = compress.compress_specs(specs, cfg)
    assert sorted(count_fits) == sorted(s.name for s in specs)
    assert len(FitCache(cfg.cache_dir).entries()) == 3
    count_fits.clear()
    second, rec2 = compress.compress_specs(specs, cfg)
    assert count_fits == []  # nothing refitted
    for name, cw in first.items():
        for k, a in cw.arrays.items():
            np.testing.assert_array_equal(second[name].arrays[k], a)
    for r1, r2 in zip(rec1, rec2):
        assert (r2.status, r2.bytes_after, r2.rel_error, r2.settings) == (r1.status, r1.bytes_after, r1.rel_error,
                                                                           r1.settings)
        assert r2.reason.startswith("from fit cache")
    # a changed option misses the cache
    compress.compress_specs(specs, dataclasses.replace(cfg, seed=7))
    assert len(count_fits) == 3


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_run_resumes(tmp_path, monkeypatch, count_fits, workers):
    """One worker: the two layers before the interrupted one are stored. Two: every layer that
    finished before the interrupt is stored (the one running beside it may be lost), and the
    resumed run fits only what is missing."""
    specs, cfg = _specs(3), _config(tmp_path, workers=workers)
    real = compress.fit_job

    def interrupt_on_third(spec, config, index):
        if index == 2:
            raise KeyboardInterrupt
        return real(spec, config, index)

    monkeypatch.setattr(compress, "fit_job", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        compress.compress_specs(specs, cfg)
    stored = len(FitCache(cfg.cache_dir).entries())  # the finished layers were stored at once
    assert stored == 2 if workers == 1 else 1 <= stored <= 2
    calls = []

    def counting(spec, config, index):
        calls.append(spec.name)
        return real(spec, config, index)

    monkeypatch.setattr(compress, "fit_job", counting)
    out, records = compress.compress_specs(specs, cfg)
    assert specs[2].name in calls and len(calls) == 3 - stored
    assert set(out) == {s.name for s in specs}
    assert sum(r.reason.startswith("from fit cache") for r in records) == stored


def test_damaged_entry_is_ignored_and_refitted(tmp_path, count_fits, caplog):
    specs, cfg = _specs(1), _config(tmp_path)
    first, _ = compress.compress_specs(specs, cfg)
    (arrays,) = list(FitCache(cfg.cache_dir).root.glob("??/*.safetensors"))
    arrays.write_bytes(arrays.read_bytes()[:-7])  # truncated
    count_fits.clear()
    again, _ = compress.compress_specs(specs, cfg)
    assert count_fits == [specs[0].name]
    assert any("damaged" in r.message for r in caplog.records)
    np.testing.assert_array_equal(again[specs[0].name].arrays["U"], first[specs[0].name].arrays["U"])


def test_failed_fits_are_not_cached(tmp_path):
    cfg = _config(tmp_path, ratio=0.01)  # too small for q=1 on a 24x32 layer
    _, records = compress.compress_specs(_specs(1), cfg)
    assert records[0].status == "skipped"
    assert FitCache(cfg.cache_dir).entries() == []


def test_clear(tmp_path):
    specs, cfg = _specs(2), _config(tmp_path, method="svd")
    compress.compress_specs(specs, cfg)
    cache = FitCache(cfg.cache_dir)
    assert len(cache.entries()) == 2
    assert cache.clear() == 2
    assert cache.entries() == [] and (cache.root / fit_cache.TAG_NAME).is_file()
    other = tmp_path / "not_a_cache"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a riem_compiler fit cache"):
        FitCache(other).clear()
    assert (other / "precious.txt").read_text() == "keep me"
    assert FitCache(tmp_path / "missing").clear() == 0


def test_unwritable_cache_does_not_fail_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = _config(tmp_path, method="svd", cache_dir=str(blocker / "sub"))  # parent is a file
    out, records = compress.compress_specs(_specs(1), cfg)
    assert len(out) == 1 and records[0].status == "compressed"


def test_auto_mode_caches_riem_candidates(tmp_path, monkeypatch):
    from riem_compiler.methods.riem import fit as fit_module

    calls = []
    real = fit_module.fit_riem

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "fit_riem", counting)
    specs, cfg = _specs(2), _config(tmp_path, method="auto", steps=10, auto_riem=True)
    first, rec1 = compress.compress_specs(specs, cfg)
    n_fits = len(calls)
    assert n_fits >= 2  # at least one RieM candidate per layer
    second, rec2 = compress.compress_specs(specs, cfg)
    assert len(calls) == n_fits  # all RieM candidates came from the cache
    assert [r.method for r in rec1] == [r.method for r in rec2]
    assert [r.bytes_after for r in rec1] == [r.bytes_after for r in rec2]
    for name, cw in first.items():
        for k, a in cw.arrays.items():
            np.testing.assert_array_equal(second[name].arrays[k], a)


def test_no_cache_dir_means_no_cache(tmp_path, count_fits):
    cfg = _config(tmp_path, cache_dir=None)
    compress.compress_specs(_specs(1), cfg)
    compress.compress_specs(_specs(1), cfg)
    assert len(count_fits) == 2
    assert not (tmp_path / "cache").exists()
