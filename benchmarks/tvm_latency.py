"""Latency of the TVM artifact (untuned and MetaSchedule-tuned) against onnxruntime and torch
eager, measured in the same run on the same machine; plus decode time at load against torch's
reconstruction, and tuning time.

    python benchmarks/tvm_latency.py --quick            # digits CNN, batch 1, no tuning
    python benchmarks/tvm_latency.py --tune-trials 64   # both models, batch 1 and 32, tuned

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
    from riem_compiler.compressed import decode_torch

    tensors = {n: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in cw.arrays.items()}
               for n, cw in result.compressed.items()}

    def run():
        with torch.no_grad():
            for n, cw in result.compressed.items():
                decode_torch(cw, tensors[n])

    return median_seconds(run, warmup=1, min_runs=3, min_time=0.5)


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

    # torch eager (dense weights, decoded once)
    with torch.no_grad():
        row["torch_ms"] = 1e3 * median_seconds(lambda: dense(*inputs))
    row["torch_reconstruct_ms"] = 1e3 * torch_reconstruction_seconds(res)

    # onnxruntime on the materialised ONNX (what ORT ends up running after constant folding)
    import onnxruntime as ort

    onnx_path = res.export_onnx(work / f"{name}_b{batch}.onnx", materialize=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    feed = {i.name: a for i, a in zip(sess.get_inputs(), np_inputs)}
    row["ort_ms"] = 1e3 * median_seconds(lambda: sess.run(None, feed))

    for label, trials in (("untuned", 0), ("tuned", args.tune_trials)):
        if label == "tuned" and trials <= 0:
            continue
        out = work / f"{name}_b{batch}_{label}"
        t0 = time.perf_counter()
        res.build_tvm(out, target="llvm", tune_trials=trials, num_cores=args.threads)
        build_s = time.perf_counter() - t0
        manifest = json.loads((out / "manifest.json").read_text())
        t0 = time.perf_counter()
        m = load_tvm(out, device="cpu")
        load_s = time.perf_counter() - t0
        got = m(*np_inputs)
        got = got[0] if isinstance(got, tuple) else got
        err = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12))
        row[f"tvm_{label}_ms"] = 1e3 * m.time_main(*np_inputs, number=5, repeat=5)
        row[f"tvm_{label}_build_s"] = build_s
        row[f"tvm_{label}_tuning_s"] = manifest["build"]["seconds_tuning"]
        row[f"tvm_{label}_tasks"] = manifest["build"]["tuned_tasks"]
        row[f"tvm_{label}_decode_ms"] = 1e3 * m.decode_seconds
        row[f"tvm_{label}_load_s"] = load_s
        row[f"tvm_{label}_max_rel_err"] = err
        log.info("%s b%d %s: %.3f ms (err %.1e)", name, batch, label, row[f"tvm_{label}_ms"], err)
    best = row.get("tvm_tuned_ms", row["tvm_untuned_ms"])
    row["tvm_best_over_ort"] = best / row["ort_ms"]
    row["tvm_best_over_torch"] = best / row["torch_ms"]
    row["tvm_untuned_over_ort"] = row["tvm_untuned_ms"] / row["ort_ms"]
    return row


def fused_vs_decode(args, work: Path) -> list[dict]:
    """Where fused pays off: one Linear layer, latency per call of decode-once vs fused, and
    the memory each keeps resident (dense weight vs compact arrays)."""
    rows = []
    for n_out, n_in, batch in ((384, 384, 1), (1536, 384, 1), (1536, 384, 32)):
        torch.manual_seed(0)
        lin = torch.nn.Sequential(torch.nn.Linear(n_in, n_out)).eval()
        x = torch.randn(batch, n_in)
        res = rc.optimize(lin, example_inputs=(x,), ratio=args.ratio, steps=20, time_budget_s=2, quiet=True,
                          min_weight_size=0)
        row = {"shape": [n_out, n_in], "batch": batch}
        for mode in ("decode-once", "fused"):
            out = work / f"lin_{n_out}_{n_in}_{batch}_{mode}"
            res.build_tvm(out, target="llvm", mode=mode, num_cores=args.threads)
            m = load_tvm(out)
            row[f"{mode}_ms"] = 1e3 * m.time_main(x.numpy(), number=5, repeat=3)
        cw = next(iter(res.compressed.values()))
        row["dense_weight_kib"] = 4 * n_out * n_in / 1024
        row["compact_kib"] = cw.nbytes / 1024
        rows.append(row)
    return rows


def write_results(rows, fused_rows, args, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
            "cpu_count": os.cpu_count(), "tune_trials": args.tune_trials, "ratio": args.ratio,
            "seq_len": args.seq_len, "torch": torch.__version__}
    try:
        import tvm
        import onnxruntime

        meta["tvm"], meta["onnxruntime"] = tvm.__version__, onnxruntime.__version__
    except ImportError:
        pass
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "fused": fused_rows}, indent=2) + "\n")
    lines = [f"# TVM artifact latency ({name})", "",
             "Same run, same machine (shared CPU, numbers are noisy). Latency in ms (median);"
             " ratios < 1 mean the TVM artifact is faster.", "",
             "```", json.dumps(meta), "```", "",
             "| model | batch | torch ms | ORT ms | TVM untuned ms | TVM tuned ms | best/ORT | best/torch |"
             " decode at load ms | torch reconstruct ms | tuning s (tasks) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tuned = f"{r['tvm_tuned_ms']:.3f}" if "tvm_tuned_ms" in r else "-"
        tuning = f"{r['tvm_tuned_tuning_s']:.0f} ({r['tvm_tuned_tasks']})" if "tvm_tuned_ms" in r else "-"
        decode = r.get("tvm_tuned_decode_ms", r["tvm_untuned_decode_ms"])
        lines.append(f"| {r['model']} | {r['batch']} | {r['torch_ms']:.3f} | {r['ort_ms']:.3f} | "
                     f"{r['tvm_untuned_ms']:.3f} | {tuned} | {r['tvm_best_over_ort']:.2f} | "
                     f"{r['tvm_best_over_torch']:.2f} | {decode:.1f} | {r['torch_reconstruct_ms']:.1f} | {tuning} |")
    if fused_rows:
        lines += ["", "## decode-once vs fused (one Linear layer, untuned default schedules)", "",
                  "| W shape | batch | decode-once ms | fused ms | fused/decode-once | resident dense KiB | compact KiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in fused_rows:
            lines.append(f"| {r['shape']} | {r['batch']} | {r['decode-once_ms']:.3f} | {r['fused_ms']:.3f} | "
                         f"{r['fused_ms'] / r['decode-once_ms']:.1f} | {r['dense_weight_kib']:.0f} | {r['compact_kib']:.0f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits CNN at batch 1 only, no tuning")
    p.add_argument("--models", default="digits_cnn,minilm")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--tune-trials", type=int, default=64, help="MetaSchedule trials per model/batch (0: untuned only)")
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
    name = "tvm_latency_quick" if args.quick else "tvm_latency"
    rows = []
    with tempfile.TemporaryDirectory(prefix="tvm_latency_") as tmp:
        work = Path(tmp)
        for model_name in args.models.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                rows.append(bench_one(model_name, batch, args, work))
                write_results(rows, [], args, name)  # partial results survive an interruption
        fused_rows = [] if args.no_fused or args.quick else fused_vs_decode(args, work)
    write_results(rows, fused_rows, args, name)


if __name__ == "__main__":
    main()
