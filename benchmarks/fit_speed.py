"""Steps per second of the RieM fitting step, before and after the fused loss, in one run.

Same layer, same shapes, same process: the autograd form (`_features` materialises K sigmoid
tensors of N_out x N_in x m and autograd keeps them) against the fused custom autograd function
(fit._FusedLoss: only Phi is kept, branch sigmoids recomputed in row chunks), on the full matrix
and on the random row/column blocks the fit samples (FitSettings.block). Timings are the median of
interleaved repeats (the machine is shared; the median resists other jobs better than the mean).

    python benchmarks/fit_speed.py                      # MiniLM layer-0 query and intermediate at 1/4
    python benchmarks/fit_speed.py --threads 1 --repeats 5

Writes benchmarks/results/fit_speed.md and .json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from riem_compiler import riem  # noqa: E402
from riem_compiler.methods.riem import fit as F  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def make_params(n_out, n_in, q, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n_out, q, generator=g) * 3 / math.sqrt(q)).requires_grad_()
    b = (torch.randn(n_in, q, generator=g) * 3 / math.sqrt(q)).requires_grad_()
    U = (torch.randn(riem.K_BRANCHES, m, q, generator=g) / math.sqrt(q)).requires_grad_()
    beta = torch.zeros(riem.K_BRANCHES, m).requires_grad_()
    return [a, b, U, beta]


def autograd_step(params, W):
    """The step as fit.py did it before the fused loss (reference)."""
    a, b, U, beta = params
    phi = F._features(a, b, U, beta)
    with torch.no_grad():
        v, c = F._solve_readout(phi.detach(), W)
    loss = ((F._readout(phi, v, c) - W) ** 2).mean()
    loss.backward()


def fused_step(params, W):
    F._FusedLoss.apply(*F.branch_inputs(*params), W).backward()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7, help="timed steps per variant (interleaved)")
    p.add_argument("--out", default=str(RESULTS / "fit_speed"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    block = F.FitSettings().block
    layers = []
    for name, (n_out, n_in) in (("minilm.0.attention.self.query", (384, 384)),
                                ("minilm.0.intermediate.dense", (1536, 384))):
        cand = riem.size_candidates(n_out, n_in, 0.25, (8,), "float16")[0]
        q, m = cand[0], cand[1]
        shapes = {"full": (n_out, n_in), f"block {block}": (min(n_out, block), min(n_in, block))}
        layers.append((name, q, m, shapes))
    rows = []
    load0 = os.getloadavg()[0]
    for name, q, m, shapes in layers:
        for label, (r, c) in shapes.items():
            if label != "full" and (r, c) == shapes["full"]:
                continue
            W = torch.randn(r, c, generator=torch.Generator().manual_seed(1))
            params = make_params(r, c, q, m)
            variants = {"autograd": autograd_step, "fused": fused_step}
            times = {k: [] for k in variants}
            for fn in variants.values():  # warm-up
                fn(params, W)
            for _ in range(args.repeats):
                for k, fn in variants.items():
                    for t in params:
                        t.grad = None
                    t0 = time.perf_counter()
                    fn(params, W)
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"layer": name, "rows x cols": f"{r}x{c}", "sampled": label, "q": q, "m": m,
                   "autograd_steps_s": 1 / med["autograd"], "fused_steps_s": 1 / med["fused"],
                   "speedup": med["autograd"] / med["fused"]}
            print(row, flush=True)
            rows.append(row)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "threads": args.threads, "repeats": args.repeats, "load_avg_start": load0,
            "load_avg_end": os.getloadavg()[0], "torch": torch.__version__,
            "command": "python benchmarks/fit_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# RieM fitting step: steps per second, autograd form vs fused loss", "",
             f"Run {meta['date']}, {meta['machine']}, torch {meta['torch']}, {args.threads} torch thread(s), "
             f"median of {args.repeats} interleaved steps, load average {load0:.1f} -> {meta['load_avg_end']:.1f} "
             f"(shared machine). Command: `{meta['command'].strip()}`. Shapes: (q, m) of the search's first "
             "candidate at 1/4, 8-bit states.", "",
             "| layer | step on | q | m | autograd steps/s | fused steps/s | speedup |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['sampled']} ({r['rows x cols']}) | {r['q']} | {r['m']} | "
                     f"{r['autograd_steps_s']:.2f} | {r['fused_steps_s']:.2f} | {r['speedup']:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
