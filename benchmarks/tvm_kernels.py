"""One fused dequantise-matmul kernel against TVM's dense float32 matmul, per weight and rows per call.

    python benchmarks/tvm_kernels.py                 # about 15 seconds on 2 cores
    python benchmarks/tvm_kernels.py --rows 1 32 256 --out /tmp/k

Each row: a random weight of MiniLM's shapes compressed by one method setting, the fused kernel that
build_tvm runs for it (`Method.tvm_fused(..., for_memory=True)`: the form mode "fused" runs; mode
"auto" runs the same one unless the row says "decode-once in auto"), and the dense NN matmul of the
decoded weight scheduled by `tvm_schedules.schedule_matmul` (what decode-once runs), both compiled
for this CPU and timed in one process: median of `--runs` calls after 3 warm-ups. Which form the
kernel takes (GEMV, the int8-activation GEMV on a VNNI CPU, tiled dot, tiled outer product) follows from
the rows (methods/tvm_gemv.py, tvm_gemv_int8.py). TVM runs on every physical core, as load_tvm sets it.
Writes tvm_kernels.md / .json under --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.tvm_lowbit import median_ms  # noqa: E402

SHAPES = ((1536, 384), (384, 1536))


def settings():
    """(label, fit(weight) -> CompressedWeight): the layouts auto picks on MiniLM."""
    from riem_compiler.methods.affine import fit_affine
    from riem_compiler.methods.rotq import fit_rotq
    from riem_compiler.methods.rtn import fit_rtn
    from riem_compiler.methods.vq import fit_vq

    return (("rtn4-g128", lambda w: fit_rtn(w, 4, 128)), ("rtn3-g128", lambda w: fit_rtn(w, 3, 128)),
            ("affine2-g64", lambda w: fit_affine(w, 2, 64, iterations=3)),
            ("vq-d4b8", lambda w: fit_vq(w, 4, 8, iterations=2)), ("vq-d3b9", lambda w: fit_vq(w, 3, 9, iterations=2)),
            ("rotq2-g64", lambda w: fit_rotq(w, 2, 64)))


def dense_matmul(batch: int, rows: int, cols: int):
    """y = x W^T with W^T a (cols, rows) parameter, scheduled as decode-once's dense matmul is."""
    from tvm import s_tir, te

    from riem_compiler.codegen import tvm_schedules
    from riem_compiler.methods.tvm_gemv import scheduled

    x = te.placeholder((batch, cols), "float32", name="x")
    wt = te.placeholder((cols, rows), "float32", name="wt")
    k = te.reduce_axis((0, cols), name="k")
    y = te.compute((batch, rows), lambda b, i: te.sum(x[b, k] * wt[k, i], axis=k), name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, wt, y]).with_attr("global_symbol", "dense"))
    if not tvm_schedules.schedule_matmul(sch, sch.get_sblock("y")):
        raise RuntimeError("the dense matmul schedule did not apply")
    return scheduled(sch)


def _form(func) -> str:
    from tvm import s_tir

    from riem_compiler.methods.tvm_gemv_int8 import FORM_ATTR

    if func.attrs is not None and func.attrs.get(FORM_ATTR, False):
        return "GEMV, int8 activations"

    sch = s_tir.Schedule(func)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if "decode_t" in names:
        return "tiled, outer product"
    if any(n.startswith("part") for n in names):
        return "tiled, dot"
    if "lut" in names:
        return "lookup table"
    return "GEMV"


def measure(label: str, fit, shape, batch: int, runs: int) -> dict:
    import tvm

    from riem_compiler import methods
    from riem_compiler.codegen.tvm_build import TvmBuildOptions, make_target

    target = make_target(TvmBuildOptions())
    rows, cols = shape
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    cw = fit(w)
    method = methods.get(cw.method)
    with target:  # as build_tvm asks: the kernels see the CPU's features (the int8 GEMV needs VNNI)
        kernel = method.tvm_fused(cw, batch, "fused", "llvm", for_memory=True)
        auto = method.tvm_fused(cw, batch, "fused", "llvm")
    lib = tvm.compile(tvm.IRModule({"fused": kernel}), target=target)
    dense = tvm.compile(tvm.IRModule({"dense": dense_matmul(batch, rows, cols)}), target=target)
    x = np.random.default_rng(1).standard_normal((batch, cols)).astype(np.float32)
    W = methods.decode(cw).reshape(rows, cols)
    names = method.tvm_kernel().array_names(cw)
    args = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(np.ascontiguousarray(cw.arrays[n])) for n in names]
    y = tvm.runtime.tensor(np.zeros((batch, rows), np.float32))
    lib["fused"](*args, y)
    ref = x @ W.T
    error = float(np.abs(y.numpy() - ref).max() / np.abs(ref).max())
    xd, wt = tvm.runtime.tensor(x), tvm.runtime.tensor(np.ascontiguousarray(W.T))
    fused_ms = median_ms(lambda: lib["fused"](*args, y), runs)
    dense_ms = median_ms(lambda: dense["dense"](xd, wt, y), runs)
    return {"setting": label, "shape": list(shape), "rows": batch, "form": _form(kernel), "fused_ms": fused_ms,
            "dense_ms": dense_ms, "max_rel_error": error, "stored_bytes": int(cw.nbytes),
            "dense_bytes": int(W.nbytes), "auto": "fused" if not isinstance(auto, str) else "decode-once in auto"}


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    lines = ["# Fused dequantise-matmul kernels against the dense float32 matmul (TVM, LLVM)", "", "```",
             json.dumps(meta), "```", "",
             "One weight per row, random values of MiniLM's shapes; fused: the kernel build_tvm runs for it; dense: the "
             "decoded weight through decode-once's matmul schedule; median ms of one process, (x) fused over dense. "
             "Error: max |fused - x W^T| over max |x W^T|, W decoded by numpy (the int8-activation GEMV adds x's "
             "rounding to int8, as onnxruntime's MatMulNBits at accuracy_level 4). TVM's thread pool: "
             f"{meta.get('tvm_threads', 1)} thread(s).", "",
             "| setting | weight (out x in) | rows | form | fused ms | dense ms | x | bytes (x fp32) | mode auto | "
             "error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['setting']} | {r['shape'][0]}x{r['shape'][1]} | {r['rows']} | {r['form']} | "
                     f"{r['fused_ms']:.3f} | {r['dense_ms']:.3f} | {r['fused_ms'] / r['dense_ms']:.2f} | "
                     f"{r['stored_bytes']} ({r['stored_bytes'] / r['dense_bytes']:.3f}) | {r['auto']} | "
                     f"{r['max_rel_error']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256], help="activation rows per call")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    from riem_compiler.codegen.tvm_runtime import use_all_cores

    threads = use_all_cores()  # as load_tvm does: TVM's pool on every physical core
    start = time.time()
    load_before = list(os.getloadavg())
    rows = []
    for label, fit in settings():
        for shape in SHAPES:
            for batch in args.rows:
                r = measure(label, fit, shape, batch, args.runs)
                rows.append(r)
                print(f"{label:12s} {shape[0]}x{shape[1]} rows {batch:4d} {r['form']:20s} fused {r['fused_ms']:8.3f} ms "
                      f"dense {r['dense_ms']:8.3f} ms  x{r['fused_ms'] / r['dense_ms']:.2f}  {r['auto']}", flush=True)
    meta = {"command": " ".join(["python benchmarks/tvm_kernels.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_before": load_before, "load_after": list(os.getloadavg()), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "runs": args.runs, "tvm_threads": threads,
            "elapsed_s": round(time.time() - start, 1)}
    doc = {"meta": meta, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tvm_kernels.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "tvm_kernels.md").write_text(markdown(doc))
    print(f"wrote {out / 'tvm_kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
