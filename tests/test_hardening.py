"""Bad inputs end in a short clear error (non-zero exit, no traceback) or a safe pass-through;
never a silently wrong model and never a half-written output (corpus: tests/bad_inputs)."""
import json
import os
import subprocess
import sys
import zlib
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


# ----------------------------------------------------------------------------- hostile code (issue 11)

def one_error_line(stderr: str, needle: str = "") -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("riem-compile: error: "), stderr
    assert "Traceback" not in stderr and needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case, needle", [
    ("pt2_pickled_constant", "pickled data that needs the Python object 'exec'"),
    ("pt2_pickled_weight", "pickled data that needs the Python object 'exec'"),
    ("pt2_opaque_constant", "holds a pickled Python object"),
    ("pt2_pickled_example_inputs", "pickled data that needs the Python object 'exec'"),
    ("pt2_guard_code", "is not a plain shape check"),
    ("pt2_shape_expression", "is not a plain formula"),
    ("pt2_graph_attribute_name", "is not a plain name"),
])
def test_pt2_that_would_run_code_is_refused(tmp_path, capsys, case, needle):
    """Each archive runs its payload under plain torch.export.load/.module()/forward (see the
    --allow-pickle test below); by default nothing of it runs and the CLI says why."""
    marker = tmp_path / "pwned"
    model = bad_inputs.HOSTILE_PT2[case](tmp_path, marker)
    code, stdout, stderr = compile_(capsys, model, tmp_path / "out")
    assert not marker.exists()
    assert code == cli.EXIT_INPUT
    line = one_error_line(stderr)
    assert needle in line and "not loaded" in line and "--allow-pickle" in line, line
    assert stdout == ""
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("case", sorted(bad_inputs.HOSTILE_PT2))
def test_allow_pickle_is_the_opt_in_that_trusts_a_pt2(tmp_path, capsys, case):
    """--allow-pickle means "I trust this file": torch.export.load as torch does it. This also
    shows that every hostile archive above really runs its payload when trusted."""
    marker = tmp_path / "pwned"
    model = bad_inputs.HOSTILE_PT2[case](tmp_path, marker)
    compile_(capsys, model, tmp_path / "out", "--allow-pickle")
    assert marker.exists()


def test_normal_pt2_loads_in_safe_mode(tmp_path, capsys):
    """Plain programs, with a constant and with a dynamic batch (shape expressions and range
    guards), are not refused: their example inputs are tensors and their formulas are plain."""
    for dynamic in (False, True):
        out = tmp_path / f"out{dynamic}"
        code, _, stderr = compile_(capsys, bad_inputs.pt2_program(tmp_path, f"p{dynamic}", dynamic), out, "-q",
                                   "--min-weight-size", "256")  # the 16x32 weight is compressed
        assert code == 0, stderr
        report = json.loads((out / "report.json").read_text())
        assert report["verification"]["status"] == "ok"
        assert report["totals"]["compressed"] == 1


def test_pt2_safe_mode_fails_closed_when_torch_lacks_a_checked_function(tmp_path, capsys, monkeypatch):
    import torch.fx.graph as fx_graph

    model = bad_inputs.pt2_program(tmp_path, "plain", False)
    monkeypatch.delattr(fx_graph, "_format_target")  # as in a torch whose internals were renamed
    code, _, stderr = compile_(capsys, model, tmp_path / "out")
    assert code == cli.EXIT_INPUT
    assert "cannot be checked" in one_error_line(stderr) and "--allow-pickle" in stderr


@pytest.mark.parametrize("builder, needle", [
    (bad_inputs.pt2_aoti_library, "holds an AOTInductor compiled library"),
    (bad_inputs.pt2_traversal_entry, "points outside the archive"),
])
def test_pt2_with_native_code_or_escaping_entry_names_is_refused(tmp_path, capsys, builder, needle):
    model = builder(tmp_path)
    for extra in ([], ["--allow-pickle"]) if builder is bad_inputs.pt2_traversal_entry else ([],):
        code, _, stderr = compile_(capsys, model, tmp_path / "out", *extra)
        assert code == cli.EXIT_INPUT
        assert needle in one_error_line(stderr)
    assert not Path("/tmp/riem_pt2_escape").exists()
    assert_nothing_written(tmp_path / "out")


def test_pt2_safety_checks_allow_plain_formulas_only():
    from riem_compiler import pt2_safety

    shape = pt2_safety._shape_calls()
    assert pt2_safety._plain_formula("FloorDiv(Symbol('s0', positive=True, integer=True), 2) + 1", shape)
    for bad in ("__import__('os').system('id')", "exec(chr(105))", "Symbol('a').__class__",
                "Symbol('x\\')')", "(lambda: 1)()", "[c for c in ()]"):
        assert not pt2_safety._plain_formula(bad, shape), bad
    guard = dict(calls=pt2_safety._GUARD_CALLS, methods=pt2_safety._GUARD_METHODS,
                 modules=pt2_safety._GUARD_MODULES, subscripts=True)
    assert pt2_safety._plain_formula("L['x'].size()[0] >= 2 and math.floor(L['y']) == 3", **guard)
    for bad in ("torch.load('f')", "L['x'].__class__", "L['x\"'] == 1", "getattr(L, 'x')", "L['x'].numpy()"):
        assert not pt2_safety._plain_formula(bad, **guard), bad


GOOD_MODELS = (
    "import torch.nn as nn\n"
    "def build():\n    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))\n")
MARKER_MODULE = "open({marker!r}, 'w').write('imported')\n"
# the console script's sys.path: no current folder first (python -c would put it there)
CONSOLE = "import sys; del sys.path[0]; from riem_compiler.cli import main; sys.exit(main(sys.argv[1:]))"


def test_model_ref_does_not_let_the_current_folder_shadow_dependencies(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    markers = [work / "onnxscript_imported", work / "numpy_imported"]
    (work / "onnxscript.py").write_text(MARKER_MODULE.format(marker=str(markers[0])))
    (work / "numpy.py").write_text(MARKER_MODULE.format(marker=str(markers[1])))
    (work / "mymodels.py").write_text(GOOD_MODELS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CONSOLE, "--model-ref", "mymodels:build", "--input-shape", "2,32",
                           "-o", str(tmp_path / "out"), *FAST, "-q"],
                          cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert not [m.name for m in markers if m.exists()]


@pytest.mark.parametrize("source, call, needle", [
    ("def build(:\n    pass\n", "build", "importing it failed: SyntaxError: "),
    ("raise RuntimeError('boom at import\\nmore')\n", "build", "importing it failed: RuntimeError: boom at import"),
    (GOOD_MODELS + "def broken():\n    raise RuntimeError('boom in call')\n", "broken",
     "calling it failed: RuntimeError: boom in call"),
    ("import sys\nsys.exit(0)\n", "build", "importing it failed: SystemExit: 0"),
    (GOOD_MODELS + "def leave():\n    import sys\n    sys.exit(3)\n", "leave", "calling it failed: SystemExit: 3"),
    (GOOD_MODELS + "class Stop(BaseException):\n    pass\ndef stop():\n    raise Stop('no')\n", "stop",
     "calling it failed: Stop: no"),
])
@pytest.mark.parametrize("form", ["file", "module"])
def test_model_ref_code_that_fails_or_exits(tmp_path, capsys, monkeypatch, source, call, needle, form):
    name = f"mref_{zlib.crc32((source + form).encode())}"  # a fresh module name per case (sys.modules)
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # whatever the import does to sys.path is undone
    ref = f"{tmp_path / name}.py:{call}" if form == "file" else f"{name}:{call}"
    code = cli.main(["--model-ref", ref, "--input-shape", "2,32", "-o", str(tmp_path / "out"), *FAST])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_INPUT
    line = one_error_line(err)
    assert line.startswith(f"riem-compile: error: --model-ref {ref}: ") and needle in line, line
    assert_nothing_written(tmp_path / "out")


def test_model_ref_lookup_leaves_sys_path_as_it_was(tmp_path, capsys, monkeypatch):
    (tmp_path / "plainmodels.py").write_text(GOOD_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    before = list(sys.path)
    assert callable(cli.inputs._resolve_ref("plainmodels:build"))
    assert sys.path == before


@pytest.mark.parametrize("forward, needle", [
    ("raise ValueError('bad forward')", "fails on inputs of shape (2, 32): ValueError: bad forward"),
    ("import sys; sys.exit(0)", "fails on inputs of shape (2, 32): SystemExit: 0"),
])
def test_model_ref_whose_forward_raises_or_exits(tmp_path, capsys, forward, needle):
    (tmp_path / "fwd.py").write_text(
        "import torch.nn as nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(32, 16)\n"
        f"    def forward(self, x):\n        {forward}\n"
        "def build():\n    return M()\n")
    code = cli.main(["--model-ref", f"{tmp_path / 'fwd.py'}:build", "--input-shape", "2,32",
                     "-o", str(tmp_path / "out"), *FAST, "-q"])  # -q: no "no --weights given" warning
    assert code == cli.EXIT_INPUT
    assert needle in one_error_line(capsys.readouterr().err)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("kind", ["directory", "symlink_loop"])
def test_model_ref_file_that_is_not_a_file(tmp_path, capsys, kind):
    target = tmp_path / "models.py"
    if kind == "directory":
        target.mkdir()
    else:
        target.symlink_to(tmp_path / "loop.py")
        (tmp_path / "loop.py").symlink_to(target)
    code = cli.main(["--model-ref", f"{target}:build", "--input-shape", "2,32", "-o", str(tmp_path / "out"), *FAST])
    assert code == cli.EXIT_INPUT
    assert "is not a readable Python file" in one_error_line(capsys.readouterr().err)
    assert_nothing_written(tmp_path / "out")


# ----------------------------------------------------------------------------- graph-structure oddities
# Each compiles with exit 0 to a model that passes onnx.checker (full check where the original
# does), loads in onnxruntime, and gives outputs close to the original's.
RTN8 = ["--ratio", "0.5"]  # rtn picks 8-bit codes: outputs within ~1%

def _feeds(model: onnx.ModelProto, seed: int = 0, **fixed) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    out = {}
    for i in model.graph.input:
        if i.name in fixed:
            out[i.name] = fixed[i.name]
            continue
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        elem = i.type.tensor_type.elem_type
        if elem == onnx.TensorProto.INT64:
            out[i.name] = g.integers(0, 64, shape).astype(np.int64)
        else:
            out[i.name] = g.standard_normal(shape).astype(np.float32)
    return out


def _passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
        return True
    except Exception:
        return False


def compile_and_compare(capsys, source: Path, out: Path, feed_sets, rtol: float, *extra) -> dict:
    """Compile with rtn, check the written model; (name -> report record)."""
    import onnxruntime as ort

    code, _, stderr = compile_(capsys, source, out, *extra)
    assert code == 0, stderr
    original, written = onnx.load(str(source)), onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(written)
    if _passes_full_check(original):
        onnx.checker.check_model(written, full_check=True)
    ref, new = ort.InferenceSession(str(source)), ort.InferenceSession(str(out / "model.onnx"))
    for feeds in feed_sets:
        for r, o in zip(ref.run(None, feeds), new.run(None, feeds)):
            assert r.shape == o.shape
            assert np.linalg.norm(o - r) <= rtol * np.linalg.norm(r) + 1e-6, feeds.keys()
    return {r["name"]: r for r in json.loads((out / "report.json").read_text())["layers"]}


def test_if_branch_initializers_shadowing_a_main_weight(corpus, tmp_path, capsys):
    """Three different tensors named "W" (main graph, then and else branch): none is replaced
    (a decoder output "W" would break SSA across scopes); V is compressed; both branches right."""
    source = corpus["if_shadowed_weight"]
    model = onnx.load(str(source))
    feed_sets = [_feeds(model, cond=np.array(flag)) for flag in (True, False)]
    # default ratio: V gets 4-bit groups (~0.1 error); a branch reading another branch's W is ~1
    report = compile_and_compare(capsys, source, tmp_path / "out", feed_sets, 0.25)
    assert report["V"]["status"] == "compressed"
    assert report["W"]["status"] == "skipped" and "defined 3 times" in report["W"]["reason"]
    written = onnx.load(str(tmp_path / "out" / "model.onnx"))

    def scopes(m):
        node = next(n for n in m.graph.node if n.op_type == "If")
        return [m.graph, *(a.g for a in node.attribute)]

    for g, original in zip(scopes(written), scopes(model), strict=True):
        w, w0 = ({t.name: t for t in x.initializer}["W"] for x in (g, original))
        np.testing.assert_array_equal(numpy_helper.to_array(w), numpy_helper.to_array(w0))  # each W as it was


def test_rewrite_refuses_a_shadowed_name_and_a_broken_result(corpus):
    """The codegen guards itself: a shadowed name is refused up front, and a rewritten model that
    onnxruntime cannot load (while the original loads) is an error, never a result."""
    from riem_compiler.codegen import onnx_export
    from riem_compiler.errors import InputError, RiemError
    from riem_compiler.methods.rtn import fit_rtn

    model = onnx.load(str(corpus["if_shadowed_weight"]))
    w = numpy_helper.to_array(model.graph.initializer[0])
    with pytest.raises(InputError, match="defined more than once"):
        onnx_export.rewrite_onnx(model, None, {"W": fit_rtn(w, 8, None)})
    ssa = onnx.ModelProto()
    ssa.CopyFrom(model)  # what the rewrite used to write: a node output "W" in the then branch
    then = next(a.g for a in ssa.graph.node[1].attribute if a.name == "then_branch")
    del then.initializer[:]
    then.node.insert(0, onnx.helper.make_node("Identity", ["V"], ["W"]))
    with pytest.raises(RiemError, match="fails onnx.checker .* single static assignment"):
        onnx_export.check_rewritten(model, ssa)
    unknown = onnx.ModelProto()
    unknown.CopyFrom(model)  # passes onnx.checker (custom domain), onnxruntime cannot load it
    unknown.opset_import.append(onnx.helper.make_opsetid(onnx_export.DOMAIN, 1))
    unknown.graph.node.insert(0, onnx.helper.make_node("NoSuchDecoder", [], ["extra"], domain=onnx_export.DOMAIN))
    onnx.checker.check_model(unknown, full_check=True)
    with pytest.raises(RiemError, match="onnxruntime cannot load the rewritten ONNX model"):
        onnx_export.check_rewritten(model, unknown)
    onnx_export.check_rewritten(model, model)  # a loadable model passes


def test_weight_shared_by_matmuls_gather_and_add(corpus, tmp_path, capsys):
    source = corpus["shared_weight_mixed_uses"]
    model = onnx.load(str(source))
    report = compile_and_compare(capsys, source, tmp_path / "out", [_feeds(model, s) for s in (0, 1)], 0.02, *RTN8)
    assert report["W"]["status"] == "compressed"
    written = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert "W" not in {t.name for t in written.graph.initializer}  # one decoder feeds all four consumers
    assert [n.output[0] for n in written.graph.node].count("W") == 1


def test_initializer_that_is_a_graph_input_stays_overridable(corpus, tmp_path, capsys):
    import onnxruntime as ort

    source = corpus["initializer_is_input"]
    model = onnx.load(str(source))
    out = tmp_path / "out"
    report = compile_and_compare(capsys, source, out, [{"X": _feeds(model)["X"]}], 0.02, *RTN8)
    assert report["W"]["status"] == "skipped" and "graph input" in report["W"]["reason"]
    assert report["V"]["status"] == "compressed"
    override = {"X": _feeds(model)["X"], "W": np.eye(64, dtype=np.float32)}  # the caller's W still wins
    ref = ort.InferenceSession(str(source)).run(None, override)[0]
    new = ort.InferenceSession(str(out / "model.onnx")).run(None, override)[0]
    assert np.linalg.norm(new - ref) <= 0.02 * np.linalg.norm(ref)


def test_weight_that_is_a_graph_output(corpus, tmp_path, capsys):
    source = corpus["weight_is_output"]
    model = onnx.load(str(source))
    report = compile_and_compare(capsys, source, tmp_path / "out", [_feeds(model)], 0.02, *RTN8)
    assert report["W"]["status"] == "compressed"
    written = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [o.name for o in written.graph.output] == ["Y", "W"]  # the output keeps its name


def test_loop_body_constant_left_operand_and_reused_node_names(corpus, tmp_path, capsys):
    source = corpus["loop_constant_left_operand"]
    model = onnx.load(str(source))
    report = compile_and_compare(capsys, source, tmp_path / "out", [_feeds(model, s) for s in (0, 1)], 0.02, *RTN8)
    assert {n for n, r in report.items() if r["status"] == "compressed"} == {"A", "L", "Wb"}
    loop = next(n for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node if n.op_type == "Loop")
    body = loop.attribute[0].g
    assert "Constant" not in [n.op_type for n in body.node]  # the body's Constant became a decoder (+ Cast)


# ----------------------------------------------------------------------------- output paths, signals, options



def no_partials(*folders):
    for folder in folders:
        assert not [p for p in Path(folder).iterdir() if ".partial-" in p.name], sorted(os.listdir(folder))


def snapshot(*files) -> dict:
    return {Path(f): Path(f).read_bytes() for f in files}


def input_tree(tmp_path):
    """src/mlp.onnx, src/ext/model.onnx + src/ext/weights/w.bin, src/mods.py, src/w.safetensors."""
    import torch
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    mlp = bad_inputs.good_mlp(src)
    ext = bad_inputs.external_data_model(src)
    build = "nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))"
    (src / "mods.py").write_text(f"import torch.nn as nn\ndef build():\n    return {build}\n")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))  # = build()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src / "w.safetensors"))
    (tmp_path / "link_to_src").symlink_to(src, target_is_directory=True)
    (tmp_path / "link_to_mlp.onnx").symlink_to(mlp)
    return src, mlp, ext


@pytest.mark.parametrize("case", [
    "o_is_model", "o_is_model_folder", "o_is_an_ancestor", "o_dotdot", "o_symlink_to_folder",
    "o_holds_external_data_only", "o_holds_weights", "o_holds_model_ref_file",
    "report_is_model", "report_symlink_to_model", "report_is_external_data", "report_is_model_ref_file",
    "report_png_is_model", "report_dotdot_is_weights",
])
def test_output_or_report_over_an_input_is_refused(tmp_path, capsys, case):
    src, mlp, ext = input_tree(tmp_path)
    data = ext.parent / "weights" / "w.bin"
    weights, mods = src / "w.safetensors", src / "mods.py"
    ref = ["--model-ref", f"{mods}:build", "--input-shape", "2,32"]
    out = tmp_path / "out"
    args = {
        "o_is_model": [mlp, "-o", mlp],
        "o_is_model_folder": [mlp, "-o", src],
        "o_is_an_ancestor": [mlp, "-o", tmp_path],
        "o_dotdot": [mlp, "-o", src / "ext" / ".." / "new" / ".."],
        "o_symlink_to_folder": [mlp, "-o", tmp_path / "link_to_src"],
        "o_holds_external_data_only": [ext, "-o", data.parent],
        "o_holds_weights": [weights, *ref, "-o", src],
        "o_holds_model_ref_file": [*ref, "-o", src],
        "report_is_model": [mlp, "-o", out, "--report", mlp],
        "report_symlink_to_model": [mlp, "-o", out, "--report", tmp_path / "link_to_mlp.onnx"],
        "report_is_external_data": [ext, "-o", out, "--report", data],
        "report_is_model_ref_file": [*ref, "-o", out, "--report", mods],
        "report_png_is_model": [],  # below: needs the plot on
        "report_dotdot_is_weights": [weights, *ref, "-o", out, "--report", src / "ext" / ".." / "w.safetensors"],
    }[case]
    before = snapshot(mlp, ext, data, weights, mods)
    if case == "report_png_is_model":
        (src / "pic.png").symlink_to(mlp)  # pic.json's picture would be the model
        code = cli.main([str(mlp), "-o", str(out), "--report", str(src / "pic.json"), "--method", "rtn", "--no-cache"])
        needle = "report picture"
    else:
        code = cli.main([*map(str, args), "--method", "rtn", "--no-cache", "--no-plot"])
        needle = "choose another" if case.startswith("report") else "would replace it"
    err = capsys.readouterr().err
    assert code == cli.EXIT_INPUT, err
    one_error_line(err, needle)
    assert snapshot(*before) == before  # every input byte-identical
    assert not out.exists()
    no_partials(tmp_path, src, ext.parent, data.parent)


def test_output_and_report_beside_inputs_still_work(tmp_path, capsys):
    """Refusing clobbering must not refuse legitimate neighbours: a sibling OUT, a report in the
    input folder, an OUT inside the input folder, an external-data model."""
    src, mlp, ext = input_tree(tmp_path)
    before = snapshot(mlp, ext, ext.parent / "weights" / "w.bin")
    for args in ([mlp, "-o", tmp_path / "a"], [mlp, "-o", src / "sub_out", "--report", src / "r.json"],
                 [ext, "-o", ext.parent / "out"]):
        code = cli.main([*map(str, args), *FAST])
        assert code == 0, capsys.readouterr().err
    assert (src / "r.json").is_file() and (src / "sub_out" / "model.onnx").is_file()
    onnx.checker.check_model(onnx.load(str(ext.parent / "out" / "model.onnx")))
    assert snapshot(*before) == before


def test_report_named_like_an_artifact_in_out_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous model")
    for name in ("model.onnx", "model.onnx.data"):
        code, _, stderr = compile_(capsys, corpus["good_mlp"], out, "--report", out / name)
        assert code == cli.EXIT_INPUT
        one_error_line(stderr, f"would be overwritten by the output's {name}")
    assert (out / "model.onnx").read_bytes() == b"previous model"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]


def test_sigterm_cleans_up_like_ctrl_c(corpus, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "riem_compiler", str(corpus["good_mlp"]), "-o", str(out), "--method", "riem",
           "--steps", "100000", "--time-budget", "300", "--no-cache", "--no-plot", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.1)
        time.sleep(0.5)  # into the fit
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == cli.EXIT_TERMINATED == 143, stderr
    assert one_error_line(stderr, "terminated (SIGTERM); nothing written")
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()
    no_partials(tmp_path)


def test_sigterm_handler_is_restored_after_main(corpus, tmp_path, capsys):
    import signal

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert compile_(capsys, corpus["good_mlp"], tmp_path / "out")[0] == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_the_fit_in_process(corpus, tmp_path, capsys, monkeypatch):
    """The handler turns SIGTERM into the interrupt path: exit 143, staging removed, OUT untouched."""
    import signal

    import riem_compiler.api as api

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(api, "compress_specs", terminated)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous model")
    code, _, stderr = compile_(capsys, corpus["good_mlp"], out)
    assert code == cli.EXIT_TERMINATED
    one_error_line(stderr, "terminated (SIGTERM)")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert (out / "model.onnx").read_bytes() == b"previous model"
    no_partials(tmp_path)


@pytest.mark.parametrize("existing", [False, True])
def test_output_symlink_to_a_directory_is_written_through(corpus, tmp_path, capsys, existing):
    target = tmp_path / "elsewhere" / "target"
    target.mkdir(parents=True)
    if existing:
        (target / "model.onnx").write_bytes(b"old")
        (target / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    code, _, stderr = compile_(capsys, corpus["good_mlp"], link)
    assert code == 0, stderr
    assert link.is_symlink() and link.resolve() == target.resolve()
    onnx.checker.check_model(onnx.load(str(target / "model.onnx")))
    assert json.loads((target / "report.json").read_text())["status"] == "ok"
    assert (target / "keep.txt").read_text() == "mine" if existing else not (target / "keep.txt").exists()
    no_partials(tmp_path, target.parent)


def test_dangling_output_symlink_is_refused_before_fitting(corpus, tmp_path, capsys, monkeypatch):
    import riem_compiler.api as api

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted although OUT cannot be written")

    monkeypatch.setattr(api, "compress_specs", no_fit)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    code, _, stderr = compile_(capsys, corpus["good_mlp"], link)
    assert code == cli.EXIT_OUTPUT
    one_error_line(stderr, "is a symlink to")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, _, stderr = compile_(capsys, corpus["good_mlp"], loop)
    assert code == cli.EXIT_OUTPUT
    one_error_line(stderr, "is a symlink to")
    no_partials(tmp_path)


@pytest.mark.parametrize("case, needle", [
    ("external_self_location", "which is the model file itself"),
    ("external_escape", "outside the model's folder"),
    ("external_absolute", "absolute location"),
    ("external_short_data", "which has only"),
    ("external_long_data", "holds 12556 bytes but its dtype and shape [32, 64] need 8192"),
    ("raw_data_too_long", "stores 8292 bytes but its dtype and shape [32, 64] need 8192"),
    ("negative_dim", "negative dimension"),
    ("huge_dim", "need 281474976710656"),
])
def test_damaged_tensor_data_is_bad_input(tmp_path, capsys, case, needle):
    path = bad_inputs.DAMAGED_ONNX[case](tmp_path)
    out = tmp_path / "out"
    code, stdout, stderr = compile_(capsys, path, out)
    assert code == cli.EXIT_INPUT, stderr
    one_error_line(stderr, needle)
    assert stdout == ""
    assert_nothing_written(out)


def test_damaged_external_data_in_the_python_api(tmp_path):
    import riem_compiler as rc
    from riem_compiler.errors import InputError

    for case in ("external_self_location", "external_short_data", "external_long_data"):
        with pytest.raises(InputError) as info:
            rc.optimize(str(bad_inputs.DAMAGED_ONNX[case](tmp_path)), method="rtn")
        assert "\n" not in str(info.value) and "external data of tensor 'W1'" in str(info.value)


@pytest.mark.parametrize("option, value", [("--error-ceiling", "nan"), ("--time-budget", "inf"), ("--ratio", "nan"),
                                           ("--max-error", "nan"), ("--ratio", "-inf"), ("--error-ceiling", "x")])
def test_non_finite_float_options_are_refused(corpus, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as info:
        cli.main([str(corpus["good_mlp"]), "-o", str(tmp_path / "out"), *FAST, f"{option}={value}"])
    assert info.value.code == cli.EXIT_INPUT
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("riem-compile: error: ")]
    assert errors == err.strip().splitlines(), err  # one line, no usage block
    assert f"argument {option}: " in errors[0] and ("finite number" in errors[0] or "invalid number" in errors[0])
    assert repr(value) in errors[0] and "Traceback" not in err
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("field", ["ratio", "time_budget_s", "lr", "error_ceiling"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_config_refuses_non_finite_numbers(field, value):
    import dataclasses

    import riem_compiler as rc
    from riem_compiler.errors import InputError

    with pytest.raises(InputError, match=f"{field} must be a finite number"):
        rc.Config(**{field: value})
    with pytest.raises(InputError, match=f"{field} must be a finite number"):
        dataclasses.replace(rc.Config(), **{field: value})  # what optimize(config=..., **overrides) does
    assert rc.Config(time_budget_s=None).time_budget_s is None  # None: no cap, still allowed


def test_concurrent_publishes_to_one_output_all_succeed(tmp_path):
    """Many runs finishing at once into the same OUT: none crashes on another's folders, OUT is complete."""
    import threading

    out = tmp_path / "out"
    stagings = []
    for i in range(8):
        staging = cli.prepare_output(out)
        (staging / "model.onnx").write_text(f"model {i}")
        (staging / "report.json").write_text(f"report {i}")
        (staging / "tuning").mkdir()
        (staging / "tuning" / "db.json").write_text(f"db {i}")
        stagings.append(staging)
    barrier, errors = threading.Barrier(len(stagings)), []

    def publish(staging):
        barrier.wait()
        try:
            cli.publish(staging, out)
        except BaseException as exc:  # noqa: BLE001 - the test reports any
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(s,)) for s in stagings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json", "tuning"]
    assert (out / "model.onnx").read_text().startswith("model ")
    assert [p.name for p in (out / "tuning").iterdir()] == ["db.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # every staging folder gone


def test_two_concurrent_runs_into_the_same_output(corpus, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "riem_compiler", str(corpus["good_mlp"]), "-o", str(out), *FAST, "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    assert json.loads((out / "report.json").read_text())["status"] == "ok"
    no_partials(tmp_path)


def test_odd_output_names(corpus, tmp_path, capsys):
    # a newline in the name is a valid name: the model is written there
    out = tmp_path / "two\nlines"
    code, _, stderr = compile_(capsys, corpus["good_mlp"], out)
    assert code == 0, stderr
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    # ... and an error naming it is still one line
    (tmp_path / "afile").write_text("x")
    code, _, stderr = compile_(capsys, corpus["good_mlp"], tmp_path / "afile" / "bad\nname")
    assert code == cli.EXIT_OUTPUT
    assert "bad\\nname" in one_error_line(stderr, "cannot write to")
    # a name longer than the file system allows
    code, _, stderr = compile_(capsys, corpus["good_mlp"], tmp_path / ("x" * 300))
    assert code == cli.EXIT_OUTPUT
    one_error_line(stderr, "cannot write to")
    # OUT is an existing file: refused, the file kept
    code, _, stderr = compile_(capsys, corpus["good_mlp"], tmp_path / "afile")
    assert code == cli.EXIT_OUTPUT and (tmp_path / "afile").read_text() == "x"
    one_error_line(stderr, "is not a directory")
    no_partials(tmp_path)


def test_onnx_path_that_is_a_directory_symlink(corpus, tmp_path, capsys):
    link = tmp_path / "model.onnx"
    link.symlink_to(corpus["good_mlp"].parent, target_is_directory=True)
    code, _, stderr = compile_(capsys, link, tmp_path / "out")
    assert code == cli.EXIT_INPUT
    one_error_line(stderr, "is a directory")
    assert_nothing_written(tmp_path / "out")
