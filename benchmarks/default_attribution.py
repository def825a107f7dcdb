"""Which of the 2026-12-07 defaults moved auto's accuracy on an ImageNet CNN: auto at one budget with
every default, with one change reverted at a time, and with both reverted.

The 2026-12-07 defaults: BatchNorm inversion at 25 steps (was 100), auto's affine candidates at 15
half-quadratic iterations (was 30), the sensitivity probes on the first half of the samples (were all).
The reverts here are auto's affine iterations at 30 ("affine30") and probes on every sample
("probe_all"); the inversion steps are measured by benchmarks/inversion_steps.py.

    python benchmarks/default_attribution.py --model mobilenet_v2 --budget 0.125   # ~10 min on 2 cores

Prints one line per variant (top-1 / top-5 agreement and KL against the original on the bundled crops,
seconds); the measured numbers are in benchmarks/results/imagenet.json's notes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("default", "affine30", "probe_all", "both_old")


def run(variant: str, model_name: str, budget: float) -> dict:
    import riem_compiler as rc
    import riem_compiler.api as api
    import riem_compiler.methods.affine as affine
    from benchmarks import imagenet

    saved = affine.AUTO_ITERATIONS, api.sensitivity_settings
    if variant in ("affine30", "both_old"):
        affine.AUTO_ITERATIONS = 30
    if variant in ("probe_all", "both_old"):
        def all_samples(cfg, make=saved[1]):
            settings = make(cfg)
            settings.probe_samples = None
            return settings

        api.sensitivity_settings = all_samples
    try:
        model = imagenet.VISION_MODELS[model_name].load().eval()
        crops, _ = imagenet.agreement_inputs(model_name)
        reference = imagenet.logits(model, crops)
        t0 = time.perf_counter()
        res = rc.optimize(model, example_inputs=(crops[:2],), method="auto", ratio=budget, quiet=True)
        seconds = time.perf_counter() - t0
        return {"variant": variant, **imagenet.agreement(reference, imagenet.logits(res.model, crops)),
                "seconds": round(seconds, 1)}
    finally:
        affine.AUTO_ITERATIONS, api.sensitivity_settings = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--budget", type=float, default=0.125)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| variant | top-1 agree | top-5 agree | KL | seconds |\n|---|---|---|---|---|")
    for variant in args.variants:
        r = run(variant, args.model, args.budget)
        print(f"| {variant} | {r['top1_agree']:.3f} | {r['top5_agree']:.3f} | {r['kl']:.4f} | {r['seconds']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
