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
    assert sum(v.nbytes for k, v in stored.items() if k.startswith("compact::")) == compact
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
    for label, opts in (("default", {}), ("stock", {"cpu_schedules": False, "lift_params": False,
                                                    "mode": "decode-once"})):
        out = build_tvm(res, tmp_path / label, target="llvm", **opts)
        manifest = json.loads((out / "manifest.json").read_text())
        assert (manifest["transform_params"] is not None) == (label == "default")
        outs[label] = load_tvm(out)(x.numpy())
        np.testing.assert_allclose(outs[label], ref, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------- every method's kernel

def _method_kernel_decode(cw: CompressedWeight, schedule: bool) -> np.ndarray:
    from riem_compiler import methods

    kernel = methods.get(cw.method).tvm_kernel()
    func = kernel.decode_primfunc(cw, "decode_w")
    if schedule:
        func = kernel.schedule_decode_cpu(func)
    lib = tvm.compile(func, target=make_target(TvmBuildOptions(num_cores=1)))
    out = tvm.runtime.tensor(np.zeros(cw.shape, np.float32))
    lib["decode_w"](*[tvm.runtime.tensor(np.ascontiguousarray(cw.arrays[n])) for n in kernel.array_names(cw)], out)
    return out.numpy()


def _weight(shape, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) / 4).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("shape,group", [((24, 40), None), ((24, 40), 16), ((7, 33), 16),  # last group shorter
                                         ((16, 8, 3, 3), None), ((16, 8, 3, 3), 32)])
def test_rtn_kernel_equals_torch_decode(shape, group, bits):
    """Codes unpacked from the bit stream (3-bit codes straddle bytes) times the row or group
    scale: the same float32 operations as decode_rtn, so bit-equal."""
    from riem_compiler.methods.rtn import fit_rtn

    cw = fit_rtn(_weight(shape, bits), bits, group)
    ref = decode(cw)
    np.testing.assert_array_equal(_method_kernel_decode(cw, schedule=True), ref)
    if shape == (7, 33):  # the unscheduled kernel too (what CUDA builds start from)
        np.testing.assert_array_equal(_method_kernel_decode(cw, schedule=False), ref)


@pytest.mark.parametrize("shape", [(24, 40), (16, 8, 3, 3)])
@pytest.mark.parametrize("factor_bits", [32, 16, 8])
def test_svd_kernel_matches_torch_decode(shape, factor_bits):
    from riem_compiler.methods.svd import fit_svd

    cw = fit_svd(_weight(shape, factor_bits), 0.5, factor_bits)
    ref = decode(cw)
    for schedule in (True, False):
        np.testing.assert_allclose(_method_kernel_decode(cw, schedule), ref, rtol=0, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (12, 6, 5), (8, 5, 3, 2)])
def test_tucker2_kernel_matches_torch_decode(shape):
    from riem_compiler.methods.tucker2 import fit_tucker2

    cw = fit_tucker2(_weight(shape, len(shape)), 0.5)
    ref = decode(cw)
    for schedule in (True, False):
        np.testing.assert_allclose(_method_kernel_decode(cw, schedule), ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_rtn_kernel_refuses_transposed_codes():
    from riem_compiler.methods.rtn import fit_rtn
    from riem_compiler.methods.rtn import tvm as rtn_tvm

    cw = fit_rtn(_weight((8, 16)), 8, None)
    cw = CompressedWeight(cw.method, cw.shape, {**cw.meta, "transposed": True}, cw.arrays)
    with pytest.raises(ValueError, match="transposed"):
        rtn_tvm.decode_primfunc(cw, "d")


def test_dense_method_says_why_it_stays_dense():
    from riem_compiler import methods

    dense = methods.get("dense")
    assert dense.tvm_kernel() is None and "by choice" in dense.tvm_dense_reason
    for name in ("riem", "rtn", "svd", "tucker2", "vq", "rotq"):
        assert methods.get(name).tvm_kernel() is not None and methods.get(name).tvm_dense_reason is None


# ----------------------------------------------------------------------------- compact artifacts for every method

class MixNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc1 = torch.nn.Linear(16 * 8 * 8, 64)
        self.fc2 = torch.nn.Linear(64, 48)
        self.fc3 = torch.nn.Linear(48, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


MIX_KINDS = {"conv1": "conv2d", "conv2": "conv2d", "fc1": "linear", "fc2": "linear", "fc3": "linear"}


def _plan(name: str, weights: dict) -> dict:
    """name -> CompressedWeight per layer: one method with several settings, or a per-layer mix as
    `auto` makes it (with a layer `auto` kept dense)."""
    from riem_compiler.methods.dense import fit_dense
    from riem_compiler.methods.rtn import fit_rtn
    from riem_compiler.methods.svd import fit_svd
    from riem_compiler.methods.tucker2 import fit_tucker2

    w = {k.split(".")[0]: v for k, v in weights.items()}
    plans = {
        "rtn": lambda: {"conv1": fit_rtn(w["conv1"], 8, None), "conv2": fit_rtn(w["conv2"], 3, 32),  # 144 cols: 32*4 + 16
                        "fc1": fit_rtn(w["fc1"], 4, 128), "fc2": fit_rtn(w["fc2"], 2, None),
                        "fc3": fit_rtn(w["fc3"], 3, 20)},
        "svd": lambda: {"conv2": fit_svd(w["conv2"], 0.3, 16), "fc1": fit_svd(w["fc1"], 0.2, 8),
                        "fc2": fit_svd(w["fc2"], 0.5, 32)},
        "tucker2": lambda: {"conv1": fit_tucker2(w["conv1"], 0.5), "conv2": fit_tucker2(w["conv2"], 0.3)},
        "auto": lambda: {"conv1": fit_dense(w["conv1"], "float16"), "conv2": fit_tucker2(w["conv2"], 0.3),
                         "fc1": fit_rtn(w["fc1"], 4, 128), "fc2": fit_svd(w["fc2"], 0.3, 8),
                         "fc3": random_riem((10, 48), q=4, bits=6, seed=5)},
        "cuda": lambda: {"conv1": fit_rtn(w["conv1"], 3, 16), "conv2": fit_tucker2(w["conv2"], 0.3),
                         "fc1": fit_rtn(w["fc1"], 8, None), "fc2": fit_svd(w["fc2"], 0.3, 8),
                         "fc3": fit_svd(w["fc3"], 0.5, 16)},
    }
    return {f"{k}.weight": cw for k, cw in plans[name]().items()}


def _mixed_result(plan: str) -> _Result:
    from riem_compiler.frontend.layers import LayerSpec
    from riem_compiler.passes.rewrite_torch import apply_compressed

    torch.manual_seed(0)
    net = MixNet().eval()
    specs = [LayerSpec(f"{m}.weight", kind, getattr(net, m).weight.detach().numpy(), module=m)
             for m, kind in MIX_KINDS.items()]
    compressed = _plan(plan, {s.name: s.weight for s in specs})
    model = apply_compressed(net, specs, compressed).eval()
    return _Result(model, compressed, (torch.randn(2, 3, 8, 8),), net)


def _safetensors_data_bytes(path: Path) -> int:
    """Bytes of a safetensors file after its header: exactly the tensors' bytes."""
    import struct

    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


def _check_compact_artifact(res: _Result, out: Path, decode: str) -> None:
    """(a) params.safetensors holds exactly the compact arrays plus the other parameters, (c) the
    manifest says per layer compact or dense and why."""
    from safetensors.numpy import load_file

    compact = {n: cw for n, cw in res.compressed.items() if cw.method != "dense"}
    dense_by_choice = {n for n, cw in res.compressed.items() if cw.method == "dense"}
    params = res.original.state_dict()
    stored = load_file(str(out / "params.safetensors"))
    for name, cw in compact.items():
        keys = {k.split("::")[2] for k in stored if k.startswith(f"compact::{name}::")}
        assert keys == set(cw.arrays) and f"param::{name}" not in stored
        for key, arr in cw.arrays.items():
            np.testing.assert_array_equal(stored[f"compact::{name}::{key}"], arr)
            assert stored[f"compact::{name}::{key}"].dtype == arr.dtype
    rest_bytes = sum(4 * p.numel() for n, p in params.items() if n not in compact)
    expected = sum(cw.nbytes for cw in compact.values()) + rest_bytes
    assert _safetensors_data_bytes(out / "params.safetensors") == expected
    size = (out / "params.safetensors").stat().st_size
    dense_size = sum(4 * p.numel() for p in params.values())
    assert size < expected + 4096 and size < dense_size

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bytes"]["compact_arrays"] == sum(cw.nbytes for cw in compact.values())
    layers = {row["name"]: row for row in manifest["layers"]}
    assert set(layers) == set(res.compressed)
    for name, row in layers.items():
        cw = res.compressed[name]
        assert row["method"] == cw.method and row["stored_bytes"] == cw.nbytes
        assert row["dense_bytes"] == 4 * int(np.prod(cw.shape))
        if name in compact:
            assert row["storage"] == "compact" and row["reason"] is None and row["artifact_bytes"] == cw.nbytes
            if decode == "auto":  # the build's default: fused where the method's kernel pays, else once at load
                assert row["decode"] in ("fused into the matmul", "once at load")
                assert (row["why"] is None) == (row["decode"] == "fused into the matmul")
                if len(cw.shape) != 2 or cw.method not in ("rtn", "affine", "vq", "svd", "rotq"):
                    assert row["decode"] == "once at load"
            else:
                assert row["decode"] == decode or (decode == "per call" and row["decode"] == "fused into the matmul")
        else:
            assert row["storage"] == "dense" and "by choice" in row["reason"] and row["decode"] is None
            assert row["artifact_bytes"] == row["dense_bytes"]
    assert set(manifest["stored_dense"]) == dense_by_choice
    assert [c["name"] for c in manifest["compressed"]] == [n for n in params if n in compact]


@pytest.mark.parametrize("plan", ["rtn", "svd", "tucker2", "auto"])
def test_every_method_builds_a_compact_artifact(plan, tmp_path):
    """build_tvm of an rtn / svd / tucker2 / mixed (auto-like) result stores the compact arrays,
    runs the fused kernel of each rtn Linear weight and decodes the others once at load (the
    default mode "auto"), and matches the compressed torch model."""
    res = _mixed_result(plan)
    # float32 activations: outputs exact to 1e-5 (the int8-activation GEMV: tests/test_tvm_int8.py)
    out = build_tvm(res, tmp_path / plan, target="llvm", num_cores=2, int8_activations=False)
    _check_compact_artifact(res, out, "auto")
    x = res.example_inputs[0]
    with torch.no_grad():
        ref = res.model(x).numpy()
    got = load_tvm(out)(x.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_fused_mode_decodes_other_methods_per_call(tmp_path):
    """Fused mode keeps every compact weight compact: the 2-D riem, rtn and svd weights get their
    fused matmul kernels, the tucker2 conv weight is decoded per call; outputs match torch."""
    res = _mixed_result("auto")
    out = build_tvm(res, tmp_path / "fused", target="llvm", mode="fused", num_cores=2, int8_activations=False)
    _check_compact_artifact(res, out, "per call")
    layers = {row["name"]: row["decode"] for row in json.loads((out / "manifest.json").read_text())["layers"]}
    assert layers == {"conv1.weight": None, "conv2.weight": "per call", "fc1.weight": "fused into the matmul",
                      "fc2.weight": "fused into the matmul", "fc3.weight": "fused into the matmul"}
    x = res.example_inputs[0]
    with torch.no_grad():
        ref = res.model(x).numpy()
    np.testing.assert_allclose(load_tvm(out)(x.numpy()), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_cuda_build_compiles_every_method_kernel(tmp_path):
    res = _mixed_result("cuda")
    out = build_tvm(res, tmp_path / "cuda", target="cuda", arch="sm_80")
    src = (out / "cuda_source.cu").read_text()
    for kernel in ("rtn_decode", "rtn_fused_linear", "svd_decode", "tucker2_decode"):
        assert kernel in src
    _check_compact_artifact(res, out, "auto")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA source generated but not compiled")
    assert len(compile_cuda_source(out / "cuda_source.cu", arch="sm_80")) > 0


def test_format_1_artifact_still_loads(small_result, tmp_path):
    """Artifacts written before other methods had kernels keyed the compact arrays riem::..."""
    from safetensors.numpy import load_file, save_file

    out = build_tvm(small_result, tmp_path / "art", target="llvm")
    tensors = load_file(str(out / "params.safetensors"))
    save_file({k.replace("compact::", "riem::", 1): v for k, v in tensors.items()}, str(out / "params.safetensors"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    x = small_result.example_inputs[0]
    with torch.no_grad():
        ref = small_result.model(x).numpy()
    np.testing.assert_allclose(load_tvm(out)(x.numpy()), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
def test_auto_result_from_optimize_builds_compact(tmp_path):
    """A real method="auto" result (rtn and svd layers at this budget) end to end."""
    import riem_compiler as rc

    torch.manual_seed(0)
    net = MixNet().eval()
    x = torch.randn(2, 3, 8, 8)
    res = rc.optimize(net, (x,), method="auto", ratio=0.05, steps=5, min_weight_size=0, quiet=True)
    assert len({cw.method for cw in res.compressed.values()}) > 1
    out = res.build_tvm(tmp_path / "auto", target="llvm")
    _check_compact_artifact(res, out, "auto")
    with torch.no_grad():
        ref = res.model(x).numpy()
    np.testing.assert_allclose(load_tvm(out)(x.numpy()), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
