"""Do auto's sensitivity probes need every synthetic sample? The per-layer gains measured on the first
P samples against those on all of them (the probe in every layer: affine 3-bit min-max, groups of 64),
on the sensitivity optimize makes for each model with default settings.

    python benchmarks/probe_samples.py --models minilm effnet_lite2   # ~15 min on 2 cores

Prints per model and P: Spearman's rho of the gains against the all-sample gains, the spread of their
ratio, and the probe seconds. (Measured 2026-12-07 with 1 torch thread under load 3-4, P of 32: MiniLM
P=16 rho 0.999, ratios 0.73-1.25; P=8 0.996. EfficientNet-Lite2 P=16 0.997, 0.85-1.10; P=8 0.987; probe
time 0.40x at P=16. optimize probes on half the samples since defaults 2026-12-07.)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def gains(model_name: str, subsets: list[int]) -> dict:
    from scipy.stats import spearmanr

    from benchmarks import accuracy as acc
    from riem_compiler.api import sensitivity_settings
    from riem_compiler.config import Config
    from riem_compiler.frontend.torch_frontend import find_torch_layers
    from riem_compiler.methods.affine import fit_affine
    from riem_compiler.passes.preprocess import prepare_torch
    from riem_compiler.passes.sensitivity import TorchSensitivity

    task = acc.Task(model_name)
    cfg = Config(method="auto")
    prepared = prepare_torch(task.model, task.example_inputs, cfg)
    specs = find_torch_layers(prepared.model, cfg).layers
    settings = sensitivity_settings(cfg)
    settings.probe_samples = None  # all samples; the subsets are cut below
    sens = TorchSensitivity(prepared.model, specs, task.example_inputs, task.refine_settings({}).input_sampler,
                            settings, task.model)
    everything = (sens.probe_inputs, sens.probe_reference)
    cuts = {}
    for p in subsets:
        inputs = tuple(t[:p] for t in sens.inputs)
        with torch.no_grad():
            cuts[p] = (inputs, sens.model(*inputs))
    found = {p: [] for p in [settings.samples, *subsets]}
    seconds = dict.fromkeys(found, 0.0)
    for spec in specs:
        probe = fit_affine(spec.weight, 3, 64, spec.in_axis, "in", 0)
        for p in found:
            sens.probe_inputs, sens.probe_reference = everything if p == settings.samples else cuts[p]
            t0 = time.perf_counter()
            found[p].append(sens.calibrate(spec, probe, "affine3").gain)
            seconds[p] += time.perf_counter() - t0
    full = np.array(found[settings.samples])
    rows = []
    for p in subsets:
        g = np.array(found[p])
        ratio = g / np.where(full > 0, full, 1.0)
        rows.append({"model": model_name, "layers": len(specs), "P": p, "of": settings.samples,
                     "spearman": float(spearmanr(g, full).correlation), "ratio_min": float(ratio.min()),
                     "ratio_max": float(ratio.max()), "seconds": seconds[p], "seconds_all": seconds[settings.samples]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["minilm", "effnet_lite2"])
    ap.add_argument("--subsets", nargs="*", type=int, default=[8, 16])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| model | layers | probe samples | rho vs all | gain ratio min-max | probe s (all) |\n|---|---|---|---|---|---|")
    for name in args.models:
        for r in gains(name, args.subsets):
            print(f"| {r['model']} | {r['layers']} | {r['P']} of {r['of']} | {r['spearman']:.4f} | "
                  f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {r['seconds']:.1f} ({r['seconds_all']:.1f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
