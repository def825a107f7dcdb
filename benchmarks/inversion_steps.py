"""How many BatchNorm-inversion steps auto's synthetic inputs need on an ImageNet CNN.

`method="auto"` on a torch model with BatchNorm and float inputs makes its synthetic inputs by
BatchNorm inversion (passes/synthetic_inputs.py): Adam on 32 noise images (and 8 held out) so
every BatchNorm sees its running statistics, `sensitivity_inversion_steps` forward and backward
passes of the whole network. On these CPUs that is most of auto's time on MobileNetV2 and
EfficientNet-Lite2. This runs `rc.optimize(model, method="auto", ratio=...)` with default settings
except that number of steps, and reports the top-1 / top-5 agreement and KL with the original on
the bundled crops (benchmarks/imagenet.py), the seconds (total and of the sensitivity), and how
many layers got another candidate than with the default steps.

    python benchmarks/inversion_steps.py --models mobilenet_v2 --budgets 0.125 --steps 25 100

Writes benchmarks/results/inversion_steps.{md,json}; rows of (model, budget, steps) measured
before are kept unless measured again. Each row names its run and the machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_STEPS = 100


def measure(model_name: str, budget: float, steps: int) -> dict:
    import riem_compiler as rc
    from benchmarks import imagenet

    model = imagenet.VISION_MODELS[model_name].load().eval()
    crops, _ = imagenet.agreement_inputs(model_name)
    reference = imagenet.logits(model, crops)
    t0 = time.perf_counter()
    res = rc.optimize(model, example_inputs=(crops[:2],), method="auto", ratio=budget, quiet=True,
                      sensitivity_inversion_steps=steps)
    seconds = time.perf_counter() - t0
    picks = {r.name: r.reason.split(":")[1].strip() for r in res.report.layers if r.reason.startswith("auto:")}
    return {"model": model_name, "budget": budget, "steps": steps, "seconds": seconds,
            "sensitivity_seconds": res.report.auto["sensitivity"]["seconds"],
            "probes_seconds": res.report.auto["timing"].get("probes"),
            **imagenet.agreement(reference, imagenet.logits(res.model, crops)), "picks": picks}


def render(doc: dict) -> str:
    lines = ["# BatchNorm-inversion steps of auto's synthetic inputs", "",
             "`rc.optimize(model, method=\"auto\", ratio=budget, sensitivity_inversion_steps=N)`, every other "
             "setting at its default; agreement with the original on the bundled crops. Runs:", ""]
    for run in doc["runs"]:
        lines.append(f"- {run['date']}: `{run['command']}`, {run['machine']}; load average (1, 5, 15 min) "
                     f"before {run['load_before']}, after {run['load_after']}")
    lines += ["", "| model | budget | steps | top-1 agree | top-5 agree | KL | layers picked otherwise than at "
              f"{DEFAULT_STEPS} steps | seconds | sensitivity s | run |", "|---|---|---|---|---|---|---|---|---|---|"]
    default = {(r["model"], r["budget"]): r for r in doc["rows"] if r["steps"] == DEFAULT_STEPS}
    for r in doc["rows"]:
        base = default.get((r["model"], r["budget"]))
        differ = ("-" if base is None or base is r else
                  str(sum(base["picks"].get(n) != p for n, p in r["picks"].items())) + f" of {len(r['picks'])}")
        lines.append(f"| {r['model']} | 1/{round(1 / r['budget'])} | {r['steps']} | {r['top1_agree']:.3f} | "
                     f"{r['top5_agree']:.3f} | {r['kl']:.4f} | {differ} | {r['seconds']:.0f} | "
                     f"{r['sensitivity_seconds']:.0f} | {r['run']} |")
    lines += ["", "Times are of one process on a shared 2-core machine (see the load): compare within a run.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "effnet_lite2"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.125])
    ap.add_argument("--steps", nargs="+", type=int, default=[25, DEFAULT_STEPS])
    ap.add_argument("--out", default=str(RESULTS / "inversion_steps"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    run = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python benchmarks/inversion_steps.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_before": [round(x, 2) for x in os.getloadavg()]}
    rows = []
    for model_name in args.models:
        for budget in args.budgets:
            for steps in args.steps:
                row = {**measure(model_name, budget, steps), "run": run["date"]}
                rows.append(row)
                print(f"{model_name} 1/{round(1 / budget)} steps {steps}: top-1 {row['top1_agree']:.3f}, "
                      f"KL {row['kl']:.4f}, {row['seconds']:.0f} s", flush=True)
    run["load_after"] = [round(x, 2) for x in os.getloadavg()]
    done = {(r["model"], r["budget"], r["steps"]) for r in rows}
    rows = [r for r in old.get("rows", []) if (r["model"], r["budget"], r["steps"]) not in done] + rows
    rows.sort(key=lambda r: (r["model"], -r["budget"], r["steps"]))
    runs = {r["date"]: r for r in old.get("runs", [])}
    runs[run["date"]] = run
    doc = {"rows": rows, "runs": [runs[d] for d in sorted(runs) if d in {r["run"] for r in rows}]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
