"""Low-bit weights at run time: TVM fused dequantise-matmul vs TVM decode-once vs onnxruntime.

On a 4-layer 4096x4096 Linear+ReLU MLP (with biases), per compression setting (rtn 4-bit g128,
affine 2-bit g64, vq at 1/16, rotq 2-bit g64), in one run:

- TVM fused: `build_tvm(mode="fused")` -- each Linear runs its method's fused kernel, the weight
  stays in its stored bytes (the default mode "auto" builds exactly this at batch <= 4 and the
  decode-once form above; the "auto picks" column says which);
- TVM decode-once: `build_tvm(mode="decode-once")` -- weights decoded to float32 at load;
- onnxruntime dense: the float32 model;
- onnxruntime `ort` form: `Config(onnx_format="ort")` (MatMulNBits where the method has that form;
  vq and rotq have none and are skipped).

For each: resident memory the loaded model adds to a fresh process (VmRSS after load and one call,
minus before; the weights are most of it), latency at batch 1, 8, 32 (median over runs, each form
in its own process, forms taken in turn), output error against the dense model (relative Frobenius
norm). TVM artifacts are compiled for a fixed batch, so each batch has its own build.

    python benchmarks/tvm_lowbit.py                  # everything (about 20 minutes on 2 cores)
    python benchmarks/tvm_lowbit.py --settings rtn4 --batches 1

Writes benchmarks/results/tvm_lowbit.md and .json with the command, settings, date, machine load
(os.getloadavg before and after) and versions. The machine is shared: ratios are taken within one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
RESULTS = HERE / "results"
N, LAYERS = 4096, 4

from benchmarks.onnx_forms import rss_bytes  # noqa: E402

SETTINGS = {  # label -> (method, ratio, method options)
    "rtn4-g128": ("rtn", 0.13, {"rtn": {"group_size": 128, "choose": "ladder"}}),
    "affine2-g64": ("affine", 0.09, {"affine": {"bits": 2, "group_size": 64, "iterations": 5}}),
    "vq-1/16": ("vq", 1 / 16, {"vq": {"iterations": 4}}),
    # 2 code bits + a float16 scale per 64 = 2.25 bits per weight (ratio 0.0703)
    "rotq2-g64": ("rotq", 0.08, {"rotq": {"bits": 2, "group_size": 64}}),
}


def _median_ms(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(kind: str, paths: list[str], feeds_path: str, runs: int) -> dict:
    """In a fresh process: RSS added by loading the first path (batch order of `paths`) plus one
    call, then latency of every batch's model; outputs saved beside the feeds."""
    feeds = dict(np.load(feeds_path))
    if kind == "tvm":
        import tvm  # noqa: F401  (imports before the RSS baseline: a process pays them once)

        from riem_compiler.codegen.tvm_runtime import load_tvm
    else:
        import onnxruntime as ort

    def load(path):
        if kind == "tvm":
            return load_tvm(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    out, lat, rss = {}, {}, None
    for tagged in paths:
        path, b = tagged.rsplit("@", 1)
        x = feeds[b]
        before = rss_bytes()
        model = load(path)
        if kind == "tvm":
            def run():
                return model(x)
        else:
            name = model.get_inputs()[0].name

            def run():
                return model.run(None, {name: x})[0]
        out[b] = np.asarray(run())
        if rss is None:
            rss = rss_bytes() - before
        lat[b] = _median_ms(run, runs)
        model = run = None  # free before the next batch
    np.savez(feeds_path + f".{os.getpid()}.out.npz", **out)
    return {"rss_mib": rss / 2 ** 20, "latency_ms": lat, "out": feeds_path + f".{os.getpid()}.out.npz"}


def mlp():
    import torch

    torch.manual_seed(0)
    layers = []
    for i in range(LAYERS):
        layers.append(torch.nn.Linear(N, N))
        if i < LAYERS - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).eval()


def to_onnx(model, path: Path) -> Path:
    """The same MLP as plain ONNX (MatMul with W^T, Add bias, Relu)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "X"
    linears = [m for m in model if hasattr(m, "weight")]
    for i, lin in enumerate(linears):
        inits.append(numpy_helper.from_array(lin.weight.detach().numpy().T.copy(), f"W{i}"))
        inits.append(numpy_helper.from_array(lin.bias.detach().numpy().copy(), f"B{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"B{i}"], [f"h{i}"]))
        if i < len(linears) - 1:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", N])],
                              [helper.make_tensor_value_info(f"h{len(linears) - 1}", TensorProto.FLOAT, ["batch", N])],
                              inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    import onnx

    onnx.save(m, str(path))
    return path


def run_measure(kind: str, paths: list[str], feeds_path: Path, runs: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--measure", kind, str(feeds_path), str(runs), *paths],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    m["out"] = {k: v for k, v in np.load(m["out"]).items()}
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        kind, feeds_path, runs, *paths = args.measure
        print(json.dumps(measure(kind, paths, feeds_path, int(runs))))
        return

    import torch

    import riem_compiler as rc

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    batches = [int(b) for b in args.batches.split(",")]
    model = mlp()
    rng = np.random.default_rng(0)
    feeds = {str(b): rng.standard_normal((b, N)).astype(np.float32) for b in batches}
    dense_weight_bytes = sum(4 * m.weight.numel() for m in model if hasattr(m, "weight"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="tvm_lowbit_") as tmp_s:
        tmp = Path(tmp_s)
        feeds_path = tmp / "feeds.npz"
        np.savez(feeds_path, **feeds)
        onnx_dense = to_onnx(model, tmp / "dense.onnx")
        forms = {"ort dense": ("ort", [str(onnx_dense) + f"@{b}" for b in batches], None)}
        info = {}
        for label in args.settings.split(","):
            method, ratio, options = SETTINGS[label]
            x1 = torch.from_numpy(feeds[str(batches[0])])
            t0 = time.perf_counter()
            res = rc.optimize(model, example_inputs=(x1,), method=method, ratio=ratio, method_options=options,
                              min_weight_size=0, quiet=True)
            fit_s = time.perf_counter() - t0
            stored = sum(cw.nbytes for cw in res.compressed.values())
            labels = sorted({rc.methods.get(cw.method).label(cw) for cw in res.compressed.values()})
            for mode, form in (("fused", "tvm fused"), ("decode-once", "tvm decode-once")):
                paths, builds = [], []
                for b in batches:
                    res.example_inputs = (torch.from_numpy(feeds[str(b)]),)
                    t0 = time.perf_counter()
                    out = res.build_tvm(tmp / f"{label.replace('/', '_')}_{mode}_b{b}", target="llvm", mode=mode)
                    builds.append(time.perf_counter() - t0)
                    paths.append(f"{out}@{b}")
                    manifest = json.loads((out / "manifest.json").read_text())
                forms[f"{form} {label}"] = ("tvm", paths, label)
                info[f"{form} {label}"] = {
                    "build_s": builds, "fit_s": fit_s, "stored_weight_bytes": stored, "layer_labels": labels,
                    "decode": sorted({row["decode"] for row in manifest["layers"]}),
                    "auto_picks": {str(b): _auto_choice(res, b) for b in batches},
                    "resident_weight_bytes": sum(row["resident_bytes"] for row in manifest["layers"])}
            if method in ("rtn", "affine"):
                from riem_compiler.frontend.onnx_frontend import load_onnx

                t0 = time.perf_counter()
                ores = rc.optimize(load_onnx(onnx_dense), method=method, ratio=ratio, method_options=options,
                                   min_weight_size=0, quiet=True, onnx_format="ort")
                path = ores.export_onnx(tmp / f"{label.replace('/', '_')}.ort.onnx")
                forms[f"ort MatMulNBits {label}"] = ("ort", [str(path) + f"@{b}" for b in batches], label)
                info[f"ort MatMulNBits {label}"] = {
                    "fit_s": time.perf_counter() - t0, "stored_weight_bytes": sum(cw.nbytes for cw in ores.compressed.values()),
                    "layer_forms": sorted({str(r.settings.get("onnx_form", "functions")) for r in ores.report.compressed})}
        # measure: every form in its own fresh process, forms in turn
        dense_out = None
        for name, (kind, paths, label) in forms.items():  # paths: "<file or dir>@<batch>"
            m = run_measure(kind, paths, feeds_path, args.runs)
            if dense_out is None:
                dense_out = m["out"]
            err = {b: float(np.linalg.norm(m["out"][b] - dense_out[b]) / np.linalg.norm(dense_out[b]))
                   for b in m["out"]}
            row = {"form": name, "setting": label, "rss_mib": m["rss_mib"], "latency_ms": m["latency_ms"],
                   "output_rel_error": err, **info.get(name, {})}
            rows.append(row)
            print(f"{name:34s} rss +{m['rss_mib']:8.1f} MiB  latency {m['latency_ms']}  err {err}", flush=True)
    meta = {
        "command": "python benchmarks/tvm_lowbit.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": f"{LAYERS} x Linear({N}, {N}) + bias, ReLU between (torch for TVM; the same weights as ONNX)",
        "settings": {k: SETTINGS[k] for k in args.settings.split(",")},
        "batches": batches, "runs": args.runs, "dense_weight_bytes": dense_weight_bytes,
        "load_before": load_before, "load_after": os.getloadavg(), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "elapsed_s": time.perf_counter() - t_start,
        "versions": _versions(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tvm_lowbit.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = markdown(rows, meta)
    (RESULTS / "tvm_lowbit.md").write_text(md)
    print(md)


def _auto_choice(res, batch: int) -> str:
    """What build_tvm's default mode "auto" picks for the first layer at this batch (LLVM)."""
    from riem_compiler import methods

    cw = next(iter(res.compressed.values()))
    kernel = methods.get(cw.method).tvm_fused(cw, batch, "probe", "llvm")
    return "decode-once" if isinstance(kernel, str) else "fused"


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("apache-tvm", "onnxruntime", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def markdown(rows, meta) -> str:
    dense = next(r for r in rows if r["form"] == "ort dense")
    bs = [str(b) for b in meta["batches"]]
    lines = ["# Low-bit weights at run time: TVM fused vs decode-once vs onnxruntime (4x4096 MLP)", "",
             "```", json.dumps({k: meta[k] for k in ("command", "date", "load_before", "load_after", "cpu_count",
                                                    "machine", "runs", "elapsed_s", "versions")}), "```", "",
             f"Model: {meta['model']}; dense weights {meta['dense_weight_bytes'] / 2 ** 20:.0f} MiB. Resident: VmRSS "
             "added by loading the model and one call in a fresh process (x: against onnxruntime dense). Latency: "
             "median ms; (x) against onnxruntime dense in the same run. Error: relative Frobenius norm of the output "
             "against onnxruntime dense.", "",
             "| form | resident MiB (x dense) | " + " | ".join(f"batch {b} ms (x)" for b in bs) + " | error b1 | "
             "decode | weight bytes resident (manifest) | auto picks |",
             "|---|---|" + "---|" * len(bs) + "---|---|---|---|"]
    for r in rows:
        lat = " | ".join(f"{r['latency_ms'][b]:.2f} ({r['latency_ms'][b] / dense['latency_ms'][b]:.2f})" for b in bs)
        res_w = r.get("resident_weight_bytes")
        lines.append(f"| {r['form']} | {r['rss_mib']:.0f} ({r['rss_mib'] / dense['rss_mib']:.2f}) | {lat} | "
                     f"{r['output_rel_error'][bs[0]]:.2e} | {', '.join(r.get('decode', [])) or '-'} | "
                     f"{'-' if res_w is None else f'{res_w / 2 ** 20:.1f} MiB'} | "
                     f"{', '.join(f'b{b}: {v}' for b, v in r['auto_picks'].items()) if 'auto_picks' in r else '-'} |")
    lines += ["", "Per-setting details (layer labels, stored bytes, build seconds) are in tvm_lowbit.json.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
