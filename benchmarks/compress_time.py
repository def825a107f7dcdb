"""How long compressing takes, and how much memory: every method, `auto` and the installed peers,
on real models and on a ladder of real layer shapes with random weights, in one run.

Each measurement runs in its own child process (`--one`), so its wall time and peak resident
memory (ru_maxrss of that process) are its own; the model's fp32 bytes and the RSS after loading
it (before compressing) are reported beside them. `rc.optimize` runs with default settings apart
from `quiet` (and the ratio); `auto` also reports where its time went (report.auto["timing"]:
candidate fits per method summed over layers, decoding and scoring them, the sensitivity's
moments and probes, planning, the end-to-end measurement of the plans).

Peers are timed at one setting each (their own default group size): NNCF `compress_weights`
INT4_ASYM g64 (INT8_ASYM where the budget is 1/4), hqq 4-bit g64 / 2-bit g64 over every Linear,
torchao `IntxWeightOnlyConfig` int4 / int2 g64 through `quantize_`. Peers quantise Linear layers
only (the CNN rows of hqq / torchao say so).

Scale ladder (random N(0, 0.02) weights with the shapes of real models, example input batch 1 x 16
tokens): BERT-base blocks (768 / 3072), 1B-decoder blocks (2048 / 5632, gated MLP) and one
7B-decoder block (4096 / 11008). Seconds and peak RSS against parameter count, a least-squares
growth exponent (time ~ params^k), and the extrapolation to a 7B decoder (6.5e9 linear weights).

A method written `auto@w1` runs with `workers=1` (one local worker instead of one per core);
`auto@ray` with `executor="ray"` on a local one-node Ray cluster of 2 CPUs; `auto@ray2n` on a Ray
cluster of two node processes of 1 CPU each on this machine (`ray.cluster_utils.Cluster`), as a
two-machine cluster would run it. Ray's start-up is inside the timed call only for `auto@ray`; the
peak RSS of Ray rows is the driver's alone (the fits run in Ray's worker processes).

Usage:
    python -m benchmarks.compress_time                     # everything (hours with riem)
    python -m benchmarks.compress_time --models minilm --methods auto rtn nncf-peer
    python -m benchmarks.compress_time --ladder-only --methods auto rtn
    python -m benchmarks.compress_time --methods auto minilm:auto@ray rtn    # auto@ray on MiniLM only
Writes benchmarks/results/compress_time.{md,json,png} (merged with rows already there, each row
keeping the run that measured it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("auto", "rtn", "affine", "rotq", "vq", "svd", "tucker2", "riemq", "riem")
PEERS = ("nncf-peer", "hqq-peer", "torchao-peer")
MODEL_BUDGETS = {"minilm": (1 / 8, 1 / 16), "effnet_lite2": (1 / 4, 1 / 8)}
# name -> (hidden, ffn, blocks, gated): the ladder's models
LADDER = {"bert-base x1": (768, 3072, 1, False), "bert-base x4": (768, 3072, 4, False),
          "1b-decoder x1": (2048, 5632, 1, True), "1b-decoder x2": (2048, 5632, 2, True),
          "7b-decoder x1": (4096, 11008, 1, True)}
LADDER_BUDGET = 1 / 8
PARAMS_7B = 6.5e9  # linear weights of a LLaMA-7B-shaped decoder (32 blocks + head)


# ----------------------------------------------------------------------------------------- models
def _ladder_model(hidden: int, ffn: int, blocks: int, gated: bool):
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
            self.up = nn.Linear(hidden, ffn)
            self.gate = nn.Linear(hidden, ffn) if gated else None
            self.down = nn.Linear(ffn, hidden)

        def forward(self, x):
            # every weight is used; the mixing is cheap (the timing is about the weights)
            x = x + self.o(torch.sigmoid(self.q(x)) * self.k(x) + self.v(x))
            h = self.up(x)
            h = torch.nn.functional.silu(self.gate(x)) * h if self.gate is not None else torch.nn.functional.gelu(h)
            return x + self.down(h)

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(blocks)]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    x = torch.randn(1, 16, hidden, generator=gen)
    return model, (x,)


def load(model_name: str):
    """(model, example inputs) of a model name or a ladder entry."""
    if model_name == "minilm":
        from benchmarks import models as bm

        model, tok = bm.load_minilm()
        return model, bm.minilm_example_inputs(tok)
    if model_name == "effnet_lite2":
        from benchmarks import imagenet

        x, _ = imagenet.agreement_inputs()
        return imagenet.load_effnet_lite2(), (x[:2],)
    if model_name in LADDER:
        return _ladder_model(*LADDER[model_name])
    raise SystemExit(f"unknown model {model_name!r}; known: {sorted(MODEL_BUDGETS) + sorted(LADDER)}")


def _rss_mb() -> float:
    from benchmarks.onnx_forms import rss_bytes

    return rss_bytes() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -------------------------------------------------------------------------------- one measurement
def _run_peer(peer: str, model, x, ratio: float) -> dict:
    import torch

    from benchmarks import peers

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        return {"error": f"{peer} quantises Linear layers only; this model has none"}
    if peer == "nncf-peer":
        mode, group = ("INT8_ASYM", None) if ratio >= 0.25 else ("INT4_ASYM", 64)
        if ratio < 1 / 8:
            return {"error": "NNCF's data-free modes are 8 and 4 bits: no setting at this budget"}
        t0 = time.perf_counter()
        peers._nncf_compress(model, mode, group, x)
        return {"seconds": time.perf_counter() - t0, "setting": f"{mode} g{group}"}
    bits = 8 if ratio >= 0.25 else 4 if ratio >= 1 / 8 else 2
    weights = {n + ".weight": m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    t0 = time.perf_counter()
    for w in weights.values():
        if peer == "hqq-peer":
            peers.hqq_quantise(w.detach(), bits, 64, 1)
        else:
            peers.torchao_quantise(w.detach(), (bits, 64, "asym", "float16"))
    return {"seconds": time.perf_counter() - t0, "setting": f"{bits}-bit g64 over {len(weights)} Linear weights"}


def _executor_options(method: str) -> tuple[str, dict]:
    """(method, optimize options) of a method name with an executor suffix (see the docstring)."""
    base, _, where = method.partition("@")
    if not where:
        return base, {}
    if where.startswith("w"):  # "auto@w1": one local worker (the default uses every core)
        return base, {"workers": int(where[1:])}
    if where == "ray":
        return base, {"executor": "ray"}
    if where == "ray2n":
        from ray.cluster_utils import Cluster

        import atexit

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})

        def stop():  # its node processes, and the file naming it that ray.init() would try, end with the row
            cluster.shutdown()
            Path("/tmp/ray/ray_current_cluster").unlink(missing_ok=True)

        atexit.register(stop)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        import ray

        ray.init(address=cluster.address, include_dashboard=False)
        return base, {"executor": "ray", "ray_address": cluster.address}
    raise SystemExit(f"unknown executor suffix in {method!r}: @w<N>, @ray or @ray2n")


def measure_one(model_name: str, method: str, ratio: float) -> dict:
    """One compression in this process: seconds, memory, and auto's time split."""
    import torch

    import riem_compiler as rc

    t_load = time.perf_counter()
    model, x = load(model_name)
    fp32 = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("weight"))
    params = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2)
    out = {"model": model_name, "method": method, "ratio": ratio, "params": params, "fp32_weight_mb": fp32 / 2**20,
           "load_seconds": time.perf_counter() - t_load, "rss_loaded_mb": _rss_mb(),
           "torch_threads": torch.get_num_threads()}
    try:
        if method in PEERS:
            out.update(_run_peer(method, model, x, ratio))
        else:
            base, options = _executor_options(method)
            t0 = time.perf_counter()
            res = rc.optimize(model, example_inputs=x, ratio=ratio, method=base, quiet=True, **options)
            out["seconds"] = time.perf_counter() - t0
            out["stored_ratio"] = res.report.bytes_after / max(res.report.bytes_before, 1)
            auto = getattr(res.report, "auto", None) or {}
            if auto:
                out["auto_timing"] = auto.get("timing", {})
                out["auto_sensitivity_seconds"] = (auto.get("sensitivity") or {}).get("seconds")
                out["auto_seconds"] = auto.get("seconds")
                picked: dict[str, int] = {}
                for c in auto.get("choices", []):
                    picked[c["method"]] = picked.get(c["method"], 0) + 1
                out["auto_picked"] = picked
                out["held_on_disk_mb"] = auto.get("held_on_disk_bytes", 0) / 2**20
    except Exception as exc:  # noqa: BLE001 - a row that fails says why; the run goes on
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _child(model_name: str, method: str, ratio: float, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.compress_time", "--one", json.dumps([model_name, method, ratio])]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
    except subprocess.TimeoutExpired:
        return {"model": model_name, "method": method, "ratio": ratio, "error": f"over the {timeout:g} s limit"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
    return {"model": model_name, "method": method, "ratio": ratio, "error": f"child failed: {tail[0][:200]}"}


# ---------------------------------------------------------------------------------------- report
def growth_exponent(rows: list[dict]) -> tuple[float, float] | None:
    """Least-squares k and log-intercept of seconds ~ params^k over rows with a time."""
    import numpy as np

    pts = [(r["params"], r["seconds"]) for r in rows if r.get("seconds") and r.get("params")]
    if len(pts) < 2:
        return None
    lp, ls = np.log([p for p, _ in pts]), np.log([s for _, s in pts])
    k, c = np.polyfit(lp, ls, 1)
    return float(k), float(c)


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(doc: dict) -> str:
    lines = ["# Compression time and memory", "",
             "Each row is its own child process: wall seconds of the compression alone, peak RSS of that "
             "process (model loading included), default settings. Runs (each row names its run):", ""]
    for run in doc.get("runs", []):
        lines.append(f"- {run['date']}: `{run['command']}`, {run['machine']}; load average (1, 5, 15 min) "
                     f"before {run['load_before']}, after {run.get('load_after')}"
                     + (f" (**{run['partial']}**)" if run.get("partial") else "")
                     + (f"; {run['note']}" if run.get("note") else ""))
    lines += ["", "| model | method | budget | weights (M) | seconds | peak RSS MB | peak - loaded MB | fp32 weights MB | stored | notes | run |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        notes = r.get("error") or r.get("setting") or ""
        if not notes and r.get("stored_ratio") is not None and r["stored_ratio"] >= 0.9999:
            notes = "every layer kept dense: the method applies to none of them"
        if r.get("auto_picked"):
            notes = "picked " + ", ".join(f"{k} x{v}" for k, v in sorted(r["auto_picked"].items()))
            if r.get("held_on_disk_mb"):  # not in the peak: candidates held in files while auto plans
                notes += f"; {r['held_on_disk_mb']:.0f} MB of held candidates in files"
        peak, loaded = r.get("peak_rss_mb", math.nan), r.get("rss_loaded_mb", math.nan)
        cells = [r["model"], r["method"], f"1/{round(1 / r['ratio'])}", f"{r.get('params', 0) / 1e6:.1f}",
                 _num(r.get("seconds"), ".1f"), f"{peak:.0f}", f"{peak - loaded:.0f}",
                 f"{r.get('fp32_weight_mb', math.nan):.0f}", _num(r.get("stored_ratio"), ".4f"), notes, r.get("run", "")]
        lines.append("| " + " | ".join(cells) + " |")
    split = [r for r in doc["rows"] if r.get("auto_timing")]
    if split:
        lines += ["", "## Where auto's time goes", "",
                  "Candidate fits and scoring are summed over layers (they run on the local executor's workers "
                  "side by side, so they can exceed the wall time of the candidate jobs).", "",
                  "Screening (from defaults 2026-12-07.3): the first pass fits most candidates as estimates on a "
                  "subset of the rows; whole fits: the estimates fitted whole afterwards, in rounds, and the "
                  "wall time of those rounds.", "",
                  "| model | method | budget | total s | sensitivity s | candidate jobs (wall) s | whole fits (rounds, wall s) | "
                  "fits per method s (summed) | scoring s | probes s | planning s | measurement s | run |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in split:
            t = r["auto_timing"]
            fits = ", ".join(f"{m} {s:.1f}" for m, s in sorted(t.get("candidates", {}).items(), key=lambda kv: -kv[1]) if s >= 0.05)
            sc = t.get("screening")
            whole = f"{sc['whole_fits']} of {sc['whole_fits'] + sc['left_out']} ({sc['rounds']}, {sc['whole_fits_wall']:.1f})" \
                if sc else "-"
            lines.append(f"| {r['model']} | {r['method']} | 1/{round(1 / r['ratio'])} | {r['seconds']:.1f} | "
                         f"{r.get('auto_sensitivity_seconds') or 0:.1f} | {t.get('candidate_jobs_wall', 0):.1f} | {whole} | "
                         f"{fits} | {t.get('scoring', 0):.1f} | {t.get('probes', 0):.1f} | {t.get('planning', 0):.1f} | "
                         f"{t.get('measurement', 0):.1f} | {r.get('run', '')} |")
    ladder = [r for r in doc["rows"] if r["model"] in LADDER]
    if ladder:
        lines += ["", "## Scale ladder", "",
                  f"Random N(0, 0.02) weights with real layer shapes, budget 1/{round(1 / LADDER_BUDGET)}; "
                  "time ~ params^k fitted by least squares over the ladder, extrapolated to a 7B decoder "
                  f"({PARAMS_7B / 1e9:.1f}e9 linear weights) on this machine.", "",
                  "Memory growth: how much the peak RSS grows per MB of fp32 weights from the smallest point to "
                  "the largest. The target, peak RSS at most 2x the fp32 model plus a constant, is a growth of at "
                  "most 2 MB per MB: the loaded model's 1 MB per MB, and at most 1 more for the compression "
                  "(pages before 2026-12-08 compared the growth of peak - loaded RSS with 2, a reading that "
                  "allowed 1 MB per MB more). Deeper, same layers: the same between two points of one shape that "
                  "differ only in their number of blocks (what grows with the model's depth, not with the size "
                  "of its largest layer, whose fits two workers hold side by side).", "",
                  "| method | points | k (time growth) | 7B extrapolation | (peak - loaded RSS) / fp32 weights (largest point) "
                  "| peak RSS growth per fp32 MB | deeper, same layers: peak RSS growth per fp32 MB | deeper: time per block |",
                  "|---|---|---|---|---|---|---|---|"]
        for method in sorted({r["method"] for r in ladder}):
            rows = sorted([r for r in ladder if r["method"] == method and r.get("seconds")], key=lambda r: r["params"])
            fit = growth_exponent(rows)
            if fit is None:
                lines.append(f"| {method} | {len(rows)} | - | - | - | - | - | - |")
                continue
            k, c = fit
            hours = math.exp(c) * PARAMS_7B ** k / 3600
            small, big = rows[0], rows[-1]
            growth = (big["peak_rss_mb"] - small["peak_rss_mb"]) / (big["fp32_weight_mb"] - small["fp32_weight_mb"])
            lines.append(f"| {method} | {len(rows)} | {k:.2f} | {hours:.1f} h | "
                         f"{(big['peak_rss_mb'] - big['rss_loaded_mb']) / big['fp32_weight_mb']:.2f}x ({big['model']}) | "
                         f"{growth:.2f} ({small['model']} to {big['model']}) | {_deeper(rows)} |")
    return "\n".join(lines) + "\n"


def _deeper(rows: list[dict]) -> str:
    """Per ladder shape measured at two depths: peak RSS growth per fp32 MB between them, and seconds per
    block at each depth (two cells of the table)."""
    growth, per_block = [], []
    for shape in sorted({r["model"].split(" x")[0] for r in rows}):
        pts = sorted([r for r in rows if r["model"].split(" x")[0] == shape], key=lambda r: r["params"])
        if len(pts) < 2:
            continue
        a, b = pts[0], pts[-1]
        mb = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["fp32_weight_mb"] - a["fp32_weight_mb"])
        growth.append(f"{mb:.2f} ({a['model']} to {b['model']})")
        blocks = [LADDER[p["model"]][2] for p in (a, b)]
        per_block.append(f"{shape}: {a['seconds'] / blocks[0]:.1f} / {b['seconds'] / blocks[1]:.1f} s")
    return f"{'; '.join(growth) or '-'} | {'; '.join(per_block) or '-'}"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ladder = [r for r in doc["rows"] if r["model"] in LADDER and r.get("seconds")]
    if not ladder:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({r["method"] for r in ladder}):
        rows = sorted([r for r in ladder if r["method"] == method], key=lambda r: r["params"])
        strong = method == "auto"
        kw = dict(marker="o", lw=2.5 if strong else 1.2, color="tab:blue" if strong else None)
        axes[0].plot([r["params"] for r in rows], [r["seconds"] for r in rows], label=method, **kw)
        axes[1].plot([r["params"] for r in rows], [r["peak_rss_mb"] / r["fp32_weight_mb"] for r in rows], **kw)
    axes[0].set(xscale="log", yscale="log", xlabel="linear weights", ylabel="seconds to compress",
                title=f"time (budget 1/{round(1 / LADDER_BUDGET)})")
    axes[1].set(xscale="log", xlabel="linear weights", ylabel="peak RSS / fp32 weight bytes", title="memory")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="*", default=list(MODEL_BUDGETS), help="real models (default: all)")
    ap.add_argument("--methods", nargs="*", default=[*METHODS, *PEERS],
                    help="methods, peers, executor variants (auto@w1, auto@ray, auto@ray2n); MODEL:METHOD for one model only")
    ap.add_argument("--ladder", nargs="*", default=list(LADDER), help="ladder entries (default: all)")
    ap.add_argument("--ladder-methods", nargs="*", default=["auto", "rtn"])
    ap.add_argument("--ladder-only", action="store_true")
    ap.add_argument("--no-ladder", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    ap.add_argument("--out", default=str(RESULTS / "compress_time"))
    args = ap.parse_args(argv)
    if args.one:
        model_name, method, ratio = json.loads(args.one)
        print(json.dumps(measure_one(model_name, method, float(ratio))), flush=True)
        return 0
    out = Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    doc = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python -m benchmarks.compress_time " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "load_before": [round(x, 2) for x in os.getloadavg()], "rows": []}
    todo = [] if args.ladder_only else [(m, meth.partition(":")[2] or meth, r) for m in args.models
                                        for r in MODEL_BUDGETS[m] for meth in args.methods
                                        if ":" not in meth or meth.partition(":")[0] == m]
    if not args.no_ladder:
        todo += [(m, meth, LADDER_BUDGET) for m in args.ladder for meth in args.ladder_methods]
    for model_name, method, ratio in todo:
        row = _child(model_name, method, ratio, args.timeout)
        row["run"] = doc["date"]
        doc["rows"].append(row)
        print(f"{model_name:16s} {method:13s} 1/{round(1 / ratio):<3d} "
              + (f"{row['seconds']:8.1f} s" if row.get("seconds") is not None else f"  error: {row.get('error')}")
              + (f"  peak RSS {row['peak_rss_mb']:.0f} MB" if row.get("peak_rss_mb") else ""), flush=True)
        _write(out, old, doc, final=False)  # after every row: a long run that stops keeps what it measured
    merged = _write(out, old, doc, final=True)
    print(render(merged))
    return 0


def _write(out: Path, old: dict, doc: dict, final: bool) -> dict:
    """This run's rows merged with the earlier rows it did not measure, written as .json, .md and .png.
    Before the run ends (final False) the run says so, with how many rows it has measured."""
    doc = {**doc, "load_after": [round(x, 2) for x in os.getloadavg()]}
    measured = {(r["model"], r["method"], r["ratio"]) for r in doc["rows"]}
    kept = [r for r in old.get("rows", []) if (r["model"], r["method"], r["ratio"]) not in measured]
    rows = kept + doc["rows"]
    this_run = {k: doc[k] for k in ("date", "command", "machine", "load_before", "load_after")}
    if not final:
        this_run["partial"] = f"in progress: {len(doc['rows'])} row(s) measured so far"
    runs = {r["date"]: r for r in old.get("runs", [])}
    runs[doc["date"]] = this_run
    used = {r.get("run") for r in rows}
    merged = {**doc, "rows": sorted(rows, key=lambda r: (r["model"] in LADDER, r["model"], r["method"], -r["ratio"])),
              "runs": [runs[d] for d in sorted(runs) if d in used]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(render(merged))
    plot(merged, out.with_suffix(".png"))
    return merged


if __name__ == "__main__":
    raise SystemExit(main())
