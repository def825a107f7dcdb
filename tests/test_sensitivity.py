"""auto's data-free output sensitivity: exact second moments for linear, conv and embedding layers,
a zero gain for a layer the network ignores, optimality against brute force where the proxy is exact,
and the planner's options (error_ceiling, executor, the report)."""
import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

import riem_compiler as rc
from riem_compiler import methods
from riem_compiler.errors import InputError
from riem_compiler.frontend.torch_frontend import find_torch_layers
from riem_compiler.methods import rtn as rtn_m
from riem_compiler.methods import svd as svd_m
from riem_compiler.methods.dense import fit_dense
from riem_compiler.passes import auto
from riem_compiler.passes.executors import LocalExecutor
from riem_compiler.passes.sensitivity import SensitivitySettings, TorchSensitivity


def _specs(model, **cfg):
    return find_torch_layers(model, rc.Config(min_weight_size=0, quiet=True, **cfg)).layers


class Parallel(nn.Module):
    """Independent linear maps of slices of the input, outputs concatenated: the model's squared
    output error is exactly the sum of the layers' ||(W - W_hat) x||^2."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.c = nn.Linear(48, 40), nn.Linear(32, 48), nn.Linear(64, 24)
        with torch.no_grad():
            for lin, scale in ((self.a, 1.0), (self.b, 0.3), (self.c, 2.0)):
                lin.weight.copy_(scale * torch.randn(lin.weight.shape, generator=g))
        self.mix = torch.randn(48, 48, generator=g)  # correlated inputs for a: its moments are not identity

    def forward(self, x):
        xa = x[:, :48] @ self.mix
        return torch.cat([self.a(xa), self.b(x[:, 48:80]), self.c(x[:, 80:144])], dim=1)


def test_linear_moments_are_exact():
    model = Parallel().eval()
    specs = _specs(model)
    sens = TorchSensitivity(model, specs, (torch.randn(2, 144),), settings=SensitivitySettings(samples=64, holdout=8))
    spec = next(s for s in specs if s.name == "a.weight")
    cw = rtn_m.fit_rtn(spec.weight, 2, None)
    err = torch.from_numpy(spec.weight - methods.decode(cw))
    x = sens.inputs[0][:, :48] @ model.mix
    direct = float((x @ err.T).pow(2).sum(1).mean())
    assert sens.layer_error(spec, cw) == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("samples", [16, 200])
def test_few_input_vectors_keep_the_factor_and_score_as_the_matrix_does(samples):
    # 16 samples < 48 inputs: the vectors themselves (the factor form); 200: the matrix, summed
    # batch by batch exactly as before the factor form existed
    model = Parallel().eval()
    specs = _specs(model)
    sens = TorchSensitivity(model, specs, (torch.randn(2, 144),), settings=SensitivitySettings(samples=samples, holdout=4))
    spec = next(s for s in specs if s.name == "a.weight")
    held = sens.moments[spec.name]
    x = (sens.inputs[0][:, :48] @ model.mix).double()
    reference = (x.T @ x / len(x)).float()
    if samples < 48:
        assert held.matrix is None and tuple(held.factor.shape) == (1, samples, 48)
        torch.testing.assert_close(held.dense()[0], reference, rtol=1e-5, atol=1e-6)
    else:
        assert held.factor is None
        assert torch.equal(held.matrix[0], reference)
    cw = rtn_m.fit_rtn(spec.weight, 2, None)
    err = torch.from_numpy(spec.weight - methods.decode(cw))
    direct = float((x.float() @ err.T).pow(2).sum(1).mean())
    assert sens.layer_error(spec, cw) == pytest.approx(direct, rel=1e-5)


def test_moments_switch_from_vectors_to_the_sum_mid_stream():
    from riem_compiler.passes.sensitivity import Moments

    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, n, 10, generator=g) for n in (4, 5, 6)]  # 4, 9 <= 10, then 15 > 10
    acc, seen = Moments(max_vectors=100), []
    for i, b in enumerate(batches):
        acc.add(b)
        seen.append(b.double())
        held = acc.result()
        if i < 2:
            assert held.matrix is None and held.factor.shape == (2, sum(x.shape[1] for x in seen), 10)
    total = sum(torch.einsum("gnd,gne->gde", v, v) for v in seen)  # the old accumulation, batch by batch
    assert torch.equal(held.matrix, (total / 15).float())


def test_conv_moments_are_exact_depthwise_and_padded():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(6, 6, 3, padding=1, stride=2, groups=3, bias=False)
    model = nn.Sequential(conv).eval()
    specs = _specs(model)
    sens = TorchSensitivity(model, specs, (torch.randn(1, 6, 9, 9),),
                            settings=SensitivitySettings(samples=8, holdout=2, max_vectors=10**6))
    spec = specs[0]
    w_hat = spec.weight + 0.1 * torch.randn(spec.shape, generator=g).numpy()
    diff = conv._conv_forward(sens.inputs[0], torch.from_numpy(spec.weight - w_hat), None)  # (N, 6, 5, 5)
    direct = float(diff.pow(2).sum(1).mean())  # per output position, summed over channels
    cw = fit_dense(w_hat.astype(np.float32), "float32")
    assert sens.layer_error(spec, cw) == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("shape, kernel, stride, dilation, pad, groups", [
    ((5, 6, 17, 13), (3, 3), (1, 1), (1, 1), [1, 1, 1, 1], 1),
    ((7, 8, 11, 9), (3, 2), (2, 1), (1, 2), [0, 1, 2, 0], 2),
    ((4, 6, 30), (3,), (2,), (1,), [1, 1], 3),
])
def test_strided_conv_patches_unfold_a_few_samples_at_a_time_and_keep_the_same_rows(
        monkeypatch, shape, kernel, stride, dilation, pad, groups):
    """The kept patches are exactly every step-th of all of them, however many samples are
    unfolded at once; and Moments.add_conv (which sums the pieces as they come) matches add() of
    all the patches."""
    from riem_compiler.passes import sensitivity as se

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    full = se.conv_patches(x, kernel, stride, dilation, pad, groups)
    assert full.shape[1] == se.patch_count(x.shape, kernel, stride, dilation, pad)
    for chunk_bytes in (1, 700, 1 << 30):  # one sample at a time, a few, all
        monkeypatch.setattr(se, "PATCH_CHUNK_BYTES", chunk_bytes)
        for step in (1, 2, 3, 7, 50):
            assert torch.equal(se.conv_patches(x, kernel, stride, dilation, pad, groups, step=step), full[:, ::step])
        whole, strided = se.Moments(max_vectors=40), se.Moments(max_vectors=40)
        whole.add(full)
        strided.add_conv(x, kernel, stride, dilation, pad, groups)
        assert strided.count == whole.count
        torch.testing.assert_close(strided.result().dense(), whole.result().dense(), rtol=1e-6, atol=1e-7)


def test_embedding_moments_weight_rows_by_frequency():
    emb = nn.Embedding(50, 8)
    model = nn.Sequential(emb).eval()
    specs = _specs(model, compress_embeddings=True)
    ids = torch.tensor([[3, 40, 7, 7]])
    sens = TorchSensitivity(model, specs, (ids,), settings=SensitivitySettings(samples=16, holdout=2))
    assert sens.input_mode == "uniform ids"
    assert int(sens.inputs[0].min()) >= 3 and int(sens.inputs[0].max()) <= 40
    spec = specs[0]
    cw = rtn_m.fit_rtn(spec.weight, 2, None)
    err = torch.from_numpy(spec.weight - methods.decode(cw))
    direct = float(err[sens.inputs[0].reshape(-1)].pow(2).sum(1).mean())
    assert sens.layer_error(spec, cw) == pytest.approx(direct, rel=1e-5)


class Ignored(nn.Module):
    """`dead`'s output is multiplied by 0: the model does not depend on its weight at all."""

    def __init__(self):
        super().__init__()
        self.dead, self.live = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return 0.0 * self.dead(x) + self.live(x)


def test_ignored_layer_has_zero_sensitivity_and_gets_the_cheapest_candidate():
    torch.manual_seed(0)
    model = Ignored().eval()
    res = rc.optimize(model, (torch.randn(4, 32),), method="auto", ratio=0.2, min_weight_size=0, quiet=True, steps=30)
    plan = res.report.auto
    assert plan["objective"] == "output"
    dead = plan["sensitivity"]["layers"]["dead.weight"]
    assert dead["gain"] == 0.0
    choice = next(c for c in plan["choices"] if c["name"] == "dead.weight")
    assert all(c["cost"] == 0.0 for c in choice["candidates"])
    assert choice["nbytes"] == min(c["nbytes"] for c in choice["candidates"])
    live = next(c for c in plan["choices"] if c["name"] == "live.weight")
    assert plan["sensitivity"]["layers"]["live.weight"]["gain"] > 0 and live["nbytes"] > choice["nbytes"]


def test_plan_is_optimal_against_brute_force_with_the_exact_linear_proxy():
    model = Parallel().eval()
    specs = _specs(model)
    sens = TorchSensitivity(model, specs, (torch.randn(2, 144),),
                            settings=SensitivitySettings(samples=256, holdout=256))
    pools = {}
    for s in specs:
        pools[s.name] = [rtn_m.fit_rtn(s.weight, b, None) for b in (8, 4, 3, 2)] + \
                        [svd_m.fit_svd(s.weight, r, 16) for r in (0.5, 0.25)]
    total = sum(s.fp32_bytes for s in specs)
    for ratio in (0.15, 0.25, 0.4):
        result = auto.choose_methods_detailed(specs, ratio, lambda spec, r: pools[spec.name], sensitivity=sens)
        assert result.nbytes <= ratio * total
        chosen = sens.measure({c.name: methods.decode(c.weight) for c in result.choices})
        assert result.proxy == pytest.approx(chosen, rel=1e-4)  # the proxy is the measured error
        best = np.inf
        for combo in itertools.product(*(range(len(pools[s.name])) for s in specs)):
            picks = [pools[s.name][j] for s, j in zip(specs, combo)]
            if sum(cw.nbytes for cw in picks) <= ratio * total:
                best = min(best, sens.measure({s.name: methods.decode(cw) for s, cw in zip(specs, picks)}))
        assert chosen == pytest.approx(best, rel=1e-4), ratio


def test_measured_plan_errors_are_reported_but_the_predicted_cost_decides(monkeypatch):
    """Far from the original the measured squared error saturates and prefers output-shrinking
    plans (MiniLM at 1/24), so a plan that measures better but is predicted worse is not taken."""
    model = Parallel().eval()
    specs = _specs(model)
    sens = TorchSensitivity(model, specs, (torch.randn(2, 144),), settings=SensitivitySettings(samples=64))
    pools = {s.name: [rtn_m.fit_rtn(s.weight, b, None) for b in (8, 4, 2)] + [svd_m.fit_svd(s.weight, 0.25, 16)]
             for s in specs}
    honest = auto.choose_methods_detailed(specs, 0.2, lambda spec, r: pools[spec.name], sensitivity=sens)
    assert honest.source == "knapsack" and set(honest.measured) > {"knapsack"}
    # a measurement that flatters every plan after the first (the knapsack's) changes the report only
    real, calls = TorchSensitivity.plan_error, []

    def flattering(self, weights):
        calls.append(weights)
        return real(self, weights) * (1.0 if len(calls) == 1 else 1e-6)

    monkeypatch.setattr(TorchSensitivity, "plan_error", flattering)
    flattered = auto.choose_methods_detailed(specs, 0.2, lambda spec, r: pools[spec.name], sensitivity=sens)
    assert flattered.source == "knapsack"
    assert [c.label for c in flattered.choices] == [c.label for c in honest.choices]
    assert min(flattered.measured.values()) < flattered.measured["knapsack"]


def test_error_ceiling_and_executor_are_honoured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    calls = []

    class Counting(LocalExecutor):
        def map(self, fn, jobs, on_error=None):
            jobs = list(jobs)
            calls.append((fn.__name__, len(jobs)))
            return super().map(fn, jobs, on_error)

    specs = _specs(model)
    cfg = rc.Config(method="auto", ratio=0.15, error_ceiling=0.1, min_weight_size=0, quiet=True, steps=30)
    grid = auto.CandidateGrid()
    compressed, records = auto.compress_auto(specs, cfg, grid, executor=Counting())
    assert calls == [("layer_candidates", 2)]
    for r in records:
        assert r.status == "skipped" or r.rel_error <= 0.1
        assert r.fit_seconds > 0
    plan = {}
    auto.compress_auto(specs, rc.Config(method="auto", ratio=0.15, min_weight_size=0, quiet=True), grid, plan=plan)
    assert plan["dropped"] == 0 and any(c["over_ceiling"] == 0 for c in plan["choices"])


def test_optimize_reports_the_plan_and_falls_back_without_inputs(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(3, 48)
    fast = dict(method="auto", ratio=0.2, min_weight_size=0, quiet=True, steps=30)
    res = rc.optimize(model, (x,), **fast)
    plan = res.report.to_dict()["auto"]
    assert plan["objective"] == "output" and plan["source"] in plan["measured"]
    assert plan["sensitivity"]["inputs"] == "gaussian"
    for choice in plan["choices"]:
        assert choice["candidates"] and all(np.isfinite(c["cost"]) for c in choice["candidates"])
        assert choice["reason"]
    assert rc.Report.from_dict(res.report.to_dict()).auto == plan
    weight = rc.optimize(model, (x,), **fast, sensitivity="weight")
    assert weight.report.auto["objective"] == "size_weighted" and weight.report.auto["measured"] == {}
    none = rc.optimize(model, **fast)
    assert none.report.auto["objective"] == "size_weighted"
    with pytest.raises(InputError, match="sensitivity"):
        rc.optimize(model, (x,), method="auto", sensitivity="fisher")


def _timeless(value):
    """The value without its "seconds" and "timing" entries (timings differ from run to run; nothing
    else may)."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k not in ("seconds", "timing")}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def test_sampler_inputs_and_determinism():
    model = nn.Sequential(nn.Embedding(100, 16), nn.Flatten(), nn.Linear(16 * 5, 8)).eval()

    def sampler(n, gen):
        return (torch.randint(10, 20, (n, 5), generator=gen),)

    a = rc.optimize(model, (torch.zeros(1, 5, dtype=torch.long),), method="auto", ratio=0.2, min_weight_size=0,
                    quiet=True, input_sampler=sampler, compress_embeddings=True, steps=30)
    b = rc.optimize(model, (torch.zeros(1, 5, dtype=torch.long),), method="auto", ratio=0.2, min_weight_size=0,
                    quiet=True, input_sampler=sampler, compress_embeddings=True, steps=30)
    assert a.report.auto["sensitivity"]["inputs"] == "sampler"
    assert _timeless(a.report.auto) == _timeless(b.report.auto)
    assert a.report.auto["sensitivity"]["layers"]["0.weight"]["moments"] == "embedding"
    # rows 10..19 are the only ones looked up: errors in the other rows cost nothing
    spec = _specs(model, compress_embeddings=True)[0]
    sens = TorchSensitivity(model, [spec], sampler=sampler, settings=SensitivitySettings(samples=8, holdout=2))
    noisy = spec.weight.copy()
    noisy[:10] += 1.0
    noisy[20:] -= 1.0
    assert sens.layer_error(spec, fit_dense(noisy, "float32")) == 0.0
    noisy[12] += 1.0
    assert sens.layer_error(spec, fit_dense(noisy, "float32")) > 0.0


def _onnx_linear_models():
    """A MatMul with a stored (in, out) weight, a Gemm with transB=1, a padded strided grouped Conv."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(3)
    models = []
    w = r.standard_normal((48, 40)).astype(np.float32)
    mix = r.standard_normal((48, 48)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "mix"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 40])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(mix, "mix")])
    models.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    g = r.standard_normal((32, 48)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "g"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
                              [numpy_helper.from_array(g, "g")])
    models.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    c = r.standard_normal((16, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "c"], ["y"], group=2, pads=[1, 0, 1, 2], strides=[2, 1])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 9, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(c, "c")])
    models.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    return models


@pytest.mark.parametrize("index", [0, 1, 2])
def test_onnx_moments_make_the_cost_the_measured_output_error(index):
    """One linear layer: after calibrating with one probe, every candidate's predicted cost is its
    measured output error (exact moments, in_axis 0 and 1, conv pads/strides/groups, fixed batch)."""
    from riem_compiler.frontend.onnx_frontend import find_onnx_layers
    from riem_compiler.passes.sensitivity import OnnxSensitivity

    model = _onnx_linear_models()[index]
    specs = [s for s in find_onnx_layers(model, rc.Config(min_weight_size=0, quiet=True))[0] if s.name != "mix"]
    sens = OnnxSensitivity(model, specs, SensitivitySettings(samples=16, holdout=4))
    spec = specs[0]
    assert sens.layers[spec.name].moments in ("linear", "conv")
    sens.calibrate(spec, rtn_m.fit_rtn(spec.weight, 2, None), "rtn2")
    for bits in (3, 4, 8):
        cw = rtn_m.fit_rtn(spec.weight, bits, None)
        measured = sens.measure({spec.name: methods.decode(cw)})
        assert sens.cost(spec, cw, methods.relative_error(spec.weight, cw)) == pytest.approx(measured, rel=1e-3)


def test_onnx_auto_plans_on_output_error():
    from riem_compiler.examples import DIGITS_CNN_ONNX

    res = rc.optimize(str(DIGITS_CNN_ONNX), method="auto", ratio=1 / 8, quiet=True, steps=30)
    plan = res.report.auto
    assert plan["objective"] == "output" and plan["sensitivity"]["inputs"] == "gaussian"
    assert set(plan["measured"]) >= {"knapsack"} and plan["source"] in plan["measured"]
    assert plan["nbytes"] <= plan["budget_bytes"] == int(plan["fp32_bytes"] / 8)


def test_freeing_unpickable_candidates_changes_no_plan_with_the_output_objective(monkeypatch):
    """With predicted output errors as costs, jobs still free only candidates no plan can pick."""
    model = Parallel().eval()
    specs = _specs(model)
    sens = TorchSensitivity(model, specs, (torch.randn(2, 144),), settings=SensitivitySettings(samples=16))
    freed = auto.choose_methods_detailed(specs, 0.1, sensitivity=sens)
    monkeypatch.setattr(auto, "_free_unpickable", lambda pool, spec, budget_ratio, also_keep=(): None)
    kept = auto.choose_methods_detailed(specs, 0.1, sensitivity=sens)
    assert [c.label for c in freed.choices] == [c.label for c in kept.choices]
    assert freed.measured == pytest.approx(kept.measured)
    assert any(c.weight is None for choice in freed.choices for c in choice.candidates)


def test_auto_shows_a_bar_per_phase_and_holds_out_a_quarter_of_the_samples(capsys):
    # BatchNorm inversion and the probes take minutes on an ImageNet CNN: each phase has its bar
    # (tests/test_cli.py: quiet prints nothing); the held-out set only measures plans for the report
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 5))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(8, generator=g))
        model[1].running_var.copy_(torch.rand(8, generator=g) + 0.5)
    model.eval()
    x = torch.randn(2, 3, 6, 6, generator=g)
    res = rc.optimize(model, example_inputs=(x,), method="auto", ratio=0.3, min_weight_size=0,
                      sensitivity_samples=8, sensitivity_inversion_steps=20)
    err = capsys.readouterr().err
    for phase in ("synthetic inputs: BatchNorm inversion of 8", "synthetic inputs: BatchNorm inversion of 2",
                  "auto: candidates", "auto: sensitivity probes"):
        assert phase in err
    summary = res.report.auto["sensitivity"]
    assert summary["samples"] == 8 and summary["holdout"] == 2 and summary["inputs"] == "bn_inversion"
    assert summary["inversion_steps"] == 20 and summary["probe_samples"] == 4  # the first half probe
    with pytest.raises(InputError, match="sensitivity_inversion_steps"):
        rc.Config(sensitivity_inversion_steps=0)


def test_probes_run_on_the_first_probe_samples_and_the_moments_on_all():
    from riem_compiler.metrics import squared_error_terms

    model = Parallel().eval()
    specs = _specs(model)
    full = TorchSensitivity(model, specs, (torch.randn(2, 144),), settings=SensitivitySettings(samples=16, holdout=4))
    half = TorchSensitivity(model, specs, (torch.randn(2, 144),),
                            settings=SensitivitySettings(samples=16, holdout=4, probe_samples=5))
    assert half.summary()["probe_samples"] == 5 and full.summary()["probe_samples"] == 16
    torch.testing.assert_close(half.inputs[0], full.inputs[0])  # same synthetic inputs, same moments
    spec = next(s for s in specs if s.name == "a.weight")
    torch.testing.assert_close(half.moments[spec.name].dense(), full.moments[spec.name].dense())
    cw = rtn_m.fit_rtn(spec.weight, 2, None)
    info = half.calibrate(spec, cw, "rtn2")
    # the probe's error is measured on the first 5 samples only
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        swapped.a.weight.copy_(torch.from_numpy(np.asarray(methods.decode(cw), np.float32).reshape(spec.shape)))
        num, den = squared_error_terms(model(half.inputs[0][:5]), swapped(half.inputs[0][:5]))
    assert info.probe_error == pytest.approx(num / den, rel=1e-5)
    assert info.probe_error != pytest.approx(half.measure({spec.name: methods.decode(cw)}), rel=1e-3)
    assert info.gain == pytest.approx(info.probe_error / half.layer_error(spec, cw), rel=1e-6)


def test_probe_samples_fall_back_to_all_when_inputs_cannot_be_cut():
    from riem_compiler.passes.sensitivity import _first_samples

    x = torch.randn(8, 3)
    assert _first_samples((x,), 8, 4)[0].shape == (4, 3)
    assert _first_samples((x,), 8, None) is None and _first_samples((x,), 8, 8) is None
    assert _first_samples((x, torch.randn(3, 8)), 8, 4) is None  # a second input without the sample axis
    with pytest.raises(InputError, match="probe_samples"):
        SensitivitySettings(probe_samples=0).validate()


def test_output_fn_makes_the_sensitivity_compare_what_the_deployment_uses():
    """With output_fn keeping only a's and c's outputs (the task ignores b's columns), b's gain is 0
    and b gets its cheapest candidate; without it, b counts. The held-out plan error follows too."""
    model = Parallel().eval()
    x = torch.randn(8, 144, generator=torch.Generator().manual_seed(1))

    def used(out, inputs):
        return torch.cat([out[:, :40], out[:, 88:]], dim=1)

    fast = dict(method="auto", ratio=0.2, min_weight_size=0, quiet=True, steps=30)
    res = rc.optimize(model, (x,), output_fn=used, **fast)
    layers = res.report.auto["sensitivity"]["layers"]
    assert layers["b.weight"]["gain"] == 0.0 and layers["a.weight"]["gain"] > 0 and layers["c.weight"]["gain"] > 0
    choice = next(c for c in res.report.auto["choices"] if c["name"] == "b.weight")
    assert choice["nbytes"] == min(c["nbytes"] for c in choice["candidates"])
    plain = rc.optimize(model, (x,), **fast)
    assert plain.report.auto["sensitivity"]["layers"]["b.weight"]["gain"] > 0
    specs = _specs(model)
    sens = TorchSensitivity(model, specs, (x,), settings=SensitivitySettings(samples=8, holdout=4), output_fn=used)
    swap = {"b.weight": np.zeros((48, 32), np.float32)}
    assert sens.measure(swap) == 0.0 and sens.measure(swap, holdout=True) == 0.0
    assert sens.measure({"a.weight": np.zeros((40, 48), np.float32)}) > 0
    with pytest.raises(InputError, match="output_fn must be a callable"):
        rc.optimize(model, (x,), output_fn="pool", **fast)
    from pathlib import Path

    onnx_path = Path(rc.__file__).parent / "examples" / "digits_cnn.onnx"
    with pytest.raises(InputError, match="output_fn works on PyTorch models"):
        rc.optimize(str(onnx_path), output_fn=used, method="rtn", quiet=True)


def test_probes_run_in_chunks_with_the_same_errors_and_moments(monkeypatch):
    """Forward calls of a few samples (so that no module output passes FORWARD_CHUNK_BYTES) give
    the probes the errors of one call over all samples, and leave the moments as they were."""
    from riem_compiler.passes import sensitivity as se

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10)).eval()
    specs, x = _specs(model), (torch.randn(1, 3, 8, 8),)
    settings = SensitivitySettings(samples=12, holdout=4, probe_samples=6)
    whole = TorchSensitivity(model, specs, x, settings=settings)
    assert whole.chunk == 12
    monkeypatch.setattr(se, "FORWARD_CHUNK_BYTES", 8 * 8 * 8 * 4)  # one sample's largest output
    parts = TorchSensitivity(model, specs, x, settings=settings)
    assert parts.chunk == 1 and len(parts.probe_reference) == 6 and len(parts.reference_holdout) == 4
    for spec in specs:
        torch.testing.assert_close(parts.moments[spec.name].dense(), whole.moments[spec.name].dense())
        noisy = {spec.name: spec.weight + 0.05 * np.random.default_rng(1).standard_normal(spec.shape)}
        for kw in ({}, {"probe": True}, {"holdout": True}):
            assert parts.measure(noisy, **kw) == pytest.approx(whole.measure(noisy, **kw), rel=1e-5)


@pytest.mark.parametrize("form", ["matrix", "factor"])
def test_moment_error_of_some_rows_is_those_rows_share(form):
    """auto's screening scores a fit of a few output rows: their share of the whole layer error."""
    from riem_compiler.passes.sensitivity import MomentError, SecondMoment

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5 if form == "factor" else 40, 12, generator=g)
    moment = SecondMoment(factor=x) if form == "factor" else SecondMoment(matrix=x.transpose(1, 2) @ x / 40)
    row_weights = np.random.default_rng(0).uniform(0.5, 2.0, 10).astype(np.float32)
    error = np.random.default_rng(1).standard_normal((10, 12)).astype(np.float32)
    rows = np.array([1, 4, 7])
    only_rows = np.zeros_like(error)
    only_rows[rows] = error[rows]
    for weights in (None, row_weights):
        whole = MomentError(moment, False, 1, weights)
        assert whole.for_rows(rows)(error[rows]) == pytest.approx(whole(only_rows), rel=1e-5)
    stored_in_out = MomentError(moment, False, 0)
    assert stored_in_out.for_rows(rows)(error[rows].T) == pytest.approx(stored_in_out(only_rows.T), rel=1e-5)


@pytest.mark.parametrize("form", ["matrix", "factor"])
def test_truncation_errors_are_the_layer_errors_of_the_truncated_svd(form):
    """auto's screening estimates svd's candidates from a spectrum and the moments, without the SVD's
    factors: at every rank, the layer error of the truncated SVD itself (wide and tall, either axis)."""
    from riem_compiler.metrics import spectrum
    from riem_compiler.passes.sensitivity import MomentError, SecondMoment

    g = torch.Generator().manual_seed(0)
    for n_in, n_out in ((12, 10), (12, 30)):
        x = torch.randn(1, 7 if form == "factor" else 40, n_in, generator=g) * torch.linspace(0.2, 2.0, n_in)
        moment = SecondMoment(factor=x) if form == "factor" else SecondMoment(matrix=x.transpose(1, 2) @ x / 40)
        w = np.random.default_rng(n_out).standard_normal((n_out, n_in)).astype(np.float32)
        for stored, in_axis in ((w, 1), (np.ascontiguousarray(w.T), 0)):
            err = MomentError(moment, False, in_axis)
            errors = err.truncation_errors(stored, spectrum(w))
            u, sv, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
            assert len(errors) == len(sv) + 1 and errors[-1] == 0
            for r in range(len(sv) + 1):
                cut = ((u[:, :r] * sv[:r]) @ vt[:r]).astype(np.float32)
                diff = w - cut if in_axis == 1 else (w - cut).T
                assert errors[r] == pytest.approx(err(diff), rel=1e-3, abs=1e-5 * errors[0])
    scaled = MomentError(moment, False, 1, np.ones(30, np.float32))  # folded input scales: not separable
    with pytest.raises(ValueError):
        scaled.truncation_errors(w, spectrum(w))
    grouped = MomentError(SecondMoment(matrix=torch.eye(4).repeat(2, 1, 1)), False, 1)
    with pytest.raises(ValueError):
        grouped.truncation_errors(np.ones((4, 4), np.float32), spectrum(np.ones((4, 4), np.float32)))


class TiedHead(nn.Module):
    """An embedding whose table is also the output projection (tied), between them a Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def test_probes_share_the_models_weights_swap_tied_ones_everywhere_and_leave_the_model_as_it_was():
    """The sensitivity's model holds the user's tensors (no second copy of the weights); a probe
    swaps whole tensors into it, in every module that holds a tied one, and puts the user's back:
    the measured error is that of a deep copy whose tensor is overwritten in place, bit for bit."""
    torch.manual_seed(0)
    model = TiedHead().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    specs = _specs(model)
    x = (torch.randint(0, 40, (2, 6)),)
    sens = TorchSensitivity(model, specs, x, settings=SensitivitySettings(samples=8, holdout=4))
    own = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert {t.data_ptr() for t in sens.model.parameters()} <= own  # shared, not copied
    assert sens.model is not model and sens.model.emb is not model.emb
    name = "head.weight"  # the tied table, found through the Linear that uses it
    assert name in {s.name for s in specs}
    noisy = (model.emb.weight.detach().numpy() + 0.1).astype(np.float32)
    got = sens.measure({name: noisy})
    ref = copy.deepcopy(model)  # the tied table overwritten in place: both of its uses see the change
    with torch.no_grad():
        ref.emb.weight.copy_(torch.from_numpy(noisy))
        outs = [ref(*[t[i:i + sens.chunk] for t in sens.inputs]) for i in range(0, 8, sens.chunk)]
    num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outs, sens.reference))
    den = sum(float(r.double().pow(2).sum()) for r in sens.reference)
    assert got == num / den > 0
    assert sens.model.head.weight is sens.model.emb.weight is model.emb.weight  # put back
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_swap_in_decode_memory_measures_what_a_copy_measures():
    """A whole plan's decodes are swapped in as they are (methods.decode gives torch-aligned,
    contiguous arrays the caller owns), not copied again: the module reads the decode's own memory,
    and the error is bit for bit that of the copied swap (a misaligned array is still copied)."""
    torch.manual_seed(0)
    model = TiedHead().eval()
    specs = _specs(model)
    sens = TorchSensitivity(model, specs, (torch.randint(0, 40, (2, 6)),),
                            settings=SensitivitySettings(samples=8, holdout=4))
    cw = rtn_m.fit_rtn(model.mid.weight.detach().numpy(), 3)
    decoded = methods.decode(cw)
    assert decoded.flags.c_contiguous and decoded.ctypes.data % methods.ALIGNMENT == 0
    assert not any(np.may_share_memory(decoded, a) for a in cw.arrays.values())
    seen = []
    hook = sens.model.mid.register_forward_pre_hook(lambda m, args: seen.append(m.weight.data_ptr()))
    try:
        got = sens.measure({"mid.weight": decoded}, holdout=True)
        raw = np.empty(decoded.nbytes + 2 * methods.ALIGNMENT, np.uint8)  # the same values, misaligned
        start = (-raw.ctypes.data) % methods.ALIGNMENT + 4
        shifted = raw[start:start + decoded.nbytes].view(np.float32).reshape(decoded.shape)
        shifted[...] = decoded
        copied = sens.measure({"mid.weight": shifted}, holdout=True)
    finally:
        hook.remove()
    assert seen[0] == decoded.ctypes.data and seen[-1] != shifted.ctypes.data
    assert got == copied > 0
    assert sens.plan_error({"mid.weight": cw}) == got


def test_decode_never_hands_back_the_stored_array():
    """A float32 dense record decodes to a copy: callers may write into a decode (auto's scoring
    forms W - W_hat in its memory) without touching the candidate."""
    w = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
    cw = fit_dense(w, "float32")
    out = methods.decode(cw)
    out -= 1.0
    assert np.array_equal(cw.arrays["weight"], w) and not np.may_share_memory(out, cw.arrays["weight"])


class ReadsChildWeight(nn.Module):
    """The parent multiplies by its child's weight itself: the weight is read outside the child's call."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)

    def forward(self, x):
        return torch.tanh(self.a(x)) @ self.b.weight.T


@pytest.mark.parametrize("model_cls", [TiedHead, ReadsChildWeight])
def test_a_plan_is_measured_one_decoded_pick_at_a_time_with_the_same_value(monkeypatch, model_cls):
    """plan_error decodes each pick while a module holding its weight runs (a whole plan's decodes
    were a model-sized copy): the same value, bit for bit, as swapping every decode in at once. While
    one layer runs the others hold a placeholder; a weight read outside its modules' calls (a parent
    multiplying by its child's weight) falls back to the plan decoded at once."""
    from riem_compiler.passes import sensitivity as sens_m

    torch.manual_seed(0)
    model = model_cls().eval()
    specs = _specs(model)
    x = (torch.randint(0, 40, (2, 6)),) if model_cls is TiedHead else (torch.randn(3, 12),)
    sens = TorchSensitivity(model, specs, x, settings=SensitivitySettings(samples=8, holdout=4))
    plan = {s.name: rtn_m.fit_rtn(s.weight, 3) for s in specs}
    at_once = sens.measure({name: methods.decode(cw).reshape(sens.specs[name].shape) for name, cw in plan.items()},
                           holdout=True)
    fallbacks, seen = [], []
    real = sens_m.Sensitivity.plan_error
    monkeypatch.setattr(sens_m.Sensitivity, "plan_error", lambda self, w: fallbacks.append(1) or real(self, w))
    first = sens.model.mid if model_cls is TiedHead else sens.model.a
    other = sens.model.emb if model_cls is TiedHead else sens.model.b
    hook = first.register_forward_hook(lambda m, a, o: seen.append(type(other._parameters["weight"]).__name__))
    try:
        got = sens.plan_error(plan)
    finally:
        hook.remove()
    assert got == at_once > 0
    assert fallbacks == ([] if model_cls is TiedHead else [1])
    if model_cls is TiedHead:
        assert seen and set(seen) == {"_Absent"}  # the table is decoded only while emb or head runs
    assert all(type(t) in (torch.Tensor, nn.Parameter) for t in sens.model.parameters())  # put back
    assert {t.data_ptr() for t in sens.model.parameters()} <= {t.data_ptr() for t in model.parameters()}
