"""The default ONNX form (`onnx_format="auto"`, issue 23 item 5) against the old default ("functions"),
"ort" and the dense model, in one run:

1. stock onnxruntime on the 4x2048^2 MatMul MLP (benchmarks/onnx_forms.py's model at 2048), rtn at
   each of --runtime-ratios (0.15: the issue's test; 0.25): file bytes, resident memory added by
   creating the session (VmRSS after - before, fresh process, default session options, 2 intra-op
   threads), session creation, latency at batch 1 and 32, output error against dense. Each file is
   measured by `benchmarks/onnx_forms.py --measure`.
2. the accuracy effect of rtn's native-first choice. "functions" and "auto" give rtn's lowest-error
   setting among all widths 2-8 ("auto" writes it natively where it maps: 4/8-bit codes, groups along
   the input axis, which is the reduction axis of the MatMul and what MatMulNBits blocks); "ort" (and
   "standard") make rtn take the lowest-error setting among the 8/4-bit ones those forms write, all
   widths only where none fits. Per ratio: the settings, mean relative weight error and output error
   on the MLP, and the digits nets' top-1 on the 360 test images, both in torch (the decoded weights)
   and through onnxruntime on the exported file (MatMulNBits multiplies int8-quantised activations,
   accuracy level 4).

Usage: python benchmarks/onnx_default.py [--ratios 0.25 0.2 0.15 0.125] [--runtime-ratios 0.15 0.25]
       [--mlp-size 2048] [--runs 20] [--repeats 3] [--out PREFIX]
Writes benchmarks/results/onnx_default.{md,json} (or PREFIX.{md,json}).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from benchmarks.onnx_forms import mlp  # noqa: E402  (onnx_forms.py's MLP at the chosen width)
FORMS = ("functions", "auto", "ort")
FORMS_SCRIPT = ROOT / "benchmarks" / "onnx_forms.py"


def labels(res) -> str:
    """The settings rtn chose, counted: e.g. "rtn4/g32 x4"."""
    from riem_compiler import methods

    counts = Counter(methods.get(cw.method).label(cw) for cw in res.compressed.values())
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def forms_of(res) -> str:
    counts = Counter(str(r.settings.get("onnx_form", "functions")) for r in res.report.compressed)
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def mean_error(res) -> float:
    errs = [r.rel_error for r in res.report.compressed if r.rel_error is not None]
    return float(np.mean(errs)) if errs else float("nan")


def runtime_rows(args, tmp: Path) -> list[dict]:
    """Part 1: dense and, per ratio, the functions / auto / ort files of the MLP in stock onnxruntime."""
    import riem_compiler as rc
    from riem_compiler.codegen.onnx_export import save_onnx

    model, feeds = mlp(args.mlp_size)
    feeds_path = tmp / "mlp.feeds.npz"
    np.savez(feeds_path, **feeds)
    files = [("dense", None, save_onnx(model, tmp / "mlp.dense.onnx"), {})]
    for ratio in args.runtime_ratios:
        for form in FORMS:
            res = rc.optimize(model, method="rtn", ratio=ratio, quiet=True, cache_dir=None, onnx_format=form)
            info = {"settings": labels(res), "layer_forms": forms_of(res), "mean_weight_error": mean_error(res)}
            files.append((form, ratio, res.export_onnx(tmp / f"mlp.{ratio}.{form}.onnx"), info))
    rows, dense_out = [], None
    for form, ratio, path, info in files:
        done = subprocess.run([sys.executable, str(FORMS_SCRIPT), "--measure", str(path), str(feeds_path),
                               str(args.runs), str(args.repeats), "0"], capture_output=True, text=True, check=True)
        m = json.loads(done.stdout.strip().splitlines()[-1])
        out = dict(np.load(str(path) + ".out.npz"))
        dense_out = out if dense_out is None else dense_out
        err = {b: float(np.linalg.norm(out[b] - dense_out[b]) / np.linalg.norm(dense_out[b])) for b in out}
        row = {"form": form, "ratio": ratio, "file_bytes": Path(path).stat().st_size, **m, "output_rel_error": err,
               **info}
        rows.append(row)
        print(f"mlp{args.mlp_size} {form:9s} {ratio} file {row['file_bytes'] / 2 ** 20:6.1f} MiB  "
              f"rss +{m['rss_mib']:6.1f} MiB  session {m['session_s']:.3f} s  latency {m['latency_ms']}  err {err}  "
              f"{info}", flush=True)
    return rows


def mlp_accuracy_rows(args) -> list[dict]:
    """Part 2a: rtn's choice under each form on the MLP weights: weight and output error (float64 numpy)."""
    import riem_compiler as rc
    from riem_compiler import methods

    model, feeds = mlp(args.mlp_size)
    weights = {t.name: np.frombuffer(t.raw_data, dtype=np.float32).reshape(tuple(t.dims))
               for t in model.graph.initializer}
    x = feeds["X@32"].astype(np.float64)

    def forward(ws):
        h = x
        for i in range(len(ws)):
            h = h @ ws[f"W{i}"].astype(np.float64)
            if i < len(ws) - 1:
                h = np.maximum(h, 0)
        return h

    dense = forward(weights)
    rows = []
    for ratio in args.ratios:
        for form in FORMS:
            res = rc.optimize(model, method="rtn", ratio=ratio, quiet=True, cache_dir=None, onnx_format=form)
            decoded = {**weights, **{n: methods.decode(cw) for n, cw in res.compressed.items()}}
            out = forward(decoded)
            rows.append({"model": f"mlp{args.mlp_size}", "ratio": ratio, "form": form, "settings": labels(res),
                         "layer_forms": forms_of(res), "stored_ratio": res.report.totals()["ratio"],
                         "mean_weight_error": mean_error(res),
                         "output_rel_error": float(np.linalg.norm(out - dense) / np.linalg.norm(dense))})
            print(rows[-1], flush=True)
    return rows


def digits_rows(args, tmp: Path) -> list[dict]:
    """Part 2b: digits nets' top-1 (torch on the decoded weights, and onnxruntime on the exported file)."""
    import torch

    import riem_compiler as rc
    from benchmarks import models

    _, _, x_te, y_te = models.digits_data()
    rows = []
    for name in models.DIGITS_MODELS:
        net = models._load_or_train(name, True)
        base = models.digits_accuracy(net)
        for ratio in args.ratios:
            for form in FORMS:
                res = rc.optimize(net, (x_te,), method="rtn", ratio=ratio, quiet=True, cache_dir=None,
                                  onnx_format=form)
                top1 = models.digits_accuracy(res.model)
                path = res.export_onnx(tmp / f"{name}.{ratio}.{form}.onnx")
                logits = rc.load(path)(x_te.numpy())
                ort_top1 = float((torch.from_numpy(np.asarray(logits)).argmax(1) == y_te).float().mean())
                rows.append({"model": name, "ratio": ratio, "form": form, "settings": labels(res),
                             "layer_forms": forms_of(res), "stored_ratio": res.report.totals()["ratio"],
                             "mean_weight_error": mean_error(res), "top1_torch": top1, "top1_onnxruntime": ort_top1,
                             "top1_original": base})
                print(rows[-1], flush=True)
    return rows


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = ["# The default ONNX form (`auto`) vs the old default (`functions`) and dense", "",
             f"Run {meta['date']} on {meta['machine']}; command `{meta['command']}`; load average "
             f"{meta['load_start']} at start, {meta['load_end']} at the end (2 cores shared with other jobs: the "
             "timings move with the load, the memory and accuracy numbers do not).", "",
             f"## Stock onnxruntime on the 4x{meta['mlp_size']}^2 MLP, rtn", "",
             "Each file in a fresh process (`benchmarks/onnx_forms.py --measure`), default session options, 2 "
             "intra-op threads; medians.", "",
             "| ratio | form | rtn settings | layer forms | file MiB | RSS added MiB | session s | latency ms (batch) | "
             "rel. output error vs dense |", "|---|---|---|---|---|---|---|---|---|"]
    rt = data["runtime"]
    for r in rt:
        lat = ", ".join(f"{v:.2f} (b{k})" for k, v in r["latency_ms"].items())
        err = ", ".join(f"{v:.3g} (b{k})" for k, v in r["output_rel_error"].items())
        lines.append(f"| {'-' if r['ratio'] is None else r['ratio']} | {r['form']} | {r.get('settings', '-')} | "
                     f"{r.get('layer_forms', '-')} | "
                     f"{r['file_bytes'] / 2 ** 20:.1f} | {r['rss_mib']:.1f} | {r['session_s']:.3f} | {lat} | {err} |")
    d = next(r for r in rt if r["form"] == "dense")
    lines += ["", "Against dense in the same run:", ""]
    for r in (r for r in rt if r["form"] != "dense"):
        lat = ", ".join(f"b{k} {v / d['latency_ms'][k]:.2f}x" for k, v in r["latency_ms"].items())
        lines.append(f"- {r['ratio']} {r['form']}: resident memory {r['rss_mib'] / d['rss_mib']:.2f}x, session "
                     f"{r['session_s'] / d['session_s']:.2f}x, latency {lat}, file {r['file_bytes'] / d['file_bytes']:.3f}x")
    lines += ["", "## Accuracy effect of rtn's native-first choice", "",
              "`functions` (the old default) and `auto` (the new one): the lowest-error rtn setting of all widths 2-8 "
              "that fits the ratio, `auto` writing it natively where it maps; `ort`: the lowest-error among the "
              "8/4-bit settings (groups along the input axis, the reduction axis) the native forms take, all widths "
              "only where none fits.", "",
              f"MLP 4x{meta['mlp_size']}^2 (random Gaussian weights; output error in float64 on 32 random inputs):", "",
              "| ratio | form | rtn settings | layer forms | stored ratio | mean weight rel. error | output rel. error |",
              "|---|---|---|---|---|---|---|"]
    for r in data["mlp_accuracy"]:
        lines.append(f"| {r['ratio']:g} | {r['form']} | {r['settings']} | {r['layer_forms']} | {r['stored_ratio']:.4f} | "
                     f"{r['mean_weight_error']:.4f} | {r['output_rel_error']:.4f} |")
    lines += ["", "Digits nets (360 test images; top-1 in torch with the decoded weights, and through onnxruntime "
              "on the file `export_onnx` writes in that form):", "",
              "| model | original top-1 | ratio | form | rtn settings | layer forms | stored ratio | mean weight rel. error "
              "| top-1 torch | top-1 onnxruntime |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["digits"]:
        lines.append(f"| {r['model']} | {r['top1_original']:.4f} | {r['ratio']:g} | {r['form']} | {r['settings']} | "
                     f"{r['layer_forms']} | {r['stored_ratio']:.4f} | {r['mean_weight_error']:.4f} | "
                     f"{r['top1_torch']:.4f} | {r['top1_onnxruntime']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.2, 0.15, 0.125])
    p.add_argument("--runtime-ratios", type=float, nargs="+", default=[0.15, 0.25])
    p.add_argument("--mlp-size", type=int, default=2048)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "onnx_default"))
    args = p.parse_args()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": " ".join(["python", "benchmarks/onnx_default.py", *sys.argv[1:]]),
            "load_start": " ".join(f"{x:.1f}" for x in os.getloadavg()), "mlp_size": args.mlp_size}
    with tempfile.TemporaryDirectory() as tmp:
        data = {"meta": meta, "runtime": runtime_rows(args, Path(tmp)), "mlp_accuracy": mlp_accuracy_rows(args),
                "digits": digits_rows(args, Path(tmp))}
    meta["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
