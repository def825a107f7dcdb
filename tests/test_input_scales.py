"""Stored input-channel scales (Config.input_scales, passes/input_scales.py): the scales follow the
formula, the compressed model computes decode(W diag s) on x / s, the scale's bytes are counted and
fit the budget, layers kept dense get their weight back, and the artifact, ONNX and TVM forms give
the torch model's outputs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import riem_compiler as rc
from riem_compiler import methods
from riem_compiler.errors import InputError
from riem_compiler.passes import input_scales


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 96), nn.Linear(96, 32)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _mlp():
    torch.manual_seed(0)
    return Mlp().eval()


def _sampler(n, gen):  # inputs whose channels carry very different energy: what the scales are for
    return (torch.randn(n, 64, generator=gen) * torch.linspace(0.05, 4.0, 64),)


def test_scales_follow_the_formula_and_keep_silent_channels_at_one():
    ms = np.array([4.0, 1.0, 0.25, 0.0, 9.0])
    inv = input_scales.scales_from(ms, 0.5)
    rms = np.sqrt(ms[[0, 1, 2, 4]])
    centre = np.exp(np.log(rms).mean())
    expected = 1.0 / (rms / centre) ** 0.5
    np.testing.assert_allclose(inv[[0, 1, 2, 4]].astype(np.float64), expected, rtol=1e-3)
    assert inv.dtype == np.float16 and inv[3] == 1.0
    extreme = input_scales.scales_from(np.array([1e-30, 1.0, 1e30]), 1.0)
    assert 1 / extreme.astype(np.float64).max() >= 1 / input_scales.LIMIT * 0.99
    assert np.all(np.isfinite(extreme))


def test_compressed_model_is_the_decoded_scaled_weight_on_the_scaled_input():
    model = _mlp()
    x = _sampler(8, torch.Generator().manual_seed(5))[0]
    res = rc.optimize(model, (x,), method="rtn", ratio=0.2, min_weight_size=0, quiet=True, input_scales=0.5,
                      input_sampler=_sampler)
    entry = res.report.preprocess["input_scales"]
    assert entry["layers"] == ["fc1", "fc2"] and entry["alpha"] == 0.5 and entry["inputs"] == "sampler"
    inv1, inv2 = res.model.fc1.input_scale, res.model.fc2.input_scale
    assert inv1.dtype == torch.float16 and inv1.shape == (64,) and inv2.shape == (96,)
    assert float(inv1[-1]) < float(inv1[0])  # the loud channel got the larger column
    # the weight that was fitted: the original's columns times s, s = 1 / the stored float16 1/s
    np.testing.assert_allclose(res.specs[0].weight, model.fc1.weight.detach().numpy() / inv1.float().numpy(),
                               rtol=1e-6)
    w1 = torch.from_numpy(methods.decode(res.compressed["fc1.weight"]))
    w2 = torch.from_numpy(methods.decode(res.compressed["fc2.weight"]))
    with torch.no_grad():
        ref = F.linear(F.gelu(F.linear(x * inv1.float(), w1, model.fc1.bias)) * inv2.float(), w2, model.fc2.bias)
        torch.testing.assert_close(res.model(x), ref, rtol=1e-5, atol=1e-6)
    # bytes: the method's arrays plus 2 per input channel, and the error is the original weight's
    for rec, channels in zip(res.report.layers, (64, 96)):
        cw = res.compressed[rec.name]
        assert rec.bytes_after == cw.nbytes + 2 * channels and rec.settings["input_scale_bytes"] == 2 * channels
        original = dict(model.named_parameters())[rec.name].detach().numpy()
        inv = (inv1 if rec.name == "fc1.weight" else inv2).float().numpy()
        assert rec.rel_error == pytest.approx(np.linalg.norm(methods.decode(cw) * inv - original)
                                              / np.linalg.norm(original), rel=1e-4)


def test_auto_fits_the_budget_with_the_scales_counted_and_dense_layers_get_their_weight_back():
    model = _mlp()
    x = torch.randn(4, 64)
    res = rc.optimize(model, (x,), method="auto", ratio=0.1, min_weight_size=0, quiet=True, input_scales=0.25,
                      input_sampler=_sampler)
    fp32 = sum(r.bytes_before for r in res.report.layers)
    assert sum(r.bytes_after for r in res.report.layers) <= 0.1 * fp32
    assert all(r.settings.get("input_scale_bytes") for r in res.report.layers)
    kept = rc.optimize(model, (x,), method="rtn", ratio=0.2, min_weight_size=0, quiet=True, input_scales=0.5,
                       input_sampler=_sampler, error_ceiling=1e-9)  # every fit refused: all layers stay dense
    assert kept.report.preprocess["input_scales"]["layers"] == []
    assert kept.report.preprocess["input_scales"]["dropped"] == 2
    with torch.no_grad():
        torch.testing.assert_close(kept.model(x), model(x), rtol=1e-5, atol=1e-6)


def test_artifact_onnx_and_tvm_run_the_scales(tmp_path):
    model = _mlp()
    x = torch.randn(3, 64)
    res = rc.optimize(model, (x,), method="affine", ratio=0.2, min_weight_size=0, quiet=True, input_scales=0.5,
                      input_sampler=_sampler)
    with torch.no_grad():
        ref = res.model(x).numpy()
    res.save(tmp_path / "art")
    loaded = rc.load(tmp_path / "art", model=Mlp())
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(x).numpy(), ref)
    path = res.export_onnx(tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    scales = [t for t in graph.initializer if t.name.endswith("input_scale")]
    assert len(scales) == 2 and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)
    assert {n.op_type for n in graph.node} >= {"Mul", "MatMulNBits"}  # still run compressed
    sess = ort.InferenceSession(str(path))
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], ref, rtol=1e-4, atol=1e-5)
    pytest.importorskip("tvm")
    from riem_compiler.codegen.tvm_runtime import load_tvm

    out = res.build_tvm(tmp_path / "tvm", target="llvm", int8_activations=False)  # exact: float32 activations
    np.testing.assert_allclose(load_tvm(out)(x.numpy()), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


class Branches(nn.Module):
    """conv -> BatchNorm -> ReLU feeding two 1x1 convs: their input is shared, so their scales cannot
    be folded into `a` and are stored."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.b, self.c = nn.Conv2d(16, 32, 1), nn.Conv2d(16, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        h = F.relu(self.bn(self.a(x)))
        return torch.cat([self.b(h), self.dw(self.c(h))], 1)


def _randomise(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.bias.uniform_(0.5, 1.5)


def test_stored_conv_scales_skip_depthwise_and_bias_correction_sees_the_scaled_input():
    torch.manual_seed(0)
    model = Branches().eval()
    _randomise(model.bn)
    x = torch.randn(2, 3, 8, 8)
    res = rc.optimize(model, (x,), method="rtn", ratio=0.2, min_weight_size=0, quiet=True, input_scales=0.5)
    entry = res.report.preprocess["input_scales"]
    assert sorted(entry["layers"]) == ["a", "b", "c"] and entry["folded"] == []  # the depthwise "dw": no scale
    assert "b" in res.report.preprocess["bias_correction"]["corrected"]
    # the correction removes the expected shift of the scaled layer: (W_hat' - W') E[x * inv] per output
    plain = rc.optimize(model, (x,), method="rtn", ratio=0.2, min_weight_size=0, quiet=True, input_scales=0.5,
                        bias_correction=False)
    from riem_compiler.passes import dfq

    expected, _ = dfq.expected_inputs(res.prepared, _stats(res))
    inv = res.model.b.input_scale.double().numpy()
    spec = next(s for s in res.specs if s.module == "b")
    shift = dfq.output_shift(methods.decode(res.compressed[spec.name]) - spec.weight, 1, expected["b"] * inv)
    np.testing.assert_allclose(plain.model.b.bias.detach().double().numpy() - res.model.b.bias.detach().double().numpy(),
                               shift, rtol=1e-4, atol=1e-6)


def test_a_scale_after_one_layer_and_relu6_is_folded_into_it(tmp_path):
    """conv -> BatchNorm -> ReLU6 -> max pool -> conv: the second conv's 1/s goes into the first
    conv's output rows and a per-channel clip (6 / s), so nothing is stored and nothing runs extra."""
    def build():
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1))

    torch.manual_seed(0)
    model = build().eval()
    _randomise(model[1])
    with torch.no_grad():  # channels of very different energy after the ReLU6: where a scale pays
        model[1].weight.copy_(torch.logspace(-1.5, 0.5, 16))
    x = torch.randn(2, 3, 8, 8) * 3
    res = rc.optimize(model, (x,), method="rtn", ratio=0.3, min_weight_size=0, quiet=True, input_scales=0.5)
    entry = res.report.preprocess["input_scales"]
    assert entry["folded"] == [["0", "4"]] and "4" not in entry["layers"]
    assert entry["relu6_clips"] == [{"module": "2", "channels": 16, "dim": 1}]
    assert res.model[4].input_scale is None  # folded: no buffer, no Mul
    assert res.report.layers[1].settings.get("input_scale_bytes") is None
    clip = res.prepared.get_submodule("2")
    assert not torch.allclose(clip.upper, torch.full_like(clip.upper, 6.0))  # 6 / s per channel
    prepared_out = res.prepared(x)
    with torch.no_grad():
        torch.testing.assert_close(prepared_out, model(x), rtol=1e-4, atol=1e-4)  # the float model is the same
        ref = res.model(x)
    res.save(tmp_path / "art")
    loaded = rc.load(tmp_path / "art", model=build())
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(x).numpy(), ref.numpy())
    path = res.export_onnx(tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path))
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], ref.numpy(), rtol=1e-4,
                               atol=1e-4)


def _stats(res):
    from riem_compiler.passes.batchnorm import fold_batchnorm

    return fold_batchnorm(res.original, res.example_inputs)[1].stats


def test_bad_options_are_one_line_errors():
    with pytest.raises(InputError, match="input_scales must be an exponent"):
        rc.Config(input_scales=1.5)
    with pytest.raises(InputError, match="input_scales must be a finite number"):
        rc.Config(input_scales=float("nan"))
    from pathlib import Path

    onnx_path = Path(rc.__file__).parent / "examples" / "digits_cnn.onnx"
    with pytest.raises(InputError, match="input_scales works on PyTorch models"):
        rc.optimize(str(onnx_path), method="rtn", input_scales=0.25, quiet=True)
    from riem_compiler.cli.arguments import _config_from_args, build_parser

    assert _config_from_args(build_parser().parse_args(["m.pt2", "--input-scales", "0.25", "--no-cache"])).input_scales == 0.25
    assert _config_from_args(build_parser().parse_args(["m.pt2", "--no-cache"])).input_scales == 0.0


def test_each_layer_takes_the_exponent_whose_probe_has_the_lowest_output_error():
    from riem_compiler.passes.sensitivity import probe_inputs

    model = _mlp()
    x = torch.randn(4, 64)
    res = rc.optimize(model, (x,), method="rtn", ratio=0.2, min_weight_size=0, quiet=True, input_scales=0.5,
                      input_sampler=_sampler)
    entry = res.report.preprocess["input_scales"]
    inputs, _ = probe_inputs(model, (x,), 32, 0, _sampler)
    stats = input_scales.layer_statistics(model, ["fc1"], inputs)  # fc1 sees the inputs themselves
    mean_squares, moment = stats["fc1"]
    weight = model.fc1.weight.detach().numpy()
    errors = {a: input_scales.probe_error(weight, input_scales.scales_from(mean_squares, a), moment)
              for a in (0.0, 0.25, 0.5)}
    assert entry["exponents"]["fc1"] == min(errors, key=errors.get)
    assert errors[entry["exponents"]["fc1"]] < errors[0.0]  # uneven channels: a scale pays on the proxy
    # channels of equal energy: every exponent gives s = 1 to float16, so 0 wins the tie and nothing is stored
    even = rc.optimize(model, (x,), method="rtn", ratio=0.2, min_weight_size=0, quiet=True, input_scales=0.5,
                       input_sampler=lambda n, gen: (torch.ones(n, 64),))
    assert even.report.preprocess["input_scales"]["exponents"]["fc1"] == 0.0
    assert "fc1" not in even.report.preprocess["input_scales"]["layers"] and even.model.fc1.input_scale is None


def test_auto_reuses_the_synthetic_inputs_the_scales_were_measured_on(monkeypatch):
    """The scales' pass draws the sensitivity's samples (same count, seed, steps): auto takes them
    instead of drawing (on a CNN: inverting BatchNorm) again; only the held-out set is drawn."""
    from riem_compiler.passes import sensitivity

    calls = []
    real = sensitivity.probe_inputs

    def counting(model, example_inputs, n, seed, *args, **kwargs):
        calls.append((n, seed))
        return real(model, example_inputs, n, seed, *args, **kwargs)

    monkeypatch.setattr(sensitivity, "probe_inputs", counting)
    x = torch.randn(4, 64)
    rc.optimize(_mlp(), (x,), method="auto", ratio=0.2, min_weight_size=0, quiet=True, input_scales=0.25,
                input_sampler=_sampler)
    assert calls == [(32, 0), (8, 7919)]


def test_the_layer_folded_into_is_costed_in_the_units_the_model_sees():
    """Folding divides the first layer's output rows by s; its candidates' proxy error counts each row
    by s^2, so an error E / s in the folded layer costs what E costs in the original one."""
    from riem_compiler.passes.sensitivity import MomentError, SecondMoment

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g)
    moment = SecondMoment(matrix=(x.T @ x / 200)[None])
    err = np.random.default_rng(0).standard_normal((6, 12)).astype(np.float32)
    s = np.linspace(0.5, 3.0, 6)
    folded = MomentError(moment, False, 1, rows=s ** 2)(err / s[:, None])
    assert folded == pytest.approx(MomentError(moment, False, 1)(err), rel=1e-5)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    with torch.no_grad():  # output channels of very different energy: the next layer's scale pays
        model[0].weight.mul_(torch.logspace(-1.5, 0.5, 16).reshape(16, 1, 1, 1))
        model[0].bias.zero_()
    from riem_compiler.frontend.torch_frontend import find_torch_layers

    specs = find_torch_layers(model, rc.Config(min_weight_size=0)).layers
    inputs = (torch.randn(16, 3, 8, 8, generator=g),)
    _, entry, rows = input_scales.scale_layers(model, specs, inputs, 1.0)
    assert entry["folded"] == [["0", "2"]] and set(rows) == {"0.weight"}
    assert rows["0.weight"].shape == (16,) and np.all(rows["0.weight"] > 0) and np.ptp(rows["0.weight"]) > 0
