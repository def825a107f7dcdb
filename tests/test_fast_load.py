"""Fast start (`rc.load(path)` on a function-form .onnx): the weights are decoded in torch and given
to onnxruntime as plain initializers. Its outputs equal the folded session's, no decoder is
left in the session's model, other files open as before, and a corrupt record is one InputError."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import riem_compiler as rc
from riem_compiler.codegen import onnx_fast_load as fl
from riem_compiler.codegen.onnx_export import DOMAIN, META_KEY, rewrite_onnx, save_onnx
from riem_compiler.codegen.ort_runner import OnnxRuntimeModel
from riem_compiler.frontend.onnx_frontend import find_onnx_layers, iter_graphs
from riem_compiler.methods import rtn as rtn_m, svd as svd_m, tucker2 as tucker2_m
from test_onnx_export import random_riem
from test_onnx_frontend import ALL, chain_model, control_flow_model, make_model, rand, vi


def net_model():
    """Conv -> Relu -> Flatten -> MatMul (weight on the right) -> Relu -> Gemm (transB, bias)."""
    nodes = [helper.make_node("Conv", ["x", "W_conv"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["cr"]),
             helper.make_node("Flatten", ["cr"], ["f"]),
             helper.make_node("MatMul", ["f", "W_mm"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Gemm", ["hr", "W_gemm", "C"], ["y"], transB=1, name="gemm")]
    inits = {"W_conv": rand((8, 4, 3, 3), 1) * 0.3, "W_mm": rand((288, 32), 2) * 0.1,
             "W_gemm": rand((24, 32), 3) * 0.3, "C": rand((24,), 4)}
    return make_model(nodes, [vi("x", (2, 4, 6, 6))], [vi("y", (2, 24))], inits), {"x": rand((2, 4, 6, 6), 5)}


def fit(method: str, spec, seed: int):
    if method == "riem":
        return random_riem(spec.shape, seed=seed)
    if method == "rtn":  # 3-bit has no standard form: always a decoder function
        return rtn_m.fit_rtn(spec.weight, 3, 16, in_axis=spec.in_axis)
    if method == "rtn4":
        return rtn_m.fit_rtn(spec.weight, 4, 16, in_axis=spec.in_axis)
    if method == "svd":
        return svd_m.fit_svd(spec.weight, 0.5, factor_bits=8)
    return tucker2_m.fit_tucker2(spec.weight, 0.5)


def compressed_file(tmp_path, builder, methods: dict, onnx_format="functions", name="model.onnx"):
    model, feeds = builder()
    specs, _ = find_onnx_layers(model, ALL)
    comp = {s.name: fit(methods.get(s.name, methods.get("*")), s, i) for i, s in enumerate(specs)}
    return save_onnx(rewrite_onnx(model, specs, comp, onnx_format), tmp_path / name), feeds, sorted(comp)


def assert_close(got, want):
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(w).max())))


MIXES = [{"W_conv": "tucker2", "W_mm": "rtn", "W_gemm": "riem"},
         {"W_conv": "riem", "W_mm": "svd", "W_gemm": "rtn"}]


@pytest.mark.parametrize("methods", MIXES, ids=lambda m: "+".join(m.values()))
def test_fast_start_equals_folded_session(tmp_path, methods):
    path, feeds, names = compressed_file(tmp_path, net_model, methods)
    fast, folded = rc.load(path), rc.load(path, fast_start=False)
    assert fast.decoded == names and folded.decoded == []
    assert_close(fast(**feeds), folded(**feeds))
    x = torch.from_numpy(feeds["x"])
    assert isinstance(fast(x), torch.Tensor)


@pytest.mark.parametrize("builder", [control_flow_model, chain_model])
def test_subgraph_and_float16_weights(tmp_path, builder):
    """Weights inside If/Loop bodies are embedded in their subgraph; a float16 Constant weight
    (decoder + Cast) is decoded and cast like the Cast node does."""
    path, feeds, names = compressed_file(tmp_path, builder, {"*": "riem"})
    fast = rc.load(path)
    assert fast.decoded == names
    assert_close(fast(**feeds), rc.load(path, fast_start=False)(**feeds))
    if builder is control_flow_model:
        assert_close(fast(**{**feeds, "flag": np.array(False)}),
                     rc.load(path, fast_start=False)(**{**feeds, "flag": np.array(False)}))


def session_model(path, tmp_path, fast_start: bool) -> onnx.ModelProto:
    """The model the session was given, as onnxruntime saves it with optimisations off (it has
    inlined the decoder functions by then: their bodies are plain nodes)."""
    seen = tmp_path / f"seen_{fast_start}.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.optimized_model_filepath = str(seen)
    OnnxRuntimeModel(path, session_options=opts, fast_start=fast_start)
    return onnx.load(str(seen))


def calls_decoders(model: onnx.ModelProto) -> bool:
    return (any(f.domain == DOMAIN for f in model.functions)
            or any(n.domain == DOMAIN for _, g in iter_graphs(model.graph) for n in g.node))


def test_no_decoder_left_in_the_session(tmp_path):
    path, _, names = compressed_file(tmp_path, net_model, MIXES[0])
    dense_ops = [n.op_type for n in net_model()[0].graph.node]
    folded = session_model(path, tmp_path, False)
    assert len(folded.graph.node) > len(dense_ops)  # the probe sees the inlined decoders
    seen = session_model(path, tmp_path, True)  # caller's options: the weights are embedded
    assert [n.op_type for n in seen.graph.node] == dense_ops and not calls_decoders(seen)
    assert {t.name for t in seen.graph.initializer} == {"W_conv", "W_mm", "W_gemm", "C"}
    prepared = fl.prepare_fast_start(path)  # what rc.load hands over: placeholders + arrays
    assert not calls_decoders(prepared.model) and prepared.decoded == names
    assert not any(o.domain == DOMAIN for o in prepared.model.opset_import)
    placeholders = {t.name for t in prepared.model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert placeholders == set(prepared.external) and set(names) <= placeholders
    compact = {n for e in json.loads(next(p.value for p in prepared.model.metadata_props if p.key == META_KEY)).values()
               for n in e["arrays"].values()}
    assert not compact & {t.name for t in prepared.model.graph.initializer}


def test_large_dense_initializers_travel_outside_the_model(tmp_path, monkeypatch):
    path, feeds, _ = compressed_file(tmp_path, net_model, MIXES[1])
    monkeypatch.setattr(fl, "MOVE_BYTES", 1)
    assert "C" in fl.prepare_fast_start(path).external
    assert_close(rc.load(path)(**feeds), rc.load(path, fast_start=False)(**feeds))


def test_session_can_be_recreated_and_torch_threads_are_restored(tmp_path):
    """onnxruntime re-creates a session from its options (set_providers): the arrays they point
    at must still be there."""
    path, feeds, _ = compressed_file(tmp_path, net_model, MIXES[0])
    threads = torch.get_num_threads()
    fast = rc.load(path)
    assert torch.get_num_threads() == threads
    want = fast(**feeds)
    import gc

    gc.collect()
    fast.session.set_providers(["CPUExecutionProvider"])
    assert_close(fast(**feeds), want)


def test_model_proto_and_artifact_directory(tmp_path):
    path, feeds, names = compressed_file(tmp_path, net_model, MIXES[0])
    model = onnx.load(str(path))
    fast = OnnxRuntimeModel(model, fast_start=True)
    assert fast.decoded == names and calls_decoders(model)  # the caller's proto is not changed
    assert_close(fast(**feeds), OnnxRuntimeModel(model)(**feeds))
    res = rc.optimize(net_model()[0], method="rtn", ratio=0.15, min_weight_size=0, quiet=True, onnx_format="functions")
    directory = res.save(tmp_path / "artifact")
    loaded = rc.load(directory)
    assert loaded.decoded == sorted(res.compressed)
    assert_close(loaded(**feeds), rc.load(directory, fast_start=False)(**feeds))
    # the default form: only the weights left as decoder functions are decoded at load (here 3-bit codes;
    # at 0.14 the MatMul weight gets 4-bit groups, MatMulNBits, and the Conv weight 4-bit rows, DequantizeLinear)
    res = rc.optimize(net_model()[0], method="rtn", ratio=0.14, min_weight_size=0, quiet=True)
    directory = res.save(tmp_path / "artifact_default")
    forms = {r.name: r.settings["onnx_form"] for r in res.report.compressed}
    functions = sorted(n for n, f in forms.items() if f == "functions")
    assert functions and len(functions) < len(forms), forms
    assert rc.load(directory).decoded == functions


def test_standard_and_plain_files_open_as_before(tmp_path):
    plain, feeds = net_model()
    plain_path = save_onnx(plain, tmp_path / "plain.onnx")
    standard, _, _ = compressed_file(tmp_path, net_model, {"*": "rtn4", "W_conv": "rtn4"}, "standard", "std.onnx")
    for path in (plain_path, standard):
        assert not fl.has_decoder_functions(path)
        got = rc.load(path)
        assert got.decoded == []
        assert_close(got(**feeds), rc.load(path, fast_start=False)(**feeds))
    # 4-bit gets DequantizeLinear, 3-bit keeps its decoder: only that one is decoded
    mixed, _, _ = compressed_file(tmp_path, net_model, {"W_conv": "rtn4", "W_mm": "rtn", "W_gemm": "rtn4"},
                                  "standard", "mixed.onnx")
    assert fl.has_decoder_functions(mixed)
    fast = rc.load(mixed)
    assert fast.decoded == ["W_mm"]
    assert_close(fast(**feeds), rc.load(mixed, fast_start=False)(**feeds))
    prepared = fl.prepare_fast_start(mixed)
    assert not calls_decoders(prepared.model)
    assert any(n.op_type == "DequantizeLinear" for n in prepared.model.graph.node)


def with_record(path, out, edit) -> str:
    model = onnx.load(str(path))
    entry = next(p for p in model.metadata_props if p.key == META_KEY)
    if callable(edit):
        record = json.loads(entry.value)
        edit(record)
        edit = json.dumps(record)
    entry.value = edit
    onnx.save_model(model, str(out))
    return str(out)


def _set(record, name, key, value):
    record[name][key] = value


CORRUPT = {
    "not json": ("{not json", "not valid JSON"),
    "not an object": ("[1, 2]", "not a JSON object"),
    "unknown method": (lambda r: _set(r, "W_gemm", "method", "mystery"), "unknown method 'mystery'"),
    "bad shape": (lambda r: _set(r, "W_gemm", "shape", [24, -1]), "shape"),
    "node not a decoder": (lambda r: _set(r, "W_gemm", "nodes", ["h", "W_gemm"]), "not a decoder call"),
    "missing node": (lambda r: _set(r, "W_gemm", "nodes", ["nowhere", "W_gemm"]), "no node produces 'nowhere'"),
    "missing array": (lambda r: _set(r, "W_gemm", "arrays", {**r["W_gemm"]["arrays"], "v": "gone"}),
                      "missing from the model"),
    "does not decode": (lambda r: _set(r, "W_gemm", "shape", [24, 33]), "cannot decode it as riem"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_record_is_one_input_error(tmp_path, case):
    path, _, _ = compressed_file(tmp_path, net_model, MIXES[0])
    edit, needle = CORRUPT[case]
    bad = with_record(path, tmp_path / "bad.onnx", edit)
    with pytest.raises(rc.InputError) as info:
        rc.load(bad)
    text = str(info.value)
    assert "\n" not in text and bad in text and needle in text, text


def test_metadata_is_read_without_the_graph(tmp_path):
    path, _, _ = compressed_file(tmp_path, net_model, MIXES[0])
    assert json.loads(fl._file_metadata(path)[META_KEY]).keys() == {"W_conv", "W_mm", "W_gemm"}
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    assert not fl.has_decoder_functions(junk)


def test_format_names_match_the_writer():
    from riem_compiler.codegen import onnx_rewrite
    from riem_compiler.methods import onnx_common

    assert fl.META_KEY == onnx_rewrite.META_KEY and fl.DOMAIN == onnx_common.DOMAIN
