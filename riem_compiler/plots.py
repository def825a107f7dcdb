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


# the style of the results plots (benchmarks/report.py): strong colours for what this run chose,
# grey for what it kept as it was; one colour per method, so an auto plan reads at a glance
METHOD_COLOURS = ("#1f4fd1", "#d1261f", "#1a9850", "#8e44ad", "#e08214", "#01665e", "#c51b7d", "#4d4d4d")
KEPT = "#c8c8c8"


def _method_colours(layers) -> dict[str, str]:
    methods = sorted({r.method for r in layers if r.status == "compressed" and r.method})
    return {m: METHOD_COLOURS[i % len(METHOD_COLOURS)] for i, m in enumerate(methods)}


def _budget_ratio(report, budget_ratio):
    if budget_ratio is not None:
        return budget_ratio
    auto = report.auto or {}
    if auto.get("budget_bytes") and auto.get("fp32_bytes"):
        return auto["budget_bytes"] / auto["fp32_bytes"]
    return None


def report_figure(report, title: str = "", budget_ratio: float | None = None):
    """A matplotlib Figure: per layer (left) KiB before/after on a log scale and the relative weight
    error, compressed layers in one strong colour per method and kept layers grey; (right) the whole
    model's bytes before and after, with the budget marked where it is known (`budget_ratio`, or
    auto's budget from the report)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter

    layers = [r for r in report.layers if r.bytes_before > 0]
    if len(layers) > MAX_LAYERS:
        keep = {id(r) for r in sorted(layers, key=lambda r: -r.bytes_before)[:MAX_LAYERS]}
        layers = [r for r in layers if id(r) in keep]
    n = max(len(layers), 1)
    fig = Figure(figsize=(min(max(10.0, 5 + 0.4 * n), 26), 7.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=(max(n, 3), 2))
    ax_bytes = fig.add_subplot(grid[0, 0])
    ax_err = fig.add_subplot(grid[1, 0], sharex=ax_bytes)
    ax_model = fig.add_subplot(grid[:, 1])
    colours = _method_colours(layers)
    xs = list(range(len(layers)))
    compressed = [r.status == "compressed" for r in layers]
    colour = [colours.get(r.method, KEPT) if c else KEPT for r, c in zip(layers, compressed)]
    ax_bytes.bar([x - 0.2 for x in xs], [r.bytes_before / 1024 for r in layers], width=0.4, color="#ececec",
                 edgecolor="#b0b0b0", label="fp32 before")
    after = [r.bytes_after / 1024 for r in layers]
    ax_bytes.bar([x + 0.2 for x in xs], after, width=0.4, color=colour,
                 hatch=[None if c else "//" for c in compressed], edgecolor="white")
    ratio = _budget_ratio(report, budget_ratio)
    marker = None
    if budget_ratio is not None:  # a per-layer budget (auto's is global: marked on the whole model only)
        marker = ax_bytes.scatter(xs, [budget_ratio * r.bytes_before / 1024 for r in layers], marker="_", s=300,
                                  color="k", linewidths=1.2, zorder=4, label=f"budget: {budget_ratio:.3g} x fp32")
    for x, r, b in zip(xs, layers, after):
        if r.status == "compressed" and r.bytes_before:
            ax_bytes.annotate(f"{r.bytes_after / r.bytes_before:.2f}x", (x + 0.2, b), ha="center", va="bottom",
                              fontsize=7)
    ax_bytes.set_yscale("log")
    ax_bytes.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_bytes.yaxis.set_minor_formatter(NullFormatter())
    ax_bytes.set_ylabel("KiB per layer")
    handles = ([Patch(facecolor="#ececec", edgecolor="#b0b0b0", label="fp32 before")]
               + [Patch(color=c, label=f"stored: {m}") for m, c in colours.items()]
               + ([Patch(facecolor=KEPT, hatch="//", edgecolor="white", label="kept as it was")]
                  if not all(compressed) else []))
    if marker is not None:
        handles.append(marker)
    ax_bytes.legend(handles=handles, loc="upper right", fontsize=8)
    ax_bytes.grid(axis="y", alpha=0.3)
    ax_bytes.tick_params(labelbottom=False)
    errors = [r.rel_error if (r.rel_error is not None and r.status == "compressed") else 0.0 for r in layers]
    ax_err.bar(xs, errors, width=0.6, color=colour)
    for x, r in zip(xs, layers):
        if r.status != "compressed":
            ax_err.annotate("kept", (x, 0), ha="center", va="bottom", fontsize=7, rotation=90, color="#707070")
    ax_err.set_ylabel("rel. weight error ||W-Ŵ||/||W||")
    ax_err.grid(axis="y", alpha=0.3)
    ax_err.set_xticks(xs)
    ax_err.set_xticklabels([_short(r.name) for r in layers], rotation=60, ha="right", fontsize=7)
    t = report.totals()
    before = t["model_bytes_before"] or t["bytes_before"]
    after_all = t["model_bytes_after"] or t["bytes_after"]
    ax_model.bar([0, 1], [before / 1024, after_all / 1024], width=0.6, color=["#ececec", "#1f4fd1"],
                 edgecolor=["#b0b0b0", "#1f4fd1"])
    ax_model.annotate(f"{after_all / before:.3f}x" if before else "", (1, after_all / 1024), ha="center",
                      va="bottom", fontsize=9)
    auto = report.auto or {}
    if t["model_bytes_before"] and (ratio is not None):
        if budget_ratio is None and auto.get("fp32_bytes"):
            line = t["model_bytes_before"] - auto["fp32_bytes"] + auto["budget_bytes"]
        else:
            line = t["model_bytes_before"] - t["bytes_before"] + ratio * t["bytes_before"]
        ax_model.axhline(line / 1024, color="k", ls=":", lw=1.2, label=f"budget {ratio:.3g} (the rest as it was)")
        ax_model.legend(loc="upper right", fontsize=8)
    ax_model.set_xticks([0, 1])
    ax_model.set_xticklabels(["fp32", "written"])
    ax_model.set_ylabel("KiB, whole model (every tensor)" if t["model_bytes_before"] else "KiB, layers above")
    ax_model.grid(axis="y", alpha=0.3)
    head = (f"{t['compressed']}/{t['layers']} layers compressed: {t['bytes_before'] / 1024:.1f} -> "
            f"{t['bytes_after'] / 1024:.1f} KiB (ratio {t['ratio']:.3f})")
    if t["model_bytes_before"]:
        head += f"; whole model {before / 1024:.1f} -> {after_all / 1024:.1f} KiB"
    if report.output_error is not None:
        head += f"\noutput error on generated inputs {report.output_error:.4f}"
    fig.suptitle(f"{title}\n{head}" if title else head, fontsize=10)
    return fig


def save_report_png(report, path, title: str = "", dpi: int = 110, budget_ratio: float | None = None) -> Path:
    """Write the report picture to `path` atomically (temporary file, then rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    fig = report_figure(report, title, budget_ratio)
    FigureCanvasAgg(fig)
    atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format="png"), suffix=".png")
    return path

