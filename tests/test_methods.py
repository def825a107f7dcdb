"""Every registered method, through every backend, on the same CompressedWeight: numpy, torch,
onnxruntime (the exported decoder) and TVM (where the method has a kernel) decode the same
weight; the byte count is what safetensors serialises; the refinement view decodes the same
weight too. A new method in `riem_compiler.methods.MODULES` gets these tests for free."""
import struct

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

import riem_compiler as rc
from riem_compiler import methods
from riem_compiler.codegen.onnx_export import OnnxRuntimeModel, read_compressed_onnx, rewrite_onnx
from riem_compiler.frontend.layers import LayerSpec

NAMES = list(methods.MODULES)


def sample(name: str):
    """A small fitted weight of this method: a linear weight, or a 3x3 conv where it needs one."""
    g = np.random.default_rng(0)
    method = methods.get(name)
    settings = method.settings(rc.Config(steps=30, min_weight_size=0, quiet=True))
    for spec in (LayerSpec("w", "linear", (g.standard_normal((24, 40)) / 6).astype(np.float32)),
                 LayerSpec("w", "conv2d", (g.standard_normal((16, 8, 3, 3)) / 8).astype(np.float32))):
        try:
            return spec, method.fit(spec, 0.6, settings).weight
        except ValueError:
            continue
    raise AssertionError(f"{name}: no sample layer fits")


def onnx_decoded(cw) -> np.ndarray:
    """Run the method's ONNX decoder: a model whose only output is the weight."""
    w = np.zeros(cw.shape, np.float32)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["out"])], "decode", [],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(cw.shape))],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rewritten = rewrite_onnx(model, None, {"w": cw})
    recovered = read_compressed_onnx(rewritten)["w"]
    assert recovered.method == cw.method and recovered.meta == cw.meta
    for key, arr in cw.arrays.items():
        np.testing.assert_array_equal(recovered.arrays[key], arr)
    return OnnxRuntimeModel(rewritten).session.run(None, {})[0]


@pytest.mark.parametrize("name", NAMES)
def test_every_backend_decodes_the_same_weight(name):
    spec, cw = sample(name)
    method = methods.get(name)
    ref = methods.decode(cw)
    assert ref.shape == spec.shape and ref.dtype == np.float32 and np.isfinite(ref).all()
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in cw.arrays.items()}
    np.testing.assert_array_equal(methods.decode_torch(cw, tensors).numpy(), ref)
    np.testing.assert_allclose(onnx_decoded(cw), ref, rtol=1e-5, atol=1e-6)
    view = method.trainable(cw, "w")
    if view is not None:
        with torch.no_grad():
            np.testing.assert_allclose(view().numpy(), ref, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(methods.decode(view.to_compressed()), ref, rtol=1e-5, atol=1e-6)
    kernel = method.tvm_kernel()
    if kernel is None:
        assert method.tvm_dense_reason  # the explicit statement instead of a kernel
    else:
        tvm = pytest.importorskip("tvm")
        from riem_compiler.codegen.tvm_build import TvmBuildOptions, make_target

        func = kernel.decode_primfunc(cw, "decode_w")
        lib = tvm.compile(func, target=make_target(TvmBuildOptions()))
        out = tvm.runtime.tensor(np.zeros(cw.shape, np.float32))
        lib["decode_w"](*[tvm.runtime.tensor(np.ascontiguousarray(cw.arrays[n])) for n in kernel.array_names(cw)], out)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bytes_are_what_is_serialised(name, tmp_path):
    _, cw = sample(name)
    path = tmp_path / "w.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in cw.arrays.items()}, str(path))
    raw = path.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    assert len(raw) - 8 - header == cw.nbytes


@pytest.mark.parametrize("name", NAMES)
def test_label_family_and_settings(name):
    method = methods.get(name)
    _, cw = sample(name)
    assert method.name == name == cw.method
    assert method.label(cw) and method.family(cw)
    settings = method.settings(rc.Config())
    assert isinstance(settings, method.Settings)
    from riem_compiler.methods.base import settings_key

    assert settings_key(settings) == settings_key(method.settings(rc.Config()))


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown compression method 'nope'"):
        methods.get("nope")


@pytest.mark.parametrize("n", [1, 9, 65536, 65537, 300_007])
def test_relative_error_in_blocks_gives_the_whole_array_sum_bit_for_bit(n):
    """metrics.relative_error sums in blocks split where numpy's pairwise sum splits: the same bits
    as summing the whole float64 difference (what local and Ray runs compare), without its copies."""
    from riem_compiler.metrics import relative_error

    r = np.random.default_rng(n)
    w = r.standard_normal(n).astype(np.float32).reshape(-1, 1) if n % 2 else r.standard_normal(n).astype(np.float32)
    approx = (w + 1e-3 * r.standard_normal(w.shape)).astype(np.float16)
    ref64 = np.asarray(w, np.float64)
    whole = float(np.sqrt(np.sum(np.square(ref64 - np.asarray(approx, np.float64))))) / float(np.sqrt(np.sum(np.square(ref64))))
    assert relative_error(w, approx) == whole
    with pytest.raises(ValueError, match="values for a weight of"):
        relative_error(w, approx.reshape(-1)[:-1])


def test_rtn_quantises_in_chunks_of_rows_with_the_same_codes_and_little_memory(monkeypatch):
    """rtn's quantiser works a chunk of rows at a time into whole-layer codes and scales: the same
    arrays as one chunk (row and group scales, a last group that is shorter, both axes, a zero row),
    and a fit holds its int16 codes (0.5x the weight) plus a constant (pack's chunks) beside the weight
    (whole-layer float32 quotients and absolute values, and a second int16 copy of the codes, had made
    it 2.7x on this shape; best_rtn 3x)."""
    import tracemalloc

    from riem_compiler.methods import rtn

    rng = np.random.default_rng(4)
    w = (rng.standard_normal((70, 300)) * np.exp(rng.standard_normal((70, 1)))).astype(np.float32)
    w[5] = 0.0
    for bits, group, scale_dtype, in_axis in ((8, None, None, 1), (4, 128, None, 1), (3, 16, "float32", 0),
                                              (2, 100, None, 0)):
        fits = []
        for values in (1 << 20, 400, 1):
            monkeypatch.setattr(rtn, "QUANTISE_CHUNK_VALUES", values)
            fits.append(rtn.fit_rtn(w, bits, group, in_axis, scale_dtype))
        for fit in fits[1:]:
            assert fit.meta == fits[0].meta
            for key in fits[0].arrays:
                assert fit.arrays[key].dtype == fits[0].arrays[key].dtype
                np.testing.assert_array_equal(fit.arrays[key], fits[0].arrays[key])
    monkeypatch.setattr(rtn, "QUANTISE_CHUNK_VALUES", 1 << 20)
    big = (rng.standard_normal((2048, 5632)) * 0.02).astype(np.float32)
    for call in (lambda: rtn.fit_rtn(big, 4, 128), lambda: rtn.best_rtn(big, 0.125)):
        tracemalloc.start()
        call()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= 0.5 * big.nbytes + 64 * 2**20, peak / big.nbytes
