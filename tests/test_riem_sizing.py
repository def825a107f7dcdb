"""RieM sizing by search (riem.size_candidates, methods/riem/sizing.py) and the fused fitting loss."""
import math

import numpy as np
import pytest
import torch

import riem_compiler as rc
from riem_compiler import riem
from riem_compiler.errors import InputError
from riem_compiler.methods.riem import RieMSettings, choose_shape, fit
from riem_compiler.methods.riem.sizing import search_size


@pytest.mark.parametrize("shape,ratio", [((384, 384), 0.25), ((1536, 384), 0.125), ((64, 32), 0.25),
                                         ((10, 128), 0.125), ((128, 144), 0.25)])
def test_candidates_fit_the_budget_and_have_no_dead_state_dimensions(shape, ratio):
    found = riem.size_candidates(*shape, ratio, riem.AUTO_STATE_BITS, "float16")
    assert found
    budget = ratio * shape[0] * shape[1] * 4
    for q, m, bits in found:
        assert q >= 1 and q <= riem.K_BRANCHES * m
        assert riem.stored_nbytes(*shape, q, m, bits, "float16") <= budget
    for bits in {c[2] for c in found}:
        q, m, _ = next(c for c in found if c[2] == bits)  # the balanced width of this bit width
        if m > 1:  # one narrower: its largest fitting q would leave dead state dimensions
            narrower = riem._max_q(*shape, ratio, bits, "float16", m - 1, riem.K_BRANCHES)
            assert narrower is None or narrower[1] != m - 1 or narrower[0] > riem.K_BRANCHES * (m - 1)


def test_candidates_match_the_measured_balanced_shape_and_default_rule():
    # MiniLM query at 1/4, 8-bit: the shape fit_fidelity_sizing.md measured as "balanced"
    assert riem.size_candidates(384, 384, 0.25, (8,), "float16")[0] == (138, 23, 8)
    assert riem.choose_size(384, 384, 0.25, 8, "float16", 16, sizing="search") == (138, 23)
    assert riem.size_candidates(2, 2, 0.01, (8,), "float16") == []


def _reference_loss(a, b, U, beta, target):
    phi = fit._features(a, b, U, beta)
    with torch.no_grad():
        v, c = fit._solve_readout(phi.detach(), target)
    return ((fit._readout(phi, v, c) - target) ** 2).mean()


@pytest.mark.parametrize("beta_scale", [1.0, 60.0])  # product form of the sigmoid; |A| > 80: torch.sigmoid
@pytest.mark.parametrize("chunk", [1 << 19, 40])  # one chunk, and rows chunked (40 floats -> 1 row)
def test_fused_loss_matches_autograd_through_the_features(chunk, beta_scale, monkeypatch):
    monkeypatch.setattr(fit, "CHUNK_FLOATS", chunk)
    g = torch.Generator().manual_seed(0)
    n_out, n_in, q, m = 9, 7, 5, 3
    target = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    leaves = [torch.randn(n_out, q, generator=g, dtype=torch.float64), torch.randn(n_in, q, generator=g, dtype=torch.float64),
              torch.randn(6, m, q, generator=g, dtype=torch.float64) / math.sqrt(q),
              torch.randn(6, m, generator=g, dtype=torch.float64) * beta_scale]
    A, _ = fit.branch_inputs(*leaves)
    assert (float(A.abs().max()) < fit.EXP_FORM_LIMIT) == (beta_scale == 1.0)
    ref = [x.clone().requires_grad_() for x in leaves]
    new = [x.clone().requires_grad_() for x in leaves]
    loss_ref = _reference_loss(*ref, target)
    loss_ref.backward()
    workspace = fit._Workspace()  # used by a larger step first: the buffers are reused, not reallocated
    fit._FusedLoss.apply(*fit.branch_inputs(*(torch.randn(2 * x.shape[0], *x.shape[1:], dtype=x.dtype)
                                              for x in leaves[:2]), *leaves[2:]), torch.zeros(18, 14, dtype=target.dtype), workspace)
    loss = fit._FusedLoss.apply(*fit.branch_inputs(*new), target, workspace)
    loss.backward()
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-10)
    for x, y in zip(new, ref):
        np.testing.assert_allclose(x.grad.numpy(), y.grad.numpy(), rtol=1e-7, atol=1e-10)


def test_chunked_readout_is_the_float64_least_squares():
    g = torch.Generator().manual_seed(1)
    n_out, n_in, q, m = 37, 11, 6, 4
    a, b = torch.randn(n_out, q, generator=g), torch.randn(n_in, q, generator=g)
    U, beta = torch.randn(6, m, q, generator=g) / math.sqrt(q), torch.randn(6, m, generator=g)
    phi = fit._features(a.double(), b.double(), U.double(), beta.double()).reshape(m, -1).T
    target = phi @ torch.randn(m, dtype=torch.float64, generator=g) + 0.3 + 0.01 * torch.randn(phi.shape[0], generator=g, dtype=torch.float64)
    X = torch.cat([phi, torch.ones(len(phi), 1, dtype=phi.dtype)], 1)
    ref = torch.linalg.lstsq(X, target[:, None]).solution[:, 0]
    v, c = fit._solve_readout_chunked(a, b, U, beta, target.float().reshape(n_out, n_in), rows=8)  # 5 chunks
    np.testing.assert_allclose(v.numpy(), ref[:m].numpy(), rtol=1e-4, atol=1e-4)
    assert float(c) == pytest.approx(float(ref[m]), abs=1e-4)


def test_search_picks_the_lowest_pilot_error_and_reports_the_runner_up():
    w = np.random.default_rng(0).standard_normal((24, 40)).astype(np.float32)
    settings = fit.FitSettings(steps=1000, seed=3)
    choice = search_size(w, 0.3, "auto", "float16", settings, pilot_steps=15)
    again = search_size(w, 0.3, "auto", "float16", settings, pilot_steps=15)
    assert choice == again  # deterministic for the seed
    found = riem.size_candidates(24, 40, 0.3, riem.AUTO_STATE_BITS, "float16")
    assert choice.pilots == len(found) > 1
    errors = {}
    for q, m, bits in found:  # the pilots, refitted independently
        pilot = fit.FitSettings(steps=15, seed=3)
        errors[(q, m, bits)] = fit.fit_riem(w, q, m, bits, "float16", pilot).rel_error
    ranked = sorted(errors, key=errors.get)
    assert (choice.q, choice.m, choice.state_bits) == ranked[0]
    assert choice.pilot_error == pytest.approx(errors[ranked[0]])
    assert choice.runner_up[:3] == ranked[1]
    assert "runner_up" in choice.report()


def test_auto_state_bits_through_optimize_reports_choice_and_runner_up():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(48, 32))
    res = rc.optimize(net, example_inputs=(torch.randn(2, 48),), method="riem", ratio=0.3, steps=20,
                      state_bits="auto", min_weight_size=0, quiet=True)
    (record,) = res.report.compressed
    s = record.settings
    assert s["state_bits"] in riem.AUTO_STATE_BITS and s["sizing"] == "wide" and "runner_up" in s
    # state widths searched at the wide shape only: one candidate per width
    assert s["pilots"] == len(riem.size_candidates(32, 48, 0.3, riem.AUTO_STATE_BITS, "float16",
                                                   wider=(riem.SEARCH_WIDER[-1],)))
    assert s["q"] <= riem.K_BRANCHES * s["m"]
    assert record.bytes_after <= 0.3 * 48 * 32 * 4


def test_pinned_shape_is_kept():
    settings = RieMSettings(sizing="max_q", m=8, state_bits=6, steps=5)
    q, m, bits, extra = choose_shape(np.zeros((40, 40), np.float32), 0.25, settings)
    assert (q, m, bits) == (*riem.choose_size(40, 40, 0.25, 6, "float16", 8), 6) and extra == {"sizing": "max_q"}


def test_default_sizing_is_the_wider_search_shape_without_pilots(monkeypatch):
    from riem_compiler.methods.riem import sizing

    monkeypatch.setattr(sizing, "search_size", lambda *a, **k: pytest.fail("pilot fits by default"))
    settings = RieMSettings()
    assert settings.sizing == "wide" and not settings.searched
    q, m, bits, extra = choose_shape(np.zeros((384, 384), np.float32), 0.125, settings)
    first, second = riem.size_candidates(384, 384, 0.125, (8,), "float16")
    assert (q, m, bits) == second and second[1] > first[1] and extra == {"sizing": "wide"}


def test_auto_state_bits_only_for_riem():
    with pytest.raises(InputError, match="state_bits"):
        rc.Config(method="svd", state_bits="auto")
    with pytest.raises(InputError, match="state_bits"):
        RieMSettings(state_bits=5)
    with pytest.raises(InputError, match="pilot_steps"):
        RieMSettings(pilot_steps=-1)
    assert rc.Config(method="riem", state_bits="auto").state_bits == "auto"


def test_cli_takes_auto_state_bits_and_pilot_steps():
    from riem_compiler.cli.arguments import _config_from_args, build_parser

    args = build_parser().parse_args(["m.onnx", "--no-cache", "--state-bits", "auto", "--riem-pilot-steps", "7",
                                      "--riem-sizing", "search"])
    config = _config_from_args(args)
    settings = rc.methods.get("riem").settings(config)
    assert config.state_bits == "auto" and settings.pilot_steps == 7 and settings.searched
    assert _config_from_args(build_parser().parse_args(["m.onnx", "--no-cache", "--state-bits", "6"])).state_bits == 6
