"""ONNX export: decoder functions pass the full checker, onnxruntime matches the materialised
reference per pattern and per method, the file really shrinks, and the compressed weights read back."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import riem_compiler as rc
from riem_compiler import riem
from riem_compiler.codegen.onnx_export import (DOMAIN, OnnxRuntimeModel, materialize_onnx, read_compressed_onnx,
                                               rewrite_onnx, save_onnx)
from riem_compiler.compressed import CompressedWeight
from riem_compiler.frontend.onnx_frontend import find_onnx_layers, load_onnx
from riem_compiler import bitpack
from riem_compiler.methods import dense as dense_m, rtn as rtn_m, svd as svd_m, tucker2 as tucker2_m
from riem_compiler.methods import decode
from test_onnx_frontend import (ALL, chain_model, control_flow_model, conv_model, gemm_model, make_model,
                                matmul_left_model, matmul_right_model, rand, vi)


def random_riem(shape, q=4, m=3, bits=8, metric_dtype="float16", seed=0) -> CompressedWeight:
    """A CompressedWeight from random RieM factors (no fitting: numerics tests only)."""
    n_out, n_in = shape[0], int(np.prod(shape[1:]))
    g = torch.Generator().manual_seed(seed)
    f = riem.RieMFactors(torch.randn(n_out, q, generator=g), torch.randn(n_in, q, generator=g),
                         torch.randn(6, m, q, generator=g) / 2, torch.randn(6, m, generator=g),
                         torch.randn(m, generator=g) * 0.1, torch.randn((), generator=g) * 0.1)
    meta = {"q": q, "m": m, "k_branches": 6, "state_bits": bits, "metric_dtype": metric_dtype}
    return CompressedWeight("riem", tuple(shape), meta, riem.store(f, bits, metric_dtype))


def run(model, feeds, disable_opt=False):
    opts = ort.SessionOptions()
    # onnxruntime fuses blocked int4/int8 DequantizeLinear + MatMul into MatMulNBits, which by
    # default (accuracy level 4) multiplies int8-quantised activations; level 0 keeps float32
    # activations, so these tests compare exact numerics (test_onnx_native checks the default)
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if disable_opt:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def compress_all(model, bits=8, method="riem"):
    specs, _ = find_onnx_layers(model, ALL)
    comp = {}
    for i, s in enumerate(specs):
        if method == "riem":
            comp[s.name] = random_riem(s.shape, bits=bits, seed=i)
        elif method == "svd":
            comp[s.name] = svd_m.fit_svd(s.weight, 0.5, factor_bits=bits)
        elif method == "rtn":
            comp[s.name] = rtn_m.fit_rtn(s.weight, bits, group_size=None if bits == 8 else 16)
        elif method == "tucker2":
            comp[s.name] = tucker2_m.fit_tucker2(s.weight, 0.5)
        else:
            comp[s.name] = dense_m.fit_dense(s.weight, "float16")
    return specs, comp, rewrite_onnx(model, specs, comp)


def assert_runs_like_materialised(new, feeds):
    onnx.checker.check_model(new, full_check=True)
    mat = materialize_onnx(new)
    onnx.checker.check_model(mat, full_check=True)
    assert not mat.functions and all(n.domain != DOMAIN for n in mat.graph.node)
    ref = run(mat, feeds)
    for opt_off in (False, True):  # folded at session creation, and evaluated node by node
        for got, want in zip(run(new, feeds, opt_off), ref):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))
    return mat


PATTERNS = {
    "gemm": lambda: gemm_model(),
    "gemm_transA_transB_alpha_beta": lambda: gemm_model(1, 1, 0.5, 2.0),
    "gemm_transA_nobias": lambda: gemm_model(1, 0, bias=False),
    "matmul_right_3d": matmul_right_model,
    "matmul_left": matmul_left_model,
    "conv": lambda: conv_model(pads=[1, 1, 1, 1]),
    "conv_group": lambda: conv_model(group=2, strides=[2, 2]),
    "conv_depthwise": lambda: conv_model(c_in=8, group=8, pads=[1, 1, 1, 1]),
    "conv_dilated": lambda: conv_model(dilations=[2, 2], pads=[2, 2, 2, 2]),
    "conv_same_upper": lambda: conv_model(auto_pad="SAME_UPPER", strides=[2, 2]),
    "conv1d": lambda: conv_model(dims=1, pads=[1, 1]),
    "constant_cast_transpose_fp16": chain_model,
}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_pattern_numerics(pattern, bits):
    model, feeds = PATTERNS[pattern]()
    specs, comp, new = compress_all(model, bits)
    assert len(specs) == 1
    mat = assert_runs_like_materialised(new, feeds)
    # the materialised model is the original with the decoded weight in place of the original one
    name = specs[0].name
    decoded = next(t for t in mat.graph.initializer if t.name == name)
    np.testing.assert_allclose(numpy_helper.to_array(decoded).astype(np.float32), decode(comp[name]),
                               rtol=1e-3, atol=1e-3)
    assert [i.name for i in new.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]


def test_gemm_matches_numpy_formula():
    model, feeds = gemm_model(1, 1, 0.5, 2.0)
    specs, comp, new = compress_all(model)
    W = decode(comp["W"])
    C = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "C"))
    want = 0.5 * feeds["x"].T @ W.T + 2.0 * C
    np.testing.assert_allclose(run(new, feeds)[0], want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits,metric", [(32, "float32"), (16, "float16"), (6, "float32")])
def test_state_bit_widths(bits, metric):
    model, feeds = conv_model(pads=[1, 1, 1, 1])
    specs, _ = find_onnx_layers(model, ALL)
    comp = {"W": random_riem(specs[0].shape, q=5, m=4, bits=bits, metric_dtype=metric)}
    new = rewrite_onnx(model, specs, comp)
    assert_runs_like_materialised(new, feeds)
    stored = {t.name: t for t in new.graph.initializer}
    U = stored["W.riem.U"]
    assert U.data_type == (TensorProto.FLOAT16 if metric == "float16" else TensorProto.FLOAT)
    if bits < 32:
        assert stored["W.riem.a_codes"].data_type == TensorProto.UINT8


@pytest.mark.parametrize("method,bits", [("svd", 16), ("svd", 8), ("rtn", 8), ("rtn", 4), ("tucker2", 0),
                                         ("dense", 0)])
def test_baseline_methods(method, bits):
    model, feeds = conv_model(c_in=8, c_out=16, pads=[1, 1, 1, 1])
    specs, comp, new = compress_all(model, bits, method)
    mat = assert_runs_like_materialised(new, feeds)
    decoded = next(t for t in mat.graph.initializer if t.name == "W")
    np.testing.assert_allclose(numpy_helper.to_array(decoded), decode(comp["W"]), rtol=1e-5, atol=1e-5)
    back = read_compressed_onnx(new)["W"]
    assert back.method == method and back.meta == comp["W"].meta


def test_control_flow_graph_still_runs():
    model, feeds = control_flow_model()
    specs, comp, new = compress_all(model)
    assert {s.name for s in specs} == {"W", "W_else", "W_loop"}
    assert_runs_like_materialised(new, feeds)
    assert_runs_like_materialised(new, {**feeds, "flag": np.array(False)})
    assert [n.op_type for n in new.graph.node][-3:] == ["Loop", "Reshape", "LSTM"]
    else_branch = next(a.g for a in next(n for n in new.graph.node if n.op_type == "If").attribute
                       if a.name == "else_branch")
    assert else_branch.node[0].op_type == "RieMWeight" and "W_else" not in [t.name for t in else_branch.initializer]


def test_opset_11_model_is_upgraded():
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1)
    model = make_model([node], [vi("x", (4, 32))], [vi("y", (4, 24))], {"W": rand((24, 32)), "C": rand((24,))},
                       opset=11, ir_version=6)
    specs, comp, new = compress_all(load_onnx(model))
    assert [o.version for o in new.opset_import if o.domain == ""] == [13] and new.ir_version >= 8
    assert_runs_like_materialised(new, {"x": rand((4, 32), 3)})


def test_file_shrinks_by_reported_bytes_and_round_trips(tmp_path):
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1)
    model = make_model([node], [vi("x", (2, 512))], [vi("y", (2, 256))], {"W": rand((256, 512)), "C": rand((256,))})
    specs, _ = find_onnx_layers(model, ALL)
    q, m = riem.choose_size(256, 512, 0.1, 8, "float16", 16)
    comp = {"W": random_riem((256, 512), q=q, m=m)}
    new = rewrite_onnx(model, specs, comp)
    before, after = tmp_path / "before.onnx", tmp_path / "after.onnx"
    save_onnx(model, before)
    save_onnx(new, after)
    dense, stored = 256 * 512 * 4, comp["W"].nbytes
    assert stored <= 0.1 * dense
    expected = before.stat().st_size - dense + stored
    overhead = after.stat().st_size - expected
    assert 0 <= overhead < 12_000, overhead  # function bodies, node, names, metadata
    assert after.stat().st_size < 0.1 * before.stat().st_size + 12_000
    back = read_compressed_onnx(str(after))
    assert set(back) == {"W"} and back["W"].meta == comp["W"].meta and back["W"].shape == (256, 512)
    for key, arr in comp["W"].arrays.items():
        assert back["W"].arrays[key].dtype == arr.dtype
        np.testing.assert_array_equal(back["W"].arrays[key], arr)
    feeds = {"x": rand((2, 512), 3)}
    np.testing.assert_allclose(OnnxRuntimeModel(after)(**feeds), run(materialize_onnx(new), feeds)[0], rtol=1e-4,
                               atol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after.onnx", "before.onnx"]  # no temp files left


def test_unknown_method_fails_before_writing(tmp_path):
    model, _ = gemm_model()
    specs, _ = find_onnx_layers(model, ALL)
    with pytest.raises(rc.InputError, match="no ONNX decoder for method 'mystery'"):
        rewrite_onnx(model, specs, {"W": CompressedWeight("mystery", (32, 24), {}, {})})


def test_optimize_onnx_path_end_to_end(tmp_path):
    model, feeds = conv_model(c_in=32, c_out=64, pads=[1, 1, 1, 1])
    path = tmp_path / "conv.onnx"
    onnx.save_model(model, str(path))
    res = rc.optimize(str(path), ratio=0.3, steps=30, min_weight_size=0, error_ceiling=10.0, quiet=True)
    assert res.source == "onnx" and set(res.compressed) == {"W"}
    out, plain = tmp_path / "out.onnx", tmp_path / "plain.onnx"
    res.export_onnx(out)
    res.export_onnx(plain, materialize=True)
    onnx.checker.check_model(str(out), full_check=True)
    plain_model = onnx.load(str(plain))
    assert not plain_model.functions and {o.domain for o in plain_model.opset_import} == {""}
    got = rc.load(out)(**feeds)
    np.testing.assert_allclose(got, run(plain_model, feeds)[0], rtol=1e-4, atol=1e-4)
    assert out.stat().st_size < path.stat().st_size - 64 * 32 * 9 * 4 + res.compressed["W"].nbytes + 12_000
    assert read_compressed_onnx(str(out))["W"].meta == res.compressed["W"].meta


def test_bad_file_gives_one_line_error_and_writes_nothing(tmp_path):
    model, _ = gemm_model()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(model.SerializeToString()[:100])
    with pytest.raises(rc.InputError) as info:
        rc.optimize(str(bad), quiet=True)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, 32)

    def forward(self, x):
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 4).flatten(1))


def test_torch_result_exports_same_onnx_form(tmp_path):
    torch.manual_seed(0)
    net = _TinyNet().eval()
    x = torch.randn(2, 3, 8, 8)
    res = rc.optimize(net, example_inputs=(x,), ratio=0.3, steps=20, min_weight_size=0,
                      error_ceiling=10.0, quiet=True)
    assert set(res.compressed) == {"conv.weight", "fc.weight"}
    path = res.export_onnx(tmp_path / "net.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {n.op_type for n in model.graph.node if n.domain == DOMAIN} == {"RieMWeight"}
    with torch.no_grad():
        want = res.model(x).numpy()
    np.testing.assert_allclose(rc.load(path)(x).numpy(), want, rtol=1e-4, atol=1e-4)
    back = read_compressed_onnx(model)
    for name, cw in res.compressed.items():
        for key, arr in cw.arrays.items():
            np.testing.assert_array_equal(back[name].arrays[key], arr)


def _unpack_model(packed: np.ndarray, count: int, bits: int) -> onnx.ModelProto:
    from riem_compiler.codegen.onnx_export import function_protos

    node = helper.make_node("UnpackBits", ["packed", "count"], ["codes"], domain=DOMAIN, bits=bits)
    graph = helper.make_graph([node], "unpack", [], [helper.make_tensor_value_info("codes", TensorProto.FLOAT, [count])],
                              [numpy_helper.from_array(packed, "packed"),
                               numpy_helper.from_array(np.array([count], dtype=np.int64), "count")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=8, functions=function_protos(["UnpackBits"], 13))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_unpack_bits_matches_numpy(bits):
    count = 37  # not a multiple of 8: the last code ends inside a byte, and the stream has padding bits
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, count)
    codes[:2] = [0, 2 ** bits - 1]
    packed = bitpack.pack(codes, bits)
    model = _unpack_model(packed, count, bits)
    for opt_off in (False, True):
        np.testing.assert_array_equal(run(model, {}, opt_off)[0], codes.astype(np.float32))


def _largest_output_bytes(model: onnx.ModelProto, feeds: dict) -> int:
    """Largest tensor any node writes when onnxruntime runs the decoders node by node (profiler)."""
    import json

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_profiling = True
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    return max(int(e["args"]["output_size"]) for e in events if e.get("cat") == "Node" and "output_size" in e.get("args", {}))


def test_riem_decoder_peak_tensor_is_one_branch():
    """The decoder never holds more than one (rows, m, cols) float32 tensor: the branches are
    summed one by one (a (rows, cols, 6m) tensor made onnxruntime slow to open big models)."""
    rows, cols, m = 96, 64, 8
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)
    model = make_model([node], [vi("x", (2, cols))], [vi("y", (2, rows))], {"W": rand((rows, cols))})
    specs, _ = find_onnx_layers(model, ALL)
    comp = {"W": random_riem((rows, cols), q=10, m=m)}
    new = rewrite_onnx(model, specs, comp)
    feeds = {"x": rand((2, cols), 3)}
    assert_runs_like_materialised(new, feeds)
    assert _largest_output_bytes(new, feeds) == rows * m * cols * 4


def test_riem_export_needs_six_branches():
    from riem_compiler.methods.riem import ONNX_BRANCHES as RIEM_BRANCHES

    assert RIEM_BRANCHES == riem.K_BRANCHES
    model, _ = gemm_model()
    specs, _ = find_onnx_layers(model, ALL)
    cw = random_riem(specs[0].shape)
    arrays = {**cw.arrays, "U": cw.arrays["U"][:4], "beta": cw.arrays["beta"][:4]}
    bad = CompressedWeight("riem", cw.shape, {**cw.meta, "k_branches": 4}, arrays)
    with pytest.raises(rc.InputError, match="needs 6 branches"):
        rewrite_onnx(model, specs, {specs[0].name: bad})
