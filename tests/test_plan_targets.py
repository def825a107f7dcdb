"""method="auto" planned for a deployment target (Config.plan_for, methods/targets.py): the plan holds
only candidates the target runs compressed, its bytes are the run-time weight bytes, and the
emitted ONNX / TVM artifacts agree with the plan."""
import json
from importlib.resources import files

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import riem_compiler as rc
from riem_compiler.errors import InputError
from riem_compiler.frontend.layers import LayerSpec
from riem_compiler.methods import targets
from riem_compiler.methods.affine import fit_affine
from riem_compiler.methods.dense import fit_dense
from riem_compiler.methods.rtn import fit_rtn
from riem_compiler.methods.svd import fit_svd
from riem_compiler.methods.vq import fit_vq


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 128),
                               torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()


def _optimized_initializer_bytes(path, tmp_path) -> dict[str, int]:
    """Initializer name -> bytes in the model onnxruntime runs (its optimised graph, saved)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp_path / "optimized.onnx"))
    return {t.name: len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in model.graph.initializer}


def _check_onnx_plan(res, path, tmp_path):
    """Every compressed layer of a plan_for="onnx" result is written in a native form, and the bytes
    onnxruntime holds for it (its optimised model's initializers) are the report's run-time bytes."""
    held = _optimized_initializer_bytes(path, tmp_path)
    compressed = [r for r in res.report.layers if r.status == "compressed"]
    assert compressed
    for r in compressed:
        assert r.settings["plan_for"] == "onnx"
        assert r.settings["onnx_form"] in ("ort", "standard"), (r.name, r.settings.get("onnx_note"))
        assert r.settings["runs_as"] == {"ort": "MatMulNBits", "standard": "DequantizeLinear"}[r.settings["onnx_form"]]
        assert r.bytes_after == r.settings["runtime_bytes"] >= r.settings["stored_bytes"]
        assert r.settings["stored_bytes"] == res.compressed[r.name].nbytes
        # the weight's own tensors (codes, scales: their float32 Casts folded), no dense copy of it
        mine = {n: b for n, b in held.items() if n.startswith(r.name + ".") and not n.endswith(".shape")}
        assert sum(mine.values()) == r.bytes_after, (r.name, mine)
        assert r.name not in held


def test_plan_for_onnx_runs_every_layer_in_a_native_form(tmp_path):
    model = _mlp()
    x = torch.randn(2, 256)
    res = rc.optimize(model, example_inputs=(x,), method="auto", ratio=0.125, plan_for="onnx", quiet=True)
    assert res.report.auto["plan_for"] == "onnx"
    assert res.report.bytes_after <= 0.125 * res.report.bytes_before
    for choice in res.report.auto["choices"]:
        assert choice["runs_as"] in ("MatMulNBits", "DequantizeLinear", "dense float32")
        assert choice["off_target"] > 0  # vq, svd, rotq, 3-bit rtn, dense float16, ... were left out
    path = res.export_onnx(tmp_path / "m.onnx")  # the default onnx_format ("auto")
    _check_onnx_plan(res, path, tmp_path)
    assert "PLANNED FOR" in str(res.report)
    with torch.no_grad():
        ref = res.model(x).numpy()
    got = np.asarray(rc.load(path)(x.numpy()))  # MatMulNBits at accuracy level 4: int8 activations
    assert float(np.abs(got - ref).max()) < 0.05 * float(np.abs(ref).max())


def test_plan_for_onnx_on_an_onnx_cnn(tmp_path):
    """ONNX input with Conv layers: those run as DequantizeLinear (kept compressed by onnxruntime),
    the Gemm layers as MatMulNBits."""
    res = rc.optimize(str(files("riem_compiler.examples") / "digits_cnn.onnx"), method="auto", ratio=0.2,
                      plan_for="onnx", min_weight_size=0, quiet=True)
    path = tmp_path / "cnn.onnx"
    onnx.save(res.model, str(path))
    _check_onnx_plan(res, path, tmp_path)
    forms = {r.kind: r.settings["runs_as"] for r in res.report.layers if r.status == "compressed"}
    assert forms.get("conv2d") == "DequantizeLinear" and forms.get("linear") == "MatMulNBits"


def test_plan_for_tvm_build_fuses_every_compressed_layer(tmp_path):
    pytest.importorskip("tvm")
    from riem_compiler.codegen.tvm_build import build_tvm

    model = _mlp()
    x = torch.randn(2, 256)
    res = rc.optimize(model, example_inputs=(x,), method="auto", ratio=0.125, plan_for="tvm", quiet=True)
    assert res.report.auto["plan_for"] == "tvm"
    compressed = [r for r in res.report.layers if r.status == "compressed"]
    assert compressed
    out = build_tvm(res, tmp_path / "art", target="llvm", mode="fused", num_cores=2)
    layers = {row["name"]: row for row in json.loads((out / "manifest.json").read_text())["layers"]}
    for r in compressed:
        assert r.settings["runs_as"] == "fused"
        assert layers[r.name]["decode"] == "fused into the matmul", layers[r.name]
        assert layers[r.name]["resident_bytes"] == r.bytes_after == res.compressed[r.name].nbytes


def _spec(kind="linear", shape=(64, 256), in_axis=1):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return LayerSpec("w", kind, w, in_axis=in_axis)


def _runtime_bytes(spec, cw, target):
    """targets.runtime's bytes, or its reason when the target does not run cw compressed."""
    got = targets.runtime(spec, cw, target)
    return got if isinstance(got, str) else got[0]


def test_runtime_bytes_asks_the_methods():
    spec = _spec()
    w = spec.weight
    rtn4 = fit_rtn(w, 4, 128)
    # MatMulNBits: packed codes plus the float16 group scales at float32 (onnxruntime folds their Cast)
    assert _runtime_bytes(spec, rtn4, "onnx") == rtn4.arrays["codes"].nbytes + 4 * rtn4.arrays["scale"].size
    assert _runtime_bytes(spec, rtn4, "tvm") == rtn4.nbytes
    rtn3 = fit_rtn(w, 3, 128)
    assert "no native ONNX form" in _runtime_bytes(spec, rtn3, "onnx")
    assert _runtime_bytes(spec, rtn3, "tvm") == rtn3.nbytes
    for cw in (fit_vq(w, 4, 6, iterations=2), fit_svd(w, 0.125, factor_bits=8)):
        assert isinstance(_runtime_bytes(spec, cw, "onnx"), str)
        assert _runtime_bytes(spec, cw, "tvm") == cw.nbytes
    aff = fit_affine(w, 2, 64, iterations=2)
    assert isinstance(_runtime_bytes(spec, aff, "onnx"), int)
    # dense float16 runs as float32 on both; float32 is the original weight
    for target in targets.PLAN_TARGETS:
        assert isinstance(_runtime_bytes(spec, fit_dense(w, "float16"), target), str)
        assert _runtime_bytes(spec, fit_dense(w, "float32"), target) == spec.fp32_bytes
    conv = _spec("conv2d", (16, 8, 3, 3))
    assert "conv" in _runtime_bytes(conv, fit_rtn(conv.weight, 4, None), "tvm")
    assert targets.runtime(conv, fit_rtn(conv.weight, 8, None), "onnx")[1] == "DequantizeLinear"
    with pytest.raises(InputError, match="onnx"):
        _runtime_bytes(spec, rtn4, "tflite")


@pytest.mark.parametrize("bits", [8, 4])
def test_per_row_dequantize_before_a_matmul_counts_what_onnxruntime_holds(bits, tmp_path):
    """A row scale and 384 inputs (no MatMulNBits block): the standard DequantizeLinear, which
    onnxruntime rebuilds as MatMulNBits with blocks of 32 and float32 scales; the run-time bytes
    predicted are the bytes its optimised model holds."""
    from riem_compiler.codegen.onnx_rewrite import rewrite_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(384, 96)).eval()
    base = torch.onnx.export(model, (torch.randn(2, 5, 384),), dynamo=True, optimize=False, verbose=False).model_proto
    spec = LayerSpec("0.weight", "linear", model[0].weight.detach().numpy())
    cw = fit_rtn(spec.weight, bits, None)
    assert targets.runtime(spec, cw, "onnx")[1] == "DequantizeLinear"
    path = tmp_path / "dq.onnx"
    onnx.save(rewrite_onnx(base, None, {"0.weight": cw}, "auto"), str(path))
    held = _optimized_initializer_bytes(path, tmp_path)
    assert sum(b for n, b in held.items() if n.startswith("0.weight.")) == _runtime_bytes(spec, cw, "onnx")


def test_plan_for_is_validated_and_on_the_cli():
    with pytest.raises(InputError, match=r"plan_for must be one of \('onnx', 'tvm'\)"):
        rc.Config(method="auto", plan_for="tflite")
    with pytest.raises(InputError, match="method='auto'"):
        rc.Config(method="rtn", plan_for="onnx")
    assert rc.Config(method="auto").plan_for is None
    from riem_compiler.cli.arguments import _config_from_args, build_parser

    for flag, want in (("any", None), ("onnx", "onnx"), ("tvm", "tvm")):
        args = build_parser().parse_args(["m.onnx", "-o", "out", "--method", "auto", "--plan-for", flag, "--no-cache"])
        assert _config_from_args(args).plan_for == want
    with pytest.raises(SystemExit):
        build_parser().parse_args(["m.onnx", "--plan-for", "tflite"])
