"""Which layers of EfficientNet-Lite2 break under rtn: agreement with the original when only one
kind of layer (depthwise, 1x1 expansion, 1x1 projection, stem/head, classifier) is quantised with
`rtn` at the ratio (its per-layer lowest-error setting, `best_rtn`) and every other layer stays
float32. Metrics as in accuracy.py's effnet_lite2 task, on every second crop (28) for speed.

    python benchmarks/imagenet_sensitivity.py --ratios 0.25 0.125 --threads 1

Writes benchmarks/results/imagenet_sensitivity.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import imagenet  # noqa: E402
from riem_compiler.methods import decode  # noqa: E402
from riem_compiler.methods.rtn import METHOD as RTN, best_rtn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("depthwise", "expand", "project", "stem/head", "classifier")


def kind(name: str) -> str:
    if name.startswith("_fc"):
        return "classifier"
    for k in ("depthwise", "expand", "project"):
        if f"_{k}_conv" in name:
            return k
    return "stem/head"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.125])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-weight-size", type=int, default=1024, help="as rc.Config: smaller layers stay float")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = [round(x, 2) for x in os.getloadavg()]
    model = imagenet.load_effnet_lite2()
    x, _ = imagenet.agreement_inputs()
    x = x[::2]
    reference = imagenet.logits(model, x)
    weights = [(n, p) for n, p in model.named_parameters()
               if n.endswith("weight") and p.ndim >= 2 and p.numel() >= args.min_weight_size]
    rows = []
    for ratio in args.ratios:
        for only in KINDS:
            t0 = time.perf_counter()
            trial = copy.deepcopy(model)
            params, labels, nbytes, fp32 = dict(trial.named_parameters()), {}, 0, 0
            with torch.no_grad():
                for name, p in weights:
                    if kind(name) != only:
                        continue
                    cw = best_rtn(p.detach().numpy(), ratio)
                    params[name].copy_(torch.from_numpy(decode(cw)))
                    label = RTN.label(cw)
                    labels[label] = labels.get(label, 0) + 1
                    nbytes, fp32 = nbytes + cw.nbytes, fp32 + 4 * p.numel()
            metrics = imagenet.agreement(reference, imagenet.logits(trial, x))
            rows.append({"ratio": ratio, "quantised": only, "layers": sum(labels.values()), "settings": labels,
                         "stored_ratio": nbytes / fp32, "metrics": metrics, "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    command = "python benchmarks/imagenet_sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command, "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "threads": args.threads, "load_average_at_start": load, "crops": len(x),
            "run": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "imagenet_sensitivity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# EfficientNet-Lite2: which layers break under rtn", "",
             f"`{command}` ({meta['run']}, {meta['machine']}, {args.threads} torch thread(s), load average at start "
             f"{' '.join(map(str, load))}). Only the named kind of layer is quantised (rtn's per-layer lowest-error "
             f"setting at the ratio); every other layer stays float32. Agreement with the original on {len(x)} crops.",
             "", "| ratio | quantised | layers | settings | stored ratio | top-1 agree | top-5 agree | softmax KL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        settings = ", ".join(f"{k} x{v}" for k, v in sorted(r["settings"].items()))
        lines.append(f"| 1/{round(1 / r['ratio'])} | {r['quantised']} | {r['layers']} | {settings} | "
                     f"{r['stored_ratio']:.4f} | {m['top1_agree']:.4f} | {m['top5_agree']:.4f} | {m['kl']:.4f} |")
    (RESULTS / "imagenet_sensitivity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
