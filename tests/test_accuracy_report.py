"""benchmarks/accuracy.py's table: the notes a reader relies on to read a row right."""
from benchmarks import accuracy


def _row(method, budget, ratio, **extra):
    return {"model": "digits_cnn", "mode": "quick", "method": method, "budget": budget, "ratio": ratio,
            "metrics": {"top1": 0.9}, "stored_bytes": 100, "artifact_bytes": 200, "fit_seconds": 1.0, **extra}


def _meta():
    settings = accuracy.model_settings(accuracy.make_mode(True, None), "digits_cnn")
    return {"machine": "test", "threads": 1, "settings": {"digits_cnn": settings}}


def test_rows_over_budget_are_marked_and_layer_error_is_shown():
    rows = [_row("original", 1.0, 1.0),
            _row("rtn", 1 / 16, 1.0, dense_layers=["a", "b"]),
            _row("riem", 1 / 16, 0.0615, mean_layer_error=0.4567)]
    lines = accuracy.markdown(rows, _meta()).splitlines()
    rtn = next(line for line in lines if "| rtn |" in line)
    riem = next(line for line in lines if "| riem |" in line)
    assert "over budget" in rtn and "2 layer(s) left dense" in rtn
    assert "over budget" not in riem and "| 0.457 |" in riem
    assert "over budget" not in next(line for line in lines if "| original |" in line)


def test_render_only_rewrites_the_table_from_the_json(tmp_path):
    import json

    doc = {"meta": _meta(), "rows": [_row("original", 1.0, 1.0), _row("svd", 0.25, 0.247)]}
    (tmp_path / "accuracy.json").write_text(json.dumps(doc))
    assert accuracy.main(["--render-only", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "accuracy.md").read_text()
    assert "| 1/4 | svd | 0.9000 | 0.2470 |" in md
    assert (tmp_path / "accuracy_digits_cnn.png").stat().st_size > 1000


def test_budgets_off_the_list_print_as_decimals_not_as_a_rounded_fraction():
    assert [accuracy.fmt_budget(b) for b in accuracy.BUDGETS] == ["1/4", "1/8", "1/10", "1/16", "1/24", "1/32"]
    assert accuracy.fmt_budget(1.0) == "1"
    assert accuracy.fmt_budget(4.25 / 32) == "0.1328"  # a peer's exact ratio, not a second "1/8"


def test_rows_run_the_default_preprocessing_and_bc_keeps_the_picks_and_bytes():
    """accuracy.py's own compress path (auto, tucker2) folds BatchNorm as `optimize` does, and the
    X row is X-bc's result with the biases corrected (as optimize's defaults correct them): same
    compressed weights, other biases."""
    from dataclasses import replace

    import torch

    from riem_compiler.config import Config
    from riem_compiler.passes.compress import compress_specs

    task = accuracy.Task("digits_cnn")
    cfg = Config(ratio=1 / 8, method="rtn", quiet=True, bias_correction=False)
    res = accuracy.build_result(task, cfg, lambda specs, c, model: compress_specs(specs, c))
    assert res.report.preprocess["batchnorm"]["folded"]  # BatchNorm folded into its conv
    assert accuracy.compressible_bytes(res) == accuracy.compressible_bytes(
        accuracy.build_result(task, cfg, lambda specs, c, model: compress_specs(specs, c)))
    bc, fit_s, extra = accuracy.bias_corrected(task, replace(cfg, bias_correction=True), res, 2.0)
    assert fit_s >= 2.0 and extra["bias_corrected_layers"] == len(bc.report.preprocess["bias_correction"]["corrected"]) > 0
    assert bc.compressed is res.compressed and accuracy.compressible_bytes(bc) == accuracy.compressible_bytes(res)
    before, after = dict(res.model.named_parameters()), dict(bc.model.named_parameters())
    changed = [k for k in before if k.endswith("bias") and not torch.equal(before[k], after[k])]
    assert changed and "bias_correction" not in (res.report.preprocess or {})  # X-bc's own result untouched
    import riem_compiler as rc

    default = rc.optimize(task.model, task.example_inputs, ratio=1 / 8, method="rtn", quiet=True)
    assert default.report.preprocess["bias_correction"] == bc.report.preprocess["bias_correction"]
    for name, value in default.model.state_dict().items():  # the X row is optimize with default settings
        torch.testing.assert_close(value, bc.model.state_dict()[name], rtol=0, atol=0)
