"""The RieM hybrid (riemq = RieM + affine-quantised residual) against its parts and the other
quantisers at equal bytes, on real weights: all-MiniLM-L6-v2 layer-0 query (384x384) and
intermediate (1536x384). Relative Frobenius error of what is stored, stored bytes, fit seconds.

    python benchmarks/hybrid_fidelity.py                 # the committed table (RieM: 500 steps, 1 thread)
    python benchmarks/hybrid_fidelity.py --steps 100     # quicker, worse RieM fits

Writes benchmarks/results/hybrid_fidelity.{md,json}.
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
from benchmarks.models import minilm_path  # noqa: E402
from riem_compiler import methods  # noqa: E402
from riem_compiler.frontend.layers import LayerSpec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = ("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight")
RATIOS = (1 / 8, 1 / 16, 1 / 24, 1 / 32)
METHODS = ("rtn", "affine", "rotq", "vq", "riem", "riemq")
SLOW = ("riem", "riemq")  # RieM fits: only where RieM is meant to pay off (1/16 and below) plus 1/8 for riemq


def run(steps: int, shares: tuple[float, ...]) -> list[dict]:
    from safetensors.numpy import load_file

    tensors = load_file(str(minilm_path() / "model.safetensors"))
    rows = []
    for key in LAYERS:
        spec = LayerSpec(key, "linear", tensors[key].astype(np.float32))
        for ratio in RATIOS:
            for name in METHODS:
                variants = [{}] if name != "riemq" else [{"riem_share": s} for s in shares]
                if name == "riem" and ratio > 1 / 16:
                    continue
                for extra in variants:
                    options = {"riem": {"sizing": "balanced"}, "riemq": extra}
                    method = methods.get(name)
                    settings = method.settings(rc.Config(steps=steps, seed=0, method_options=options))
                    row = {"layer": key, "ratio": ratio, "method": name, **extra}
                    t0 = time.perf_counter()
                    try:
                        fitted = method.fit(spec, ratio, settings)
                    except ValueError as exc:
                        row["error"] = str(exc).splitlines()[0][:120]
                    else:
                        row.update(rel_error=fitted.rel_error, bytes=fitted.weight.nbytes,
                                   label=method.label(fitted.weight))
                    row["seconds"] = time.perf_counter() - t0
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# RieM hybrid (riemq) vs its parts and the quantisers, equal bytes", "",
             f"Run {meta['run']} on {meta['machine']}; command `{meta['command']}`; load average at start "
             f"{meta['load']}. RieM: {meta['steps']} steps, balanced sizing, 8-bit states, 1 torch thread. "
             "riemq = RieM fit of W at least `riem_share` of the budget + affine quantisation of the residual with "
             "the rest. Cells: relative Frobenius error (stored bytes); best of the row in bold; "
             "'-' = cannot meet the budget; blank = not run (RieM alone only at 1/16 and below).", ""]
    header = ["layer", "budget"] + [m if m != "riemq" else f"riemq share {s}" for m in METHODS
                                    for s in (meta["shares"] if m == "riemq" else [None])]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in LAYERS:
        for ratio in RATIOS:
            cells, errs = [], []
            for m in METHODS:
                for s in (meta["shares"] if m == "riemq" else [None]):
                    r = next((r for r in rows if r["layer"] == key and r["ratio"] == ratio and r["method"] == m
                              and r.get("riem_share") == s), None)
                    cells.append(r)
                    if r is not None and "rel_error" in r:
                        errs.append(r["rel_error"])
            best = min(errs) if errs else None
            text = []
            for r in cells:
                if r is None:
                    text.append("")
                elif "rel_error" not in r:
                    text.append("-")
                else:
                    cell = f"{r['rel_error']:.3f} ({r['bytes']})"
                    text.append(f"**{cell}**" if r["rel_error"] == best else cell)
            lines.append(f"| {key.split('.')[-3]}.{key.split('.')[-2]} | 1/{round(1 / ratio)} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.5])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    meta = {"run": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": "python benchmarks/hybrid_fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg()), "steps": args.steps, "shares": args.shares}
    rows = run(args.steps, tuple(args.shares))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hybrid_fidelity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "hybrid_fidelity.md").write_text(markdown(rows, meta))
    print((out / "hybrid_fidelity.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
