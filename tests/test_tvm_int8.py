"""The int8-activation GEMV (methods/tvm_gemv_int8.py): numerics against a numpy model of the same
integer arithmetic (tight) and against the float decode + matmul (within x's int8 rounding), the
layouts it takes and refuses, build_tvm's default and its switch, and the TVM thread pool's size."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from riem_compiler import methods  # noqa: E402
from riem_compiler.codegen import tvm_runtime  # noqa: E402
from riem_compiler.codegen.tvm_build import TvmBuildOptions, build_tvm, make_target  # noqa: E402
from riem_compiler.codegen.tvm_runtime import load_tvm  # noqa: E402
from riem_compiler.methods import tvm_gemv_int8 as gi  # noqa: E402
from riem_compiler.methods.affine import fit_affine  # noqa: E402
from riem_compiler.methods.rotq import fit_rotq  # noqa: E402
from riem_compiler.methods.rtn import fit_rtn  # noqa: E402
from riem_compiler.methods.vq import fit_vq  # noqa: E402

TARGET = make_target(TvmBuildOptions())
with TARGET:
    VNNI = gi.target_supports()
needs_vnni = pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI")


def _weight(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def int8_reference(cw, x: np.ndarray) -> np.ndarray:
    """y = x W^T the way the kernel computes it: x's groups rounded to int8 (scale max|x| / 127),
    exact integer dot products with the codes (rotq: x padded and rotated first, the codes mapped
    to their grid levels rounded to int8 steps of max|grid| / 127, plus 128), then the float scale
    and zero point per group."""
    from riem_compiler import bitpack
    from riem_compiler.methods.rotq.rotation import rotate_numpy

    m = cw.meta
    rows, cols = cw.matrix_shape
    if cw.method == "vq":
        return vq_int8_reference(cw, x)
    if cw.method == "rotq":
        cols = int(m["padded_cols"])
        xp = np.zeros((len(x), cols))
        xp[:, :x.shape[1]] = x
        x = rotate_numpy(xp, int(m["block"]), int(m["seed"])).astype(np.float32)
    bits, group = int(m["bits"]), m.get("group_size") or cols
    ng = cols // group
    codes = bitpack.unpack(cw.arrays["codes"], bits, rows * cols).reshape(rows, ng, group).astype(np.int64)
    scale = cw.arrays["scale"].astype(np.float32).reshape(rows, ng)
    step = np.float32(1)
    if cw.method == "rotq":
        grid = cw.arrays["grid"].astype(np.float32)
        step = np.abs(grid).max() / np.float32(127)
        codes = (np.round(grid / step).astype(np.int64) + 128)[codes]
        zero = np.full((rows, ng), 128.0, np.float32)
    elif "zero" in cw.arrays:
        zero = cw.arrays["zero"].astype(np.float32).reshape(rows, ng)
    else:
        zero = np.full((rows, ng), float(m["offset"]), np.float32)
    xg = x.reshape(len(x), ng, group).astype(np.float32)
    amax = np.abs(xg).max(axis=2)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.trunc(xg * inv[:, :, None] + np.copysign(np.float32(0.5), xg)).astype(np.int64)  # half away from 0
    sx = amax / np.float32(127)
    dot = np.einsum("rgk,bgk->brg", codes, xq)  # exact
    qsum = xq.sum(axis=2)  # (b, g)
    per_group = (dot - zero[None] * qsum[:, None, :]) * scale[None] * sx[:, None, :] * step
    return per_group.sum(axis=2)


def vq_int8_reference(cw, x: np.ndarray) -> np.ndarray:
    """vq/tvm_int8.py's arithmetic: the codebook rounded to int8 steps of max|codebook| / 127 (+128),
    every vector padded to whole 4-byte words and the row to whole 16-vector blocks, x rounded per
    block of `blk` vectors, exact integer sums per block."""
    from riem_compiler import bitpack
    from riem_compiler.methods.vq import tvm_int8

    rows, cols = cw.matrix_shape
    dim, bits = int(cw.meta["dim"]), int(cw.meta["bits"])
    with TARGET:
        v, words, vpad, blk = tvm_int8.layout(cw, len(x))
    slots = 4 * words
    cb = cw.arrays["codebook"].astype(np.float32)
    step = np.abs(cb).max() / np.float32(127)
    levels = np.full((len(cb), slots), 128, np.int64)
    levels[:, :dim] = np.trunc(cb / step + np.copysign(np.float32(0.5), cb)).astype(np.int64) + 128
    codes = np.zeros((rows, vpad), np.int64)
    codes[:, :v] = bitpack.unpack(cw.arrays["codes"], bits, rows * v).reshape(rows, v)
    xs = np.zeros((len(x), vpad, slots), np.float32)
    xp = np.zeros((len(x), v * dim), np.float32)
    xp[:, :cols] = x
    xs[:, :v, :dim] = xp.reshape(len(x), v, dim)
    xb = xs.reshape(len(x), vpad // blk, blk * slots)
    amax = np.abs(xb).max(axis=2)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.trunc(xb * inv[:, :, None] + np.copysign(np.float32(0.5), xb)).astype(np.int64)
    w = levels[codes].reshape(rows, vpad // blk, blk * slots)  # (rows, blocks, blk * slots)
    dot = np.einsum("rgk,bgk->brg", w, xq) - 128 * xq.sum(axis=2)[:, None, :]
    per_row = (dot * (amax / np.float32(127))[:, None, :]).sum(axis=2)
    scale = cw.arrays["scale"].astype(np.float32).reshape(rows) * cw.arrays["gain"].astype(np.float32)[0]
    return per_row * scale[None, :] * step


# (label, fit, batch): 64-, 32- and 16-byte vectors; 2/4/8 bits; one group per row; odd rows; batch 1-4
CASES = [
    ("rtn4-g128", lambda: fit_rtn(_weight((24, 256)), 4, 128), 1),
    ("rtn4-g32-b3", lambda: fit_rtn(_weight((13, 96), 1), 4, 32), 3),
    ("rtn2-g64", lambda: fit_rtn(_weight((16, 128), 2), 2, 64), 2),
    ("rtn8-g64", lambda: fit_rtn(_weight((10, 192), 3), 8, 64), 4),
    ("rtn4-row", lambda: fit_rtn(_weight((9, 128), 4), 4, None), 1),
    ("affine4-g128", lambda: fit_affine(_weight((24, 256), 5), 4, 128, iterations=2), 1),
    ("affine2-g64-b4", lambda: fit_affine(_weight((17, 128), 6), 2, 64, iterations=2), 4),
    # rotq: x padded (250 -> 256 columns) and rotated in the kernel, the grid looked up in a register
    ("rotq2-g64-padded", lambda: fit_rotq(_weight((20, 250), 7), 2, 64), 1),
    ("rotq2-g64-block8", lambda: fit_rotq(_weight((20, 128), 10), 2, 64, block=8, seed=3), 2),
    ("rotq4-g128-b2", lambda: fit_rotq(_weight((12, 256), 8), 4, 128), 2),
    ("rotq2-g64-fitted-b3", lambda: fit_rotq(_weight((16, 256), 9), 2, 64, grid="fitted"), 3),
    # vq: 8-bit codes of 4-vectors; 5-vectors in two words (a row of 77 vectors padded to 80);
    # 3-vectors of 9-bit codes (codes that straddle bytes), 10-bit codes at batch 4
    ("vq-d4-b8", lambda: fit_vq(_weight((24, 384), 11), 4, 8, iterations=2), 1),
    ("vq-d5-b8-padded", lambda: fit_vq(_weight((10, 384), 12), 5, 8, iterations=2), 2),
    ("vq-d3-b9", lambda: fit_vq(_weight((12, 96), 13), 3, 9, iterations=1), 3),
    ("vq-d8-b10-b4", lambda: fit_vq(_weight((9, 128), 14), 8, 10, iterations=1), 4),
    # many activation rows (a sequence): in chunks of 4, 2 or 1 rows
    ("rtn4-g128-b32", lambda: fit_rtn(_weight((16, 256), 15), 4, 128), 32),
    ("affine4-g32-b6", lambda: fit_affine(_weight((8, 128), 16), 4, 32, iterations=2), 6),
    ("rotq4-g128-b7", lambda: fit_rotq(_weight((8, 256), 17), 4, 128), 7),
    ("vq-d4-b8-b18", lambda: fit_vq(_weight((8, 256), 18), 4, 8, iterations=1), 18),
]


def _run_kernel(cw, batch: int, seed: int = 7):
    method = methods.get(cw.method)
    with TARGET:
        kernel = method.tvm_fused(cw, batch, "fused", "llvm")
    assert not isinstance(kernel, str), kernel
    lib = tvm.compile(tvm.IRModule({"fused": kernel}), target=TARGET)
    x = np.random.default_rng(seed).standard_normal((batch, cw.matrix_shape[1])).astype(np.float32)
    args = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(np.ascontiguousarray(cw.arrays[n]))
                                      for n in method.tvm_kernel().array_names(cw)]
    y = tvm.runtime.tensor(np.zeros((batch, cw.matrix_shape[0]), np.float32))
    lib["fused"](*args, y)
    return kernel, x, y.numpy()


@needs_vnni
@pytest.mark.parametrize("label,fit,batch", CASES, ids=[c[0] for c in CASES])
def test_int8_kernel_matches_its_integer_model_and_the_float_product(label, fit, batch):
    cw = fit()
    kernel, x, got = _run_kernel(cw, batch)
    assert kernel.attrs[gi.FORM_ATTR]
    ref = int8_reference(cw, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    W = methods.decode(cw).reshape(cw.matrix_shape)
    exact = x @ W.T
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 0 < rel < 3e-2, rel  # x's int8 rounding (rotq, vq: and the levels'), nothing more


@needs_vnni
def test_int8_layouts_taken_and_refused():
    with TARGET:
        assert gi.layout(4, 256, 128, 1) == (128, 64, 64)
        assert gi.layout(4, 96, 32, 4) == (32, 16, 16)
        assert gi.layout(2, 256, None, 1) == (256, 64, 64)
        assert "tiled" in gi.layout(4, 256, 128, gi.MAX_BATCH + 1)
        assert "whole bytes" in gi.layout(3, 256, 128, 1)
        assert "multiple of 16" in gi.layout(4, 96, 24, 1)  # 12-byte groups
        assert "divide" in gi.layout(4, 100, 32, 1)
        with gi.int8_activations(False):
            assert "switched off" in gi.layout(4, 256, 128, 1)
    assert "VNNI" in gi.layout(4, 256, 128, 1)  # no current target: no CPU features to rely on


def test_float_form_without_a_target_or_when_switched_off():
    cw = fit_rtn(_weight((24, 256)), 4, 128)
    kernel = methods.get("rtn").tvm_fused(cw, 1, "fused", "llvm")
    assert gi.FORM_ATTR not in (kernel.attrs or {})
    with TARGET, gi.int8_activations(False):
        kernel = methods.get("rtn").tvm_fused(cw, 1, "fused", "llvm")
    assert gi.FORM_ATTR not in (kernel.attrs or {})


@needs_vnni
def test_build_default_uses_int8_activations_and_the_option_turns_them_off(tmp_path):
    from riem_compiler.frontend.layers import LayerSpec
    from riem_compiler.passes.rewrite_torch import apply_compressed
    from tests.test_tvm import _Result

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).eval()
    specs = [LayerSpec(f"{i}.weight", "linear", net[i].weight.detach().numpy(), module=str(i)) for i in (0, 2)]
    compressed = {specs[0].name: fit_rtn(specs[0].weight, 4, 128),
                  specs[1].name: fit_affine(specs[1].weight, 4, 64, iterations=2)}
    model = apply_compressed(net, specs, compressed).eval()
    x = torch.randn(1, 256)
    res = _Result(model, compressed, (x,), net)
    with torch.no_grad():
        ref = model(x).numpy()
    results = {}
    for flag in (True, False):
        art = build_tvm(res, tmp_path / f"int8-{flag}", target="llvm", int8_activations=flag)
        manifest = json.loads((art / "manifest.json").read_text())
        assert manifest["options"]["int8_activations"] is flag
        layers = {row["name"]: row for row in manifest["layers"]}
        for name in compressed:
            assert layers[name]["decode"] == "fused into the matmul"
            assert layers[name]["activations"] == ("int8" if flag else "float32")
        results[flag] = load_tvm(art)(x.numpy())
    np.testing.assert_allclose(results[False], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    rel = np.linalg.norm(results[True] - ref) / np.linalg.norm(ref)
    assert 0 < rel < 2e-2, rel


def test_thread_pool_sized_to_the_physical_cores(monkeypatch):
    cores = tvm_runtime.physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    assert tvm_runtime.use_all_cores() == cores and os.environ["TVM_NUM_THREADS"] == str(cores)
    monkeypatch.setenv("TVM_NUM_THREADS", "3")  # the user's choice is kept
    assert tvm_runtime.use_all_cores() == 3
