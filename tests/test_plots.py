"""report.png (riem_compiler/plots.py): one strong colour per method, kept layers grey, the whole
model beside the layers and auto's budget marked on it."""
from riem_compiler.plots import KEPT, report_figure, save_report_png
from riem_compiler.report import LayerRecord, Report


def _report(auto=None):
    layers = [LayerRecord("a.weight", "linear", (64, 64), "affine", "compressed", 16384, 2048, 0.1),
              LayerRecord("b.weight", "linear", (64, 64), "riem", "compressed", 16384, 1024, 0.4),
              LayerRecord("c.weight", "linear", (4, 64), "dense", "skipped", 1024, 1024, None, reason="small")]
    return Report(layers=layers, output_error=0.2, model_bytes_before=40000, auto=auto)


def test_methods_get_their_own_colour_and_kept_layers_are_grey():
    fig = report_figure(_report(auto={"budget_bytes": 4096, "fp32_bytes": 32768}), "t")
    ax_bytes, ax_err, ax_model = fig.axes
    labels = [t.get_text() for t in ax_bytes.get_legend().get_texts()]
    assert "stored: affine" in labels and "stored: riem" in labels and "kept as it was" in labels
    colours = [p.get_facecolor() for p in ax_err.patches]
    assert colours[0] != colours[1]
    from matplotlib.colors import to_rgba
    assert colours[2] == to_rgba(KEPT)
    budget = [t.get_text() for t in ax_model.get_legend().get_texts()]
    assert budget == ["budget 0.125 (the rest as it was)"]


def test_png_is_written_without_a_budget(tmp_path):
    path = save_report_png(_report(), tmp_path / "r.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
