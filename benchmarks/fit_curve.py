"""RieM error against fitting steps on real layers (the curve the default `steps` is chosen from).

Fits all-MiniLM-L6-v2 layer-0 matrices at one budget, 8-bit states, with the shape the sizing
search tries first (riem.size_candidates) and optionally the next wider one, for each step count.
Each fit is a full fit of that many steps (the one-cycle schedule scales with the steps), so every
point is what `steps=N` gives. SVD with int8 factors at the same bytes is the reference line.

    python benchmarks/fit_curve.py --steps 1000 3000 10000 --kinds attention.self.query
    python benchmarks/fit_curve.py --steps 1000 3000 --kinds intermediate.dense --append

Writes benchmarks/results/fit_curve.md and .json (after every fit, so a stopped run keeps its points).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fit_fidelity import minilm_weights, rel_err  # noqa: E402
from riem_compiler import riem  # noqa: E402
from riem_compiler.methods import decode, svd  # noqa: E402
from riem_compiler.methods.riem.fit import FitSettings, fit_riem  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def markdown(rows, meta) -> str:
    lines = ["# RieM error vs fitting steps", "",
             f"Budget 1/{round(1 / meta['budget'])} of fp32 bytes, 8-bit states, float16 metric net, seed 0, "
             f"block {meta['block']} (rows/cols sampled per step), {meta['threads']} torch thread(s), "
             f"{meta['machine']}. Machine shared with other jobs: seconds are upper bounds. Commands: "
             + "; ".join(f"`{c}`" for c in meta["commands"]) + ".", meta.get("note", ""), "",
             "| layer | shape | q | m | steps | rel. error | SVD-int8 error | RieM / SVD-int8 | fit s | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape']} | {r['q']} | {r['m']} | {r['steps']} | {r['rel_error']:.4f} | "
                     f"{r['svd_int8']:.4f} | {r['rel_error'] / r['svd_int8']:.2f} | {r['fit_s']:.0f} | "
                     f"{r['load']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=["attention.self.query", "intermediate.dense"])
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 3000, 10000])
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--wider", action="store_true", help="also the search's wider candidate (m x 1.3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--append", action="store_true")
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(RESULTS / "fit_curve"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    command = "python benchmarks/fit_curve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, commands = [], []
    if args.append and out.with_suffix(".json").is_file():
        prev = json.loads(out.with_suffix(".json").read_text())
        rows, commands = prev["rows"], prev["meta"]["commands"]
    meta = {"budget": args.budget, "block": FitSettings().block, "threads": args.threads,
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
            "commands": commands + [command.strip()], "note": args.note}
    for kind in args.kinds:
        w = minilm_weights([0], [kind])[f"minilm.0.{kind}"]
        n_out, n_in = w.shape
        svd_err = rel_err(w, decode(svd.fit_svd(w, args.budget, 8)))
        shapes = riem.size_candidates(n_out, n_in, args.budget, (8,), "float16")[: 2 if args.wider else 1]
        for steps in args.steps:
            for q, m, bits in shapes:
                res = fit_riem(w, q, m, bits, "float16", FitSettings(steps=steps, seed=0))
                row = {"layer": f"minilm.0.{kind}", "shape": f"{n_out}x{n_in}", "q": q, "m": m, "steps": steps,
                       "rel_error": res.rel_error, "svd_int8": svd_err, "fit_s": res.seconds,
                       "load": os.getloadavg()[0], "ratio": res.weight.nbytes / w.nbytes}
                print(row, flush=True)
                rows.append(row)
                out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
                out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
