"""Latency of the TVM artifact against onnxruntime and torch eager, measured in the same run:

- untuned: TVM's stock CPU lowering (naive loops; weight transposes run on every call),
- default: this project's default CPU schedules (tvm_schedules: register-tiled matmul, fused
  epilogues, vectorised elementwise kernels, polynomial gelu/exp) and weight transposes lifted
  to load time -- what `build_tvm` does without tuning,
- tuned: default + MetaSchedule on the N heaviest tasks with a small trial budget.

All variants and both baselines are timed in interleaved rounds (the machine is shared and
noisy); each number is the median over rounds of per-round medians, and ratios are taken
against onnxruntime in the same run. Also: decode time at load against torch's reconstruction,
and decode-once vs fused for one MiniLM-size Linear layer (latency and weight memory).

    python benchmarks/tvm_latency.py --quick            # digits CNN, batch 1, no tuning
    python benchmarks/tvm_latency.py --models minilm --batches 1 --tune-trials 32 --tune-tasks 3

Writes benchmarks/results/tvm_latency[_quick].md and .json. Fit quality is not the point here:
layers are fitted with few steps (latency does not depend on the fitted values).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import riem_compiler as rc  # noqa: E402
from riem_compiler.codegen.tvm_runtime import load_tvm  # noqa: E402
from riem_compiler.passes.rewrite_torch import materialize  # noqa: E402

RESULTS = HERE / "results"


def median_seconds(fn, warmup: int = 3, min_runs: int = 10, min_time: float = 1.0) -> float:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return float(np.median(times))


def make_model(name: str, batch: int, seq_len: int):
    sys.path.insert(0, str(HERE))
    import models  # benchmarks/models.py

    if name == "digits_cnn":
        model = models.digits_cnn()
        x = models.digits_data()[2][:batch]
        if x.shape[0] < batch:
            x = x.repeat((batch + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:batch]
        return model, (x.contiguous(),)
    if name == "minilm":
        model, tok = models.load_minilm()
        return model, tuple(models.minilm_example_inputs(tok, batch=batch, seq_len=seq_len))
    raise ValueError(name)


def torch_reconstruction_seconds(result) -> float:
    """Time torch needs to decode every compressed weight (what the TVM decode replaces)."""
    from riem_compiler.methods import decode_torch

    tensors = {n: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in cw.arrays.items()}
               for n, cw in result.compressed.items()}

    def run():
        with torch.no_grad():
            for n, cw in result.compressed.items():
                decode_torch(cw, tensors[n])

    return median_seconds(run, warmup=1, min_runs=3, min_time=0.5)


VARIANTS = {  # label -> build options
    "untuned": dict(cpu_schedules=False, lift_params=False),
    "default": dict(),
    "tuned": dict(),  # + tune_trials / tune_tasks from the command line
}


def interleaved(fns: dict, rounds: int, min_time: float) -> dict[str, float]:
    """Median over `rounds` of each function's per-round median seconds; the functions take
    turns within a round so that load changes hit all of them alike."""
    per = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            per[k].append(median_seconds(fn, warmup=1, min_runs=3, min_time=min_time))
    return {k: float(np.median(v)) for k, v in per.items()}


def bench_one(name: str, batch: int, args, work: Path) -> dict:
    log = logging.getLogger("tvm_latency")
    model, inputs = make_model(name, batch, args.seq_len)
    t0 = time.perf_counter()
    res = rc.optimize(model, example_inputs=inputs, ratio=args.ratio, steps=args.fit_steps,
                      time_budget_s=args.fit_budget, quiet=True)
    fit_s = time.perf_counter() - t0
    dense = materialize(res.model).eval()
    np_inputs = [t.numpy() for t in inputs]
    with torch.no_grad():
        ref = dense(*inputs)
        ref = ref[0] if isinstance(ref, (tuple, list)) else ref
        ref = ref.numpy()
    row = {"model": name, "batch": batch, "compressed_layers": len(res.compressed), "fit_seconds": fit_s}
    row["torch_reconstruct_ms"] = 1e3 * torch_reconstruction_seconds(res)

    # onnxruntime on the materialised ONNX (what ORT ends up running after constant folding)
    import onnxruntime as ort

    onnx_path = res.export_onnx(work / f"{name}_b{batch}.onnx", materialize=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    feed = {i.name: a for i, a in zip(sess.get_inputs(), np_inputs)}

    def torch_run():
        with torch.no_grad():
            dense(*inputs)

    fns = {"ort": lambda: sess.run(None, feed), "torch": torch_run}
    for label, opts in VARIANTS.items():
        trials = args.tune_trials if label == "tuned" else 0
        if label == "tuned" and trials <= 0:
            continue
        out = work / f"{name}_b{batch}_{label}"
        t0 = time.perf_counter()
        res.build_tvm(out, target="llvm", tune_trials=trials, num_cores=args.threads,
                      tune_tasks=args.tune_tasks if trials else None, **opts)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = load_tvm(out, device="cpu")
        manifest = m.manifest
        load_s = time.perf_counter() - t0
        got = m(*np_inputs)
        got = got[0] if isinstance(got, tuple) else got
        err = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12))
        dev_inputs, _ = m._to_device(np_inputs)
        fns[f"tvm_{label}"] = (lambda mm, di: (lambda: mm.run_device(di)))(m, dev_inputs)
        row[f"tvm_{label}_build_s"] = build_s
        row[f"tvm_{label}_tuning_s"] = manifest["build"]["seconds_tuning"]
        row[f"tvm_{label}_tasks"] = manifest["build"]["tuned_tasks"]
        row[f"tvm_{label}_task_names"] = manifest["build"].get("tuned_task_names", [])
        row[f"tvm_{label}_decode_ms"] = 1e3 * m.decode_seconds
        row[f"tvm_{label}_transform_ms"] = 1e3 * getattr(m, "transform_seconds", 0.0)
        row[f"tvm_{label}_load_s"] = load_s
        row[f"tvm_{label}_max_rel_err"] = err
        log.info("%s b%d %s built in %.0fs (err %.1e)", name, batch, label, build_s, err)
    slow = "tvm_untuned" in fns and name == "minilm"
    times = interleaved(fns, rounds=args.rounds, min_time=0.05 if slow else 0.3)
    for k, v in times.items():
        row[f"{k}_ms"] = 1e3 * v
    for k in fns:
        if k.startswith("tvm_"):
            row[f"{k}_over_ort"] = times[k] / times["ort"]
            row[f"{k}_over_torch"] = times[k] / times["torch"]
    tvm_keys = [k for k in fns if k.startswith("tvm_") and k != "tvm_untuned"]
    best = min(tvm_keys, key=lambda k: times[k])
    row["tvm_best"] = best
    row["tvm_best_over_ort"] = times[best] / times["ort"]
    log.info("%s b%d: %s", name, batch, {k: round(1e3 * v, 3) for k, v in times.items()})
    return row


def fused_vs_decode(args, work: Path) -> list[dict]:
    """Where fused pays off: one MiniLM-size Linear layer (384 -> 1536), latency per call of
    decode-once vs fused, and the weight memory each needs (measured from the kernels)."""
    from riem_compiler.methods.riem import tvm as tk

    rows = []
    n_out, n_in = 1536, 384
    for batch in (1, 32):
        torch.manual_seed(0)
        lin = torch.nn.Sequential(torch.nn.Linear(n_in, n_out)).eval()
        x = torch.randn(batch, n_in)
        res = rc.optimize(lin, example_inputs=(x,), ratio=args.ratio, steps=20, time_budget_s=2, quiet=True,
                          min_weight_size=0)
        cw = next(iter(res.compressed.values()))
        row = {"shape": [n_out, n_in], "batch": batch, "q": cw.meta["q"], "m": cw.meta["m"]}
        fns = {}
        for mode in ("decode-once", "fused"):
            out = work / f"lin_{n_out}_{n_in}_{batch}_{mode}"
            res.build_tvm(out, target="llvm", mode=mode, num_cores=args.threads)
            m = load_tvm(out)
            di, _ = m._to_device([x.numpy()])
            fns[mode] = (lambda mm, d: (lambda: mm.run_device(d)))(m, di)
            if mode == "decode-once":
                row["decode_at_load_ms"] = 1e3 * m.decode_seconds
        times = interleaved(fns, rounds=args.rounds, min_time=0.2)
        for mode, t in times.items():
            row[f"{mode}_ms"] = 1e3 * t
        dense = 4 * n_out * n_in
        compact = int(cw.nbytes)
        fused_scratch = tk.scratch_bytes(tk.fused_linear_primfunc(cw, batch, "f"))
        decode_scratch = tk.scratch_bytes(tk.schedule_decode_cpu(tk.decode_primfunc(cw, "d")))
        row.update({
            "dense_weight_bytes": dense, "compact_bytes": compact,
            # decode-once keeps the dense W (compact arrays are dropped after the load-time decode);
            # its peak is at load: compact + decode intermediates (which include W itself)
            "decode_once_resident_bytes": dense, "decode_once_peak_bytes": compact + decode_scratch,
            # fused keeps the compact arrays; each call allocates the projections and a W row tile
            "fused_resident_bytes": compact, "fused_peak_bytes": compact + fused_scratch,
        })
        rows.append(row)
    return rows


def _f(r, key, fmt="{:.3f}"):
    return fmt.format(r[key]) if key in r else "-"


def write_results(rows, fused_rows, args, name: str, notes: str = "") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
            "cpu_count": os.cpu_count(), "tune_trials": args.tune_trials, "tune_tasks": args.tune_tasks,
            "rounds": args.rounds, "ratio": args.ratio, "seq_len": args.seq_len, "torch": torch.__version__,
            "load_average": os.getloadavg()[0]}
    try:
        import tvm
        import onnxruntime

        meta["tvm"], meta["onnxruntime"] = tvm.__version__, onnxruntime.__version__
    except ImportError:
        pass
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "fused": fused_rows}, indent=2) + "\n")
    lines = [f"# TVM artifact latency ({name})", "",
             "Same run, same machine (shared 2-core CPU, other jobs running: numbers are noisy). Latency in ms:"
             " median over interleaved rounds of per-round medians. x/ORT < 1 means TVM is faster than"
             " onnxruntime. untuned = stock TVM lowering; default = build_tvm without tuning;"
             " tuned = default + MetaSchedule on the heaviest tasks.", "",
             "```", json.dumps(meta), "```", "",
             "| model | batch | torch ms | ORT ms | TVM untuned ms | TVM default ms | TVM tuned ms |"
             " untuned/ORT | default/ORT | tuned/ORT | default/torch | decode at load ms | torch reconstruct ms |"
             " tuning s (tasks) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tuning = f"{r['tvm_tuned_tuning_s']:.0f} ({r['tvm_tuned_tasks']})" if "tvm_tuned_ms" in r else "-"
        decode = r.get("tvm_default_decode_ms", 0.0)
        lines.append(f"| {r['model']} | {r['batch']} | {_f(r, 'torch_ms')} | {_f(r, 'ort_ms')} | "
                     f"{_f(r, 'tvm_untuned_ms')} | {_f(r, 'tvm_default_ms')} | {_f(r, 'tvm_tuned_ms')} | "
                     f"{_f(r, 'tvm_untuned_over_ort', '{:.2f}')} | {_f(r, 'tvm_default_over_ort', '{:.2f}')} | "
                     f"{_f(r, 'tvm_tuned_over_ort', '{:.2f}')} | {_f(r, 'tvm_default_over_torch', '{:.2f}')} | "
                     f"{decode:.1f} | {r['torch_reconstruct_ms']:.1f} | {tuning} |")
    if fused_rows:
        lines += ["", "## decode-once vs fused: one MiniLM-size Linear layer (384 -> 1536), default schedules", "",
                  "Weight memory in KiB, measured from the kernels' allocations (methods/riem/tvm.scratch_bytes)."
                  " resident = kept between calls; peak = resident + transient (decode-once: at load; fused: per call).", "",
                  "| batch | q, m | decode-once ms | fused ms | fused/decode-once | decode-once resident | "
                  "decode-once peak (load) | fused resident | fused peak (per call) | decode at load ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in fused_rows:
            kib = (lambda k: f"{r[k] / 1024:.0f}")
            lines.append(f"| {r['batch']} | {r['q']}, {r['m']} | {r['decode-once_ms']:.3f} | {r['fused_ms']:.3f} | "
                         f"{r['fused_ms'] / r['decode-once_ms']:.0f}x | {kib('decode_once_resident_bytes')} | "
                         f"{kib('decode_once_peak_bytes')} | {kib('fused_resident_bytes')} | {kib('fused_peak_bytes')} | "
                         f"{r['decode_at_load_ms']:.1f} |")
    if notes:
        lines += ["", notes.strip()]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits CNN at batch 1 only, no tuning")
    p.add_argument("--models", default="digits_cnn,minilm")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--tune-trials", type=int, default=32, help="MetaSchedule trials per model/batch (0: no tuned variant)")
    p.add_argument("--tune-tasks", type=int, default=3, help="tune only this many heaviest tasks")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--name", default=None, help="results file name (default tvm_latency[_quick])")
    p.add_argument("--notes", default=None, help="markdown file appended to the results")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for torch, onnxruntime and TVM alike (1 on a shared, loaded machine: "
                        "torch with 2 spinning threads measured 130 ms for the digits CNN here)")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--fit-steps", type=int, default=50)
    p.add_argument("--fit-budget", type=float, default=3.0)
    p.add_argument("--no-fused", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("tvm", "tvm.s_tir.meta_schedule", "riem_compiler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    if args.quick:
        args.models, args.batches, args.tune_trials = "digits_cnn", "1", 0
    name = args.name or ("tvm_latency_quick" if args.quick else "tvm_latency")
    notes = Path(args.notes).read_text() if args.notes else ""
    rows = []
    with tempfile.TemporaryDirectory(prefix="tvm_latency_") as tmp:
        work = Path(tmp)
        for model_name in args.models.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                rows.append(bench_one(model_name, batch, args, work))
                write_results(rows, [], args, name, notes)  # partial results survive an interruption
        fused_rows = [] if args.no_fused or args.quick else fused_vs_decode(args, work)
    write_results(rows, fused_rows, args, name, notes)


if __name__ == "__main__":
    main()
