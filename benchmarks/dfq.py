"""Effect of BatchNorm folding and the DFQ preprocessing on task accuracy (digits CNNs, data-free).

For each model, method and budget, one compression per preprocessing variant:
  none      fold_batchnorm=False (BatchNorm kept; the weights fitted are the unfolded ones)
  fold      BatchNorm folded (the default)
  fold+dead     + dead-channel handling
  fold+cle      + cross-layer equalisation
  fold+bc       + bias correction from BatchNorm statistics
  fold+cle+bc   + both
  all           fold + dead + cle + bc
Metrics: top-1 on the fixed 360-image digits test split (original 0.994 / 0.997), or for effnet_lite2
top-1 agreement with the original on 56 natural-image crops; the relative output error against the
original on those inputs, the mean relative weight error of the compressed layers
(measured on the weights that were fitted: folded or not), and the stored ratio of those layers.

    python benchmarks/dfq.py --threads 1                       # rtn, affine at 1/8 and 1/16
    python benchmarks/dfq.py --methods rtn affine rotq vq auto --budgets 0.125 0.0625 --threads 1
    python benchmarks/dfq.py --models effnet_lite2 --methods rtn affine --budgets 0.25 0.125 --threads 2

Writes benchmarks/results/dfq.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import riem_compiler as rc  # noqa: E402
from benchmarks import models as bm  # noqa: E402
from riem_compiler.metrics import model_output_error  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {  # bias correction is on by default since defaults 2026-12-07.2: off unless a variant names it
    "none": {"fold_batchnorm": False, "bias_correction": False},
    "fold": {"bias_correction": False},
    "fold+dead": {"dead_channels": True, "bias_correction": False},
    "fold+cle": {"equalize": True, "bias_correction": False},
    "fold+bc": {"bias_correction": True},
    "fold+cle+bc": {"equalize": True, "bias_correction": True},
    "all": {"dead_channels": True, "equalize": True, "bias_correction": True},
}
LOADERS = {"digits_cnn": bm.digits_cnn, "digits_resnet8": bm.digits_resnet8, "effnet_lite2": None}


class Task:
    """A model, its evaluation inputs and its metric: digits top-1 on the test split, or for
    EfficientNet-Lite2 (benchmarks/imagenet.py, from the ImageNet benchmark work) top-1 agreement
    with the original on its 56 natural-image crops (top-5 agreement and softmax KL in the JSON)."""

    def __init__(self, name: str):
        self.name = name
        if name == "effnet_lite2":
            try:
                from benchmarks import imagenet
            except ImportError as exc:
                raise SystemExit(f"effnet_lite2 needs benchmarks/imagenet.py (the ImageNet benchmark): {exc}")
            self.imagenet = imagenet
            self.model = imagenet.load_effnet_lite2()
            self.x = imagenet.agreement_inputs()[0]
            self.reference = imagenet.logits(self.model, self.x)
        else:
            self.model = LOADERS[name]()
            self.x = bm.digits_data()[2]

    def original_score(self) -> float:
        return 1.0 if self.name == "effnet_lite2" else round(bm.digits_accuracy(self.model), 4)

    def evaluate(self, model) -> dict:
        """The metric(s) and the relative output error against the original on the task's inputs."""
        if self.name != "effnet_lite2":
            return {"top1": round(bm.digits_accuracy(model), 4),
                    "output_error": round(model_output_error(self.model, model, (self.x,)), 4)}
        out = self.imagenet.logits(model, self.x)
        got = self.imagenet.agreement(self.reference, out)
        return {"top1": round(got["top1_agree"], 4), "top5": round(got["top5_agree"], 4), "kl": round(got["kl"], 4),
                "output_error": round(float((out - self.reference).norm() / self.reference.norm()), 4)}


def run_one(task: Task, method: str, budget: float, options: dict, steps: int) -> dict:
    model, x_te = task.model, task.x
    t0 = time.perf_counter()
    res = rc.optimize(model, (x_te[:4],), method=method, ratio=budget, quiet=True, cache_dir=None,
                      steps=steps, **options)
    seconds = time.perf_counter() - t0
    comp = res.report.compressed
    row = {"seconds": round(seconds, 2), "compressed_layers": len(comp), "layers": len(res.report.layers)}
    if not comp:
        return {**row, "top1": None, "output_error": None, "weight_error": None, "ratio": None}
    pre = res.report.preprocess or {}
    errors = [r.rel_error for r in comp if r.rel_error is not None]
    with torch.no_grad():
        row.update(**task.evaluate(res.model),
                   weight_error=round(float(np.mean(errors)), 4) if errors else None,
                   ratio=round(sum(r.bytes_after for r in comp) / sum(r.bytes_before for r in comp), 4),
                   folded=len(pre.get("batchnorm", {}).get("folded", [])),
                   bias_corrected=len(pre.get("bias_correction", {}).get("corrected", [])),
                   equalized_pairs=len(pre.get("equalize", {}).get("pairs", [])),
                   dead_channels=sum(len(v["channels"]) for v in pre.get("dead_channels", {}).values()))
    return row


def markdown(rows: list[dict], runs: list[dict]) -> str:
    lines = ["# BatchNorm folding and DFQ preprocessing (digits nets, EfficientNet-Lite2)", "",
             "Cells: top-1 (effnet_lite2: top-1 agreement with the original on 56 natural-image crops) / output error vs the original (relative, test split) / mean relative weight error "
             "of the compressed layers. Ratio: stored / fp32 bytes of those layers. Runs (each row's `run` in "
             "dfq.json names its run):", ""]
    for meta in sorted(runs, key=lambda m: m["date"]):
        lines.append(f"- {meta['date']}: `{meta['command']}`; {meta['machine']}, torch threads {meta['threads']}, "
                     f"load average at start {' '.join(str(x) for x in meta['load_average_at_start'])}; "
                     f"originals {', '.join(f'{k} top-1 {v}' for k, v in meta['originals'].items())}; "
                     f"RieM steps {meta['steps']}")
    lines.append("")
    variants = list(VARIANTS)
    keys = sorted({(r["model"], r["method"], r["budget"]) for r in rows}, key=lambda k: (k[0], k[1], -k[2]))
    lines += ["| model | method | budget | ratio | " + " | ".join(variants) + " |",
              "|---|---|---|---|" + "---|" * len(variants)]
    for model, method, budget in keys:
        cells, ratio = [], "-"
        for v in variants:
            r = next((r for r in rows if (r["model"], r["method"], r["budget"], r["variant"]) ==
                      (model, method, budget, v)), None)
            if r is None or r["top1"] is None:
                cells.append("no fit" if r is not None else "-")
                continue
            ratio = f"{r['ratio']:.3f}"
            werr = "-" if r["weight_error"] is None else f"{r['weight_error']:.3f}"
            cells.append(f"{r['top1']:.3f} / {r['output_error']:.3f} / {werr}")
        lines.append(f"| {model} | {method} | 1/{round(1 / budget)} | {ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["digits_cnn", "digits_resnet8"], choices=list(LOADERS))
    p.add_argument("--methods", nargs="+", default=["rtn", "affine"])
    p.add_argument("--budgets", nargs="+", type=float, default=[1 / 8, 1 / 16])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=400, help="RieM fit steps (riem, and auto's RieM candidates)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "dfq"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = {"command": "python benchmarks/dfq.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "threads": args.threads,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps, "originals": {}}
    rows = []
    for name in args.models:
        task = Task(name)
        meta["originals"][name] = task.original_score()
        for method in args.methods:
            for budget in args.budgets:
                for variant in args.variants:
                    row = {"model": name, "method": method, "budget": budget, "variant": variant,
                           **run_one(task, method, budget, VARIANTS[variant], args.steps)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    key = lambda r: (r["model"], r["method"], r["budget"], r["variant"])  # noqa: E731
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"runs": []}
    done = {key(r) for r in rows}
    run = meta["date"]
    rows = [r for r in old.get("rows", []) if key(r) not in done] + [{**r, "run": run} for r in rows]
    runs = [m for m in old.get("runs", []) if any(r.get("run") == m["date"] for r in rows)] + [meta]
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, runs))
    print(markdown(rows, runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
