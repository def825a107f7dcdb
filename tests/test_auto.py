"""method="auto": the plan stays within the byte budget, the knapsack is optimal (up to its byte
rounding), and it is never worse on the proxy than any single method at the same budget."""
import itertools

import numpy as np
import pytest

from riem_compiler.frontend.layers import LayerSpec
from riem_compiler.passes import auto
from riem_compiler import methods
from riem_compiler.methods import rtn as rtn_m
from riem_compiler.methods import svd as svd_m
from riem_compiler.methods import decode


def _specs():
    """Layers where different methods win: low rank (svd), Gaussian (rtn), Tucker conv, a wide one."""
    r = np.random.default_rng(0)
    low = (r.standard_normal((64, 4)) @ r.standard_normal((4, 48)) + 0.01 * r.standard_normal((64, 48)))
    core = r.standard_normal((6, 4, 3, 3))
    out_f, in_f = np.linalg.qr(r.standard_normal((16, 6)))[0], np.linalg.qr(r.standard_normal((32, 4)))[0]
    conv = np.einsum("rs...,or,is->oi...", core, out_f, in_f) + 0.01 * r.standard_normal((16, 32, 3, 3))
    return [
        LayerSpec("low.weight", "linear", low.astype(np.float32)),
        LayerSpec("gauss.weight", "linear", r.standard_normal((64, 64)).astype(np.float32)),
        LayerSpec("conv.weight", "conv2d", conv.astype(np.float32), attrs={"groups": 1}),
        LayerSpec("wide.weight", "linear", (0.1 * r.standard_normal((32, 160))).astype(np.float32)),
    ]


def _proxy(specs, weights, proxy="size_weighted"):
    w = auto.proxy_weights(specs, proxy)
    return sum(wl * methods.relative_error(s.weight, cw) ** 2 for wl, s, cw in zip(w, specs, weights))


def _single_method_plans(specs, ratio):
    """Each method alone at `ratio` of every layer's fp32 bytes, fitted directly (not via auto)."""
    plans = {}
    for bits in (32, 16, 8):
        if all(svd_m.svd_rank_for_ratio(s.shape, ratio, bits) > 0 for s in specs):
            plans[f"svd{bits}"] = [svd_m.fit_svd(s.weight, ratio, bits) for s in specs]
    settings = [rtn_m.rtn_settings_for_ratio(ratio, s.shape) for s in specs]
    if all(x is not None for x in settings):
        plans["rtn"] = [rtn_m.fit_rtn(s.weight, *x) for s, x in zip(specs, settings)]
    return plans


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3])
@pytest.mark.parametrize("proxy", ["size_weighted", "energy"])
def test_auto_within_budget_and_not_worse_than_single_methods(ratio, proxy):
    specs = _specs()
    result = auto.choose_methods_detailed(specs, ratio, proxy=proxy)
    total_fp32 = sum(s.fp32_bytes for s in specs)
    assert [c.name for c in result.choices] == [s.name for s in specs]
    assert sum(c.weight.nbytes for c in result.choices) <= ratio * total_fp32
    ours = _proxy(specs, [c.weight for c in result.choices], proxy)
    assert ours == pytest.approx(result.proxy, rel=1e-9)
    singles = _single_method_plans(specs, ratio)
    assert singles, "at least one single method must fit these ratios"
    for name, plan in singles.items():
        assert sum(cw.nbytes for cw in plan) <= ratio * total_fp32
        assert ours <= _proxy(specs, plan, proxy) + 1e-12, name
    # mixing helps here: strictly better than every single method
    assert ours < min(_proxy(specs, plan, proxy) for plan in singles.values())


def test_choices_are_consistent_and_explained():
    specs = _specs()
    result = auto.choose_methods_detailed(specs, 0.2)
    for spec, c in zip(specs, result.choices):
        assert c.nbytes == c.weight.nbytes and c.fp32_bytes == spec.fp32_bytes
        assert c.rel_error == pytest.approx(methods.relative_error(spec.weight, c.weight))
        assert c.method == c.weight.method and c.reason and str(len(c.candidates)) in c.reason
        assert decode(c.weight).shape == spec.shape
    by_name = {c.name: c for c in result.choices}
    assert by_name["low.weight"].method == "svd"  # rank-4 matrix: SVD is near exact and cheap
    # Tucker-2 is a candidate for the KxK conv only, and the best one when bytes are scarce
    assert all(x.family != "tucker2" for c in result.choices if c.name != "conv.weight" for x in c.candidates)
    conv = by_name["conv.weight"]
    fits = [x for x in conv.candidates if x.nbytes <= 0.07 * conv.fp32_bytes]
    assert min(fits, key=lambda x: x.rel_error).family == "tucker2"
    table = result.table()
    for spec in specs:
        assert spec.name in table
    assert "budget" in table and result.to_dict()["nbytes"] == result.nbytes


def _fixed_source(pools):
    """A candidate source that returns prebuilt candidates (to test the solver alone)."""
    return lambda spec, ratio: pools[spec.name]


def test_knapsack_matches_brute_force():
    specs = _specs()[:3]
    pools = {}
    for s in specs:
        cands = [rtn_m.fit_rtn(s.weight, b, g) for b, g in ((8, None), (4, 32), (3, 32), (2, None))]
        cands += [svd_m.fit_svd(s.weight, r, 16) for r in (0.3, 0.15, 0.08)]
        pools[s.name] = cands
    weights = auto.proxy_weights(specs, "size_weighted")
    errors = {n: [methods.relative_error(s.weight, cw) for cw in pools[n]] for n, s in zip(pools, specs)}
    total_fp32 = sum(s.fp32_bytes for s in specs)
    resolution = 2048
    for ratio in (0.08, 0.12, 0.18, 0.25):
        budget = ratio * total_fp32
        result = auto.choose_methods_detailed(specs, ratio, _fixed_source(pools), resolution=resolution)
        assert result.nbytes <= budget

        def best_within(limit):
            best = np.inf
            for combo in itertools.product(*(range(len(pools[s.name])) for s in specs)):
                nbytes = sum(pools[s.name][j].nbytes for s, j in zip(specs, combo))
                if nbytes <= limit:
                    best = min(best, sum(w * errors[s.name][j] ** 2 for w, s, j in zip(weights, specs, combo)))
            return best

        # bytes are rounded up to budget/resolution units: at most one unit lost per layer
        assert best_within(budget) - 1e-12 <= result.proxy <= best_within(budget * (1 - len(specs) / resolution)) + 1e-12


def test_riem_candidates_through_callable():
    specs = _specs()[1:2]  # the Gaussian 64 x 64 layer
    calls = []

    def fit(weight, ratio):
        calls.append(ratio)
        settings = methods.get("riem").Settings(steps=20, seed=0, state_bits=8, m=8, sizing="max_q")
        return methods.get("riem").candidate_fitter(settings)(weight, ratio)

    grid = auto.CandidateGrid(riem_fit=fit, riem_ratios=(0.25,), svd_ratios=(0.25,), rtn=((8, None), (4, 32)))
    result = auto.choose_methods_detailed(specs, 0.2, grid)
    assert sorted(calls) == [0.2, 0.25]
    families = {c.family for c in result.choices[0].candidates}
    assert {"riem8", "rtn", "svd16", "svd8", "dense16", "dense32"} <= families
    assert result.nbytes <= 0.2 * specs[0].fp32_bytes


def test_bad_inputs():
    specs = _specs()
    with pytest.raises(ValueError, match="too small"):
        auto.choose_methods(specs, 0.001)
    with pytest.raises(ValueError, match="proxy"):
        auto.choose_methods(specs, 0.2, proxy="nope")
    with pytest.raises(ValueError, match="budget_ratio"):
        auto.choose_methods(specs, 0.0)


def test_generous_budget_keeps_weights_exact():
    specs = _specs()
    choices = auto.choose_methods(specs, 1.0)
    assert all(c.rel_error == 0.0 for c in choices)  # dense float32 fits everywhere


def test_compress_auto_records_and_budget():
    from riem_compiler.config import Config

    specs = _specs()
    bad = LayerSpec("nan.weight", "linear", np.full((8, 8), np.nan, np.float32))
    config = Config(method="auto", ratio=0.2, steps=10, time_budget_s=5.0, quiet=True)
    compressed, records = auto.compress_auto(specs + [bad], config, auto.CandidateGrid())
    assert [r.name for r in records] == [s.name for s in specs] + ["nan.weight"]
    assert records[-1].status == "skipped" and "NaN" in records[-1].reason
    assert sum(r.bytes_after for r in records[:-1]) <= 0.2 * sum(s.fp32_bytes for s in specs)
    for spec, r in zip(specs, records):
        assert r.reason.startswith("auto: ") and r.rel_error is not None
        if r.status == "compressed":
            cw = compressed[spec.name]
            assert r.bytes_after == cw.nbytes and r.method == cw.method
            assert r.rel_error == pytest.approx(methods.relative_error(spec.weight, cw))
    assert "nan.weight" not in compressed


def test_compress_auto_default_grid_fits_riem_from_config(monkeypatch):
    from riem_compiler.config import Config

    made, fitted = [], []
    riem = methods.get("riem")
    real = type(riem).candidate_fitter

    def spy(self, settings):
        made.append((settings.steps, settings.state_bits, settings.metric_dtype, settings.m))
        fit = real(self, settings)
        return lambda w, r: fitted.append(r) or fit(w, r)

    monkeypatch.setattr(type(riem), "candidate_fitter", spy)
    specs = _specs()[1:2]
    config = Config(method="auto", ratio=0.2, steps=10, time_budget_s=5.0, m=8, quiet=True, auto_riem=True)
    compressed, records = auto.compress_auto(specs, config)
    assert made == [(10, 8, "float16", 8)] and sorted(fitted) == [0.1, 0.2]
    assert records[0].bytes_after <= 0.2 * specs[0].fp32_bytes


def test_default_auto_offers_no_riem_candidates_and_reports_its_time_split(monkeypatch):
    """RieM candidates are opt-in (auto_riem): they cost minutes per model and were rarely picked."""
    from riem_compiler.config import Config

    monkeypatch.setattr(type(methods.get("riem")), "candidate_fitter",
                        lambda self, settings: pytest.fail("RieM fitted by default"))
    specs = _specs()[1:3]
    plan = {}
    compressed, records = auto.compress_auto(specs, Config(method="auto", ratio=0.2, quiet=True), plan=plan)
    labels = {c["label"] for choice in plan["choices"] for c in choice["candidates"]}
    assert labels and not any(lab.startswith("riem") for lab in labels)
    timing = plan["timing"]
    assert {"rtn", "vq", "affine"} <= set(timing["candidates"]) and timing["scoring"] > 0
    assert all(v >= 0 for v in timing["candidates"].values())


@pytest.mark.parametrize("ratio", [0.08, 0.2, 0.3])
def test_freeing_unpickable_candidates_changes_no_plan(ratio, monkeypatch):
    """Jobs free the arrays of candidates no plan can pick: the plan, its measured single-method
    plans and the probe are those of a run that keeps every candidate, and most arrays are freed."""
    specs = _specs()
    freed = auto.choose_methods_detailed(specs, ratio)
    monkeypatch.setattr(auto, "_free_unpickable", lambda pool, spec, budget_ratio, also_keep=(): None)
    over_budget_only = auto.choose_methods_detailed(specs, ratio)
    monkeypatch.setattr(auto, "_free_over_budget", lambda pools, budget: None)
    kept = auto.choose_methods_detailed(specs, ratio)
    # what _free_over_budget alone frees: candidates too large for any plan within the budget
    pools = [c.candidates for c in over_budget_only.choices]
    least = [min(c.nbytes for c in pool) for pool in pools]
    gone = [(c, sum(least) - own + c.nbytes) for pool, own in zip(pools, least) for c in pool if c.weight is None]
    assert all(need > over_budget_only.budget_bytes for _, need in gone)
    assert gone or ratio > 0.1  # at 0.08 the float16 copies of the large layers cannot be in a plan
    assert [c.label for c in over_budget_only.choices] == [c.label for c in kept.choices]
    assert [c.label for c in freed.choices] == [c.label for c in kept.choices]
    assert freed.source == kept.source and freed.single_method == kept.single_method
    for f, k in zip(freed.choices, kept.choices):
        assert [(c.label, c.nbytes, c.rel_error) for c in f.candidates] == \
            [(c.label, c.nbytes, c.rel_error) for c in k.candidates]
        np.testing.assert_array_equal(decode(f.weight), decode(k.weight))
    pools = [c.candidates for c in freed.choices]
    # (svd's rungs of as many numbers as the matrix, always freed, are no longer fitted)
    assert sum(c.weight is None for pool in pools for c in pool) > 0.4 * sum(len(pool) for pool in pools)
    assert all(c.weight is not None for c in kept.choices[0].candidates)


def _screened_specs():
    """Layers large enough for screening (CandidateGrid.screen_subset), one stored (in, out)."""
    r = np.random.default_rng(1)
    heavy = r.standard_normal((256, 192)) * np.exp(r.standard_normal((1, 192)))  # uneven input columns
    return [LayerSpec("a.weight", "linear", (0.02 * r.standard_normal((384, 128))).astype(np.float32)),
            LayerSpec("b.weight", "linear", (0.05 * heavy).astype(np.float32)),
            LayerSpec("c.weight", "matmul", (0.03 * r.standard_normal((128, 256))).astype(np.float32), in_axis=0)]


@pytest.mark.parametrize("ratio", [0.1, 0.2])
def test_screening_ships_whole_fits_within_the_budget(ratio):
    specs = _screened_specs()
    grid = auto.CandidateGrid()
    assert all(grid.screen_subset(s) is not None for s in specs)
    result = auto.choose_methods_detailed(specs, ratio)
    assert sum(c.weight.nbytes for c in result.choices) <= ratio * sum(s.fp32_bytes for s in specs)
    assert result.timing["screening"]["whole_fits"] > 0 and sum(c.screened for c in result.choices) > 0
    for spec, choice in zip(specs, result.choices):
        assert not any(c.estimated for c in choice.candidates)
        assert tuple(choice.weight.shape) == spec.shape
        whole = grid(spec, ratio, only={choice.label})  # rtn's setting for the budget is fitted whole anyway
        if methods.get(choice.method).screened_on_rows and whole:
            assert [auto.label(cw) for cw in whole] == [choice.label]
            np.testing.assert_array_equal(decode(choice.weight), decode(whole[0]))


@pytest.mark.parametrize("ratio", [0.1, 0.2])
def test_screened_plan_is_close_to_fitting_every_candidate_whole(ratio):
    specs = _screened_specs()
    screened = auto.choose_methods_detailed(specs, ratio)
    whole = auto.choose_methods_detailed(specs, ratio, auto.CandidateGrid(screen_rows=1))
    assert "screening" not in whole.timing
    assert screened.proxy <= 1.05 * whole.proxy


def test_screening_is_the_same_on_one_or_two_workers():
    from riem_compiler.passes.executors import LocalExecutor

    specs = _screened_specs()
    one = auto.choose_methods_detailed(specs, 0.15, executor=LocalExecutor(workers=1))
    two = auto.choose_methods_detailed(specs, 0.15, executor=LocalExecutor(workers=2))
    assert [c.label for c in one.choices] == [c.label for c in two.choices]
    for a, b in zip(one.choices, two.choices):
        np.testing.assert_array_equal(decode(a.weight), decode(b.weight))


def test_estimates_count_the_bytes_of_the_whole_weight():
    grid = auto.CandidateGrid()
    for spec in _screened_specs():
        rows = grid.screen_subset(spec)
        estimates = [cw for cw in grid(spec, 0.125, rows=rows) if tuple(cw.shape) != spec.shape]
        assert {cw.method for cw in estimates} == {m.name for m in methods.all_methods() if m.screened_on_rows}
        for cw in estimates:
            assert cw.shape[spec.output_axis] == len(rows)
            (whole,) = grid(spec, 0.125, only={auto.label(cw)})
            assert methods.get(cw.method).nbytes_for_shape(cw, spec.shape) == whole.nbytes, auto.label(cw)


def test_svd_is_screened_by_its_spectrum():
    """Screening's first pass gives svd a RankEstimate per candidate (no SVD, no fit): the labels and
    bytes of its whole fits, and the errors of the truncated SVD of each rank, which the float16 fits
    are close to and no fit goes below; a second pass fits only the labels asked for."""
    from riem_compiler.methods.base import RankEstimate

    grid = auto.CandidateGrid()
    for spec in _screened_specs():
        first = grid(spec, 0.125, rows=grid.screen_subset(spec))
        estimates = [c for c in first if isinstance(c, RankEstimate)]
        assert estimates and not any(getattr(c, "method", "") == "svd" and not isinstance(c, RankEstimate)
                                     for c in first)
        whole = [cw for cw in grid(spec, 0.125) if cw.method == "svd"]
        assert [e.label for e in estimates] == [auto.label(cw) for cw in whole]
        assert [e.nbytes for e in estimates] == [cw.nbytes for cw in whole]
        pool, *_ = auto._evaluate_candidates(spec, grid, 0.125, rows=grid.screen_subset(spec))
        scored = {c.label: c for c in pool if c.family.startswith("svd")}
        assert scored.keys() == {e.label for e in estimates}
        assert all(c.estimated and c.weight is None for c in scored.values())
        for cw in whole:
            rel = methods.relative_error(spec.weight, cw)
            assert scored[auto.label(cw)].rel_error <= rel * (1 + 1e-5)
            if cw.meta["factor_bits"] == 16:
                assert scored[auto.label(cw)].rel_error == pytest.approx(rel, rel=2e-3)
        (one,) = grid(spec, 0.125, only={estimates[-1].label})
        assert auto.label(one) == estimates[-1].label
        np.testing.assert_array_equal(decode(one), decode(whole[-1]))


def test_an_svd_estimate_that_cannot_be_had_is_a_whole_fit():
    """Moments that count output rows unevenly (folded input scales) have no per-rank truncation
    error: that layer's svd candidates are fitted whole in the same job, not dropped."""
    import torch

    from riem_compiler.passes.sensitivity import MomentError, SecondMoment

    spec = _screened_specs()[0]
    x = torch.randn(1, 64, spec.shape[1], generator=torch.Generator().manual_seed(0))
    uneven = MomentError(SecondMoment(factor=x), False, 1, np.linspace(0.5, 2, spec.shape[0]).astype(np.float32))
    grid = auto.CandidateGrid()
    pool, dropped, _ = auto._evaluate_candidates(spec, grid, 0.125, uneven, rows=grid.screen_subset(spec))
    svd = [c for c in pool if c.family.startswith("svd")]
    assert svd and dropped == 0 and not any(c.estimated for c in svd)
    whole = {auto.label(cw): cw for cw in grid(spec, 0.125) if cw.method == "svd"}
    assert {c.label for c in svd} == whole.keys()
    for c in svd:
        np.testing.assert_array_equal(decode(c.weight), decode(whole[c.label]))


def test_spectrum_tails_are_the_truncation_errors():
    from riem_compiler.metrics import spectrum

    r = np.random.default_rng(3)
    for shape in ((30, 12), (12, 30)):
        m = r.standard_normal(shape).astype(np.float32)
        s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
        found = spectrum(m)
        np.testing.assert_allclose(found.tails, [np.sum(s[k:] ** 2) for k in range(len(s) + 1)],
                                   rtol=1e-5, atol=1e-6 * np.sum(s ** 2))
        np.testing.assert_allclose(np.sqrt(found.squares), s, rtol=1e-4)
        assert found.side == ("out" if shape[0] <= shape[1] else "in")
        assert found.relative_error(4) == pytest.approx(np.sqrt(np.sum(s[4:] ** 2) / np.sum(s ** 2)), rel=1e-5)
    low = (r.standard_normal((20, 2)) @ r.standard_normal((2, 16))).astype(np.float32)  # rank 2
    assert spectrum(low).relative_error(2) <= 1e-3  # float32 products: rounding of 1e-7 of the energy
    assert spectrum(np.zeros((3, 4), np.float32)).relative_error(0) == 0.0


def test_screening_leaves_small_grouped_and_gathered_layers_whole():
    grid = auto.CandidateGrid()
    r = np.random.default_rng(2)
    assert grid.screen_subset(LayerSpec("s", "linear", r.standard_normal((64, 64)).astype(np.float32))) is None
    assert grid.screen_subset(LayerSpec("g", "conv2d", r.standard_normal((512, 1, 3, 3)).astype(np.float32),
                                        groups=512)) is None
    assert grid.screen_subset(LayerSpec("e", "embedding", r.standard_normal((4096, 64)).astype(np.float32))) is None
    assert auto.CandidateGrid(screen_rows=1).screen_subset(_screened_specs()[0]) is None


def test_a_whole_fit_rescales_its_familys_estimates_only():
    est = [auto.Candidate(None, "vq8/d4", "vq", 100, 0.2, layer_error=2.0, estimated=True),
           auto.Candidate(None, "vq9/d3", "vq", 120, 0.1, layer_error=1.0, estimated=True),
           auto.Candidate(None, "rotq2/g64", "rotq", 110, 0.3, layer_error=3.0, estimated=True)]
    whole = [auto.Candidate(object(), "vq8/d4", "vq", 100, 0.19, layer_error=1.8)]
    auto._calibrate_estimates(est, est[0], whole)
    assert est[1].rel_error == pytest.approx(0.1 * 0.19 / 0.2) and est[1].layer_error == pytest.approx(0.9)
    assert (est[2].rel_error, est[2].layer_error) == (0.3, 3.0)


def test_held_candidates_wait_in_files_and_change_nothing(tmp_path, monkeypatch):
    """auto keeps the arrays of its held candidates in files (candidate_store.py): the same plan,
    picks and weights as holding them in memory; the picks come back as plain arrays and the
    files are gone when the plan is made."""
    from riem_compiler.passes import candidate_store

    specs = _screened_specs() + _specs()
    in_memory = auto.choose_methods_detailed(specs, 0.15)
    assert in_memory.held_on_disk == 0  # these layers' arrays are all under the 1 MiB floor

    made = []

    class SmallFloor(candidate_store.CandidateStore):
        def __init__(self):
            super().__init__(min_bytes=256, directory=str(tmp_path))
            made.append(self)

    monkeypatch.setattr(auto, "CandidateStore", SmallFloor)
    on_disk = auto.choose_methods_detailed(specs, 0.15)
    assert on_disk.held_on_disk > 0 and list(tmp_path.iterdir()) == []
    mapped = [c.weight for ch in on_disk.choices for c in ch.candidates
              if c.weight is not None and any(isinstance(a, np.memmap) for a in c.weight.arrays.values())]
    assert mapped  # held candidates that were not picked: still readable after the files went
    assert all(decode(cw).shape == cw.shape for cw in mapped)
    assert [c.label for c in on_disk.choices] == [c.label for c in in_memory.choices]
    assert on_disk.source == in_memory.source and on_disk.measured == in_memory.measured
    for a, b in zip(on_disk.choices, in_memory.choices):
        assert not any(isinstance(x, np.memmap) for x in a.weight.arrays.values())
        assert [(c.label, c.nbytes, c.rel_error) for c in a.candidates] == \
            [(c.label, c.nbytes, c.rel_error) for c in b.candidates]
        np.testing.assert_array_equal(decode(a.weight), decode(b.weight))


def test_a_store_that_cannot_write_keeps_the_candidate_in_memory(tmp_path, caplog):
    from riem_compiler.methods.dense import fit_dense
    from riem_compiler.passes.candidate_store import CandidateStore

    cw = fit_dense(np.ones((64, 64), np.float32), "float16")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    store = CandidateStore(min_bytes=1, directory=str(not_a_dir))
    with caplog.at_level("WARNING", logger="riem_compiler.auto"):
        assert store.hold(cw) is cw and store.hold(cw) is cw
    assert store.spilled_bytes == 0
    assert len([r for r in caplog.records if "stay in memory" in r.getMessage()]) == 1
    store.close()
