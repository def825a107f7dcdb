"""TVM codegen: RieM kernels against the torch decoder, both build modes against the torch
model, the artifact in a fresh process, the CUDA build (compile-only here), tuning (slow)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from riem_compiler import riem  # noqa: E402
from riem_compiler.methods.riem import tvm as tk  # noqa: E402
from riem_compiler.codegen.tvm_build import build_tvm, compile_cuda_source, make_target, TvmBuildOptions  # noqa: E402
from riem_compiler.codegen.tvm_runtime import load_tvm  # noqa: E402
from riem_compiler.compressed import CompressedWeight  # noqa: E402
from riem_compiler.methods import decode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def random_riem(shape, q=8, m=4, bits=8, metric_dtype="float16", seed=0) -> CompressedWeight:
    """Stored RieM arrays from random factors (no fitting needed to test decoding)."""
    g = torch.Generator().manual_seed(seed)
    n_out, n_in = shape[0], int(np.prod(shape[1:]))
    f = riem.RieMFactors(
        torch.randn(n_out, q, generator=g), torch.randn(n_in, q, generator=g),
        0.5 * torch.randn(6, m, q, generator=g), torch.randn(6, m, generator=g),
        0.05 * torch.randn(m, generator=g), torch.tensor(0.01))
    meta = {"q": q, "m": m, "k_branches": 6, "state_bits": bits, "metric_dtype": metric_dtype}
    return CompressedWeight("riem", tuple(shape), meta, riem.store(f, bits, metric_dtype))


def _run_decode(cw: CompressedWeight, schedule: bool) -> np.ndarray:
    func = tk.decode_primfunc(cw, "decode_w")
    if schedule:
        func = tk.schedule_decode_cpu(func)
    lib = tvm.compile(func, target=make_target(TvmBuildOptions()))
    args = [tvm.runtime.tensor(np.ascontiguousarray(cw.arrays[n])) for n in tk.riem_array_names(cw)]
    out = tvm.runtime.tensor(np.zeros(cw.shape, np.float32))
    lib["decode_w"](*args, out)
    return out.numpy()


@pytest.mark.parametrize("shape,bits,metric,schedule", [
    ((24, 40), 8, "float16", True),
    ((16, 4, 3, 3), 6, "float16", True),   # conv weight, 6-bit codes straddle bytes
    ((20, 16), 4, "float32", False),
    ((33, 40), 16, "float16", True),       # odd rows, 16-bit codes
    ((48, 32), 32, "float32", True),       # float states
])
def test_decode_kernel_matches_torch(shape, bits, metric, schedule):
    cw = random_riem(shape, bits=bits, metric_dtype=metric, seed=len(shape) + bits)
    got = _run_decode(cw, schedule)
    ref = decode(cw)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * max(1.0, np.abs(ref).max()))


def test_fast_exp_accuracy():
    x = np.linspace(-30, 30, 4001).astype(np.float32)
    from tvm import te

    ph = te.placeholder((x.size,), "float32", name="x")
    out = te.compute(ph.shape, lambda i: tk.fast_exp(ph[i]), name="y")
    lib = tvm.compile(te.create_prim_func([ph, out]), target=make_target(TvmBuildOptions()))
    y = tvm.runtime.tensor(np.zeros_like(x))
    lib(tvm.runtime.tensor(x), y)
    rel = np.abs(y.numpy() / np.exp(x.astype(np.float64)) - 1)
    assert rel.max() < 1e-6


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = torch.nn.Linear(8 * 8 * 8, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


class _Result:
    """The attributes of api.Result that build_tvm reads (keeps these tests independent of fitting)."""

    def __init__(self, model, compressed, example_inputs, original):
        self.model, self.compressed, self.example_inputs = model, compressed, example_inputs
        self.original, self.source = original, "torch"


@pytest.fixture(scope="module")
def small_result():
    from riem_compiler.frontend.layers import LayerSpec
    from riem_compiler.passes.rewrite_torch import apply_compressed

    torch.manual_seed(0)
    net = SmallNet().eval()
    specs = [LayerSpec("conv.weight", "conv2d", net.conv.weight.detach().numpy(), module="conv"),
             LayerSpec("fc1.weight", "linear", net.fc1.weight.detach().numpy(), module="fc1")]
    compressed = {"conv.weight": random_riem((8, 1, 3, 3), q=4, bits=6, seed=1),
                  "fc1.weight": random_riem((32, 512), q=8, bits=8, seed=2)}
    model = apply_compressed(net, specs, compressed).eval()
    return _Result(model, compressed, (torch.randn(2, 1, 8, 8),), net)


@pytest.mark.parametrize("mode", ["decode-once", "fused"])
def test_build_matches_torch(small_result, tmp_path, mode):
    out = build_tvm(small_result, tmp_path / mode, target="llvm", mode=mode)
    x = small_result.example_inputs[0]
    with torch.no_grad():
        ref = small_result.model(x).numpy()
    model = load_tvm(out)
    got = model(x.numpy())
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert isinstance(model(x), torch.Tensor)  # torch in, torch out

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "riem-tvm" and manifest["mode"] == mode
    assert manifest["inputs"] == [{"name": "x", "shape": [2, 1, 8, 8], "dtype": "float32"}]
    assert manifest["outputs"] == [{"shape": [2, 10], "dtype": "float32"}]
    assert manifest["source_hash"].startswith("sha256:")
    assert manifest["versions"]["apache-tvm"]
    # the compact arrays are stored, the dense compressed weights are not
    from safetensors.numpy import load_file

    stored = load_file(str(out / "params.safetensors"))
    assert not any(k in stored for k in ("param::conv.weight", "param::fc1.weight"))
    assert "param::fc2.weight" in stored
    compact = sum(cw.nbytes for cw in small_result.compressed.values())
    assert sum(v.nbytes for k, v in stored.items() if k.startswith("riem::")) == compact
    assert manifest["bytes"]["dense_weights_replaced"] == 4 * (8 * 9 + 32 * 512)


def test_no_dense_weight_in_library(small_result, tmp_path):
    """FoldConstant pitfall: grep the library for the bytes of the reconstructed fc1 weight."""
    out = build_tvm(small_result, tmp_path / "a", target="llvm")
    blob = (out / "model.so").read_bytes()
    w = decode(small_result.compressed["fc1.weight"])
    assert w[0, :16].tobytes() not in blob


def test_bad_options(small_result, tmp_path):
    with pytest.raises(ValueError, match="mode"):
        build_tvm(small_result, tmp_path, mode="lazy")
    with pytest.raises(ValueError, match="target"):
        build_tvm(small_result, tmp_path, target="metal")


def test_artifact_round_trip_in_fresh_process(small_result, tmp_path):
    out = build_tvm(small_result, tmp_path / "art", target="llvm")
    x = small_result.example_inputs[0].numpy()
    np.save(tmp_path / "x.npy", x)
    with torch.no_grad():
        ref = small_result.model(small_result.example_inputs[0]).numpy()
    script = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {str(REPO)!r})
        import riem_compiler as rc
        m = rc.load({str(out)!r}, device="cpu")
        y = m(np.load({str(tmp_path / 'x.npy')!r}))
        np.save({str(tmp_path / 'y.npy')!r}, y)
        print("decode_ms", 1e3 * m.decode_seconds)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_wrong_device_or_shape_is_clear(small_result, tmp_path):
    out = build_tvm(small_result, tmp_path / "art", target="llvm")
    with pytest.raises(ValueError, match="built for 'cpu'"):
        load_tvm(out, device="cuda")
    model = load_tvm(out)
    with pytest.raises(ValueError, match="fixed shapes"):
        model(np.zeros((3, 1, 8, 8), np.float32))


@pytest.mark.parametrize("mode", ["decode-once", "fused"])
def test_cuda_build_compiles(small_result, tmp_path, mode):
    out = build_tvm(small_result, tmp_path / mode, target="cuda", mode=mode, arch="sm_80")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["device"] == "cuda" and manifest["target"]["arch"] == "sm_80"
    src = (out / "cuda_source.cu").read_text()
    assert "__global__" in src and "riem_decode" in src
    if mode == "fused":
        assert "riem_fused_linear" in src and "__shared__" in src
    assert (out / "model.so").stat().st_size > 0
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA source generated but not compiled")
    assert len(compile_cuda_source(out / "cuda_source.cu", arch="sm_80")) > 0


@pytest.mark.slow
def test_metaschedule_tuning_and_database_reuse(small_result, tmp_path):
    out = build_tvm(small_result, tmp_path / "tuned", target="llvm", tune_trials=4, num_cores=1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["tuned_tasks"] > 0
    assert (out / "tuning" / "database_tuning_record.json").stat().st_size > 0
    x = small_result.example_inputs[0]
    with torch.no_grad():
        ref = small_result.model(x).numpy()
    np.testing.assert_allclose(load_tvm(out)(x.numpy()), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    again = build_tvm(small_result, tmp_path / "reuse", target="llvm", tuning_db=str(out / "tuning"))
    assert json.loads((again / "manifest.json").read_text())["files"]["tuning"] == "tuning"
    np.testing.assert_allclose(load_tvm(again)(x.numpy()), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# ----------------------------------------------------------------------------- default CPU schedules

def _compile_run(func, arrays, out_shape):
    lib = tvm.compile(func, target=make_target(TvmBuildOptions(num_cores=1)))
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib["main"](*args, out)
    return out.numpy()


@pytest.mark.parametrize("m,k,n", [(32, 48, 64), (5, 24, 40), (1, 16, 12)])
def test_matmul_schedule_matches_numpy(m, k, n):
    from tvm import te

    from riem_compiler.codegen import tvm_schedules as ts

    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((k, n), "float32", name="w")
    b = te.placeholder((n,), "float32", name="b")
    r = te.reduce_axis((0, k), name="k")
    mm = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="matmul")
    y = te.compute((m, n), lambda i, j: te.max(mm[i, j] + b[j], 0.0), name="bias_relu")
    func = te.create_prim_func([x, w, b, y])
    sched = ts.schedule_func(func)
    assert sched is not None and sched.attrs["tir.is_scheduled"]
    with pytest.raises(Exception):  # epilogue fused into the accumulator write-back: no own block
        tvm.s_tir.Schedule(sched).get_sblock("bias_relu")
    g = np.random.default_rng(0)
    xs, ws, bs = (g.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,)))
    got = _compile_run(sched, [xs, ws, bs], (m, n))
    np.testing.assert_allclose(got, np.maximum(xs @ ws + bs, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin,cout,groups,size", [(3, 8, 1, 9), (8, 8, 8, 8), (16, 32, 4, 4)])
def test_conv_schedule_matches_torch(cin, cout, groups, size):
    from tvm import te, topi

    from riem_compiler.codegen import tvm_schedules as ts

    data = te.placeholder((1, cin, size, size), "float32", name="data")
    kernel = te.placeholder((cout, cin // groups, 3, 3), "float32", name="kernel")
    if groups == 1:
        conv = topi.nn.conv2d_nchw(data, kernel, 1, 1, 1)
    else:
        conv = topi.nn.group_conv2d_nchw(data, kernel, 1, 1, 1, groups)
    out = topi.nn.relu(conv)
    sched = ts.schedule_func(te.create_prim_func([data, kernel, out]))
    assert sched is not None
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(1, cin, size, size, generator=g)
    ks = torch.randn(cout, cin // groups, 3, 3, generator=g)
    ref = torch.relu(torch.nn.functional.conv2d(xs, ks, padding=1, groups=groups)).numpy()
    got = _compile_run(sched, [xs.numpy(), ks.numpy()], ref.shape)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_unrecognised_function_is_left_alone():
    """A reduction that is neither matmul nor conv gets no schedule from this module."""
    from tvm import te

    from riem_compiler.codegen import tvm_schedules as ts

    x = te.placeholder((8, 16), "float32", name="x")
    r = te.reduce_axis((0, 16), name="r")
    s = te.compute((8,), lambda i: te.sum(x[i, r] * x[i, r], axis=r), name="sumsq")
    assert ts.schedule_func(te.create_prim_func([x, s])) is None


class GeluMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 96)
        self.fc2 = torch.nn.Linear(96, 48)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(x))
        return torch.softmax(self.fc2(h), dim=-1) + h[..., :48]


def test_default_build_lifts_transposes_and_matches_torch(tmp_path):
    """Default CPU build: polynomial gelu/exp, lifted weight transposes, scheduled kernels."""
    from riem_compiler.frontend.layers import LayerSpec
    from riem_compiler.passes.rewrite_torch import apply_compressed

    torch.manual_seed(0)
    net = GeluMLP().eval()
    specs = [LayerSpec("fc1.weight", "linear", net.fc1.weight.detach().numpy(), module="fc1")]
    compressed = {"fc1.weight": random_riem((96, 64), q=8, bits=8, seed=3)}
    model = apply_compressed(net, specs, compressed).eval()
    res = _Result(model, compressed, (torch.randn(4, 64),), net)
    x = res.example_inputs[0]
    with torch.no_grad():
        ref = model(x).numpy()
    outs = {}
    for label, opts in (("default", {}), ("stock", {"cpu_schedules": False, "lift_params": False})):
        out = build_tvm(res, tmp_path / label, target="llvm", **opts)
        manifest = json.loads((out / "manifest.json").read_text())
        assert (manifest["transform_params"] is not None) == (label == "default")
        outs[label] = load_tvm(out)(x.numpy())
        np.testing.assert_allclose(outs[label], ref, rtol=1e-5, atol=2e-5)
