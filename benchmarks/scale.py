"""Scaling the fit out: local executor vs Ray on 1 and 2 workers, and a 7B projection.

Fits the 36 linear weights of all-MiniLM-L6-v2's encoder with `compress_specs`, in the same run:
- local executor, torch pinned to 1 thread (the baseline);
- Ray with 1 worker (a local Ray instance with num_cpus=1, tasks of num_cpus=1);
- Ray with 2 workers (num_cpus=2: two 1-CPU tasks at a time).
Each configuration runs in its own child process, so the driver's peak RSS is that
configuration's alone. Reported: fitting wall time (Ray start-up excluded, shown apart), ratios
against the local run, whether every stored array equals the local run's bit for bit, the
driver's peak RSS, the per-layer fit times.

Projection to a 7B-parameter model (LLaMA-7B linear shapes: 32 blocks of 4x 4096x4096,
2x 11008x4096, 1x 4096x11008, plus a 32000x4096 head): a layer's fit costs
`steps * t_step + t_final`. A step touches a random block of at most 1024x1024 of the matrix,
so t_step is the same for every 7B layer up to the state width q; t_final (readout solve over
the whole matrix, quantisation, error check) grows with the number of weights. Both are
measured here: from single-step fits of MiniLM's shapes and, unless --quick, of one 4096x4096
matrix at 1 and 3 steps. Layers are independent: the time on N workers is the makespan of a
largest-first greedy schedule of the layer times.

This machine has no GPU: the projection is measured on one CPU thread; with --device cuda on a
GPU machine the same script measures and projects GPU workers.

Usage: python benchmarks/scale.py [--quick] [--steps 20] [--device cpu]
Writes benchmarks/results/scale.{md,json} (scale_quick.* with --quick).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
BLOCK = 1024  # FitSettings.block: rows/cols a fit step touches at most

# LLaMA-7B (6.7B parameters; 6.6B of them in these linear weights)
LLAMA7B_LAYERS = [((4096, 4096), 4 * 32), ((11008, 4096), 2 * 32), ((4096, 11008), 32), ((32000, 4096), 1)]


def minilm_specs(quick: bool):
    """LayerSpecs of the encoder's linear weights, straight from the checkpoint."""
    from safetensors.numpy import load_file

    from benchmarks.models import minilm_path
    from riem_compiler.frontend.layers import LayerSpec

    state = load_file(str(minilm_path() / "model.safetensors"))
    specs = [LayerSpec(k, "linear", np.ascontiguousarray(v, dtype=np.float32), module=k.rsplit(".", 1)[0])
             for k, v in state.items() if k.startswith("encoder.layer.") and k.endswith(".weight") and v.ndim == 2]
    if quick:
        specs = [s for s in specs if s.name.startswith("encoder.layer.0.")]
    return specs


def fit_config(args, steps: int):
    from riem_compiler.config import Config

    # no wall-clock budget: a fit cut by the clock would differ between executors
    return Config(ratio=args.ratio, steps=steps, time_budget_s=1e9, min_weight_size=0, quiet=True,
                  device=args.device, executor="ray" if args.child_executor == "ray" else "local")


def digest(cw) -> str:
    h = hashlib.sha256()
    for key in sorted(cw.arrays):
        arr = np.ascontiguousarray(cw.arrays[key])
        h.update(key.encode() + str(arr.dtype).encode() + str(arr.shape).encode() + arr.tobytes())
    return h.hexdigest()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ------------------------------------------------------------------------------------------
# children: one configuration each
# ------------------------------------------------------------------------------------------


def child_run(args) -> dict:
    import torch

    from riem_compiler.passes.compress import compress_specs
    from riem_compiler.passes.executors import LocalExecutor, RayExecutor

    specs = minilm_specs(args.quick)
    config = fit_config(args, args.steps)
    init_s = 0.0
    if args.child_executor == "local":
        executor = LocalExecutor(num_threads=1)
    else:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="ERROR")
        init_s = time.perf_counter() - t0
        executor = RayExecutor(num_cpus=1, num_gpus=1 if args.device == "cuda" else 0)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    compressed, records = compress_specs(specs, config, executor)
    wall = time.perf_counter() - t0
    if args.child_executor == "ray":
        import ray

        ray.shutdown()
    return {
        "executor": args.child_executor, "workers": args.workers, "torch_threads": 1,
        "wall_s": wall, "ray_init_s": init_s, "peak_rss_mb_before_fit": rss_before, "peak_rss_mb": peak_rss_mb(),
        "layers": [{"name": r.name, "shape": list(r.shape), "status": r.status, "seconds": r.fit_seconds,
                    "rel_error": r.rel_error, "q": r.settings.get("q")} for r in records],
        "digests": {name: digest(cw) for name, cw in compressed.items()},
        "torch_version": torch.__version__,
    }


def timed_fit(shape, steps: int, args, seed: int = 0) -> tuple[float, int]:
    """Seconds of one fit_job on a synthetic matrix of `shape` (its values do not change the cost)."""
    from riem_compiler.frontend.layers import LayerSpec
    from riem_compiler.passes.compress import fit_job

    w = (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)
    outcome = fit_job(LayerSpec("calibration", "linear", w), fit_config(args, steps), 0)
    return outcome.seconds, outcome.settings.get("q")


def child_calibrate(args) -> dict:
    """t_final of each MiniLM shape (1-step fits) and, unless quick, t_step/t_final at 4096x4096."""
    import torch

    torch.set_num_threads(1)
    out = {"minilm_one_step": {}, "big": None}
    timed_fit((64, 64), 2, args)  # warm-up: first-call costs of torch are not the layer's
    for shape in sorted({tuple(s.shape) for s in minilm_specs(True)}):
        seconds, q = min(timed_fit(shape, 1, args) for _ in range(2))
        out["minilm_one_step"][f"{shape[0]}x{shape[1]}"] = {"seconds": seconds, "q": q}
    if not args.quick:
        t1, q = timed_fit((4096, 4096), 1, args)
        t3, _ = timed_fit((4096, 4096), 3, args)
        out["big"] = {"shape": [4096, 4096], "q": q, "one_step_s": t1, "three_steps_s": t3,
                      "t_step_s": max((t3 - t1) / 2, 0.0), "t_final_s": max(t1 - (t3 - t1) / 2, 0.0)}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_child(extra: list[str], args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, __file__, "--out", str(out), "--steps", str(args.steps), "--ratio", str(args.ratio),
               "--device", args.device] + (["--quick"] if args.quick else []) + extra
        print("  running:", " ".join(extra), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------
# projection
# ------------------------------------------------------------------------------------------


def step_work(n_out: int, n_in: int, q: int) -> float:
    """Work of one fit step up to a constant: sigmoid features over the block plus the state
    projections, both times K*m (equal for all shapes, so left out)."""
    bo, bi = min(n_out, BLOCK), min(n_in, BLOCK)
    return bo * bi + (bo + bi) * q


def schedule(times: list[float], workers: int) -> float:
    """Makespan of independent layers on `workers`, largest first to the least loaded worker."""
    loads = [0.0] * workers
    for t in sorted(times, reverse=True):
        i = loads.index(min(loads))
        loads[i] += t
    return max(loads)


def project(local: dict, calib: dict, steps_list=(1000, 5000), workers_list=(1, 8, 64, 256)) -> dict:
    """7B fitting time from the measured costs; two estimates:
    A: per-step and final costs per unit of work from MiniLM's measured per-layer times;
    B: per-step and final costs measured on one 4096x4096 layer (skipped with --quick)."""
    from riem_compiler import riem

    def q_of(shape):
        return riem.choose_size(shape[0], shape[1], 0.25, 8, "float16", 16)[0]

    # A: MiniLM. per layer: measured(S) = S * t_step + t_final, t_final from the 1-step fit
    steps = local["steps"]
    step_rates, final_rates = [], []
    for layer in local["layers"]:
        n_out, n_in = layer["shape"]
        one = calib["minilm_one_step"][f"{n_out}x{n_in}"]
        t_step = max(layer["seconds"] - one["seconds"], 0.0) / max(steps - 1, 1)
        step_rates.append(t_step / step_work(n_out, n_in, layer["q"]))
        final_rates.append(one["seconds"] / (n_out * n_in))
    rate_a = (float(np.median(step_rates)), float(np.median(final_rates)))
    estimates = {"A_from_minilm": rate_a}
    big = calib.get("big")
    if big:
        n = big["shape"][0]
        estimates["B_from_4096x4096"] = (big["t_step_s"] / step_work(n, n, big["q"]), big["t_final_s"] / (n * n))
    out = {"layers": [{"shape": list(s), "count": c, "q": q_of(s)} for s, c in LLAMA7B_LAYERS],
           "n_params": sum(s[0] * s[1] * c for s, c in LLAMA7B_LAYERS), "estimates": {}}
    for name, (step_rate, final_rate) in estimates.items():
        per_shape = {}
        for shape, count in LLAMA7B_LAYERS:
            q = q_of(shape)
            per_shape[f"{shape[0]}x{shape[1]}"] = {"t_step_s": step_rate * step_work(*shape, q),
                                                   "t_final_s": final_rate * shape[0] * shape[1]}
        rows = []
        for s in steps_list:
            times = []
            for shape, count in LLAMA7B_LAYERS:
                p = per_shape[f"{shape[0]}x{shape[1]}"]
                times += [s * p["t_step_s"] + p["t_final_s"]] * count
            rows.append({"steps": s, "hours_by_workers": {str(w): schedule(times, w) / 3600 for w in workers_list}})
        out["estimates"][name] = {"step_rate_s_per_unit": step_rate, "final_rate_s_per_weight": final_rate,
                                  "per_layer": per_shape, "rows": rows}
    return out


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def markdown(res: dict) -> str:
    runs, base = res["runs"], res["runs"][0]
    lines = [f"# Fit scaling: local vs Ray ({'quick' if res['quick'] else 'full'})", "",
             f"Model: all-MiniLM-L6-v2, {len(base['layers'])} linear weights "
             f"({sum(math.prod(l['shape']) for l in base['layers']):,} weights), ratio {res['ratio']}, "
             f"**{res['steps']} fit steps per layer** (default is 1000; fewer to keep the run short), "
             f"device {res['device']}, torch threads per fit 1.", "",
             f"Machine: {res['machine']}. {res['note']}", "",
             "| executor | workers | fit wall s | vs local | Ray start s | bit-identical to local | driver peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        same = "-" if r is base else ("yes" if r["digests"] == base["digests"] else "NO")
        lines.append(f"| {r['executor']} | {r['workers']} | {r['wall_s']:.1f} | {base['wall_s'] / r['wall_s']:.2f}x | "
                     f"{r['ray_init_s']:.1f} | {same} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Per-layer fit seconds (local run; mean over layers of that shape):", "",
              "| shape | layers | q | mean s | min s | max s |", "|---|---|---|---|---|---|"]
    by_shape: dict[str, list] = {}
    for l in base["layers"]:
        by_shape.setdefault("x".join(map(str, l["shape"])), []).append(l)
    for shape, ls in by_shape.items():
        t = [l["seconds"] for l in ls]
        lines.append(f"| {shape} | {len(ls)} | {ls[0]['q']} | {np.mean(t):.2f} | {min(t):.2f} | {max(t):.2f} |")
    proj = res["projection"]
    lines += ["", f"## Projection: 7B model ({proj['n_params'] / 1e9:.2f}B weights in "
              f"{sum(l['count'] for l in proj['layers'])} linear layers, LLaMA-7B shapes, ratio 0.25)", "",
              "Layer fit time = steps x t_step + t_final; a step works on a block of at most 1024x1024, so",
              "t_step barely grows past MiniLM sizes (only through q), t_final grows with the weight count.",
              "Wall time on N workers = greedy largest-first schedule of the independent layer fits",
              "(no time budget: Config.time_budget_s, 60 s by default, caps each layer's steps).", ""]
    calib = res["calibration"]
    if calib.get("big"):
        b = calib["big"]
        lines.append(f"Measured on one 4096x4096 layer (q={b['q']}, {res['device']}, 1 thread): 1 step {b['one_step_s']:.1f} s, "
                     f"3 steps {b['three_steps_s']:.1f} s -> t_step {b['t_step_s']:.2f} s, t_final {b['t_final_s']:.1f} s.")
        lines.append("")
    for name, est in proj["estimates"].items():
        label = {"A_from_minilm": "A: rates from MiniLM's measured per-layer times (extrapolated)",
                 "B_from_4096x4096": "B: rates from the measured 4096x4096 layer (closest to 7B shapes)"}[name]
        lines += [f"**{label}**", ""]
        lines.append("| layer shape | t_step s | t_final s |")
        lines.append("|---|---|---|")
        for shape, p in est["per_layer"].items():
            lines.append(f"| {shape} | {p['t_step_s']:.3f} | {p['t_final_s']:.1f} |")
        workers = list(est["rows"][0]["hours_by_workers"])
        lines += ["", "| steps/layer | " + " | ".join(f"{w} worker(s), h" for w in workers) + " |",
                  "|---|" + "---|" * len(workers)]
        for row in est["rows"]:
            lines.append(f"| {row['steps']} | " + " | ".join(f"{row['hours_by_workers'][w]:.1f}" for w in workers) + " |")
        lines.append("")
    lines += ["The largest layer bounds the wall time however many workers: past ~225 workers (one per layer) the",
              "32000x4096 head alone sets it. With the default Config (time_budget_s=60) each 7B layer would stop",
              "after about 60 s of steps on one CPU thread, i.e. a few tens of steps, far from converged.", "",
              "Local vs Ray with 1 worker run the same single-thread fits; their difference is per-task",
              "overhead plus the load other jobs put on the shared cores while each ran.", "",
              res["projection_note"], ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="first encoder block only, no 4096x4096 calibration")
    p.add_argument("--steps", type=int, default=None, help="fit steps per layer (default 20; 5 with --quick)")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    # internal: one configuration in a child process
    p.add_argument("--child", choices=["run", "calibrate"], help=argparse.SUPPRESS)
    p.add_argument("--child-executor", default="local", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--render", metavar="JSON", help="only re-write the markdown of a results JSON")
    args = p.parse_args()
    if args.steps is None:
        args.steps = 5 if args.quick else 20
    if args.render:  # re-write the markdown from a results JSON, without measuring again
        res = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(res))
        return
    if args.child:
        result = child_run(args) if args.child == "run" else child_calibrate(args)
        Path(args.out).write_text(json.dumps(result))
        return

    t_start = time.time()
    runs = [run_child(["--child", "run", "--child-executor", "local"], args)]
    for w in (1, 2):
        runs.append(run_child(["--child", "run", "--child-executor", "ray", "--workers", str(w)], args))
    runs[0]["steps"] = args.steps
    calib = run_child(["--child", "calibrate"], args)
    import ray
    import torch

    load = os.getloadavg()
    res = {
        "quick": args.quick, "steps": args.steps, "ratio": args.ratio, "device": args.device,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__}, ray {ray.__version__}",
        "note": (f"The 2 cores are shared with other agents' jobs (load average at the end {load[0]:.1f}, "
                 f"{load[1]:.1f}, {load[2]:.1f}): absolute times are noisy and inflated; compare the ratios, "
                 "measured back to back in this run."),
        "runs": runs, "calibration": calib, "projection": project(runs[0], calib),
        "projection_note": ("CPU numbers are one loaded CPU thread per worker. No GPU was available for this run: "
                            "for GPU workers run `python benchmarks/scale.py --device cuda` on a GPU machine "
                            "(Ray gives each task one GPU); the projection then uses GPU-measured t_step/t_final."
                            if args.device == "cpu" else "Rates measured on the GPU of this run; one GPU per worker."),
        "total_benchmark_s": time.time() - t_start,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "scale_quick" if args.quick else "scale"
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
