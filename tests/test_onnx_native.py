"""onnx_format="standard": rtn 8/4-bit weights as standard DequantizeLinear (no decoder functions).

The native form decodes exactly what methods.decode decodes, passes the full checker, runs in onnxruntime with the function form's outputs, keeps model
inputs/outputs, stores exactly the reported bytes and reads back bit for bit; layouts that do not
map (3-bit) and models that cannot be upgraded keep the function form with a note."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import riem_compiler as rc
from riem_compiler.codegen import onnx_rewrite
from riem_compiler.codegen.onnx_export import (DOMAIN, materialize_onnx, onnx_forms, read_compressed_onnx,
                                               rewrite_onnx)
from riem_compiler.errors import InputError
from riem_compiler.frontend.onnx_frontend import find_onnx_layers, iter_graphs
from riem_compiler.methods import decode, rtn as rtn_m
from test_onnx_export import run
from test_onnx_frontend import (ALL, chain_model, control_flow_model, conv_model, gemm_model, make_model, matmul_left_model,
                                matmul_right_model, rand, vi)

LAYOUTS = [(8, None), (4, 16), (4, None), (8, 16), (4, 5)]  # (4, 5): a partial last block


def rewrite_both(builder, bits, group, **kw):
    model, feeds = builder(**kw)
    specs, _ = find_onnx_layers(model, ALL)
    comp = {s.name: rtn_m.fit_rtn(s.weight, bits, group) for s in specs}
    return model, feeds, comp, rewrite_onnx(model, specs, comp), rewrite_onnx(model, specs, comp, "standard")


def initializer_bytes(model, names) -> int:
    tensors = {t.name: t for _, g in iter_graphs(model.graph) for t in g.initializer}
    return sum(len(tensors[n].raw_data) for n in names)


def same_arrays(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].method == b[name].method and a[name].shape == b[name].shape and a[name].meta == b[name].meta
        for k in a[name].arrays:
            x, y = a[name].arrays[k], b[name].arrays[k]
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), (name, k)


@pytest.mark.parametrize("bits,group", LAYOUTS)
@pytest.mark.parametrize("shape", [(24, 32), (8, 4, 3, 3)])
def test_standard_decode_equals_torch_decode(bits, group, shape):
    """A model whose output is the decoded weight: DequantizeLinear gives methods.decode exactly
    (float16 group scales are Cast to float32 first, so the product is float32 as in torch)."""
    w = rand(shape, 1)
    model = make_model([helper.make_node("Identity", ["W"], ["y"])], [], [vi("y", shape)], {"W": w})
    cw = rtn_m.fit_rtn(w, bits, group)
    native = rewrite_onnx(model, None, {"W": cw}, "standard")
    onnx.checker.check_model(native, full_check=True)
    assert onnx_forms(native) == {"W": {"onnx_form": "standard"}}
    assert not any(n.domain == DOMAIN for n in native.graph.node) and not native.functions
    assert [n.op_type for n in native.graph.node if n.op_type == "DequantizeLinear"] == ["DequantizeLinear"]
    ref = decode(cw).reshape(shape)
    for disable in (True, False):
        np.testing.assert_array_equal(run(native, {}, disable_opt=disable)[0], ref)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(24, 32), (8, 1, 3, 3)])
def test_float16_row_scales_have_the_standard_form(bits, shape):
    """rtn takes float16 row scales where a float32 scale per short row (a depthwise Conv's) does not fit:
    Cast to float32, then DequantizeLinear, gives methods.decode exactly and reads back bit for bit."""
    w = rand(shape, 2)
    model = make_model([helper.make_node("Identity", ["W"], ["y"])], [], [vi("y", shape)], {"W": w})
    cw = rtn_m.fit_rtn(w, bits, None, scale_dtype="float16")
    native = rewrite_onnx(model, None, {"W": cw}, "standard")
    onnx.checker.check_model(native, full_check=True)
    assert onnx_forms(native) == {"W": {"onnx_form": "standard"}}
    np.testing.assert_array_equal(run(native, {})[0], decode(cw).reshape(shape))
    same_arrays(read_compressed_onnx(native), {"W": cw})


@pytest.mark.parametrize("bits,group", LAYOUTS)
@pytest.mark.parametrize("builder", [gemm_model, conv_model, matmul_right_model, chain_model, control_flow_model])
def test_standard_form_runs_like_function_form(builder, bits, group):
    model, feeds, comp, functions, native = rewrite_both(builder, bits, group)
    onnx.checker.check_model(native, full_check=True)
    assert [i.name for i in native.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in native.graph.output] == [o.name for o in model.graph.output]
    assert [o.type for o in native.graph.output] == [o.type for o in model.graph.output]
    assert set(onnx_forms(native)) == set(comp)
    assert all(f["onnx_form"] == "standard" for f in onnx_forms(native).values())
    ops = {n.op_type for _, g in iter_graphs(native.graph) for n in g.node}
    assert "DequantizeLinear" in ops and not ops & {"RTNWeight", "RTNWeightGrouped"}
    a, b = run(functions, feeds)[0], run(native, feeds)[0]
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)
    # the same file materialises to the same plain model
    np.testing.assert_allclose(run(materialize_onnx(native), feeds)[0], run(materialize_onnx(functions), feeds)[0],
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bits,group", LAYOUTS + [(3, 16), (2, None)])
def test_read_back_bit_for_bit_and_bytes(bits, group):
    for builder in (gemm_model, conv_model, chain_model):
        model, _, comp, _, native = rewrite_both(builder, bits, group)
        same_arrays(read_compressed_onnx(native), comp)
        entries = onnx_rewrite._read_meta(native)
        for name, cw in comp.items():  # codes + scales, no zero points: exactly the CompressedWeight's bytes
            assert initializer_bytes(native, entries[name]["arrays"].values()) == cw.nbytes


@pytest.mark.parametrize("bits", [3, 2])
def test_three_and_two_bit_keep_function_form(bits):
    model, feeds, comp, functions, native = rewrite_both(gemm_model, bits, 16)
    forms = onnx_forms(native)
    assert forms["W"]["onnx_form"] == "functions" and f"{bits}-bit" in forms["W"]["onnx_note"]
    assert any(n.domain == DOMAIN for n in native.graph.node)
    onnx.checker.check_model(native, full_check=True)
    np.testing.assert_array_equal(run(native, feeds)[0], run(functions, feeds)[0])


def test_mixed_model_native_and_function_layers():
    """One 4-bit grouped layer (upgrades the model to opset 21) beside a 3-bit one (functions at 21)."""
    x = rand((3, 32), 3)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y"])]
    model = make_model(nodes, [vi("x", (3, 32))], [vi("y", (3, 16))], {"W1": rand((32, 24), 1), "W2": rand((24, 16), 2)})
    specs, _ = find_onnx_layers(model, ALL)
    comp = {"W1": rtn_m.fit_rtn(rand((32, 24), 1), 4, 8), "W2": rtn_m.fit_rtn(rand((24, 16), 2), 3, 8)}
    native = rewrite_onnx(model, specs, comp, "standard")
    onnx.checker.check_model(native, full_check=True)
    assert {n: f["onnx_form"] for n, f in onnx_forms(native).items()} == {"W1": "standard", "W2": "functions"}
    assert max(o.version for o in native.opset_import if o.domain in ("", "ai.onnx")) == 21
    np.testing.assert_allclose(run(native, {"x": x})[0], run(rewrite_onnx(model, specs, comp), {"x": x})[0],
                               rtol=1e-2, atol=1e-2)
    same_arrays(read_compressed_onnx(native), comp)


def test_opset17_model_is_upgraded_to_21():
    model, feeds, comp, functions, native = rewrite_both(gemm_model, 4, 16)
    assert max(o.version for o in model.opset_import if o.domain == "") == 17
    assert max(o.version for o in native.opset_import if o.domain == "") == 21
    assert native.ir_version >= 10
    onnx.checker.check_model(native, full_check=True)


def test_int8_per_row_needs_no_upgrade():
    model, feeds, comp, functions, native = rewrite_both(gemm_model, 8, None)
    assert max(o.version for o in native.opset_import if o.domain == "") == 17
    assert onnx_forms(native)["W"]["onnx_form"] == "standard"


def test_failed_upgrade_keeps_function_form_with_note(monkeypatch):
    from onnx import version_converter

    def refuse(model, target):
        raise RuntimeError("no adapter for this op")

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    model, feeds, comp, functions, native = rewrite_both(gemm_model, 4, 16)
    forms = onnx_forms(native)
    assert forms["W"]["onnx_form"] == "functions" and "opset 21" in forms["W"]["onnx_note"]
    assert max(o.version for o in native.opset_import if o.domain == "") == 17
    onnx.checker.check_model(native, full_check=True)
    np.testing.assert_array_equal(run(native, feeds)[0], run(functions, feeds)[0])
    same_arrays(read_compressed_onnx(native), comp)


def test_invalid_upgrade_keeps_function_form(monkeypatch):
    """A conversion that yields a model the checker rejects is not used."""
    from onnx import version_converter

    def broken(model, target):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.node[0].input[0] = "nowhere"
        for o in out.opset_import:
            if o.domain == "":
                o.version = target
        return out

    monkeypatch.setattr(version_converter, "convert_version", broken)
    model, feeds, comp, functions, native = rewrite_both(gemm_model, 4, 16)
    assert onnx_forms(native)["W"]["onnx_form"] == "functions"
    np.testing.assert_array_equal(run(native, feeds)[0], run(functions, feeds)[0])


def test_config_option_and_report(tmp_path):
    with pytest.raises(InputError, match="onnx_format"):
        rc.Config(onnx_format="matmulnbits")
    model, feeds = gemm_model()
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    res = rc.optimize(str(path), method="rtn", ratio=0.2, min_weight_size=0, quiet=True, onnx_format="standard")
    record = next(r for r in res.report.layers if r.name == "W")
    assert record.status == "compressed" and record.settings["onnx_form"] == "standard"
    out = res.export_onnx(tmp_path / "native.onnx")
    loaded = onnx.load(str(out))
    entry = onnx_rewrite._read_meta(loaded)["W"]
    assert initializer_bytes(loaded, entry["arrays"].values()) == record.bytes_after == res.compressed["W"].nbytes
    same_arrays(read_compressed_onnx(out), res.compressed)
    # the same result exported as decoder functions, and back
    fn = onnx.load(str(res.export_onnx(tmp_path / "functions.onnx", onnx_format="functions")))
    assert onnx_forms(fn) == {} and "onnx_form" not in record.settings
    assert any(n.domain == DOMAIN for n in fn.graph.node)
    np.testing.assert_allclose(run(loaded, feeds)[0], run(fn, feeds)[0], rtol=1e-2, atol=1e-2)
    res.export_onnx(tmp_path / "again.onnx", onnx_format="standard")
    assert record.settings["onnx_form"] == "standard"


def test_torch_result_exports_standard_form(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
    x = torch.randn(4, 32)
    res = rc.optimize(net, example_inputs=(x,), method="rtn", ratio=0.2, min_weight_size=0, quiet=True,
                      onnx_format="standard")
    out = onnx.load(str(res.export_onnx(tmp_path / "t.onnx")))
    onnx.checker.check_model(out, full_check=True)
    forms = onnx_forms(out)
    assert forms and all(f["onnx_form"] == "standard" for f in forms.values())
    assert all(r.settings.get("onnx_form") == "standard" for r in res.report.layers if r.status == "compressed")
    same_arrays(read_compressed_onnx(out), res.compressed)
    with torch.no_grad():
        ref = res.model(x).numpy()
    np.testing.assert_allclose(run(out, {out.graph.input[0].name: x.numpy()})[0], ref, rtol=1e-2, atol=1e-2)


def test_cli_writes_the_standard_form(tmp_path):
    """--onnx-format standard reaches the export: the written file has DequantizeLinear nodes,
    the report names the form per layer, and the model verifies."""
    import json

    from bad_inputs import good_mlp
    from riem_compiler import cli

    out = tmp_path / "out"
    assert cli.main([str(good_mlp(tmp_path)), "-o", str(out), "--method", "rtn", "--ratio", "0.3", "--no-cache",
                     "--no-plot", "-q", "--onnx-format", "standard", "--min-weight-size", "0"]) == 0
    written = onnx.load(str(out / "model.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in written.graph.node)
    report = json.loads((out / "report.json").read_text())
    forms = {r["name"]: r["settings"].get("onnx_form") for r in report["layers"] if r["status"] == "compressed"}
    assert forms and set(forms.values()) == {"standard"}, forms  # 8-bit per channel at 0.3: both layers map
    assert report["verification"]["status"] == "ok"


@pytest.mark.parametrize("builder,kw,in_axis", [
    (matmul_right_model, {}, 0), (matmul_left_model, {}, 1), (gemm_model, {"trans_b": 0}, 0),
    (gemm_model, {"trans_b": 1}, 1), (gemm_model, {"trans_a": 1, "trans_b": 1}, 1)])
def test_frontend_names_the_input_axis(builder, kw, in_axis):
    """The axis summed against the input, so rtn groups run along the reduction (K) axis."""
    model, _ = builder(**kw)
    (spec,), _ = find_onnx_layers(model, ALL)
    assert spec.in_axis == in_axis
    ladder = rc.Config(method_options={"rtn": {"choose": "ladder"}})  # 4-bit groups of 128 at 0.2
    cw = rc.methods.get("rtn").fit(spec, 0.2, rc.methods.get("rtn").settings(ladder)).weight
    assert cw.meta.get("transposed", False) == (in_axis == 0)
    k = spec.shape[in_axis]
    # the scale has one column per group of 128 inputs (here one: K <= 128) and one row per output
    assert cw.arrays["scale"].shape == (spec.shape[1 - in_axis], -(-k // 128))


@pytest.mark.parametrize("bits,group", [(4, 16), (4, 5), (8, None), (3, 16)])
def test_transposed_rtn_quantises_the_transpose(bits, group):
    """in_axis 0 fits W.T: the same codes and scales as fitting the (out, in) matrix, decoded back
    in the weight's own (in, out) layout, through numpy, torch and both ONNX forms."""
    w = rand((40, 24), 5)
    a, b = rtn_m.fit_rtn(w, bits, group, in_axis=0), rtn_m.fit_rtn(w.T.copy(), bits, group)
    assert a.meta == {**b.meta, "transposed": True}
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    np.testing.assert_array_equal(decode(a), decode(b).T)
    model = make_model([helper.make_node("Identity", ["W"], ["y"])], [], [vi("y", (40, 24))], {"W": w})
    for fmt in ("functions", "standard"):
        out = rewrite_onnx(model, None, {"W": a}, fmt)
        onnx.checker.check_model(out, full_check=True)
        np.testing.assert_array_equal(run(out, {})[0], decode(a))
        same_arrays(read_compressed_onnx(out), {"W": a})


def torch_linear_onnx(tmp_path, rank: int):
    """A torch MLP through optimize + export: rank 2 exports Gemm(transB=1), rank 3 Transpose+MatMul."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    x = torch.randn(*((3, 256) if rank == 2 else (2, 3, 256)))
    res = rc.optimize(net, example_inputs=(x,), method="rtn", ratio=0.15, min_weight_size=0, quiet=True,
                      onnx_format="standard")
    return res.export_onnx(tmp_path / f"r{rank}.onnx"), {"input": x.numpy()}, res


def onnx_builder_file(tmp_path, builder):
    model, feeds = builder(n_in=256, n_out=64)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    res = rc.optimize(str(path), method="rtn", ratio=0.15, min_weight_size=0, quiet=True, onnx_format="standard")
    return res.export_onnx(tmp_path / "native.onnx"), feeds, res


@pytest.mark.parametrize("case", ["matmul_right", "gemm_transB0", "torch_gemm", "torch_transpose_matmul"])
def test_onnxruntime_fuses_the_standard_form_into_matmulnbits(tmp_path, case):
    """The 4-bit standard form stays 4-bit in onnxruntime: every weight's DequantizeLinear (+ its
    Transpose) and the consuming MatMul/Gemm become one MatMulNBits at session creation, for
    ONNX MatMul/Gemm weights and for torch's Linear exports; outputs equal the function form at
    accuracy level 0 and stay within int8 activation rounding at onnxruntime's default level.
    Except where onnxruntime's Gemm + Relu fusion comes first: torch's 2-D Linear + ReLU exports as
    Gemm -> Relu, which becomes a FusedGemm on a per-call DequantizeLinear (onnx_format "ort"
    writes MatMulNBits itself for that reason)."""
    import onnxruntime as ort

    if case.startswith("torch"):
        path, feeds, res = torch_linear_onnx(tmp_path, 2 if case == "torch_gemm" else 3)
    else:
        builder = matmul_right_model if case == "matmul_right" else (lambda **k: gemm_model(trans_b=0, **k))
        path, feeds, res = onnx_builder_file(tmp_path, builder)
    assert {r.settings["onnx_form"] for r in res.report.layers if r.status == "compressed"} == {"standard"}
    assert {cw.meta["bits"] for cw in res.compressed.values()} == {4}
    functions = res.export_onnx(tmp_path / "functions.onnx", onnx_format="functions")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    default = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    if case == "torch_gemm":
        assert ops == ["DequantizeLinear", "FusedGemm", "MatMulNBits"], ops
    else:
        assert ops.count("MatMulNBits") == len(res.compressed) and "DequantizeLinear" not in ops, ops
    exact = run(onnx.load(str(path)), feeds)[0]
    ref = run(onnx.load(str(functions)), feeds)[0]
    np.testing.assert_allclose(exact, ref, rtol=1e-4, atol=1e-5)
    scale = float(np.abs(ref).max())
    assert float(np.abs(default - ref).max()) < 0.05 * scale


ORT_CASES = ["matmul_right", "gemm_transB0", "torch_gemm", "torch_transpose_matmul"]


def ort_file(tmp_path, case, ratio):
    if case.startswith("torch"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
        x = torch.randn(*((3, 256) if case == "torch_gemm" else (2, 3, 256)))
        res = rc.optimize(net, example_inputs=(x,), method="rtn", ratio=ratio, min_weight_size=0, quiet=True,
                          onnx_format="ort")
        feeds = {"input": x.numpy()}
    else:
        builder = matmul_right_model if case == "matmul_right" else (lambda **k: gemm_model(trans_b=0, **k))
        model, feeds = builder(n_in=256, n_out=64)
        path = tmp_path / "m.onnx"
        onnx.save_model(model, str(path))
        res = rc.optimize(str(path), method="rtn", ratio=ratio, min_weight_size=0, quiet=True, onnx_format="ort")
    return res.export_onnx(tmp_path / "ort.onnx"), feeds, res


@pytest.mark.parametrize("ratio,bits", [(0.07, 2), (0.15, 4), (0.3, 8)])
@pytest.mark.parametrize("case", ORT_CASES)
def test_ort_form_writes_matmulnbits(tmp_path, monkeypatch, case, ratio, bits):
    """onnx_format="ort": every consuming MatMul/Gemm is a MatMulNBits in the file (2-bit too,
    which standard ONNX cannot hold), with exactly the function form's numerics at accuracy
    level 0 and int8-activation rounding at the default level 4; the arrays read back bit for
    bit and materialising gives back the original graph structure."""
    from riem_compiler.methods.rtn import native

    path, feeds, res = ort_file(tmp_path, case, ratio)
    assert {cw.meta["bits"] for cw in res.compressed.values()} == {bits}
    assert {r.settings["onnx_form"] for r in res.report.layers if r.status == "compressed"} == {"ort"}
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == len(res.compressed) and "DequantizeLinear" not in ops
    assert not ops.count("Transpose") and not ops.count("Gemm")
    assert [i.name for i in model.graph.input] == list(feeds)
    same_arrays(read_compressed_onnx(model), res.compressed)
    entries = onnx_rewrite._read_meta(model)
    stored = sum(cw.nbytes for cw in res.compressed.values())
    on_disk = sum(initializer_bytes(model, e["arrays"].values()) for e in entries.values())
    assert stored <= on_disk <= stored * 1.02  # blocks padded to whole blocks where K % block != 0
    functions = onnx.load(str(res.export_onnx(tmp_path / "functions.onnx", onnx_format="functions")))
    ref = run(functions, feeds)[0]
    default = run(model, feeds)[0]
    assert float(np.abs(default - ref).max()) < 0.05 * float(np.abs(ref).max())
    monkeypatch.setattr(native, "ACCURACY_LEVEL", 0)
    exact = rewrite_onnx(materialize_onnx(functions), None, res.compressed, "ort")
    np.testing.assert_allclose(run(exact, feeds)[0], ref, rtol=1e-4, atol=1e-5)
    plain = materialize_onnx(model)
    plain_ops = [n.op_type for n in plain.graph.node]
    original_ops = [n.op_type for n in materialize_onnx(functions).graph.node]
    assert plain_ops == original_ops and "MatMulNBits" not in plain_ops
    assert not any(o.domain == "com.microsoft" for o in plain.opset_import)
    np.testing.assert_allclose(run(plain, feeds)[0], ref, rtol=1e-5, atol=1e-5)


def test_ort_form_falls_back_with_a_note(tmp_path):
    """What MatMulNBits cannot take keeps the standard form (a conv, a weight read by a non-matmul
    op) or the function form (3-bit codes), each with the reason in the metadata and report."""
    model, feeds = conv_model(c_in=16, c_out=32)
    specs, _ = find_onnx_layers(model, ALL)
    comp = {s.name: rtn_m.fit_rtn(s.weight, 4, 16) for s in specs}
    out = rewrite_onnx(model, specs, comp, "ort")
    form = onnx_forms(out)["W"]
    assert form["onnx_form"] == "standard" and "no MatMulNBits form" in form["onnx_note"]
    model, feeds = matmul_right_model(n_in=256, n_out=64)
    specs, _ = find_onnx_layers(model, ALL)
    comp = {s.name: rtn_m.fit_rtn(s.weight, 3, 128, in_axis=0) for s in specs}
    out = rewrite_onnx(model, specs, comp, "ort")
    form = onnx_forms(out)["W"]
    assert form["onnx_form"] == "functions" and "3-bit" in form["onnx_note"]
    np.testing.assert_allclose(run(out, feeds)[0], run(rewrite_onnx(model, specs, comp), feeds)[0], rtol=1e-6)
    # grouped along the weight's output axis (fitted without in_axis): no MatMulNBits layout
    comp = {s.name: rtn_m.fit_rtn(s.weight, 4, 16) for s in specs}
    form = onnx_forms(rewrite_onnx(model, specs, comp, "ort"))["W"]
    assert form["onnx_form"] == "standard" and "output axis" in form["onnx_note"]
