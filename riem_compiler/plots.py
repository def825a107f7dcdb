"""The report as a picture: stored bytes and weight error per layer (PNG).

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), so
it works headless and does not disturb a notebook that imports riem_compiler.
"""
from __future__ import annotations

from pathlib import Path

from riem_compiler.files import atomic_write

MAX_LAYERS = 80  # beyond this, the largest layers are drawn (labels stay readable)


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def report_figure(report, title: str = ""):
    """A matplotlib Figure with two panels sharing the layer axis: KiB before/after (log scale)
    and relative weight error (kept layers marked)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    layers = [r for r in report.layers if r.bytes_before > 0]
    if len(layers) > MAX_LAYERS:
        keep = {id(r) for r in sorted(layers, key=lambda r: -r.bytes_before)[:MAX_LAYERS]}
        layers = [r for r in layers if id(r) in keep]
    n = max(len(layers), 1)
    fig = Figure(figsize=(min(max(8.0, 3 + 0.4 * n), 24), 7.5), layout="constrained")
    ax_bytes, ax_err = fig.subplots(2, 1, sharex=True)
    xs = list(range(len(layers)))
    before = [r.bytes_before / 1024 for r in layers]
    after = [r.bytes_after / 1024 for r in layers]
    compressed = [r.status == "compressed" for r in layers]
    ax_bytes.bar([x - 0.2 for x in xs], before, width=0.4, color="#b0b0b0", label="fp32 before")
    ax_bytes.bar([x + 0.2 for x in xs], after, width=0.4,
                 color=["#1f77b4" if c else "#d9a441" for c in compressed], label="stored after")
    for x, r, b in zip(xs, layers, after):
        if r.status == "compressed" and r.bytes_before:
            ax_bytes.annotate(f"{r.bytes_after / r.bytes_before:.2f}x", (x + 0.2, b), ha="center", va="bottom",
                              fontsize=7)
    ax_bytes.set_yscale("log")
    ax_bytes.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_bytes.yaxis.set_minor_formatter(NullFormatter())
    ax_bytes.set_ylabel("KiB")
    ax_bytes.legend(loc="upper right", fontsize=8)
    ax_bytes.grid(axis="y", alpha=0.3)
    errors = [r.rel_error if (r.rel_error is not None and r.status == "compressed") else 0.0 for r in layers]
    ax_err.bar(xs, errors, width=0.6, color=["#d62728" if c else "#d9a441" for c in compressed])
    for x, r in zip(xs, layers):
        if r.status != "compressed":
            ax_err.annotate("kept", (x, 0), ha="center", va="bottom", fontsize=7, rotation=90, color="#8a6d1d")
        elif r.method:
            ax_err.annotate(r.method, (x, errors[x]), ha="center", va="bottom", fontsize=7)
    ax_err.set_ylabel("rel. weight error ||W-Ŵ||/||W||")
    ax_err.grid(axis="y", alpha=0.3)
    ax_err.set_xticks(xs)
    ax_err.set_xticklabels([_short(r.name) for r in layers], rotation=60, ha="right", fontsize=7)
    t = report.totals()
    head = (f"{t['compressed']}/{t['layers']} layers compressed: {t['bytes_before'] / 1024:.1f} -> "
            f"{t['bytes_after'] / 1024:.1f} KiB (ratio {t['ratio']:.3f})")
    if report.output_error is not None:
        head += f"\noutput error on generated inputs {report.output_error:.4f}"
    fig.suptitle(f"{title}\n{head}" if title else head, fontsize=10)
    return fig


def save_report_png(report, path, title: str = "", dpi: int = 110) -> Path:
    """Write the report picture to `path` atomically (temporary file, then rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    fig = report_figure(report, title)
    FigureCanvasAgg(fig)
    atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format="png"), suffix=".png")
    return path

