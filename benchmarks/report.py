"""Results pages from the results JSON, so that no number in the docs can go stale.

Reads benchmarks/results/*.json (nothing is run) and writes:

- docs/RESULTS.md: one section per rendered file, each number beside its run (date, command,
  machine load, as far as the JSON records them; "not recorded" where it does not);
- the README's headline table, between the markers BEGIN and END below;
- docs/results/<model>.png: per model, the task metric against whole-file bytes (not checked by
  --check: only the text outputs are compared).

    python -m benchmarks.report              # write the page, the README block and the plots
    python -m benchmarks.report --no-plots   # text only (no matplotlib needed)
    python -m benchmarks.report --check      # exit 1 when the committed text differs from the JSON's

Adding a section: write `render_x(name, doc) -> list[str]` (markdown lines) and add the file
name and the function to SECTIONS. Files not in SECTIONS are listed at the end of the page as
not rendered. Output is deterministic: fixed float formats, sorted keys, no clock.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "RESULTS.md"
README = ROOT / "README.md"
PLOTS_DIR = ROOT / "docs" / "results"
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
NOT_RECORDED = "not recorded"
REGENERATE = "python -m benchmarks.report"

METRIC_NAMES = {"top1": "top-1", "ws353": "WS353 rho", "simlex": "SimLex rho", "polarity": "polarity acc",
                "emb_cos": "emb. cosine", "top1_agree": "top-1 agreement", "top5_agree": "top-5 agreement",
                "kl": "softmax KL"}
LOWER_IS_BETTER = {"kl"}


@dataclass(frozen=True)
class ModelInfo:
    title: str
    primary: str  # the metric of the headline table and the plot


MODELS = {
    "minilm": ModelInfo("all-MiniLM-L6-v2", "ws353"),
    "digits_cnn": ModelInfo("digits CNN", "top1"),
    "digits_resnet8": ModelInfo("digits ResNet-8", "top1"),
    "effnet_lite2": ModelInfo("EfficientNet-Lite2 on ImageNet crops", "top1_agree"),
    "mobilenet_v2": ModelInfo("MobileNetV2 on ImageNet crops", "top1_agree"),
}
HEADLINE_BUDGETS = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
ACCURACY_FILES = ("accuracy.json", "imagenet.json")  # same schema: benchmarks/accuracy.py


# ---------------------------------------------------------------- formatting

def fmt_budget(b: float) -> str:
    """1/N for budgets that are one over an integer, else a decimal (e.g. a peer's exact ratio)."""
    if b >= 1:
        return "1"
    return f"1/{round(1 / b)}" if abs(1 / b - round(1 / b)) < 1e-6 else f"{b:.4g}"


def fmt_num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB"


def fmt_load(load) -> str:
    if load is None:
        return NOT_RECORDED
    if isinstance(load, (list, tuple)):
        return " ".join(f"{x:g}" for x in load)
    if isinstance(load, float):
        return f"{load:.2f}"
    return str(load)


def cell_text(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(cell_text(c) for c in row) + " |" for row in rows])


def provenance(meta: dict | None) -> dict[str, str]:
    """date / command / load / machine of a whole-file run, from whichever keys the JSON uses."""
    meta = meta or {}
    machine = meta.get("machine") or meta.get("cpu")
    if machine is not None and meta.get("cpu_count") is not None and "core" not in str(machine):
        machine = f"{machine}, {meta['cpu_count']} cores"
    if machine is not None and meta.get("threads") is not None and "thread" not in str(machine):
        machine = f"{machine}, {meta['threads']} torch thread(s)"
    load = next((meta[k] for k in ("load", "load_average", "load_average_at_start") if k in meta), None)
    return {"date": str(meta.get("date", NOT_RECORDED)),
            "command": f"`{meta['command']}`" if meta.get("command") else NOT_RECORDED,
            "load": fmt_load(load),
            "machine": str(machine) if machine is not None else NOT_RECORDED}


def provenance_lines(meta: dict | None) -> list[str]:
    p = provenance(meta)
    lines = [f"Run: date {p['date']}; command {p['command']}; load average {p['load']}; machine {p['machine']}."]
    if meta and meta.get("note"):
        lines += ["", f"Note recorded with the run: {meta['note'].strip()}"]
    return lines


# ---------------------------------------------------------------- task accuracy (accuracy.json, imagenet.json)

def is_peer(row: dict) -> bool:
    return bool(row.get("peer")) or row["method"].endswith("-peer")


def is_single(method: str) -> bool:
    """One of our methods on its own (not auto, not a variant with +/-, not a peer, not the original)."""
    return method != "original" and not method.startswith("auto") and "+" not in method and "-" not in method


def method_kind(row: dict) -> str:
    if row["method"] == "original":
        return "original"
    if is_peer(row):
        return "peer"
    if row["method"] == "auto":
        return "auto"
    return "ours" if is_single(row["method"]) else "variant"


class AccuracyDoc:
    """The rows of one accuracy-style JSON, one per (model, method, budget): the latest run wins."""

    def __init__(self, name: str, doc: dict):
        self.name = name
        self.meta = doc.get("meta", {})
        self.runs = self.meta.get("runs", {})
        order = {run: i for i, run in enumerate(sorted(self.runs))}
        best: dict[tuple, dict] = {}
        for row in doc.get("rows", []):
            key = (row["model"], row["method"], row["budget"])
            rank = (row.get("run") in order, order.get(row.get("run"), -1), str(row.get("run")))
            if key not in best or rank >= best[key][0]:
                best[key] = (rank, row)
        self.rows = [row for _, row in best.values()]

    def models(self) -> list[str]:
        found = {r["model"] for r in self.rows}
        return [m for m in MODELS if m in found] + sorted(found - set(MODELS))

    def model_rows(self, model: str) -> list[dict]:
        return [r for r in self.rows if r["model"] == model]


def metric_keys(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k in r.get("metrics", {}):
            if k not in keys:
                keys.append(k)
    return keys


def primary_metric(model: str, rows: list[dict]) -> str:
    keys = metric_keys(rows)
    info = MODELS.get(model)
    return info.primary if info and info.primary in keys else (keys[0] if keys else "")


def method_order(rows: list[dict]) -> list[str]:
    kinds = {"original": 0, "auto": 1, "ours": 2, "variant": 3, "peer": 4}
    seen = {r["method"]: method_kind(r) for r in rows}
    return sorted(seen, key=lambda m: (kinds[seen[m]], m))


def over_budget(row: dict) -> bool:
    return row["method"] != "original" and row.get("ratio") is not None and row["ratio"] > row["budget"] * 1.001


def metric_cell(row: dict | None, key: str) -> str:
    if row is None:
        return ""
    if "error" in row:
        return "no setting" if is_peer(row) else "no fit"
    value = row.get("metrics", {}).get(key)
    if value is None:
        return "-"
    return fmt_num(value) + (f" [{row['ratio']:.3f}]" if over_budget(row) else "")


def metric_whole_cell(row: dict | None, key: str) -> str:
    """metric_cell plus the whole file the row ships (every tensor of the model: compressed layers,
    the dense rest, embeddings included), where the row records it."""
    cell = metric_cell(row, key)
    if not cell or "error" in row or row.get("artifact_bytes") is None:
        return cell
    return f"{cell} ({fmt_bytes(row['artifact_bytes'])})"


def best_single(rows: list[dict], key: str, budget: float) -> dict | None:
    """Our best single method at a budget on the metric `key` (ties: the method name decides)."""
    cands = [r for r in rows if r["budget"] == budget and is_single(r["method"]) and not is_peer(r)
             and key in r.get("metrics", {}) and not over_budget(r)]
    if not cands:
        return None
    sign = 1 if key in LOWER_IS_BETTER else -1
    return min(cands, key=lambda r: (sign * r["metrics"][key], r["method"]))


def best_overall_single(rows: list[dict], key: str) -> str | None:
    """The single method with the best mean metric over the budgets, a missing fit counting as the worst."""
    budgets = sorted({r["budget"] for r in rows if r["method"] != "original"})
    methods = sorted({r["method"] for r in rows if is_single(r["method"]) and not is_peer(r)})
    if not methods or not budgets:
        return None
    by = {(r["method"], r["budget"]): r["metrics"][key] for r in rows
          if key in r.get("metrics", {}) and not over_budget(r)}
    values = [v for v in by.values()]
    worst = (max(values) if key in LOWER_IS_BETTER else min(values)) if values else 0.0

    def score(m):
        mean = sum(by.get((m, b), worst) for b in budgets) / len(budgets)
        return (mean if key in LOWER_IS_BETTER else -mean, m)
    return min(methods, key=score)


def runs_list(doc: AccuracyDoc, runs: list[str], machine: bool = True) -> list[str]:
    lines = []
    for run in runs:
        info = doc.runs.get(run)
        if info is None:
            lines.append(f"- {run}: command {NOT_RECORDED}, load average {NOT_RECORDED}")
        else:
            cmd = f"`{info['command']}`" if info.get("command") else f"command {NOT_RECORDED}"
            lines.append(f"- {run}: {cmd}, load average at start "
                         f"{fmt_load(info.get('load_average_at_start'))}")
    if machine:
        meta = doc.meta
        lines.append(f"- machine: {meta.get('machine', NOT_RECORDED)}; torch {meta.get('torch', NOT_RECORDED)}")
    return lines


def runs_of(by: dict, method: str, budgets: list[float]) -> str:
    """The run of a method's cells; where they come from several runs, which budgets each gave."""
    per: dict[str, list[str]] = {}
    for b in budgets:
        if (method, b) in by:
            per.setdefault(str(by[(method, b)].get("run", NOT_RECORDED)), []).append(fmt_budget(b))
    if len(per) == 1:
        return next(iter(per))
    return "; ".join(f"{run} ({', '.join(bs)})" for run, bs in sorted(per.items()))


def method_table(rows: list[dict], methods: list[str], budgets: list[float], cell) -> list[str]:
    by = {(r["method"], r["budget"]): r for r in rows}
    out = []
    for m in methods:
        cells = [cell(by.get((m, b))) for b in budgets]
        if not any(cells):
            continue
        kind = next(method_kind(r) for r in rows if r["method"] == m)
        out.append([m, kind] + cells + [runs_of(by, m, budgets)])
    return table(["method", "kind"] + [fmt_budget(b) for b in budgets] + ["run"], out)


def render_accuracy_model(doc: AccuracyDoc, model: str) -> list[str]:
    rows = doc.model_rows(model)
    title = MODELS[model].title if model in MODELS else model
    orig = next((r for r in rows if r["method"] == "original" and "metrics" in r), None)
    comp = [r for r in rows if r["method"] != "original"]
    budgets = sorted({r["budget"] for r in comp}, reverse=True)
    methods = [m for m in method_order(rows) if m != "original"]
    keys = metric_keys(rows)
    lines = [f"### {title} (`{doc.name}`, model `{model}`)", ""]
    if orig:
        lines.append("Original: " + ", ".join(f"{METRIC_NAMES.get(k, k)} {fmt_num(v)}"
                                             for k, v in orig["metrics"].items())
                     + f"; whole file {fmt_bytes(orig.get('artifact_bytes'))} (run {orig.get('run', NOT_RECORDED)}).")
        lines.append("")
    auto_rows = [r for r in comp if r["method"] == "auto" and "error" not in r]
    if auto_rows:
        versions = sorted({str(r.get("defaults_version", NOT_RECORDED)) for r in auto_rows})
        riem = sorted({"with RieM candidates" if r.get("auto_riem_candidates") else "without RieM candidates"
                       for r in auto_rows if "auto_riem_candidates" in r})
        inputs = sorted({r["auto_inputs"] for r in auto_rows if r.get("auto_inputs")})
        lines += [f"`auto` rows: defaults version {', '.join(versions)}"
                  + (f" ({', '.join(riem)})" if riem else "")
                  + (f"; sensitivity inputs: {', '.join(inputs)}" if inputs else "") + ".", ""]
    primary = primary_metric(model, rows)
    for key in sorted(keys, key=lambda k: (k != primary, keys.index(k))):
        lines += [f"#### {METRIC_NAMES.get(key, key)}", ""]
        lines += method_table(comp, methods, budgets, lambda r, k=key: metric_cell(r, k))
        lines.append("")
    lines += ["#### Whole-file bytes", ""]
    lines += method_table(comp, methods, budgets,
                          lambda r: "" if r is None else ("-" if "error" in r else fmt_bytes(r.get("artifact_bytes"))))
    lines += ["", "#### Fit seconds (wall time of the compression; depends on the run's load)", ""]
    lines += method_table(comp, methods, budgets,
                          lambda r: "" if r is None else ("-" if "error" in r else fmt_num(r.get("fit_seconds"), 1)))
    notes = [r for r in comp if "error" in r]
    if notes:
        lines += ["", "Why a cell says no fit / no setting:", ""]
        for r in sorted(notes, key=lambda r: (methods.index(r["method"]), -r["budget"])):
            lines.append(f"- {r['method']} at {fmt_budget(r['budget'])}: {cell_text(r['error'])}")
    peers = sorted({r["setting"] for r in comp if is_peer(r) and r.get("setting")})
    if peers:
        settings = [(r["method"], r["budget"], r["setting"]) for r in comp if is_peer(r) and r.get("setting")]
        lines += ["", "Peer settings chosen:", ""]
        for m, b, s in sorted(settings, key=lambda t: (t[0], -t[1])):
            lines.append(f"- {m} at {fmt_budget(b)}: {cell_text(s)}")
    runs = sorted({str(r.get("run", NOT_RECORDED)) for r in rows})
    lines += ["", "Runs of these rows:", ""] + runs_list(doc, runs) + [""]
    return lines


def render_accuracy(name: str, raw: dict) -> list[str]:
    doc = AccuracyDoc(name, raw)
    lines = ["Cells: the metric at each budget (stored bytes / fp32 bytes of the compressible layers). "
             "[x] after a value: the stored ratio, where it is over the budget (peers get their best "
             "setting near it, benchmarks/peers.py); an empty cell: not run. kind: auto = `method=\"auto\"`, "
             "ours = one of our methods on its own, variant = auto's variants and refined models, peer = another "
             "project's compressor run by its own code. The run column names the run of the row's cells (and "
             "which budgets each run gave, where there are several); its command and load are listed under "
             "each model.", ""]
    for model in doc.models():
        lines += render_accuracy_model(doc, model)
    return lines


# ---------------------------------------------------------------- headline table (README)

def headline(docs: dict[str, dict]) -> list[str]:
    """One table: per model and budget, the original, auto, our best single method and each peer."""
    adocs = [AccuracyDoc(n, docs[n]) for n in ACCURACY_FILES if n in docs]
    peers = sorted({r["method"] for d in adocs for r in d.rows if is_peer(r)})
    out, used = [], []
    for d in adocs:
        for model in d.models():
            rows = d.model_rows(model)
            key = primary_metric(model, rows)
            by = {(r["method"], r["budget"]): r for r in rows}
            orig = next((r for r in rows if r["method"] == "original" and "metrics" in r), None)
            title = MODELS[model].title if model in MODELS else model
            for b in HEADLINE_BUDGETS:
                if not any(r["budget"] == b for r in rows):
                    continue
                best = best_single(rows, key, b)
                cells = [r for r in [orig, by.get(("auto", b)), best] + [by.get((p, b)) for p in peers] if r]
                used += [(d, str(r.get("run", NOT_RECORDED))) for r in cells]
                runs = sorted({str(r.get("run", NOT_RECORDED)) for r in cells})
                out.append([f"{title} ({METRIC_NAMES.get(key, key)})", fmt_budget(b), metric_whole_cell(orig, key),
                            metric_whole_cell(by.get(("auto", b)), key),
                            f"{best['method']} {metric_whole_cell(best, key)}" if best else "",
                            *[metric_whole_cell(by.get((p, b)), key) or "not run" for p in peers], ", ".join(runs)])
    lines = [f"Generated by `{REGENERATE}` from `benchmarks/results/` ({', '.join(n for n in ACCURACY_FILES if n in docs)}); "
             "edit the JSON or the script, not this table. Budget: stored bytes / fp32 bytes of the compressible "
             "layers; [x]: stored ratio, where over the budget; (MB): the whole model as shipped (every tensor: "
             "compressed layers and the dense rest, embeddings and biases included; ours: the saved artifact, "
             "a peer: its compressed model's tensors), to compare at what a user ships; best single: our best "
             "method on its own at that budget (within it). Every row, metric and file size: "
             "[docs/RESULTS.md](docs/RESULTS.md).", ""]
    lines += table(["model (metric)", "budget", "original", "auto", "best single", *peers, "run"], out)
    lines += ["", "Runs:", ""]
    for d in adocs:
        lines += runs_list(d, sorted({run for x, run in used if x is d}), machine=False)
    machines = sorted({str(d.meta.get("machine", NOT_RECORDED)) for d in adocs})
    lines.append(f"- machine: {'; '.join(machines)}")
    return lines


# ---------------------------------------------------------------- deployment files

def ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def render_onnx_forms(name: str, doc: dict) -> list[str]:
    lines = provenance_lines(doc.get("meta")) + [""]
    rows = doc.get("rows", [])
    for model in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == model]
        dense = next((r for r in mrows if r["form"] == "dense"), {})
        batches = sorted({b for r in mrows for b in r.get("latency_ms", {})}, key=int)
        out = []
        for r in mrows:
            lat = []
            for b in batches:
                v, d = r.get("latency_ms", {}).get(b), dense.get("latency_ms", {}).get(b)
                lat.append("-" if v is None else f"{v:.2f} ({ratio(v, d)})")
            err = ", ".join(f"{fmt_num(r['output_rel_error'][b])}" for b in batches if b in r.get("output_rel_error", {}))
            out.append([r["form"], f"{fmt_bytes(r.get('file_bytes'))} ({ratio(r.get('file_bytes'), dense.get('file_bytes'))})",
                        f"{fmt_num(r.get('session_s'), 2)} ({ratio(r.get('session_s'), dense.get('session_s'))})",
                        f"{fmt_num(r.get('rss_mib'), 0)} ({ratio(r.get('rss_mib'), dense.get('rss_mib'))})",
                        *lat, err])
        lines += [f"`{model}` (ratios to the dense file of the same run in brackets):", ""]
        lines += table(["form", "file", "session s", "resident MiB", *[f"latency ms, batch {b}" for b in batches],
                        "output error (rel. to norm), per batch"], out) + [""]
    return lines


def render_onnx_size_latency(name: str, doc: dict) -> list[str]:
    env = doc.get("env", {})
    lines = provenance_lines({**env, "machine": env.get("cpu")})
    lines += ["", f"Settings: ratio {env.get('ratio', NOT_RECORDED)}, {env.get('runs', NOT_RECORDED)} timed runs; "
              f"onnxruntime {env.get('onnxruntime', NOT_RECORDED)}, torch {env.get('torch', NOT_RECORDED)}.", ""]
    out = []
    for r in doc.get("rows", []):
        out.append([r["model"], str(r.get("layers_compressed", "-")), str(r.get("fit_steps", "-")),
                    f"{fmt_bytes(r.get('file_bytes_before'))} -> {fmt_bytes(r.get('file_bytes_after'))} "
                    f"({fmt_num(r.get('file_ratio'))})",
                    f"{fmt_num(r.get('dense_default_s'), 3)} / {fmt_num(r.get('riem_default_s'), 3)}",
                    f"{fmt_num(r.get('latency_dense_ms'), 3)} / {fmt_num(r.get('latency_riem_ms'), 3)} "
                    f"({fmt_num(r.get('latency_ratio'), 2)}x)",
                    fmt_num(r.get("out_rel_err_vs_dense")), fmt_num(r.get("fit_seconds"), 0)])
    lines += table(["model", "layers", "fit steps", "file dense -> RieM (ratio)", "session s dense / RieM",
                    "latency ms dense / RieM", "output error vs dense", "fit s"], out) + [""]
    return lines


def render_tvm_latency(name: str, doc: dict) -> list[str]:
    meta = doc.get("meta", {})
    lines = provenance_lines(meta)
    lines += ["", f"Settings: ratio {meta.get('ratio', NOT_RECORDED)}, tune trials {meta.get('tune_trials', NOT_RECORDED)}, "
              f"TVM {meta.get('tvm', NOT_RECORDED)}, onnxruntime {meta.get('onnxruntime', NOT_RECORDED)}.", ""]
    out = []
    for r in doc.get("rows", []):
        out.append([r["model"], str(r.get("batch", "-")), fmt_num(r.get("ort_ms"), 3), fmt_num(r.get("torch_ms"), 3),
                    fmt_num(r.get("tvm_untuned_ms"), 3), fmt_num(r.get("tvm_default_ms"), 3),
                    fmt_num(r.get("tvm_tuned_ms"), 3), f"{r.get('tvm_best', '-')}: {fmt_num(r.get('tvm_best_over_ort'), 2)}x",
                    fmt_num(r.get("tvm_default_load_s"), 2)])
    lines += table(["model", "batch", "onnxruntime ms", "torch ms", "TVM untuned ms", "TVM default ms",
                    "TVM tuned ms", "best TVM / onnxruntime", "TVM load s"], out) + [""]
    fused = doc.get("fused", [])
    if fused:
        out = [[f"{r['shape'][0]}x{r['shape'][1]}", str(r.get("batch")), fmt_num(r.get("decode-once_ms"), 3),
                fmt_num(r.get("fused_ms"), 1), fmt_bytes(r.get("decode_once_resident_bytes")),
                fmt_bytes(r.get("fused_resident_bytes"))] for r in fused]
        lines += ["Fused decode-in-matmul against decode once:", ""]
        lines += table(["weight", "batch", "decode-once ms", "fused ms", "resident, decode once",
                        "resident, fused"], out) + [""]
    return lines


def render_fit_fidelity(name: str, doc: dict) -> list[str]:
    lines = provenance_lines(doc.get("meta")) + [""]
    rows = doc.get("rows", [])
    methods = sorted({r["method"] for r in rows})
    by = {(r["layer"], r["budget"], r["method"]): r for r in rows}
    out = []
    for layer, budget in sorted({(r["layer"], r["budget"]) for r in rows}, key=lambda t: (t[0], -t[1])):
        shape = next(r.get("shape") for r in rows if r["layer"] == layer)
        cells = []
        for m in methods:
            r = by.get((layer, budget, m))
            cells.append("" if r is None else fmt_num(r.get("rel_error")) + (f" [{r['ratio']:.3f}]" if r.get("ratio", 0) > budget * 1.001 else ""))
        out.append([layer, "x".join(str(s) for s in shape or []), fmt_budget(budget), *cells])
    lines += ["Relative Frobenius error of the stored weight, per layer ([x]: stored ratio, where over the budget):", ""]
    lines += table(["layer", "shape", "budget", *methods], out) + [""]
    return lines


def render_compress_time(name: str, doc: dict) -> list[str]:
    """benchmarks/compress_time.py's own page, headings one level down."""
    from benchmarks.compress_time import render

    lines = render(doc).splitlines()[2:]  # without its title
    return ["#" + line if line.startswith("## ") else line for line in lines] + [""]


SECTIONS = [
    ("accuracy.json", "Task accuracy against stored bytes (MiniLM, digits nets, peers)", render_accuracy),
    ("imagenet.json", "A pretrained ImageNet CNN", render_accuracy),
    ("onnx_forms.json", "ONNX forms: file, session start, memory, latency", render_onnx_forms),
    ("onnx_forms_embeddings.json", "ONNX forms with the embedding tables compressed", render_onnx_forms),
    ("onnx_size_latency.json", "RieM ONNX file in stock onnxruntime", render_onnx_size_latency),
    ("tvm_latency.json", "TVM latency (MiniLM)", render_tvm_latency),
    ("tvm_latency_digits.json", "TVM latency (digits CNN)", render_tvm_latency),
    ("fit_fidelity.json", "Weight error at equal bytes, per layer", render_fit_fidelity),
    ("compress_time.json", "Time and memory to compress", render_compress_time),
]


# ---------------------------------------------------------------- the page

def load_docs(results_dir: Path = RESULTS_DIR) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}


def anchor(title: str) -> str:
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -")
    return keep.replace(" ", "-")


def results_page(docs: dict[str, dict]) -> str:
    present = [(f, t, fn) for f, t, fn in SECTIONS if f in docs]
    lines = ["# Results", "",
             f"Generated by `{REGENERATE}` from `benchmarks/results/*.json`; do not edit by hand "
             f"(`{REGENERATE} --check` and `tests/test_results_pages.py` fail when this page and the JSON "
             "disagree). Each section names its file and its run: date, command and machine load as the JSON "
             f"records them, \"{NOT_RECORDED}\" where it does not. Timings are from shared, loaded CPU cores: "
             "compare them within a run, not across runs. The benchmark scripts that write each file are under "
             "`benchmarks/` (each file's `.md` beside it has the script's own, longer table).", "",
             "Plots (one per model, the task metric against whole-file bytes): "
             + ", ".join(f"[{m}](results/{m}.png)" for m in plot_models(docs)) + ".", "",
             "Contents:", ""]
    lines += [f"- [{t}](#{anchor(t)}) (`{f}`)" for f, t, _ in present] + [""]
    for f, t, fn in present:
        lines += [f"## {t}", "", f"From `benchmarks/results/{f}`.", ""] + fn(f, docs[f])
    rendered = {f for f, _, _ in SECTIONS}
    rest = [n for n in docs if n not in rendered]
    lines += ["## Not rendered here", "",
              "These results files are not rendered on this page yet (their scripts write markdown tables "
              "into `benchmarks/results/` beside them):", ""]
    lines += [f"- `benchmarks/results/{n}`" for n in rest] + [""]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip("\n") + "\n"


def readme_block(docs: dict[str, dict]) -> str:
    return "\n".join(headline(docs)) + "\n"


def splice_readme(readme: str, block: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def readme_current_block(readme: str) -> str:
    if BEGIN not in readme or END not in readme:
        return ""
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].lstrip("\n")


# ---------------------------------------------------------------- plots (not part of --check)

def plot_models(docs: dict[str, dict]) -> list[str]:
    out = []
    for n in ACCURACY_FILES:
        if n in docs:
            out += [m for m in AccuracyDoc(n, docs[n]).models() if m not in out]
    return out


def plot_model(doc: AccuracyDoc, model: str, path: Path) -> Path:
    """Task metric against whole-file bytes: auto and our best single method in strong colours, the peers
    dashed in one grey family, everything else as light grey dots; dotted lines mark the budgets. Where the
    budgets crowd on the log axis (a model whose uncompressed rest dominates the file), a second panel
    zooms on them with a linear axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    rows = doc.model_rows(model)
    key = primary_metric(model, rows)
    pts = [r for r in rows if key in r.get("metrics", {}) and r.get("artifact_bytes")
           and (is_peer(r) or not over_budget(r))]
    orig = next((r for r in pts if r["method"] == "original"), None)
    best = best_overall_single(rows, key)
    denoms = Counter(r["compressible_fp32_bytes"] for r in rows if r.get("compressible_fp32_bytes")
                     and not r["method"].endswith("+emb"))
    marks = []
    if orig and denoms:
        comp = denoms.most_common(1)[0][0]
        rest = orig["artifact_bytes"] - comp
        marks = [(rest + b * comp, fmt_budget(b)) for b in sorted({r["budget"] for r in rows if r["method"] != "original"})
                 if rest + b * comp > 0]
    zoom = len(marks) > 1 and max(x for x, _ in marks) / min(x for x, _ in marks) < 1.5
    fig = Figure(figsize=(13, 5.2) if zoom else (8, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
    peer_styles = [("#222222", "s"), ("#555555", "D"), ("#888888", "^"), ("#aaaaaa", "v"), ("#333333", "P")]
    peers = sorted({r["method"] for r in pts if is_peer(r)})
    for i, ax in enumerate(axes):
        others_labelled = False
        for m in method_order(rows):
            mp = sorted((r["artifact_bytes"], r["metrics"][key]) for r in pts if r["method"] == m)
            if not mp or m == "original":
                continue
            xs, ys = [p[0] for p in mp], [p[1] for p in mp]
            if m == "auto":
                ax.plot(xs, ys, color="#1f4fd1", lw=2.6, marker="o", ms=7, label="auto", zorder=5)
            elif m == best:
                ax.plot(xs, ys, color="#d1261f", lw=2.6, marker="o", ms=7, label=f"{m} (our best single method)",
                        zorder=4)
            elif m in peers:
                color, marker = peer_styles[peers.index(m) % len(peer_styles)]
                ax.plot(xs, ys, color=color, lw=1.6, ls="--", marker=marker, ms=6, label=f"{m} (peer)", zorder=3)
            else:
                ax.plot(xs, ys, color="#c8c8c8", ls="none", marker="o", ms=4, zorder=1,
                        label=None if others_labelled else "our other methods and variants")
                others_labelled = True
        if orig:
            ax.axhline(orig["metrics"][key], color="k", ls=":", lw=1.2, label="original (fp32)")
        last, span = None, marks[-1][0] - marks[0][0] if marks else 0
        for x, label in marks:
            ax.axvline(x, color="#9ab0d8", ls=":", lw=0.9, zorder=0)
            far = last is None or ((x - last) > 0.05 * span if zoom else x / last > 1.06)
            if zoom == (i == 1) and far:
                last = x
                ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                            fontsize=8, color="#44609a")
        ax.grid(alpha=0.25)
        ax.set_ylabel(METRIC_NAMES.get(key, key))
        if i == 0:
            ax.set_xscale("log")
            ax.set_xlabel("whole-file bytes (log scale)")
        else:
            lo, hi = min(x for x, _ in marks), max(x for x, _ in marks)
            ax.set_xlim(lo - 0.06 * (hi - lo), hi + 0.06 * (hi - lo))
            ax.set_xlabel("whole-file bytes, zoom on the budgets (linear, MB)")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g}"))
            ys = [r["metrics"][key] for r in pts if lo * 0.97 <= r["artifact_bytes"] <= hi * 1.03]
            if ys:
                ax.set_ylim(min(ys) - 0.03, max(ys) + 0.03)
    axes[0].legend(fontsize=8, loc="best")
    title = MODELS[model].title if model in MODELS else model
    fig.suptitle(f"{title}: {METRIC_NAMES.get(key, key)} against whole-file bytes ({doc.name})\ndotted: the file "
                 "size a budget gives, the rest of the model as in the original; rows over their budget left out",
                 fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


def write_plots(docs: dict[str, dict], out_dir: Path = PLOTS_DIR) -> list[Path]:
    paths = []
    for n in ACCURACY_FILES:
        if n not in docs:
            continue
        d = AccuracyDoc(n, docs[n])
        for model in d.models():
            paths.append(plot_model(d, model, out_dir / f"{model}.png"))
    return paths


# ---------------------------------------------------------------- entry point

def outputs(results_dir: Path = RESULTS_DIR, readme: Path = README) -> dict[Path, str]:
    """What the committed text files should hold, from the committed JSON."""
    docs = load_docs(results_dir)
    return {PAGE: results_page(docs), readme: splice_readme(readme.read_text(), readme_block(docs))}


def check(results_dir: Path = RESULTS_DIR, readme: Path = README) -> list[str]:
    """Differences between the committed text files and what the JSON gives (empty: current)."""
    problems = []
    for path, want in outputs(results_dir, readme).items():
        have = path.read_text() if path.exists() else ""
        if have != want:
            diff = list(difflib.unified_diff(have.splitlines(), want.splitlines(), str(path), "generated",
                                             lineterm="", n=0))
            problems.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} is stale "
                            f"(run `{REGENERATE}`):\n" + "\n".join(diff[:40]))
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when a page is stale")
    ap.add_argument("--no-plots", action="store_true", help="do not redraw docs/results/*.png")
    args = ap.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        if not problems:
            print("docs/RESULTS.md and the README's results block match benchmarks/results/*.json")
        return 1 if problems else 0
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    if not args.no_plots:
        for p in write_plots(load_docs()):
            print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
