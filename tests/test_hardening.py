"""Bad inputs end in a short clear error (non-zero exit, no traceback) or a safe pass-through;
never a silently wrong model and never a half-written output (corpus: tests/bad_inputs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bad_inputs
from riem_compiler import cli

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--method", "rtn", "--no-cache", "--no-plot"]


@pytest.fixture
def corpus(tmp_path):
    return bad_inputs.write_corpus(tmp_path / "corpus")


def compile_(capsys, model, out, *extra):
    code = cli.main([str(model), "-o", str(out), *FAST, *map(str, extra)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("case, needle", [
    ("truncated", "truncated or not an ONNX model"),
    ("corrupt", "truncated or not an ONNX model"),
    ("empty_file", "truncated or not an ONNX model"),
    ("unknown_opset", "opset 99"),
    ("missing_external_data", "external data file 'model.onnx.data'"),
    ("not_a_model", "unknown model format '.txt'"),
])
def test_unreadable_models_fail_with_one_line(corpus, tmp_path, capsys, case, needle):
    out = tmp_path / "out"
    code, stdout, stderr = compile_(capsys, corpus[case], out)
    assert code == cli.EXIT_INPUT
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("riem-compile: error: ") and needle in lines[0]
    assert stdout == ""
    assert_nothing_written(out)


def test_error_in_a_real_process_has_no_traceback_unless_debug(corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "riem_compiler", str(corpus["truncated"]), "-o", str(tmp_path / "out"), "--no-cache"]
    proc = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == cli.EXIT_INPUT
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    proc = subprocess.run([*base, "--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == cli.EXIT_INPUT and "Traceback" in proc.stderr


def test_dynamic_batch_is_verified_at_batch_1(corpus, tmp_path, capsys):
    code, _, _ = compile_(capsys, corpus["dynamic_batch"], tmp_path / "out")
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verification"]["inputs"] == [{"name": "X", "shape": [1, 32], "dtype": "float32"}]
    inp = onnx.load(str(tmp_path / "out" / "model.onnx")).graph.input[0]
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"  # still dynamic in the output
    # an explicit shape for the dynamic dim is used
    code, _, _ = compile_(capsys, corpus["dynamic_batch"], tmp_path / "out2", "--input-shape", "X=5,32")
    assert code == 0
    assert json.loads((tmp_path / "out2" / "report.json").read_text())["verification"]["inputs"][0]["shape"] == [5, 32]


@pytest.mark.parametrize("case, bad_layer, good_layer", [("nan_weights", "W1", "W2"), ("inf_weights", "W2", "W1")])
def test_non_finite_weights_pass_through(corpus, tmp_path, capsys, case, bad_layer, good_layer):
    out = tmp_path / "out"
    code, stdout, stderr = compile_(capsys, corpus[case], out)
    assert code == 0
    assert f"{bad_layer}: weight contains NaN or inf; left unchanged" in stderr
    report = {r["name"]: r for r in json.loads((out / "report.json").read_text())["layers"]}
    assert report[bad_layer]["status"] == "skipped" and report[good_layer]["status"] == "compressed"
    before, after = initializers(corpus[case]), initializers(out / "model.onnx")
    np.testing.assert_array_equal(after[bad_layer], before[bad_layer])  # exactly as it was, NaN/inf included
    assert good_layer not in after  # replaced by its compressed arrays


def test_all_zero_weights_stay_exactly_zero(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main([str(corpus["zero_weights"]), "-o", str(out), "--steps", "20", "--ignore", "W2", "--no-cache",
                     "--no-plot", "-q"])
    assert code == 0
    report = {r["name"]: r for r in json.loads((out / "report.json").read_text())["layers"]}
    w1 = report["W1"]
    assert w1["status"] == "skipped" or w1["rel_error"] < 1e-6
    # the decoded weight is still zero, not a small random matrix
    from riem_compiler.codegen.onnx_export import materialize_onnx

    dense = materialize_onnx(onnx.load(str(out / "model.onnx")))
    assert np.abs(initializers_of(dense)["W1"]).max() < 1e-6


def initializers_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from riem_compiler.frontend.onnx_frontend import iter_graphs

    return {t.name: numpy_helper.to_array(t) for _, g in iter_graphs(model.graph) for t in g.initializer}


@pytest.mark.parametrize("case, extra, reason", [
    ("one_by_one", ["--min-weight-size", "0"], "too small"),
    ("one_by_one", [], "1 weights < min_weight_size"),
    ("conv3d_only", [], "3-D convolution"),
    ("no_weights", [], None),
])
def test_nothing_to_compress_passes_through_unchanged(corpus, tmp_path, capsys, case, extra, reason):
    out = tmp_path / "out"
    code, stdout, stderr = compile_(capsys, corpus[case], out, *extra)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["compressed"] == 0
    if reason:
        assert reason in report["layers"][0]["reason"]
    before, after = initializers(corpus[case]), initializers(out / "model.onnx")
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    assert report["verification"]["rel_error"] == 0.0


def test_output_path_that_is_a_file(corpus, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("a file")
    code, _, stderr = compile_(capsys, corpus["good_mlp"], target)
    assert code == cli.EXIT_OUTPUT and "is not a directory" in stderr
    assert target.read_text() == "a file"
    code, _, stderr = compile_(capsys, corpus["good_mlp"], target / "sub")  # parent is a file
    assert code == cli.EXIT_OUTPUT and "cannot write to" in stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_directory(corpus, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, stderr = compile_(capsys, corpus["good_mlp"], ro / "out")
        assert code == cli.EXIT_OUTPUT and "cannot write to" in stderr
    finally:
        ro.chmod(0o700)


def test_failure_while_writing_leaves_no_half_written_output(corpus, tmp_path, capsys, monkeypatch):
    from riem_compiler.api import Result

    def half_write(self, path, materialize=False):
        Path(path).write_bytes(b"\x08\x07half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Result, "export_onnx", half_write)
    out = tmp_path / "out"
    code, _, stderr = compile_(capsys, corpus["good_mlp"], out)
    assert code == cli.EXIT_OUTPUT and "No space left on device" in stderr
    assert_nothing_written(out)
    # an existing output keeps its old files
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous model")
    code, _, _ = compile_(capsys, corpus["good_mlp"], out)
    assert code == cli.EXIT_OUTPUT
    assert (out / "model.onnx").read_bytes() == b"previous model"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]


def test_interrupt_writes_nothing(corpus, tmp_path, capsys, monkeypatch):
    import riem_compiler.api as api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "compress_specs", interrupted)
    out = tmp_path / "out"
    code = cli.main([str(corpus["good_mlp"]), "-o", str(out), "--method", "rtn", "--cache-dir", str(tmp_path / "c")])
    assert code == cli.EXIT_INTERRUPTED
    assert "run the same command to resume" in capsys.readouterr().err
    assert_nothing_written(out)


def test_unexpected_error_is_one_line_unless_debug(corpus, tmp_path, capsys, monkeypatch):
    import riem_compiler.api as api

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(api, "compress_specs", boom)
    code, _, stderr = compile_(capsys, corpus["good_mlp"], tmp_path / "out")
    assert code == cli.EXIT_ERROR
    assert stderr.strip() == "riem-compile: error: RuntimeError: boom (rerun with --debug for the traceback)"
    code, _, stderr = compile_(capsys, corpus["good_mlp"], tmp_path / "out", "--debug")
    assert code == cli.EXIT_ERROR and "Traceback" in stderr
    assert_nothing_written(tmp_path / "out")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("args, needle", [
    (["--ratio", "1.5"], "ratio must be a number in (0, 1)"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--input-shape", "a,b"], "expected comma-separated integers"),
    (["--input-shape", "Y=2,32"], "--input-shape names ['Y']"),
    (["--target", "tvm-llvm"], "needs a PyTorch model"),
    (["--max-error", "0.1", "--no-verify"], "--max-error needs verification"),
])
def test_bad_options(corpus, tmp_path, capsys, args, needle):
    code, _, stderr = compile_(capsys, corpus["good_mlp"], tmp_path / "out", *args)
    assert code == cli.EXIT_INPUT and needle in stderr and "Traceback" not in stderr
    assert_nothing_written(tmp_path / "out")


def test_bad_torch_inputs(tmp_path, capsys):
    import torch

    (tmp_path / "mods.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))\n"
        "def not_a_module():\n    return 42\n")
    ref = f"{tmp_path / 'mods.py'}:build"
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    torch.save({"0.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "broken.pt2").write_bytes(b"PK\x03\x04 not really a zip")
    cases = [
        (["--model-ref", "no_such_module_xyz:build", "--input-shape", "2,32"], "cannot import 'no_such_module_xyz'"),
        (["--model-ref", f"{tmp_path / 'mods.py'}:missing", "--input-shape", "2,32"], "has no callable 'missing'"),
        (["--model-ref", f"{tmp_path / 'mods.py'}:not_a_module", "--input-shape", "2,32"], "returned int"),
        (["--model-ref", ref], "--model-ref needs --input-shape"),
        (["--model-ref", ref, "--input-shape", "2,31"], "fails on inputs of shape (2, 31)"),
        ([str(tmp_path / "evil.pt"), "--model-ref", ref, "--input-shape", "2,32", "--allow-pickle"], "weights_only"),
        ([str(tmp_path / "wrong.pt"), "--model-ref", ref, "--input-shape", "2,32", "--allow-pickle"],
         "does not fit the model"),
        ([str(tmp_path / "garbage.safetensors"), "--model-ref", ref, "--input-shape", "2,32"],
         "not a readable safetensors file"),
        ([str(tmp_path / "broken.pt2")], "cannot load as a torch.export program"),
        ([str(tmp_path / "missing.onnx")], "no such file"),
        ([str(tmp_path / "garbage.safetensors")], "also pass --model-ref"),
    ]
    for args, needle in cases:
        code = cli.main([*args, "-o", str(tmp_path / "out"), *FAST])
        err = capsys.readouterr().err
        assert code == cli.EXIT_INPUT, (args, err)
        assert needle in err and "Traceback" not in err, (args, err)
    assert_nothing_written(tmp_path / "out")
