"""Does auto's proxy predict task quality? Rank correlation of the old and the new proxy with the
real task metrics, over many allocations of the same candidates.

For each model and budget, the layers' candidates (auto's default grid, no RieM) are made once;
then these allocations are scored:
- auto's plan with the output sensitivity (the default) and with the old weight-error proxy;
- random plans: each layer takes a random candidate whose bytes lie within [budget/1.5, 1.5 budget]
  of its fp32 bytes (so every plan has about the budget's size; what differs is where the
  bytes go, which is what the proxy must rank).

Per plan: the old proxy (size-weighted squared relative weight error), the new proxy (sum of the
candidates' predicted output errors: passes/sensitivity.py, calibrated at that budget), the
measured relative squared output error on held-out synthetic inputs, and the task metrics
(digits: top-1; MiniLM: WS353 rho and the mean cosine to the original sentence embeddings).
Spearman's rho is computed per budget between each proxy and the metric's loss (original minus
compressed), and over all budgets of a model.

    python benchmarks/auto_proxy.py                       # all three models (about 25 min on 2 cores)
    python benchmarks/auto_proxy.py --models digits_cnn --plans 6

Writes benchmarks/results/auto_proxy.{md,json} and auto_proxy.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import accuracy as acc  # noqa: E402
from riem_compiler.config import Config  # noqa: E402
from riem_compiler.frontend.torch_frontend import find_torch_layers  # noqa: E402
from riem_compiler.passes import auto  # noqa: E402
from riem_compiler.passes.rewrite_torch import apply_compressed  # noqa: E402

log = logging.getLogger("riem_compiler.benchmarks.auto_proxy")
BUDGETS = (1 / 8, 1 / 16, 1 / 32)
METRICS = {"digits_cnn": ("top1",), "digits_resnet8": ("top1",), "minilm": ("ws353", "emb_cos")}
PROXIES = ("old", "new", "measured")
PROXY_NAMES = {"old": "old: size-weighted weight error", "new": "new: predicted output error",
               "measured": "measured synthetic output error"}


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def random_plan(pools, specs, budget: float, rng: np.random.Generator) -> list[int]:
    plan = []
    for spec, pool in zip(specs, pools):
        near = [j for j, c in enumerate(pool) if budget / 1.5 <= c.nbytes / spec.fp32_bytes <= 1.5 * budget]
        if not near:  # the closest candidate in bytes
            near = [min(range(len(pool)), key=lambda j: abs(np.log(pool[j].nbytes / (budget * spec.fp32_bytes))))]
        plan.append(int(rng.choice(near)))
    return plan


def run_model(name: str, n_random: int, seed: int) -> tuple[list[dict], dict]:
    task = acc.Task(name)
    cfg = Config(quiet=True)
    det = find_torch_layers(task.model, cfg)
    specs = det.layers
    original = task.metrics(task.model)
    grid = acc.MemoGrid(auto.CandidateGrid())
    t0 = time.perf_counter()
    sens = acc.Sensitivities().get(task, specs, 0)
    sens_seconds = time.perf_counter() - t0
    size_w = auto.proxy_weights(specs, "size_weighted")
    total = sum(s.fp32_bytes for s in specs)
    rng = np.random.default_rng(seed)
    rows = []
    for budget in BUDGETS:
        pools = [auto._evaluate_candidates(spec, grid, budget)[0] for spec in specs]
        t1 = time.perf_counter()
        for spec, pool in zip(specs, pools):
            probe = auto._probe(pool, spec, budget)
            sens.calibrate(spec, probe.weight, probe.label)
        new_cost = [[sens.cost(s, c.weight, c.rel_error) for c in pool] for s, pool in zip(specs, pools)]
        calib_seconds = time.perf_counter() - t1
        plans = {}
        offered = {s.name: [c.weight for c in pool] for s, pool in zip(specs, pools)}
        for label, sensitivity in (("auto", sens), ("auto-weight", None)):
            result = auto.choose_methods_detailed(specs, budget, lambda spec, r: offered[spec.name],
                                                  sensitivity=sensitivity)
            plans[label] = [next(j for j, c in enumerate(pool) if c.weight is choice.weight)
                            for pool, choice in zip(pools, result.choices)]
        for k in range(n_random):
            plans[f"random {k}"] = random_plan(pools, specs, budget, rng)
        for label, plan in plans.items():
            picks = [pool[j] for pool, j in zip(pools, plan)]
            weights = {s.name: c.weight for s, c in zip(specs, picks) if c.nbytes < s.fp32_bytes}
            model = apply_compressed(task.model, specs, weights, det.graph_module, False)
            metrics = task.metrics(model)
            row = {"model": name, "budget": budget, "plan": label,
                   "ratio": sum(c.nbytes for c in picks) / total,
                   "old": float(sum(w * c.rel_error ** 2 for w, c in zip(size_w, picks))),
                   "new": float(sum(new_cost[i][j] for i, j in enumerate(plan))),
                   "measured": sens.plan_error(weights), "metrics": metrics,
                   "loss": {m: original[m] - metrics[m] for m in METRICS[name]},
                   "calibration_seconds": calib_seconds}
            rows.append(row)
            log.info("%s 1/%g %-12s ratio %.4f old %.4g new %.4g measured %.4g %s", name, 1 / budget, label,
                     row["ratio"], row["old"], row["new"], row["measured"],
                     {m: round(v, 4) for m, v in metrics.items()})
    return rows, {"original": original, "sensitivity_seconds": sens_seconds, "inputs": sens.input_mode,
                  "layers": len(specs)}


def correlations(rows: list[dict], name: str) -> list[dict]:
    out = []
    for budget in [*BUDGETS, None]:
        sel = [r for r in rows if r["model"] == name and (budget is None or r["budget"] == budget)]
        for metric in METRICS[name]:
            loss = [r["loss"][metric] for r in sel]
            out.append({"model": name, "budget": budget, "metric": metric, "plans": len(sel),
                        **{p: spearman([r[p] for r in sel], loss) for p in PROXIES}})
    return out


def markdown(rows, corr, meta) -> str:
    lines = ["# Does auto's proxy predict task quality?", "",
             f"Generated on {meta['machine']}; per model: "
             + "; ".join(f"{m}: `{info['command']}` (load average at start {info['load_average_at_start']})"
                         for m, info in meta["models"].items()) + ".", "",
             "Spearman's rho between each proxy and the task metric's loss (original minus compressed) over "
             "the allocations of one budget (auto's two plans and random plans of about the budget's size; see "
             "the script's docstring), and over all budgets of the model (last row per metric). 1 = the proxy "
             "ranks the plans exactly as the task metric does.", "",
             "- old = the size-weighted squared relative weight error (auto's objective before issue 15);",
             "- new = the sum of the candidates' predicted output errors (riem_compiler/passes/sensitivity.py: "
             "input second moments and a measured gain per layer, on synthetic inputs);",
             "- measured = the relative squared output error of the whole plan on held-out synthetic inputs "
             "(what auto's final check measures).", "",
             "| model | budget | metric | plans | rho old | rho new | rho measured |", "|---|---|---|---|---|---|---|"]
    for c in corr:
        budget = "all" if c["budget"] is None else acc.fmt_budget(c["budget"])
        lines.append(f"| {c['model']} | {budget} | {c['metric']} | {c['plans']} | {c['old']:.3f} | "
                     f"{c['new']:.3f} | {c['measured']:.3f} |")
    lines += ["", "## auto's plans", "", "| model | budget | plan | ratio | old | new | measured | metrics |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["plan"].startswith("auto"):
            lines.append(f"| {r['model']} | {acc.fmt_budget(r['budget'])} | {r['plan']} | {r['ratio']:.4f} | "
                         f"{r['old']:.4g} | {r['new']:.4g} | {r['measured']:.4g} | "
                         + ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items()) + " |")
    lines += ["", "Best random plan per budget, for scale:", ""]
    for (model, budget) in sorted({(r["model"], r["budget"]) for r in rows}, key=lambda x: (x[0], -x[1])):
        metric = METRICS[model][0]
        sel = [r for r in rows if r["model"] == model and r["budget"] == budget and r["plan"].startswith("random")]
        if sel:
            best = max(sel, key=lambda r: r["metrics"][metric])
            lines.append(f"- {model} {acc.fmt_budget(budget)}: best of {len(sel)} random plans {metric} "
                         f"{best['metrics'][metric]:.4f} (ratio {best['ratio']:.4f})")
    lines += ["", "Per model: " + "; ".join(f"{m}: {info['layers']} layers, synthetic inputs {info['inputs']}, "
                                            f"sensitivity {info['sensitivity_seconds']:.1f} s"
                                            for m, info in meta["models"].items()), "",
              "![scatter](auto_proxy.png)", ""]
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 3, figsize=(13, 3.6 * len(models)), squeeze=False)
    colours = {b: c for b, c in zip(BUDGETS, ("tab:blue", "tab:orange", "tab:red"))}
    for i, model in enumerate(models):
        metric = METRICS[model][0]
        for k, proxy in enumerate(PROXIES):
            ax = axes[i][k]
            for budget in BUDGETS:
                sel = [r for r in rows if r["model"] == model and r["budget"] == budget]
                ax.scatter([max(r[proxy], 1e-9) for r in sel], [r["metrics"][metric] for r in sel], s=14,
                           color=colours[budget], label=f"budget {acc.fmt_budget(budget)}")
                for r in sel:
                    if r["plan"].startswith("auto"):
                        ax.annotate(r["plan"], (max(r[proxy], 1e-9), r["metrics"][metric]), fontsize=6)
            ax.set_xscale("log")
            ax.set_xlabel(PROXY_NAMES[proxy])
            ax.set_ylabel(f"{model} {metric}")
            if i == 0 and k == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(METRICS), choices=list(METRICS))
    ap.add_argument("--plans", type=int, default=12, help="random plans per budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(acc.RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("riem_compiler").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    meta = {"command": "python benchmarks/auto_proxy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M"), "models": {}}
    rows, corr = [], []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "auto_proxy.json"
    if previous.exists():  # models not run this time keep their rows (each model names its command)
        old = json.loads(previous.read_text())
        rows = [r for r in old["rows"] if r["model"] not in args.models]
        corr = [c for c in old["correlations"] if c["model"] not in args.models]
        meta["models"] = {m: info for m, info in old["meta"]["models"].items() if m not in args.models}
        for info in meta["models"].values():  # files from before per-model commands: the run's own
            info.setdefault("command", old["meta"]["command"])
            info.setdefault("load_average_at_start", old["meta"]["load_average_at_start"])
    for name in args.models:  # written after each model: a long run keeps what it finished
        model_rows, info = run_model(name, args.plans, args.seed)
        rows += model_rows
        meta["models"][name] = {**info, "command": meta["command"], "load_average_at_start": meta["load_average_at_start"]}
        corr += correlations(rows, name)
        (out / "auto_proxy.json").write_text(json.dumps({"meta": meta, "correlations": corr, "rows": rows},
                                                        indent=1) + "\n")
        (out / "auto_proxy.md").write_text(markdown(rows, corr, meta))
        plot(rows, out / "auto_proxy.png")
    print((out / "auto_proxy.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
