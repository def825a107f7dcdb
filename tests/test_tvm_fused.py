"""Fused dequantise-matmul TVM kernels (methods/<method>/tvm.py `fused_linear_primfunc`,
tvm_gemv.py): numerics against numpy decode + matmul (odd shapes, tails that do not fill a
byte, groups that do not divide the row, both affine axes, rotq's padded columns, batch > 1), CUDA
source that nvcc compiles, and build_tvm's per-layer choice (fused / decoded once, and why) with
resident bytes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from riem_compiler import methods  # noqa: E402
from riem_compiler.codegen.tvm_build import TvmBuildOptions, build_tvm, compile_cuda_source, make_target  # noqa: E402
from riem_compiler.codegen.tvm_runtime import load_tvm  # noqa: E402
from riem_compiler.methods.affine import fit_affine  # noqa: E402
from riem_compiler.methods.rotq import fit_rotq  # noqa: E402
from riem_compiler.methods.rtn import fit_rtn  # noqa: E402
from riem_compiler.methods.svd import fit_svd  # noqa: E402
from riem_compiler.methods.vq import fit_vq  # noqa: E402


def _weight(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# (label, fit, batch): the packed-rows form (1-8 bits, rows and groups of whole units) and the
# element form (a row that ends mid-unit, a group that does not divide the row or fill vector lanes,
# the output-axis affine grouping, codebooks; rotq: the rotation applied to x, then packed rows with
# a grid lookup, the element form for groups of one 3-byte unit; padded columns, fitted grid)
CASES = [
    ("rtn4-g32", lambda: fit_rtn(_weight((24, 96)), 4, 32), 1),
    ("rtn2-row", lambda: fit_rtn(_weight((20, 64), 1), 2, None), 3),
    ("rtn8-g16", lambda: fit_rtn(_weight((17, 48), 2), 8, 16), 2),
    ("rtn3-g20-odd", lambda: fit_rtn(_weight((13, 45), 3), 3, 20), 2),
    ("rtn4-tail", lambda: fit_rtn(_weight((9, 37), 4), 4, None), 1),
    ("rtn4-g24-ragged", lambda: fit_rtn(_weight((16, 40), 5), 4, 24), 3),
    ("affine4-in-g32", lambda: fit_affine(_weight((24, 128), 6), 4, 32, iterations=3), 1),
    ("affine2-out-g16", lambda: fit_affine(_weight((48, 30), 7), 2, 16, axis="out", iterations=3), 2),
    ("affine3-odd", lambda: fit_affine(_weight((11, 27), 8), 3, 8, iterations=3), 1),
    ("vq-d4", lambda: fit_vq(_weight((32, 64), 9), 4, 6, iterations=2), 2),
    ("vq-d8-tail", lambda: fit_vq(_weight((10, 44), 10), 8, 5, iterations=2), 1),
    ("vq-d3-b10-tail", lambda: fit_vq(_weight((7, 50), 19), 3, 10, iterations=1), 3),
    ("svd-int8", lambda: fit_svd(_weight((40, 64), 11), 0.3, 8), 2),
    ("svd-f16-odd", lambda: fit_svd(_weight((21, 35), 12), 0.5, 16), 1),
    ("rotq2-g32", lambda: fit_rotq(_weight((24, 96), 13), 2, 32), 1),
    ("rotq4-row-padded", lambda: fit_rotq(_weight((20, 70), 14), 4, None, seed=5), 3),
    ("rotq2-g16-fitted", lambda: fit_rotq(_weight((16, 256), 15), 2, 16, grid="fitted"), 4),
    ("rotq3-g8-padded", lambda: fit_rotq(_weight((17, 100), 16), 3, 8), 2),
    ("rotq1-g32", lambda: fit_rotq(_weight((12, 64), 17), 1, 32), 1),
    ("affine1-in-g64", lambda: fit_affine(_weight((16, 128), 37), 1, 64, iterations=3), 2),
    # packed rows of multi-byte units (8 codes in `bits` bytes): 3/5/6/7 bits, rows of whole units
    ("rtn3-g32", lambda: fit_rtn(_weight((24, 96), 40), 3, 32), 1),
    ("rtn5-g16", lambda: fit_rtn(_weight((9, 64), 41), 5, 16), 3),
    ("rtn7-row", lambda: fit_rtn(_weight((10, 128), 42), 7, None), 2),
    ("affine3-in-g32", lambda: fit_affine(_weight((16, 128), 43), 3, 32, iterations=3), 1),
    ("rotq3-g32", lambda: fit_rotq(_weight((24, 96), 44), 3, 32), 2),
    ("tiled-rtn6-g16", lambda: fit_rtn(_weight((16, 64), 45), 6, 16), 8),
    ("nn-rtn3-g64", lambda: fit_rtn(_weight((32, 128), 46), 3, 64), 64),
    ("nn-rotq3-g32", lambda: fit_rotq(_weight((24, 96), 47), 3, 32), 70),
    # the tiled form (at least TILED_FROM_ROWS activation rows): packed rows, the element form
    # (padded reduction), codebooks (lane-aligned vectors, and rows of vectors padded to whole lanes),
    # rotq's rotation before it; rows that do not fill a tile; batches that do not fill a block
    ("tiled-rtn4-g32", lambda: fit_rtn(_weight((24, 96), 20), 4, 32), 8),
    ("tiled-rtn2-row-odd-rows", lambda: fit_rtn(_weight((13, 64), 21), 2, None), 7),
    ("tiled-rtn3-g20-odd", lambda: fit_rtn(_weight((13, 45), 22), 3, 20), 6),
    ("tiled-affine4-in-g32", lambda: fit_affine(_weight((32, 128), 23), 4, 32, iterations=3), 32),
    ("tiled-affine2-out-g16", lambda: fit_affine(_weight((48, 30), 24), 2, 16, axis="out", iterations=3), 5),
    ("tiled-vq-d4", lambda: fit_vq(_weight((32, 64), 25), 4, 6, iterations=2), 9),
    ("tiled-vq-d3-b10-tail", lambda: fit_vq(_weight((7, 50), 26), 3, 10, iterations=1), 5),
    ("tiled-vq-d6-b9", lambda: fit_vq(_weight((16, 96), 27), 6, 9, iterations=1), 12),
    ("tiled-rotq2-g32", lambda: fit_rotq(_weight((24, 96), 28), 2, 32), 8),
    ("tiled-rotq3-g8-padded", lambda: fit_rotq(_weight((17, 100), 29), 3, 8), 6),
    ("tiled-svd-int8", lambda: fit_svd(_weight((40, 64), 30), 0.3, 8), 16),
    # the tiled form's outer-product product (at least TILED_NN_FROM_ROWS rows), transposed tiles
    ("nn-rtn4-g32", lambda: fit_rtn(_weight((24, 96), 31), 4, 32), 64),
    ("nn-rtn3-g20-odd", lambda: fit_rtn(_weight((13, 45), 32), 3, 20), 66),
    ("nn-affine2-out-g16", lambda: fit_affine(_weight((48, 30), 33), 2, 16, axis="out", iterations=3), 70),
    ("nn-vq-d3-b10-tail", lambda: fit_vq(_weight((7, 50), 34), 3, 10, iterations=1), 64),
    ("nn-vq-d4", lambda: fit_vq(_weight((32, 64), 35), 4, 6, iterations=2), 96),
    ("nn-rotq2-g32", lambda: fit_rotq(_weight((24, 96), 36), 2, 32), 64),
    ("tiled-rotq1-g32", lambda: fit_rotq(_weight((12, 64), 38), 1, 32), 8),
    ("nn-affine1-in-g64", lambda: fit_affine(_weight((16, 128), 39), 1, 64, iterations=3), 64),
]


def _fused_kernel(cw, batch, target_kind="llvm"):
    """The fused kernel itself (for_memory: also where mode "auto" would decode once instead)."""
    kernel = methods.get(cw.method).tvm_fused(cw, batch, "fused_k", target_kind, for_memory=True)
    assert not isinstance(kernel, str), kernel
    return kernel


@pytest.mark.parametrize("label,fit,batch", CASES, ids=[c[0] for c in CASES])
def test_fused_kernel_matches_decode_then_matmul(label, fit, batch):
    cw = fit()
    kernel = _fused_kernel(cw, batch)
    lib = tvm.compile(tvm.IRModule({"fused_k": kernel}), target=make_target(TvmBuildOptions(num_cores=2)))
    rows, cols = cw.matrix_shape
    x = np.random.default_rng(batch).standard_normal((batch, cols)).astype(np.float32)
    names = methods.get(cw.method).tvm_kernel().array_names(cw)
    args = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(np.ascontiguousarray(cw.arrays[n])) for n in names]
    y = tvm.runtime.tensor(np.zeros((batch, rows), np.float32))
    lib["fused_k"](*args, y)
    ref = x @ methods.decode(cw).reshape(rows, cols).T
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_rotq_kernel_signs_match_rotation():
    """The column signs the rotq kernels regenerate (int64 hash in TIR) equal rotation.signs_numpy."""
    from tvm import te

    from riem_compiler.methods.rotq import rotation
    from riem_compiler.methods.rotq import tvm as rotq_tvm

    signs = rotq_tvm.signs_te(7, 5000, 1.0)
    lib = tvm.compile(te.create_prim_func([signs]), target=make_target(TvmBuildOptions(num_cores=2)))
    out = tvm.runtime.tensor(np.zeros(5000, np.float32))
    lib["main"](out)
    np.testing.assert_array_equal(out.numpy(), rotation.signs_numpy(7, 5000).astype(np.float32))


@pytest.mark.parametrize("shape,bits,group", [((16, 8, 3, 3), 3, 8), ((10, 100), 2, None)])
def test_rotq_decode_once_kernel(shape, bits, group):
    """rotq's decode-once kernel (per-row butterflies, CPU schedule) writes the weight in its own
    shape (a conv weight; padded columns dropped) equal to the torch decode."""
    from riem_compiler.methods.rotq import tvm as rotq_tvm

    cw = fit_rotq(_weight(shape, 18), bits, group)
    func = rotq_tvm.schedule_decode_cpu(rotq_tvm.decode_primfunc(cw, "d"))
    lib = tvm.compile(func, target=make_target(TvmBuildOptions(num_cores=2)))
    out = tvm.runtime.tensor(np.zeros(shape, np.float32))
    lib["d"](*[tvm.runtime.tensor(np.ascontiguousarray(cw.arrays[n])) for n in rotq_tvm.array_names(cw)], out)
    ref = methods.decode(cw)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_rotq_decode_once_kernel_cuda_source_compiles(tmp_path):
    """The multi-stage decode (Q, butterflies, signs) builds for cuda sm_90 and nvcc compiles it."""
    from riem_compiler.codegen.tvm_pipeline import _default_schedules, cuda_sources
    from riem_compiler.methods.rotq import tvm as rotq_tvm

    cw = fit_rotq(_weight((16, 8, 3, 3), 19), 3, 8)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    ex = tvm.compile(_default_schedules(tvm.IRModule({"d": rotq_tvm.decode_primfunc(cw, "d")}), target), target=target)
    src = "\n".join(cuda_sources(ex))
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA source generated but not compiled")
    (tmp_path / "d.cu").write_text(src)
    assert len(compile_cuda_source(tmp_path / "d.cu", arch="sm_90")) > 0


def test_riem_stays_decode_once_and_says_why():
    from tests.test_tvm import random_riem

    why = methods.get("riem").tvm_fused(random_riem((8, 16)), 1, "k", "llvm")
    assert isinstance(why, str) and "decode-once" in why and "sigmoid" in why


def _block_names(func):
    """Names of the kernel's blocks, less the _init/_update suffixes decompose_reduction adds."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    names = (sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root")))
    return {n.removesuffix("_init").removesuffix("_update") for n in names}


def test_batch_regime_choice():
    """Mode "auto" on LLVM: the GEMV forms below TILED_FROM_ROWS activation rows, the tiled form
    (a decoded tile per call: "part" partial sums, from TILED_NN_FROM_ROWS a transposed tile) from there on, fused at every batch where the
    decode is the packed-rows (3-bit codes too, in whole units) or codebook one; the generic
    per-weight bit reader (3-bit rows that do not hold whole units) is decoded once at load
    instead, with the reason; mode "fused" keeps it fused."""
    from riem_compiler.methods.tvm_gemv import TILED_FROM_ROWS, TILED_NN_FROM_ROWS

    rtn, vq = methods.get("rtn"), methods.get("vq")
    cw, cw3, cwv = CASES[0][1](), CASES[3][1](), CASES[9][1]()
    small = rtn.tvm_fused(cw, TILED_FROM_ROWS - 1, "k", "llvm")
    large = rtn.tvm_fused(cw, TILED_FROM_ROWS, "k", "llvm")
    assert "part" not in _block_names(small) and "part" in _block_names(large)
    assert "lut" in _block_names(vq.tvm_fused(cwv, 2, "k", "llvm"))
    assert "part" in _block_names(vq.tvm_fused(cwv, 32, "k", "llvm"))
    assert "decode_t" in _block_names(vq.tvm_fused(cwv, TILED_NN_FROM_ROWS, "k", "llvm"))
    why = rtn.tvm_fused(cw3, 32, "k", "llvm")
    assert isinstance(why, str) and "slower than decoding once" in why
    packed3 = next(f for name, f, _ in CASES if name == "rtn3-g32")()  # 3-bit codes in whole 3-byte units
    assert "x_split" in _block_names(rtn.tvm_fused(packed3, 2, "k", "llvm"))
    assert "part" in _block_names(rtn.tvm_fused(packed3, 32, "k", "llvm"))
    assert "part" in _block_names(rtn.tvm_fused(cw3, 32, "k", "llvm", for_memory=True))
    assert not isinstance(rtn.tvm_fused(cw, 32, "k", "cuda"), str)


@pytest.mark.parametrize("label", ["rtn4-g32", "rtn3-g20-odd", "affine2-out-g16", "vq-d4", "svd-int8", "rotq2-g32",
                                   "rotq3-g8-padded", "tiled-rtn3-g20-odd", "tiled-vq-d4"])
def test_fused_kernel_cuda_source_compiles(label, tmp_path):
    """Each form builds for cuda sm_90 (dlight GPU rules) and nvcc compiles its source."""
    from riem_compiler.codegen.tvm_pipeline import _default_schedules, cuda_sources

    fit, batch = next((f, b) for name, f, b in CASES if name == label)
    cw = fit()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    mod = _default_schedules(tvm.IRModule({"fused_k": _fused_kernel(cw, batch, "cuda")}), target)
    assert mod["fused_k"].attrs.get("tirx.is_scheduled", False)
    ex = tvm.compile(mod, target=target)

    src = "\n".join(cuda_sources(ex))
    assert "fused_k" in src
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA source generated but not compiled")
    (tmp_path / "k.cu").write_text(src)
    assert len(compile_cuda_source(tmp_path / "k.cu", arch="sm_90")) > 0


# ----------------------------------------------------------------------------- build_tvm's per-layer choice

class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 96)
        self.fc2 = torch.nn.Linear(96, 64)
        self.fc3 = torch.nn.Linear(64, 40)
        self.fc4 = torch.nn.Linear(40, 10)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(x))
        return self.fc4(torch.relu(self.fc3(torch.relu(self.fc2(h)))))


def compressed_mlp(seed: int, fits: dict, batch: int):
    """The MLP drawn with torch seed `seed`, each Linear's weight replaced by fits[module](weight),
    as a build_tvm input with a (batch, 64) example."""
    from riem_compiler.frontend.layers import LayerSpec
    from riem_compiler.passes.rewrite_torch import apply_compressed
    from tests.test_tvm import _Result

    torch.manual_seed(seed)
    net = MLP().eval()
    specs = [LayerSpec(f"{m}.weight", "linear", getattr(net, m).weight.detach().numpy(), module=m)
             for m in ("fc1", "fc2", "fc3", "fc4")]
    compressed = {s.name: fits[s.module](s.weight) for s in specs}
    model = apply_compressed(net, specs, compressed).eval()
    return _Result(model, compressed, (torch.randn(batch, 64),), net)


@pytest.fixture(scope="module")
def mlp_result():
    from tests.test_tvm import random_riem

    return compressed_mlp(0, {"fc1": lambda w: fit_rtn(w, 4, 32),
                              "fc2": lambda w: fit_affine(w, 2, 16, axis="out", iterations=3),
                              "fc3": lambda w: fit_vq(w, 4, 6, iterations=2),
                              "fc4": lambda w: random_riem((10, 40), q=4, bits=8, seed=3)}, batch=3)


@pytest.fixture(scope="module")
def auto_artifact(mlp_result, tmp_path_factory):
    # float32 activations, so outputs are exact to 1e-5 (the int8 GEMV: tests/test_tvm_int8.py)
    return build_tvm(mlp_result, tmp_path_factory.mktemp("auto") / "art", target="llvm", num_cores=2,
                     int8_activations=False)


def test_auto_build_fuses_per_layer_and_says_why(mlp_result, auto_artifact):
    manifest = json.loads((auto_artifact / "manifest.json").read_text())
    assert manifest["mode"] == "auto"
    layers = {row["name"]: row for row in manifest["layers"]}
    # rtn packed rows; affine grouped along the outputs; vq's lookup table
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert layers[name]["decode"] == "fused into the matmul" and layers[name]["why"] is None
        assert layers[name]["resident_bytes"] == mlp_result.compressed[name].nbytes
    # riem stays decode-once
    assert layers["fc4.weight"]["decode"] == "once at load" and "decode-once" in layers["fc4.weight"]["why"]
    assert layers["fc4.weight"]["resident_bytes"] == layers["fc4.weight"]["dense_bytes"]
    assert any(k.startswith("rtn_fused_linear") for k in manifest["build"]["kernels"])
    x = mlp_result.example_inputs[0]
    with torch.no_grad():
        ref = mlp_result.model(x).numpy()
    got = load_tvm(auto_artifact)(x.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_auto_artifact_holds_the_stored_bytes(mlp_result, auto_artifact):
    """The runtime keeps the fused weights as exactly their stored arrays: the parameters main
    receives for them are the compact arrays, no float32 copy of those weights; the others are
    held decoded (float32)."""
    model = load_tvm(auto_artifact)
    fused = {n: cw for n, cw in mlp_result.compressed.items() if n in ("fc1.weight", "fc2.weight", "fc3.weight")}
    dense_shapes = [tuple(cw.shape) for cw in fused.values()] + [tuple(cw.shape)[::-1] for cw in fused.values()]
    held = [tuple(int(s) for s in p.shape) for p in model.params]
    assert not any(s in dense_shapes for s in held), held
    param_bytes = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in model.params)
    decoded_and_biases = sum(4 * p.numel() for n, p in mlp_result.original.state_dict().items()
                             if n not in fused)
    assert param_bytes == sum(cw.nbytes for cw in fused.values()) + decoded_and_biases


def test_auto_build_fuses_rotq_and_keeps_its_bytes(tmp_path):
    """rotq in mode "auto": weights whose groups hold whole units in vector lanes (fc1; fc3; fc4 with
    padded columns) run the fused kernel (rotation on x, codes decoded in the reduction) and stay at
    their stored bytes; 3-bit groups of 8 codes (one 3-byte unit: too few for vector lanes, the
    element form) are decoded once at load, with the reason; outputs match torch."""
    res = compressed_mlp(1, {"fc1": lambda w: fit_rotq(w, 2, 32), "fc2": lambda w: fit_rotq(w, 3, 8),
                             "fc3": lambda w: fit_rotq(w, 4, None, grid="fitted"),
                             "fc4": lambda w: fit_rotq(w, 2, 16, block=16)}, batch=2)
    compressed, model = res.compressed, res.model
    assert compressed["fc4.weight"].meta["padded_cols"] == 48
    # float32 activations: exact to 1e-5 (fc3's 4-bit codes would take the int8 GEMV: tests/test_tvm_int8.py)
    out = build_tvm(res, tmp_path / "art", target="llvm", num_cores=2, int8_activations=False)
    layers = {row["name"]: row for row in json.loads((out / "manifest.json").read_text())["layers"]}
    for name in ("fc1.weight", "fc3.weight", "fc4.weight"):
        assert layers[name]["decode"] == "fused into the matmul" and layers[name]["why"] is None
        assert layers[name]["resident_bytes"] == compressed[name].nbytes < layers[name]["dense_bytes"]
    assert layers["fc2.weight"]["decode"] == "once at load" and "slower" in layers["fc2.weight"]["why"]
    assert layers["fc2.weight"]["resident_bytes"] == layers["fc2.weight"]["dense_bytes"]
    x = res.example_inputs[0]
    with torch.no_grad():
        ref = model(x).numpy()
    got = load_tvm(out)(x.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
