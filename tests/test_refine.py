"""Data-free refinement: trainable views decode exactly what is stored, refinement lowers the
output error on inputs it never saw, keeps bytes, is deterministic, and needs no data."""
import functools

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import structured_matrix

import riem_compiler as rc
from riem_compiler.errors import InputError
from riem_compiler.methods.dense import fit_dense
from riem_compiler.methods.rtn import fit_rtn
from riem_compiler.methods.svd import fit_svd
from riem_compiler.methods.tucker2 import fit_tucker2
from riem_compiler.methods.riem.fit import FitSettings, fit_riem
from riem_compiler.passes.refine import (RefineSettings, make_synthetic, make_trainable, refine_result,
                                         refine_torch)
from riem_compiler.passes.rewrite_torch import RieMWeight
from riem_compiler.methods import decode


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the cores are shared: more threads were much slower here
    yield
    torch.set_num_threads(old)


@functools.lru_cache(maxsize=1)
def _weights():
    w = structured_matrix(48, 64, seed=1)
    conv = np.random.default_rng(2).normal(size=(16, 8, 3, 3)).astype(np.float32)
    riem8 = fit_riem(w, 6, 8, 8, "float16", FitSettings(steps=40, seed=0)).weight
    riem32 = fit_riem(w, 6, 8, 32, "float32", FitSettings(steps=20, seed=0)).weight
    return [
        (w, riem8), (w, riem32),
        (w, fit_svd(w, 0.25, 16)), (w, fit_svd(w, 0.25, 8)),
        (conv, fit_tucker2(conv, 0.25)), (w, fit_rtn(w, 4, 16)),
        (w, fit_rtn(w, 8, None)), (w, fit_dense(w, "float16")),
    ]


@pytest.mark.parametrize("case", range(8))
def test_view_decodes_the_stored_weight_and_stores_it_back(case):
    _, cw = _weights()[case]
    view = make_trainable(cw, "w")
    ref = decode(cw)
    np.testing.assert_allclose(view().detach().numpy(), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    back = view.to_compressed()
    assert back.method == cw.method and back.meta == cw.meta and back.nbytes == cw.nbytes
    assert {k: (v.dtype, v.shape) for k, v in back.arrays.items()} == {k: (v.dtype, v.shape) for k, v in cw.arrays.items()}
    np.testing.assert_allclose(decode(back), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("case", range(8))
def test_what_is_trained_is_what_is_stored(case):
    """After the float parameters move, the stored arrays decode to the weight the view computed
    (its straight-through rounding equals the storage rounding)."""
    _, cw = _weights()[case]
    view = make_trainable(cw, "w")
    g = torch.Generator().manual_seed(case)
    with torch.no_grad():
        for p in view.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.pow(2).mean().sqrt())
    trained = view().detach().numpy()
    stored = view.to_compressed()
    assert stored.nbytes == cw.nbytes
    assert not np.allclose(trained, decode(cw))
    np.testing.assert_allclose(decode(stored), trained, rtol=1e-4, atol=1e-5 * np.abs(trained).max())


def _bn_mlp(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 40))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.2, 1.0)
    return net.eval()


def _fresh_error(original, model, n=256, seed=123):
    x = torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y, ref = model(x), original(x)
    return float((y - ref).pow(2).sum() / ref.pow(2).sum())


def test_refine_lowers_output_error_on_unseen_inputs_and_keeps_bytes():
    net = _bn_mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 32)
    res = rc.optimize(net, example_inputs=(x,), ratio=0.25, method="svd", quiet=True)
    settings = RefineSettings(steps=120, inputs="gaussian", num_samples=256, holdout=64, batch_size=32)
    outcome = refine_torch(net, res.model, settings, (x,))
    assert outcome.kept and outcome.loss_after < 0.8 * outcome.loss_before
    # judged on Gaussian inputs neither training nor the hold-out saw
    assert _fresh_error(net, outcome.model) < 0.8 * _fresh_error(net, res.model)
    assert {k: v.nbytes for k, v in outcome.compressed.items()} == {k: v.nbytes for k, v in res.compressed.items()}
    for mod in outcome.model.modules():  # the model's buffers are the stored arrays of the outcome
        if isinstance(mod, RieMWeight):
            for name, arr in outcome.compressed[mod.param_name].arrays.items():
                np.testing.assert_array_equal(getattr(mod, name).numpy(), arr)
    for k, v in net.state_dict().items():  # the original is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not outcome.model.training


def test_refine_is_deterministic():
    net = _bn_mlp(1)
    x = torch.randn(4, 32)
    res = rc.optimize(net, example_inputs=(x,), ratio=0.25, method="rtn", quiet=True)
    s = RefineSettings(steps=15, num_samples=64, holdout=32, inversion_steps=10, inversion_batch=32)
    a = refine_torch(net, res.model, s, (x,))
    b = refine_torch(net, res.model, s, (x,))
    assert a.inputs == "bn_inversion"
    assert a.loss_after == b.loss_after
    for name in a.compressed:
        for key, arr in a.compressed[name].arrays.items():
            np.testing.assert_array_equal(arr, b.compressed[name].arrays[key])


def test_refine_riem_result_and_saved_artifact_round_trip(tmp_path):
    net = _bn_mlp(2)
    x = torch.randn(4, 32)
    res = rc.optimize(net, example_inputs=(x,), ratio=0.25, method="riem", steps=40, quiet=True)
    err_fit = res.report.output_error
    res, outcome = refine_result(res, RefineSettings(steps=60, inputs="gaussian", num_samples=128, holdout=64),
                                 (x,))
    assert outcome.kept and outcome.loss_after < outcome.loss_before
    assert res.report.output_error < err_fit  # on the example inputs, not used for refinement
    loaded = rc.load(res.save(tmp_path / "art"), model=_bn_mlp(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), res.model(x), rtol=1e-5, atol=1e-5)


def test_bn_inversion_matches_running_statistics():
    net = _bn_mlp(3)
    with torch.no_grad():  # reachable, but far from what N(0, 1) inputs produce: inputs centred at 1.5
        net[1].running_mean.copy_(net[0](torch.full((1, 32), 1.5))[0])
    s = RefineSettings(num_samples=64, holdout=16, inversion_steps=150, inversion_batch=64, inversion_lr=0.1)
    syn = make_synthetic(net, (torch.randn(2, 32),), s)
    assert syn.mode == "bn_inversion" and syn.train[0].shape == (64, 32)
    noise = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap_noise = (net[0](noise).mean(0) - net[1].running_mean).norm()
        gap_syn = (net[0](syn.train[0]).mean(0) - net[1].running_mean).norm()
    assert gap_syn < 0.3 * gap_noise


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 7), (4, 3, 9, 8)])
def test_inversion_channel_statistics_match_torch(shape):
    from riem_compiler.passes.synthetic_inputs import _channel_mean_var

    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2.0 + 3.0).requires_grad_()
    mean, var = _channel_mean_var(x)
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(mean, x.mean(dims), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, x.var(dims, unbiased=False), rtol=1e-4, atol=1e-4)
    (var.sum() + mean.sum()).backward()  # differentiable: the inversion descends through it
    expected = torch.autograd.grad((x.var(dims, unbiased=False).sum() + x.mean(dims).sum()), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-5)


def _bn_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 5 * 5, 10)).eval()
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("micro", [1, 3, 7])
def test_micro_batched_inversion_step_has_the_whole_batch_gradient(micro):
    """BatchNorm statistics couple the samples of a batch; the micro-batched step still gives
    each sample the whole batch's gradient (priors and pseudo-label term included)."""
    from riem_compiler.passes import synthetic_inputs as si

    net, s = _bn_cnn(), RefineSettings(inversion_ce=0.5, inversion_tv=1e-2, inversion_l2=1e-2)
    bns = si._batchnorms(net)
    x0 = torch.randn(10, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    whole, parts = [x0.clone().requires_grad_()], [x0.clone().requires_grad_()]
    loss_whole = si._whole_batch_step(net, bns, whole, 5, s, 10)
    loss_micro = si._micro_batch_step(net, bns, parts, 5, s, micro)
    assert loss_micro == pytest.approx(loss_whole, rel=1e-5)
    torch.testing.assert_close(parts[0].grad, whole[0].grad, rtol=1e-4, atol=1e-7)


def test_inversion_micro_batches_follow_the_memory_setting_and_give_the_same_inputs():
    from riem_compiler.passes import synthetic_inputs as si

    net, x = _bn_cnn(), (torch.randn(1, 3, 12, 12),)
    per_sample = 4 * (8 * 144 * 3 + 8 * 25 * 3 + 200 + 10)  # every leaf module's output for one sample
    assert sum(si.leaf_output_bytes(net, [x[0]])) == per_sample
    assert si.micro_batch(net, [x[0]], RefineSettings(inversion_memory_mb=0)) == 1
    assert si.micro_batch(net, [x[0]], RefineSettings(inversion_memory_mb=1)) == (1 << 20) // per_sample
    made = {}
    for mb in (0, 512):  # micro-batches of one sample; the whole batch of 12 at once
        s = RefineSettings(inversion_steps=20, inversion_batch=12, inversion_memory_mb=mb)
        made[mb] = si.bn_inversion(net, x, 24, torch.Generator().manual_seed(1), s)[0]
    torch.testing.assert_close(made[0], made[512], rtol=0, atol=1e-3)


class _TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(100, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1)


def test_integer_inputs_need_a_sampler():
    net = _TokenNet().eval()
    ids = torch.randint(0, 100, (2, 5))
    res = rc.optimize(net, example_inputs=(ids,), ratio=0.25, method="svd", quiet=True)
    with pytest.raises(InputError, match="input_sampler"):
        refine_torch(net, res.model, RefineSettings(steps=2), (ids,))
    sampler = lambda n, g: (torch.randint(0, 100, (n, 5), generator=g),)  # noqa: E731
    out = refine_torch(net, res.model, RefineSettings(steps=40, input_sampler=sampler, num_samples=128), (ids,))
    assert out.inputs == "sampler" and out.loss_after < out.loss_before


def test_bad_settings_are_named():
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    x = torch.randn(2, 32)
    res = rc.optimize(net, example_inputs=(x,), ratio=0.25, method="svd", quiet=True)
    with pytest.raises(InputError, match="BatchNorm"):
        refine_torch(net, res.model, RefineSettings(inputs="bn_inversion"), (x,))
    with pytest.raises(InputError, match="inputs must be one of"):
        refine_torch(net, res.model, RefineSettings(inputs="real"), (x,))
    with pytest.raises(InputError, match="example_inputs"):
        refine_torch(net, res.model, RefineSettings())
