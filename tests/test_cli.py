"""riem-compile end to end: ONNX, torch.export and --model-ref inputs, reports, cache, verification."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bad_inputs import good_mlp
from riem_compiler import cli
from riem_compiler.fit_cache import FitCache

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "riem_compiler", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def ort_run(path_or_model, x):
    import onnxruntime as ort

    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_onnx_input_in_a_subprocess(tmp_path):
    src = good_mlp(tmp_path)
    out = tmp_path / "out"
    proc = run_cli(src, "-o", out, "--method", "rtn", "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json", "report.png"]
    assert (out / "report.png").read_bytes()[:8] == PNG_MAGIC
    # the printed table: one row per layer and the totals
    assert "layer" in proc.stdout and "TOTAL" in proc.stdout and "W1" in proc.stdout and "W2" in proc.stdout
    assert "verification (onnx file" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["target"] == "onnx"
    assert [r["name"] for r in report["layers"]] == ["W1", "W2"]
    assert all(r["status"] == "compressed" and r["method"] == "rtn" for r in report["layers"])
    assert report["totals"]["bytes_after"] <= 0.25 * report["totals"]["bytes_before"]
    assert report["files"]["model.onnx"] == (out / "model.onnx").stat().st_size
    # the written model: smaller, runs, close to the original, and the report's error is its error
    assert (out / "model.onnx").stat().st_size < src.stat().st_size
    x = np.random.default_rng(5).standard_normal((2, 32)).astype(np.float32)
    err = rel(ort_run(out / "model.onnx", x), ort_run(src, x))
    assert 1e-4 < err < 0.3
    v = report["verification"]
    assert v["status"] == "ok" and v["checked"] == "onnx file" and v["inputs"][0]["shape"] == [2, 32]
    assert 1e-4 < v["rel_error"] < 0.3 and report["totals"]["output_error"] == v["rel_error"]


def test_max_error_fails_loudly_and_writes_nothing(tmp_path):
    src = good_mlp(tmp_path)
    out = tmp_path / "out"
    proc = run_cli(src, "-o", out, "--method", "rtn", "--max-error", "1e-6", "--no-cache", "-q")
    assert proc.returncode == cli.EXIT_VERIFY
    assert "exceeds --max-error 1e-06" in proc.stderr and "nothing written" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    # and a generous bound passes
    assert cli.main([str(src), "-o", str(out), "--method", "rtn", "--max-error", "0.5", "--no-cache", "-q"]) == 0
    assert (out / "model.onnx").is_file()


def test_repeat_run_is_served_from_the_cache(tmp_path, capsys):
    src = good_mlp(tmp_path)
    args = [str(src), "--steps", "20", "--time-budget", "20", "--cache-dir", str(tmp_path / "cache"), "--no-plot"]
    assert cli.main([*args, "-o", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "report.json").read_text())
    assert first["cache"]["layers_fitted"] == 2 and first["cache"]["layers_from_cache"] == 0
    assert len(FitCache(tmp_path / "cache").entries()) == 2
    assert cli.main([*args, "-o", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "report.json").read_text())
    assert second["cache"]["layers_fitted"] == 0 and second["cache"]["layers_from_cache"] == 2
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert "from fit cache" in capsys.readouterr().out
    # --clear-cache alone empties it and exits
    assert cli.main(["--clear-cache", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert FitCache(tmp_path / "cache").entries() == []


MODEL_FILE = '''
import torch
import torch.nn as nn


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def build():
    torch.manual_seed(123)  # other weights than the file's: the test sees which ones were used
    return TinyMLP()
'''
_model_file_namespace: dict = {}
exec(compile(MODEL_FILE, "tiny_model.py", "exec"), _model_file_namespace)  # the same class the subprocess tests import
TinyMLP = _model_file_namespace["TinyMLP"]


def _trained_like(seed=0):
    torch.manual_seed(seed)
    return TinyMLP().eval()


def test_pt2_input_to_onnx(tmp_path):
    model = _trained_like()
    program = torch.export.export(model, (torch.randn(2, 32),))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    out = tmp_path / "out"
    assert cli.main([str(tmp_path / "m.pt2"), "-o", str(out), "--method", "rtn", "--no-cache",
                     "-q", "--no-plot"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["format"] == "torch" and report["verification"]["status"] == "ok"
    x = torch.randn(2, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort_run(out / "model.onnx", x.numpy())
    assert 1e-4 < rel(got, ref) < 0.3
    assert 1e-4 < report["verification"]["rel_error"] < 0.3


def test_model_ref_with_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "tiny_model.py").write_text(MODEL_FILE)
    model = _trained_like(seed=0)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "out"
    code = cli.main([str(tmp_path / "w.safetensors"), "--model-ref", f"{tmp_path / 'tiny_model.py'}:build",
                     "--input-shape", "3,32", "-o", str(out), "--method", "rtn", "--no-cache", "-q", "--no-plot"])
    assert code == 0
    x = np.random.default_rng(2).standard_normal((3, 32)).astype(np.float32)
    got = ort_run(out / "model.onnx", x)
    with torch.no_grad():
        from_file = model(torch.from_numpy(x)).numpy()
        torch.manual_seed(123)
        from_build = TinyMLP()(torch.from_numpy(x)).numpy()
    assert rel(got, from_file) < 0.2 < rel(got, from_build)  # the file's weights were compressed
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["inputs"][0]["shape"] == [3, 32]


def test_pickle_checkpoint_needs_the_flag(tmp_path, capsys):
    (tmp_path / "tiny_model.py").write_text(MODEL_FILE)
    torch.save(_trained_like().state_dict(), tmp_path / "w.pt")
    base = [str(tmp_path / "w.pt"), "--model-ref", f"{tmp_path / 'tiny_model.py'}:build", "--input-shape", "2,32",
            "-o", str(tmp_path / "out"), "--method", "rtn", "--no-cache", "-q", "--no-plot"]
    assert cli.main(base) == cli.EXIT_INPUT
    assert "--allow-pickle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli.main([*base, "--allow-pickle"]) == 0


def test_quiet_prints_nothing_and_existing_output_dir_is_updated(tmp_path, capsys):
    src = good_mlp(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old")
    (out / "mine.txt").write_text("not the tool's")
    report = tmp_path / "reports" / "r.json"
    report.parent.mkdir()
    assert cli.main([str(src), "-o", str(out), "--method", "rtn", "--no-cache", "-q", "--report", str(report)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    assert (out / "mine.txt").read_text() == "not the tool's"
    assert json.loads(report.read_text())["status"] == "ok"
    assert report.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "report.json").exists()


def test_version_and_help(capsys):
    for flag in ("--version", "--help"):
        with pytest.raises(SystemExit) as exc:
            cli.main([flag])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "riem-compile 0." in out and "--max-error" in out and "Exit codes" in out


def test_bundled_example(tmp_path, capsys):
    from riem_compiler.examples import DIGITS_CNN_ONNX

    assert DIGITS_CNN_ONNX.stat().st_size < 200_000
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    assert ort_run(DIGITS_CNN_ONNX, x).shape == (3, 10)
    out = tmp_path / "out"
    assert cli.main([str(DIGITS_CNN_ONNX), "-o", str(out), "--method", "rtn", "--no-cache"]) == 0
    assert "conv3.weight" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["compressed"] == 3 and report["verification"]["status"] == "ok"
    assert (out / "model.onnx").stat().st_size < 0.5 * DIGITS_CNN_ONNX.stat().st_size


@pytest.mark.slow
def test_tvm_llvm_target_is_verified_on_the_artifact(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "tiny_model.py").write_text(MODEL_FILE)
    save_file(_trained_like().state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "tvm"
    code = cli.main([str(tmp_path / "w.safetensors"), "--model-ref", f"{tmp_path / 'tiny_model.py'}:build",
                     "--input-shape", "2,32", "-o", str(out), "--target", "tvm-llvm", "--steps", "20",
                     "--min-weight-size", "0", "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.so", "params.safetensors", "manifest.json", "report.json", "report.png"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["checked"] == "tvm artifact"
    assert report["verification"]["rel_error"] == pytest.approx(report["totals"]["output_error"])
    assert report["totals"]["compressed"] == 2


def test_executor_flags_reach_the_config():
    from riem_compiler.cli.arguments import _config_from_args, build_parser

    args = build_parser().parse_args(["m.onnx", "-o", "out", "--executor", "ray", "--ray-address", "auto", "--no-cache"])
    cfg = _config_from_args(args)
    assert (cfg.executor, cfg.ray_address) == ("ray", "auto")
    assert _config_from_args(build_parser().parse_args(["m.onnx", "--no-cache"])).executor == "local"


def test_every_python_setting_has_a_flag(tmp_path, capsys):
    """lr, k_branches, recompute, refine(_steps) and each method's own settings are CLI flags."""
    import dataclasses

    from riem_compiler import methods
    from riem_compiler.cli.arguments import _config_from_args, build_parser
    from riem_compiler.config import Config

    args = build_parser().parse_args(["m.onnx", "-o", "o", "--lr", "0.01", "--k-branches", "4", "--recompute",
                                      "--refine", "--refine-steps", "7", "--svd-factor-bits", "8",
                                      "--rtn-group-size", "64", "--tucker2-rank-rule", "proportional"])
    cfg = _config_from_args(args)
    assert (cfg.lr, cfg.k_branches, cfg.recompute, cfg.refine, cfg.refine_steps) == (0.01, 4, True, True, 7)
    assert cfg.method_options == {"svd": {"factor_bits": 8}, "rtn": {"group_size": 64},
                                  "tucker2": {"rank_rule": "proportional"}}
    assert methods.get("svd").settings(cfg).factor_bits == 8
    # every method setting is reachable: as a Config field (with its flag) or as --METHOD-FIELD
    flags = {a.dest for a in build_parser()._actions}
    config_fields = {f.name for f in dataclasses.fields(Config)}
    for name in methods.SELECTABLE:
        for f in dataclasses.fields(methods.get(name).Settings):
            assert f.name in config_fields or f"method__{name}__{f.name}" in flags, (name, f.name)
    # a bad value is one clean line, exit 2
    src = good_mlp(tmp_path)
    code = cli.main([str(src), "-o", str(tmp_path / "out"), "--method", "svd", "--svd-factor-bits", "7", "--no-cache"])
    assert code == cli.EXIT_INPUT and "factor_bits must be one of" in capsys.readouterr().err
    code = cli.main([str(src), "-o", str(tmp_path / "out"), "--refine", "--no-cache"])
    assert code == cli.EXIT_INPUT and "--refine needs a PyTorch model" in capsys.readouterr().err


def test_cli_defaults_are_configs_defaults():
    """No flag given, the CLI builds exactly Config() (the cache aside, which the CLI turns on):
    a default changed in Config reaches the command line, and no flag keeps an old one."""
    import dataclasses

    from riem_compiler.cli.arguments import _config_from_args, build_parser
    from riem_compiler.config import Config

    built = _config_from_args(build_parser().parse_args(["model.onnx", "--no-cache"]))
    for f in dataclasses.fields(Config):
        assert getattr(built, f.name) == getattr(Config(), f.name), f.name


def test_tvm_float_activations_flag_reaches_build_tvm(tmp_path):
    from riem_compiler.cli import write_artifact
    from riem_compiler.cli.arguments import build_parser

    seen = {}

    class _Res:
        def build_tvm(self, directory, **kwargs):
            seen.update(kwargs)
            return directory

    for flags, expected in (([], True), (["--tvm-float-activations"], False)):
        args = build_parser().parse_args(["m.pt2", "-o", str(tmp_path / "o"), "--target", "tvm-llvm", *flags])
        write_artifact(_Res(), args, tmp_path / "s", tmp_path / "o")
        assert seen["int8_activations"] is expected and seen["mode"] == "auto"
