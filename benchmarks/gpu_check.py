"""One-shot GPU check: RieM fits on the GPU, and the TVM CUDA path (run it on a machine with an NVIDIA GPU).

First fits the all-MiniLM-L6-v2 layer-0 query (384x384) and intermediate (1536x384) matrices at 1/4
with device="cpu" and device="cuda" (same shape, steps and seed): steps/s, error of each, and
whether two CUDA fits are bit-identical. Without a GPU only the CPU fits run, the CUDA parts are
skipped with a message, and the results go to gpu_check_nogpu.md/.json instead. Then it builds the digits CNN and all-MiniLM-L6-v2 (compressed, few fitting steps) for target cuda in
both modes (decode-once, fused), loads them on the GPU, compares outputs with torch, times
TVM against torch eager on the same GPU, and writes benchmarks/results/gpu_check.md/.json.
Then the fused dequantise-matmul kernels alone (rtn 4-bit g128, affine 2-bit g64, vq at 1/16 on
an N x N weight, batch 1 and 32; dlight GPU schedules): outputs against torch decode + matmul
on the GPU, and the time of each. Without a GPU those kernels are only built for sm_90 and their
source compiled with nvcc (when installed).
Budget: a few minutes on one GPU (fitting runs on the GPU when torch sees one).

    python benchmarks/gpu_check.py                 # everything, dlight default schedules
    python benchmarks/gpu_check.py --quick         # digits CNN only (and the query fit)
    python benchmarks/gpu_check.py --fit-steps-check 3000   # longer CPU/GPU fit comparison
    python benchmarks/gpu_check.py --tune-trials 64 --models digits_cnn   # MetaSchedule on the GPU

The library embeds CUDA C; TVM compiles it when loading: with NVRTC when the `cuda-bindings`
package is importable, else set TVM_CUDA_COMPILE_MODE=nvcc (done here when nvcc is on PATH).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results"


def gpu_arch() -> str:
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm_{major}{minor}"


def cuda_time_ms(fn, runs: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / runs


def check_model(name: str, batch: int, args, work: Path, arch: str) -> dict:
    from tvm_latency import make_model  # after main() chose how TVM compiles CUDA

    import riem_compiler as rc
    from riem_compiler.codegen.tvm_runtime import load_tvm
    from riem_compiler.passes.rewrite_torch import materialize

    model, inputs = make_model(name, batch, args.seq_len)
    t0 = time.perf_counter()
    res = rc.optimize(model, example_inputs=inputs, ratio=0.25, steps=args.fit_steps, time_budget_s=5.0,
                      quiet=True, device="cuda")
    row = {"model": name, "batch": batch, "arch": arch, "fit_s": time.perf_counter() - t0,
           "compressed_layers": len(res.compressed)}
    dense = materialize(res.model).eval().cuda()
    gpu_inputs = tuple(t.cuda() for t in inputs)
    with torch.no_grad():
        ref = dense(*gpu_inputs)
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).float().cpu().numpy()
        row["torch_gpu_ms"] = cuda_time_ms(lambda: dense(*gpu_inputs))
    np_inputs = [t.numpy() for t in inputs]
    for mode in ("auto", "decode-once", "fused"):
        key = mode.replace("-", "_")
        try:
            out = work / f"{name}_b{batch}_{mode}"
            t0 = time.perf_counter()
            res.build_tvm(out, target="cuda", arch=arch, mode=mode,
                          tune_trials=args.tune_trials if mode == "decode-once" else 0)
            row[f"{key}_build_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            m = load_tvm(out, device="cuda")
            row[f"{key}_load_s"] = time.perf_counter() - t0
            row[f"{key}_decode_ms"] = 1e3 * m.decode_seconds
            got = m(*np_inputs)
            got = got[0] if isinstance(got, tuple) else got
            row[f"{key}_max_rel_err"] = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12))
            row[f"{key}_ok"] = bool(row[f"{key}_max_rel_err"] < 1e-3)
            row[f"{key}_ms"] = 1e3 * m.time_main(*np_inputs, number=20, repeat=5)
        except Exception as err:  # record and go on: one run should report everything it can
            row[f"{key}_error"] = f"{type(err).__name__}: {err}"[:2000]
            traceback.print_exc()
    return row


FUSED_CASES = ("rtn4-g128", "affine2-g64", "vq-d8-12bit")


def _fused_weight(label: str, n: int):
    from riem_compiler.methods.affine import fit_affine
    from riem_compiler.methods.rtn import fit_rtn
    from riem_compiler.methods.vq import fit_vq

    w = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32) / np.sqrt(n)
    if label == "rtn4-g128":
        return fit_rtn(w, 4, 128)
    if label == "affine2-g64":
        return fit_affine(w, 2, 64, iterations=5)
    return fit_vq(w, 8, 12, iterations=4)  # a 12-bit code per 8 weights (1.5 bits/weight) + codebook + scales


def fused_kernel_check(args, arch: str, gpu: bool) -> list[dict]:
    """Each fused kernel built for cuda (dlight rules); on a GPU: max relative error against torch
    decode + matmul on the GPU and both times; without one: build + nvcc only."""
    import tvm

    from riem_compiler import methods
    from riem_compiler.codegen.tvm_pipeline import _default_schedules, compile_cuda_source, cuda_sources

    rows = []
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    for label in FUSED_CASES:
        cw = _fused_weight(label, args.fused_size)
        method = methods.get(cw.method)
        names = method.tvm_kernel().array_names(cw)
        for batch in (int(b) for b in args.batches.split(",")):
            row = {"kernel": label, "shape": list(cw.shape), "batch": batch, "arch": arch,
                   "stored_bytes": cw.nbytes, "dense_bytes": 4 * int(np.prod(cw.shape))}
            try:
                kernel = method.tvm_fused(cw, batch, "fused_k", "cuda")
                mod = _default_schedules(tvm.IRModule({"fused_k": kernel}), target)
                ex = tvm.compile(mod, target=target)
                if not gpu:
                    if shutil.which("nvcc"):
                        with tempfile.TemporaryDirectory() as tmp:
                            src = Path(tmp) / "k.cu"
                            src.write_text("\n".join(cuda_sources(ex)))
                            row["nvcc_cubin_bytes"] = len(compile_cuda_source(src, arch))
                    row["built"] = True
                else:
                    dev = tvm.cuda(0)
                    x = np.random.default_rng(batch).standard_normal((batch, cw.shape[1])).astype(np.float32)
                    args_dev = [tvm.runtime.tensor(x, dev)] + [
                        tvm.runtime.tensor(np.ascontiguousarray(cw.arrays[n]), dev) for n in names]
                    y = tvm.runtime.tensor(np.zeros((batch, cw.shape[0]), np.float32), dev)
                    ex.mod["fused_k"](*args_dev, y)
                    dev.sync()
                    tens = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in cw.arrays.items()}
                    xt = torch.from_numpy(x).cuda()
                    with torch.no_grad():
                        ref = (xt @ method.decode_torch(cw, tens).reshape(cw.shape).T).cpu().numpy()
                        row["torch_decode_matmul_ms"] = cuda_time_ms(
                            lambda: xt @ method.decode_torch(cw, tens).reshape(cw.shape).T)
                        wd = method.decode_torch(cw, tens).reshape(cw.shape)
                        row["torch_dense_matmul_ms"] = cuda_time_ms(lambda: xt @ wd.T)
                    row["max_rel_err"] = float(np.abs(y.numpy() - ref).max() / (np.abs(ref).max() + 1e-12))
                    row["ok"] = bool(row["max_rel_err"] < 1e-4)
                    timer = ex.mod.time_evaluator("fused_k", dev, number=50, repeat=5)
                    row["tvm_fused_ms"] = 1e3 * float(np.median(timer(*args_dev, y).results))
            except Exception as err:  # record and go on
                row["error"] = f"{type(err).__name__}: {err}"[:2000]
                traceback.print_exc()
            print(row, flush=True)
            rows.append(row)
    return rows


def fused_lines(rows) -> list[str]:
    from tvm_latency import _f

    lines = ["## Fused dequantise-matmul kernels (TVM cuda, dlight) vs torch decode + matmul", "",
             "| kernel | shape | batch | stored/dense bytes | TVM fused ms | torch decode+matmul ms | "
             "torch dense matmul ms | max rel err | built / nvcc | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {'x'.join(map(str, r['shape']))} | {r['batch']} | "
                     f"{r['stored_bytes'] / r['dense_bytes']:.3f} | {_f(r, 'tvm_fused_ms', '{:.4f}')} | "
                     f"{_f(r, 'torch_decode_matmul_ms', '{:.4f}')} | {_f(r, 'torch_dense_matmul_ms', '{:.4f}')} | "
                     f"{_f(r, 'max_rel_err', '{:.1e}')} | {r.get('built', '-')} / {r.get('nvcc_cubin_bytes', '-')} | "
                     f"{r.get('error', '-')[:80]} |")
    return lines + [""]


def fit_check(args, cuda: bool) -> list[dict]:
    """Fit MiniLM layer-0 matrices on CPU and (when present) on the GPU with the same settings."""
    from fit_fidelity import minilm_weights

    from riem_compiler import riem
    from riem_compiler.methods.riem.fit import FitSettings, fit_riem

    torch.set_num_threads(args.cpu_threads)
    rows = []
    for kind in args.fit_layers.split(","):
        w = minilm_weights([0], [kind])[f"minilm.0.{kind}"]
        q, m, bits = riem.size_candidates(w.shape[0], w.shape[1], 0.25, (8,), "float16")[0]
        row = {"layer": f"minilm.0.{kind}", "shape": "x".join(map(str, w.shape)), "q": q, "m": m,
               "state_bits": bits, "steps": args.fit_steps_check, "cpu_threads": args.cpu_threads}
        for device in ("cpu", "cuda") if cuda else ("cpu",):
            settings = FitSettings(steps=args.fit_steps_check, seed=0, device=device)
            res = fit_riem(w, q, m, bits, "float16", settings)
            row[f"{device}_s"] = res.seconds
            row[f"{device}_steps_s"] = res.steps / res.seconds
            row[f"{device}_rel_error"] = res.rel_error
            if device == "cuda":
                again = fit_riem(w, q, m, bits, "float16", settings)
                row["cuda_repeat_identical"] = all(
                    np.array_equal(res.weight.arrays[k], again.weight.arrays[k]) for k in res.weight.arrays)
        if not cuda:
            row["cuda"] = "skipped: no CUDA GPU (torch.cuda.is_available() is False)"
        print(row, flush=True)
        rows.append(row)
    return rows


def fit_lines(fit_rows) -> list[str]:
    from tvm_latency import _f

    lines = ["## RieM fits, CPU vs GPU (same shape, steps, seed)", "",
             "| layer | shape | q | m | steps | CPU steps/s | CPU err | GPU steps/s | GPU err | GPU speedup | "
             "GPU repeat bit-identical |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in fit_rows:
        speed = f"{r['cuda_steps_s'] / r['cpu_steps_s']:.1f}x" if "cuda_steps_s" in r else "-"
        lines.append(f"| {r['layer']} | {r['shape']} | {r['q']} | {r['m']} | {r['steps']} | "
                     f"{_f(r, 'cpu_steps_s', '{:.1f}')} | {_f(r, 'cpu_rel_error', '{:.4f}')} | "
                     f"{_f(r, 'cuda_steps_s', '{:.1f}')} | {_f(r, 'cuda_rel_error', '{:.4f}')} | {speed} | "
                     f"{r.get('cuda_repeat_identical', r.get('cuda', '-'))} |")
    return lines + [""]


def write(rows, meta, name, fit_rows=(), fused_rows=()):
    from tvm_latency import _f

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "fit_rows": list(fit_rows), "rows": rows,
                                                      "fused_rows": list(fused_rows)}, indent=2) + "\n")
    lines = [f"# GPU check ({name})", "", "```", json.dumps(meta), "```", "", *fit_lines(fit_rows),
             *(fused_lines(fused_rows) if fused_rows else []),
             "## TVM CUDA artifacts vs torch on the same GPU", "",
             "| model | batch | torch GPU ms | auto ms | decode-once ms | fused ms | decode at load ms | "
             "max rel err (a/d/f) | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(k, fmt="{:.3f}"):
            return _f(r, k, fmt)
        errs = "; ".join(r[k][:80] for k in ("auto_error", "decode_once_error", "fused_error") if k in r) or "-"
        lines.append(f"| {r['model']} | {r['batch']} | {f('torch_gpu_ms')} | {f('auto_ms')} | {f('decode_once_ms')} | "
                     f"{f('fused_ms')} | {f('decode_once_decode_ms', '{:.1f}')} | {f('auto_max_rel_err', '{:.1e}')} / "
                     f"{f('decode_once_max_rel_err', '{:.1e}')} / {f('fused_max_rel_err', '{:.1e}')} | {errs} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits CNN only, batch 1")
    p.add_argument("--models", default="digits_cnn,minilm")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--fit-steps", type=int, default=100)
    p.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials (decode-once build)")
    p.add_argument("--fit-layers", default="attention.self.query,intermediate.dense",
                   help="MiniLM layer-0 matrices fitted on CPU and GPU")
    p.add_argument("--fit-steps-check", type=int, default=1000, help="steps of each CPU/GPU comparison fit")
    p.add_argument("--cpu-threads", type=int, default=min(8, os.cpu_count() or 1), help="torch threads of the CPU fits")
    p.add_argument("--skip-fit-check", action="store_true", help="only the TVM CUDA builds")
    p.add_argument("--skip-fused-kernels", action="store_true", help="no fused dequantise-matmul kernel check")
    p.add_argument("--fused-size", type=int, default=4096, help="N of the N x N weights of the fused kernel check")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("tvm").setLevel(logging.WARNING)
    has_gpu = torch.cuda.is_available()
    if args.quick:
        args.fit_layers = args.fit_layers.split(",")[0]
    t_start = time.perf_counter()
    fit_rows = [] if args.skip_fit_check else fit_check(args, has_gpu)
    if not has_gpu:
        fused_rows = [] if args.skip_fused_kernels else fused_kernel_check(args, "sm_90", False)
        meta = {"gpu": None, "torch": torch.__version__, "cpu_count": os.cpu_count(),
                "elapsed_s": time.perf_counter() - t_start,
                "skipped": "CUDA fits and TVM CUDA runs: torch.cuda.is_available() is False (fused kernels "
                           "built for sm_90 and nvcc-compiled only)"}
        write([], meta, "gpu_check_nogpu", fit_rows, fused_rows)
        print("gpu_check.py: no CUDA GPU here; ran the CPU fits only and skipped the CUDA fits and the TVM CUDA "
              "builds (results in benchmarks/results/gpu_check_nogpu.md). Run it on a GPU machine.")
        return
    if "TVM_CUDA_COMPILE_MODE" not in os.environ and shutil.which("nvcc"):
        try:
            import cuda.bindings  # noqa: F401  (NVRTC path)
        except ImportError:
            os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    import tvm

    arch = gpu_arch()
    meta = {"gpu": torch.cuda.get_device_name(0), "arch": arch, "tvm": tvm.__version__, "torch": torch.__version__,
            "tvm_cuda_enabled": bool(tvm.cuda(0).exist), "compile_mode": os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc"),
            "tune_trials": args.tune_trials, "seq_len": args.seq_len}
    if args.quick:
        args.models, args.batches = "digits_cnn", "1"
    name = "gpu_check_quick" if args.quick else "gpu_check"
    rows = []
    fused_rows = [] if args.skip_fused_kernels else fused_kernel_check(args, arch, True)
    write(rows, meta, name, fit_rows, fused_rows)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for model_name in args.models.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                rows.append(check_model(model_name, batch, args, Path(tmp), arch))
                meta["elapsed_s"] = time.perf_counter() - t_start
                write(rows, meta, name, fit_rows, fused_rows)


if __name__ == "__main__":
    main()
