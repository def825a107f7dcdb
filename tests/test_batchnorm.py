"""BatchNorm folding and DFQ preprocessing: folding is exact (torch module, fx graph, ONNX),
equalisation keeps the float outputs, bias correction removes the expected output shift, dead
channels cost nothing, the input model is never touched, and artifacts still load."""
import copy
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import riem_compiler as rc
from riem_compiler.errors import InputError
from riem_compiler.passes import batchnorm, dfq
from riem_compiler.passes.batchnorm import fold_batchnorm
from riem_compiler.passes.batchnorm_onnx import fold_batchnorm_onnx


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters far from identity (scales over two decades)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 4 + 0.05)
                m.weight.copy_(torch.exp(torch.randn(c, generator=g) * 1.2) * torch.sign(torch.randn(c, generator=g)))
                m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


class Net(nn.Module):
    """Dense conv (no bias), depthwise conv (bias), pointwise conv, ReLU6, Conv1d, Linear -> BN1d."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.b2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.act = nn.ReLU6()
        self.pw, self.b3 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.c1d, self.b1d = nn.Conv1d(32, 24, 3, padding=1), nn.BatchNorm1d(24)
        self.fc, self.bfc = nn.Linear(24 * 16, 64), nn.BatchNorm1d(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = self.act(self.b2(self.dw(h)))
        h = F.relu(self.b3(self.pw(h)))  # (N, 32, 4, 4)
        h = F.relu(self.b1d(self.c1d(h.flatten(2))))  # (N, 24, 16)
        return self.head(F.relu(self.bfc(self.fc(h.flatten(1)))))


def _x(n=8, seed=0):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("as_graph", [False, True])
def test_torch_fold_is_exact_and_copies(as_graph):
    model = _randomise_bn(Net())
    src = torch.fx.symbolic_trace(model) if as_graph else model
    before = copy.deepcopy(src)
    x = _x()
    folded, out = fold_batchnorm(src, (x,))
    assert _same_state(src, before)  # the input is never modified
    assert {bn for _, bn in out.folded} == {"b1", "b2", "b3", "b1d", "bfc"} and not out.kept
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert isinstance(folded, torch.fx.GraphModule if as_graph else Net) and folded.c1.bias is not None
    with torch.no_grad():
        ref, got = src(x), folded(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    mean, std = out.stats["c1"]  # the folded output's distribution: N(beta, (gamma sqrt(var/(var+eps)))^2)
    np.testing.assert_allclose(mean, model.b1.bias.detach().numpy(), rtol=1e-6)
    assert np.all(std > 0)


def test_unfoldable_batchnorms_are_kept_with_reasons():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)  # conv output also used elsewhere
            self.c2, self.shared = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)  # called twice
            self.fc, self.bfc = nn.Linear(8, 8), nn.BatchNorm1d(8)  # no example inputs: shape unknown
            self.c3, self.train_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.c(x)
            h = self.bn(y) + y
            h = self.shared(self.shared(self.c2(h)))
            h = self.train_bn(self.c3(h))
            return self.bfc(self.fc(h.mean((2, 3))))

    model = _randomise_bn(Odd())
    model.train_bn.train()
    folded, out = fold_batchnorm(model)
    reasons = dict(out.kept)
    assert not out.folded
    assert "feeds more than this BatchNorm" in reasons["bn"]
    assert "called 2 times" in reasons["shared"]
    assert "training mode" in reasons["train_bn"]
    assert "example inputs" in reasons["bfc"]
    assert isinstance(folded.bn, nn.BatchNorm2d)
    res = rc.optimize(model, method="rtn", ratio=0.3, min_weight_size=0, quiet=True)
    kept = dict(map(tuple, res.report.preprocess["batchnorm"]["kept"]))
    assert kept.keys() == reasons.keys()


def test_exported_program_folds_functional_batchnorm(tmp_path):
    def build():
        return _randomise_bn(nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                           nn.Conv2d(16, 16, 3, bias=True), nn.BatchNorm2d(16),
                                           nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)))
    model = build()
    x = _x(4).repeat(1, 1, 2, 2)
    gm = torch.export.export(model, (x,)).module()
    folded, out = fold_batchnorm(gm)
    assert len(out.folded) == 3 and not out.kept
    assert not any("batch_norm" in str(n.target) for n in folded.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    ep = torch.export.export(model, (x,))
    res = rc.optimize(ep, (x,), method="rtn", ratio=0.3, min_weight_size=0, quiet=True, dead_channels=True,
                      equalize=True, bias_correction=True)  # the DFQ passes find no module layers here: no-ops
    assert len(res.report.preprocess["batchnorm"]["folded"]) == 3 and res.report.output_error < 0.2
    res.save(tmp_path / "art")
    loaded = rc.load(tmp_path / "art", model=torch.export.export(build().train(), (x,)))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), res.model(x))


def _onnx_model(with_bias: bool, extra_use: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f32(8, 3, 3, 3), "W1"), numpy_helper.from_array(f32(4, 8, 1, 1), "W2")]
    conv1_in = ["x", "W1"] + (["B1"] if with_bias else [])
    if with_bias:
        inits.append(numpy_helper.from_array(f32(8), "B1"))
    for i, c in ((1, 8), (2, 4)):
        inits += [numpy_helper.from_array(np.exp(f32(c)), f"s{i}"), numpy_helper.from_array(f32(c), f"b{i}"),
                  numpy_helper.from_array(f32(c), f"m{i}"), numpy_helper.from_array(np.exp(f32(c)), f"v{i}")]
    nodes = [helper.make_node("Conv", conv1_in, ["y1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["y1", "s1", "b1", "m1", "v1"], ["z1"], epsilon=1e-3, name="bn1"),
             helper.make_node("Relu", ["z1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["y2"], name="conv2"),
             helper.make_node("BatchNormalization", ["y2", "s2", "b2", "m2", "v2"], ["out"], name="bn2")]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 6, 6])]
    if extra_use:
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 4, 6, 6]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["out"], {"x": x})[0]


@pytest.mark.parametrize("with_bias", [False, True])
def test_onnx_fold_is_exact(with_bias):
    model = _onnx_model(with_bias)
    before = model.SerializeToString()
    folded, out = fold_batchnorm_onnx(model)
    assert model.SerializeToString() == before
    assert out["folded"] == [["conv1", "bn1"], ["conv2", "bn2"]] and not out["kept"]
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert not {"s1", "v1", "m2"} & {t.name for t in folded.graph.initializer}
    onnx.checker.check_model(folded, full_check=True)
    x = np.random.default_rng(1).normal(size=(2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(model, x), rtol=1e-4, atol=1e-4)


def test_onnx_fold_keeps_a_shared_conv_output_and_compresses_folded_weights():
    folded, out = fold_batchnorm_onnx(_onnx_model(True, extra_use=True))
    assert out["folded"] == [["conv1", "bn1"]]
    assert out["kept"] == [["bn2", "the Conv's output feeds more than this BatchNormalization"]]
    res = rc.optimize(_onnx_model(True), method="rtn", ratio=0.3, min_weight_size=0, quiet=True)
    assert res.report.preprocess["batchnorm"]["folded"] == [["conv1", "bn1"], ["conv2", "bn2"]]
    w1 = numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == "W1"))
    np.testing.assert_allclose(res.specs[0].weight, w1)  # the weight compressed is the folded one
    # the default bias correction works on torch graphs only: the report says the ONNX input was not corrected
    assert res.report.preprocess["bias_correction"]["corrected"] == []
    assert "ONNX input" in res.report.preprocess["bias_correction"]["skipped"][0][1]
    assert "bias_correction" not in rc.optimize(_onnx_model(True), method="rtn", ratio=0.3, min_weight_size=0,
                                                quiet=True, bias_correction=False).report.preprocess
    with pytest.raises(InputError, match="PyTorch"):
        rc.optimize(_onnx_model(True), method="rtn", equalize=True, quiet=True)
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 32])],
        [numpy_helper.from_array(np.ones((64, 32), np.float32), "W")]), opset_imports=[helper.make_opsetid("", 17)])
    assert fold_batchnorm_onnx(plain)[0] is plain  # nothing to fold: no copy
    assert rc.optimize(plain, method="rtn", ratio=0.3, quiet=True).report.preprocess is None


def test_equalization_keeps_float_outputs_and_balances_ranges():
    model = _randomise_bn(Net())
    x = _x()
    folded, out = fold_batchnorm(model, (x,))
    folded, eq = dfq.equalize(folded, out.stats)
    assert ["c1", "dw"] in [list(p) for p in eq.pairs] and ["dw", "pw"] in [list(p) for p in eq.pairs]
    assert eq.clips == [{"module": "act", "channels": 16, "dim": 1}]  # ReLU6 became a per-channel clip
    assert isinstance(folded.act, dfq.ChannelClip) and not torch.all(folded.act.upper == 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    for first, second in eq.pairs:  # converged: each channel's range equal on both sides
        r1 = dfq.out_ranges(folded.get_submodule(first))
        r2 = dfq.in_ranges(folded.get_submodule(second))
        torch.testing.assert_close(r1, r2, rtol=1e-3, atol=0)


class Inverted(nn.Module):
    """MobileNet-style block: one nn.ReLU6 module called twice, asymmetric ZeroPad2d before the depthwise conv."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.expand, self.b0 = nn.Conv2d(8, 48, 1, bias=False), nn.BatchNorm2d(48)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.dw, self.b1 = nn.Conv2d(48, 48, 3, stride=2, groups=48, bias=False), nn.BatchNorm2d(48)
        self.project, self.b2 = nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.act = F.relu6 if functional else nn.ReLU6()

    def forward(self, x):
        h = self.act(self.b0(self.expand(x)))
        h = self.act(self.b1(self.dw(self.pad(h))))
        return self.b2(self.project(h))


@pytest.mark.parametrize("functional", [False, True])
def test_equalization_with_a_shared_or_functional_relu6_round_trips(tmp_path, functional):
    model = _randomise_bn(Inverted(functional))
    x = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(3)) * 3
    folded, out = fold_batchnorm(model, (x,))
    eq_model, eq = dfq.equalize(folded, out.stats)
    assert isinstance(eq_model, torch.fx.GraphModule) and len(eq.clips) == 2
    assert all("node" in c for c in eq.clips) and eq.pairs == [("expand", "dw"), ("dw", "project")]
    with torch.no_grad():
        torch.testing.assert_close(eq_model(x), model(x), rtol=1e-4, atol=1e-4)
    res = rc.optimize(model, (x,), method="rtn", ratio=0.3, min_weight_size=0, equalize=True,
                      bias_correction=True, quiet=True)
    assert res.report.preprocess["bias_correction"]["corrected"] == ["dw", "project"]
    res.save(tmp_path / "art")
    loaded = rc.load(tmp_path / "art", model=Inverted(functional))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), res.model(x))


def test_clipped_normal_mean_matches_sampling():
    mu, sd = np.array([-1.0, 0.5, 3.0, 7.0, 2.0]), np.array([1.0, 2.0, 0.5, 3.0, 0.0])
    z = np.random.default_rng(0).normal(size=(400000, 1)) * sd + mu
    np.testing.assert_allclose(dfq.clipped_normal_mean(mu, sd), np.maximum(z, 0).mean(0), atol=0.01)
    np.testing.assert_allclose(dfq.clipped_normal_mean(mu, sd, 0.0, 6.0), np.clip(z, 0, 6).mean(0), atol=0.01)


def test_bias_correction_removes_the_expected_output_shift():
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(nn.Linear(8, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 64)))
    with torch.no_grad():
        model[1].bias.add_(1.5)  # mostly positive pre-activations: a large E[x]
    x = torch.randn(4, 8)
    kwargs = dict(method="rtn", ratio=0.07, min_weight_size=1024, quiet=True)
    plain = rc.optimize(model, (x,), bias_correction=False, **kwargs)
    corrected = rc.optimize(model, (x,), **kwargs)  # on by default
    assert corrected.report.preprocess["bias_correction"]["corrected"] == ["3"]
    # inputs of the compressed layer drawn from the BatchNorm's distribution through the ReLU
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 128, generator=g) * model[1].weight.detach().abs() + model[1].bias.detach()
    h = F.relu(z)
    with torch.no_grad():
        ref = model[3](h)
        shift_plain = (plain.model[3](h) - ref).mean(0).norm()
        shift_corr = (corrected.model[3](h) - ref).mean(0).norm()
    assert shift_plain > 0.05 * ref.mean(0).norm()
    assert shift_corr < 0.2 * shift_plain


def test_dead_channels_cost_nothing():
    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                        nn.Conv2d(4, 4, 3, padding=1)))
    with torch.no_grad():  # channel 2: gamma 0 (constant beta > 0); channel 5: variance 0, beta < 0
        model[1].weight[2], model[1].bias[2] = 0.0, 0.7
        model[1].running_var[5], model[1].bias[5] = 0.0, -0.4
        model[0].weight[5] = 0.0
        model[0].bias[5] = model[1].running_mean[5]
        model[4].weight[1], model[4].bias[1] = 0.0, 0.9  # constant 0.9 into a padded conv: not moved
    res = rc.optimize(model, (_x(2, 3).repeat(1, 1, 2, 2),), method="rtn", ratio=0.3, min_weight_size=0,
                      dead_channels=True, quiet=True)
    dead = res.report.preprocess["dead_channels"]
    assert dead["0"] == {"channels": [2, 5], "moved_to": "3"} and dead["3"] == {"channels": [1], "moved_to": ""}
    prepared = res.prepared
    assert torch.all(prepared[0].weight[[2, 5]] == 0) and torch.all(prepared[3].weight[:, [2, 5]] == 0)
    assert torch.all(prepared[3].weight[1] == 0) and float(prepared[3].bias[1].detach()) == pytest.approx(0.9)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [{}, {"equalize": True, "bias_correction": True, "dead_channels": True}])
def test_round_trip_with_folding(tmp_path, options):
    model = _randomise_bn(Net())
    before = copy.deepcopy(model)
    x = _x()
    res = rc.optimize(model, (x,), method="rtn", ratio=0.3, min_weight_size=0, quiet=True, **options)
    assert _same_state(model, before) and isinstance(model.b1, nn.BatchNorm2d)
    assert len(res.report.preprocess["batchnorm"]["folded"]) == 5
    assert re.search(r"BATCHNORM +5 folded", str(res.report)) and rc.Report.from_dict(res.report.to_dict()).preprocess
    assert res.report.output_error < 0.1
    res.save(tmp_path / "art")
    fresh = Net()  # train mode, random init: only the architecture matters
    loaded = rc.load(tmp_path / "art", model=fresh)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), res.model(x))
    assert isinstance(fresh.b1, nn.BatchNorm2d)


def test_options_are_validated_and_off_switch_keeps_batchnorm():
    with pytest.raises(InputError, match="fold_batchnorm"):
        rc.Config(dead_channels=True, fold_batchnorm=False)
    with pytest.raises(InputError, match="equalize must be True or False"):
        rc.Config(equalize="yes")
    model = _randomise_bn(Net())
    res = rc.optimize(model, (_x(),), method="rtn", ratio=0.3, min_weight_size=0, fold_batchnorm=False, quiet=True)
    # no folded statistics: the default bias correction has nothing to work from and leaves the fit as it is
    assert res.report.preprocess is None and isinstance(res.model.b1, nn.BatchNorm2d) and res.prepared is model
    plain = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    res = rc.optimize(plain, method="rtn", ratio=0.3, min_weight_size=0, quiet=True)
    assert res.report.preprocess is None and res.prepared is plain  # no BatchNorm: no copy made
    from riem_compiler.cli.arguments import _config_from_args, build_parser

    args = build_parser().parse_args(["m.onnx", "--no-fold-batchnorm", "--equalize", "--no-cache"])
    cfg = _config_from_args(args)
    assert (cfg.fold_batchnorm, cfg.equalize, cfg.bias_correction) == (False, True, True)
    args = build_parser().parse_args(["m.onnx", "--no-bias-correction", "--no-cache"])
    assert _config_from_args(args).bias_correction is False


def test_clipped_normal_moments_match_sampling():
    mu, sd = np.array([-1.0, 0.5, 3.0, 7.0]), np.array([1.0, 2.0, 0.5, 3.0])
    z = np.random.default_rng(0).normal(size=(400000, 1)) * sd + mu
    mean, std = dfq.clipped_normal_moments(mu, sd, 0.0, 6.0)
    np.testing.assert_allclose(mean, np.clip(z, 0, 6).mean(0), atol=0.01)
    np.testing.assert_allclose(std, np.clip(z, 0, 6).std(0), atol=0.01)


class _Res(nn.Module):
    def __init__(self, twice: bool):
        super().__init__()
        self.twice = twice
        self.a, self.ba = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)
        self.b, self.bb = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)
        self.c, self.bc = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.ba(self.a(x)) + self.bb(self.b(x)))
        y = self.fc(F.relu6(self.bc(self.c(h))).mean((2, 3)))
        return (y, self.a(x)) if self.twice else y


def test_expected_inputs_through_residual_sums_and_means():
    folded, out = fold_batchnorm(_randomise_bn(_Res(twice=False)))
    expected, why = dfq.expected_inputs(folded, out.stats)
    (ma, sa), (mb, sb), (mc, sc) = out.stats["a"], out.stats["b"], out.stats["c"]
    np.testing.assert_allclose(expected["c"], dfq.clipped_normal_mean(ma + mb, np.sqrt(sa ** 2 + sb ** 2)))
    np.testing.assert_allclose(expected["fc"], dfq.clipped_normal_mean(mc, sc, 0.0, 6.0))
    assert "a" in why and "b" in why  # the model's input has no statistics
    folded, out = fold_batchnorm(_randomise_bn(_Res(twice=True)))
    expected, why = dfq.expected_inputs(folded, out.stats)
    assert "called more than once" in why["a"] and "a" not in expected


def test_bias_correction_still_runs_after_equalisation_turned_relu6_modules_into_clips():
    """Equalisation makes each (unshared) nn.ReLU6 module a ChannelClip in the module tree; the bias
    correction's graph walk must still trace the model (a ChannelClip stays a module call) and
    correct the layers behind it."""
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                                        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                                        nn.Conv2d(16, 8, 1)))
    x = torch.randn(2, 3, 8, 8)
    res = rc.optimize(model, (x,), method="rtn", ratio=0.3, min_weight_size=0, quiet=True, equalize=True)
    assert isinstance(res.prepared[2], dfq.ChannelClip) and not isinstance(res.prepared, torch.fx.GraphModule)
    assert res.report.preprocess["bias_correction"]["corrected"] == ["3", "6"]
    traced = batchnorm.trace(res.prepared)
    assert any(n.op == "call_module" and n.target == "2" for n in traced.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), res.prepared(x))
