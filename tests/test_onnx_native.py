"""onnx_format="standard": rtn 8/4-bit weights as standard DequantizeLinear (no decoder functions).

The native form decodes what methods.decode decodes (float16-scale forms round once to float16),
passes the full checker, runs in onnxruntime with the function form's outputs, keeps model
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
from test_onnx_frontend import (ALL, chain_model, control_flow_model, conv_model, gemm_model, make_model,
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
    (float32 per-row scale) or its float16 rounding (float16 group scales, float16 product)."""
    w = rand(shape, 1)
    model = make_model([helper.make_node("Identity", ["W"], ["y"])], [], [vi("y", shape)], {"W": w})
    cw = rtn_m.fit_rtn(w, bits, group)
    native = rewrite_onnx(model, None, {"W": cw}, "standard")
    onnx.checker.check_model(native, full_check=True)
    assert onnx_forms(native) == {"W": {"onnx_form": "standard"}}
    assert not any(n.domain == DOMAIN for n in native.graph.node) and not native.functions
    assert [n.op_type for n in native.graph.node if n.op_type == "DequantizeLinear"] == ["DequantizeLinear"]
    ref = decode(cw).reshape(shape)
    if group is not None:
        ref = ref.astype(np.float16).astype(np.float32)
    for disable in (True, False):
        np.testing.assert_array_equal(run(native, {}, disable_opt=disable)[0], ref)


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
    # float16 group scales: the decoded weight is rounded once to float16 (relative 2**-11)
    tol = 0 if group is None else 3e-3 * float(np.abs(a).max())
    np.testing.assert_allclose(b, a, atol=tol + 1e-5, rtol=1e-4)
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
        rc.Config(onnx_format="ort")
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
