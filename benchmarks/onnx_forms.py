"""How onnxruntime runs each ONNX form of the same compressed weights: dense, decoder functions,
standard opset-21 DequantizeLinear (`onnx_format="standard"`, which onnxruntime fuses into
MatMulNBits), onnxruntime MatMulNBits written in the file (`onnx_format="ort"`); and the function-form file opened
with `rc.load` (fast start: weights decoded in torch, handed to onnxruntime as initializers).

Models: a 4-layer MLP of 4096x4096 MatMuls (dynamic batch; big enough for memory and bandwidth to
matter) and all-MiniLM-L6-v2 (the benchmarks' own export, static batch 2, sequence 32). Weights:
`method="rtn"` at ratio 0.15 (4-bit, groups of 128), so every compressed layer has a standard form.
Each file is measured in its own fresh process (default session options, 2 intra-op threads):
file bytes; session creation (median of --repeats); resident memory added by creating the session
(VmRSS after - before); latency at batch 1 and 32 (MLP) or the export's batch (MiniLM), medians;
output error against the dense model on the same inputs. "functions+fast_start" is the functions
file opened by `rc.load(path)`: its session seconds are the whole rc.load call (riem_compiler, onnx
and onnxruntime imported beforehand; default session options, which on 2 physical cores are 2
intra-op threads), and its row also gives the largest output difference from the folded session.

--compress-embeddings also compresses the embedding tables (`compress_embeddings=True`; on
MiniLM the 30522x384 word table, 47 of its 87 MB, and the position table), and the header says so.

Usage: python benchmarks/onnx_forms.py [--models mlp4096 minilm] [--runs 30] [--repeats 3]
       [--compress-embeddings] [--out PREFIX]
Writes benchmarks/results/onnx_forms.{md,json} (or PREFIX.{md,json}).
"""
from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
FORMS = ("dense", "functions", "standard", "ort")
FAST = "functions+fast_start"  # the functions file, opened by rc.load


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(path: str, feeds_path: str, runs: int, repeats: int, fast_start: bool = False) -> dict:
    """Run in a fresh process: session creation, RSS, latencies, outputs (saved beside the model)."""
    import importlib

    import onnxruntime as ort

    if fast_start:  # import up front: a process pays imports once, they are not the time to open a file
        import riem_compiler as rc

        importlib.import_module("riem_compiler.codegen.onnx_fast_load")

    def make():
        if fast_start:
            return rc.load(path).session
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    before = rss_bytes()
    t0 = time.perf_counter()
    sess = make()
    first = time.perf_counter() - t0
    rss = rss_bytes() - before
    creation = [first] + [_timed(make) for _ in range(repeats - 1)]
    feeds = dict(np.load(feeds_path))
    batches = sorted({int(k.split("@")[1]) for k in feeds})
    out, lat = {}, {}
    for b in batches:
        f = {k.split("@")[0]: v for k, v in feeds.items() if k.endswith(f"@{b}")}
        out[b] = sess.run(None, f)[0]
        for _ in range(3):
            sess.run(None, f)
        times = [_timed(lambda: sess.run(None, f)) for _ in range(runs)]
        lat[b] = statistics.median(times)
    np.savez(path + (".fast" if fast_start else "") + ".out.npz", **{str(b): o for b, o in out.items()})
    return {"session_s": statistics.median(creation), "rss_mib": rss / 2 ** 20,
            "latency_ms": {str(b): 1e3 * t for b, t in lat.items()}}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def mlp(n: int, layers: int = 4, name: str = "mlp"):
    """(ONNX model, feeds): `layers` MatMuls of n x n N(0, 1/n) weights stored (in, out), Relu
    between, dynamic batch; feeds "X@1" and "X@32". Seeded: every caller gets the same weights."""
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(0)
    nodes, inits, x = [], [], "X"
    for i in range(layers):
        inits.append(numpy_helper.from_array((g.standard_normal((n, n)) / n ** 0.5).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"]))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info(f"h{layers - 1}", TensorProto.FLOAT, ["batch", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = {f"X@{b}": g.standard_normal((b, n)).astype(np.float32) for b in (1, 32)}
    return model, feeds


def mlp4096(tmp: Path):
    return mlp(4096, name="mlp4096")


def minilm(tmp: Path):
    from benchmarks import models
    from riem_compiler.frontend.onnx_frontend import load_onnx

    model, tok = models.load_minilm()
    path = tmp / "minilm.export.onnx"
    models.export_minilm_onnx(path, model, tok, batch=2, seq_len=32)
    ids, mask = models.minilm_example_inputs(tok, batch=2, seq_len=32)
    return load_onnx(path), {"input_ids@2": ids.numpy(), "attention_mask@2": mask.numpy()}


def bench(name: str, args, tmp: Path) -> list[dict]:
    import riem_compiler as rc
    from riem_compiler.codegen.onnx_export import save_onnx

    model, feeds = (mlp4096 if name == "mlp4096" else minilm)(tmp)
    feeds_path = tmp / f"{name}.feeds.npz"
    np.savez(feeds_path, **feeds)
    paths = {"dense": save_onnx(model, tmp / f"{name}.dense.onnx")}
    forms = {}
    for form in FORMS[1:]:
        res = rc.optimize(model, method="rtn", ratio=0.15, quiet=True, onnx_format=form,
                          compress_embeddings=args.compress_embeddings)
        paths[form] = res.export_onnx(tmp / f"{name}.{form}.onnx")
        forms[form] = sorted({str(r.settings.get("onnx_form", "functions")) for r in res.report.compressed})
    paths[FAST], forms[FAST] = paths["functions"], forms["functions"]
    rows, outs = [], {}
    for form in (*FORMS, FAST):
        fast = form == FAST
        proc = subprocess.run([sys.executable, __file__, "--measure", str(paths[form]), str(feeds_path),
                               str(args.runs), str(args.repeats), str(int(fast))],
                              capture_output=True, text=True, check=True)
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        out = outs[form] = dict(np.load(str(paths[form]) + (".fast" if fast else "") + ".out.npz"))
        dense_out = outs["dense"]
        err = {b: float(np.linalg.norm(out[b] - dense_out[b]) / np.linalg.norm(dense_out[b])) for b in out}
        size = sum(p.stat().st_size for p in Path(paths[form]).parent.glob(Path(paths[form]).name + "*")
                   if not p.name.endswith(".out.npz"))
        if fast:
            m["max_abs_diff_vs_functions"] = max(float(np.abs(out[b] - outs["functions"][b]).max()) for b in out)
        rows.append({"model": name, "form": form, "file_bytes": size, **m, "output_rel_error": err,
                     "layer_forms": forms.get(form, ["dense"])})
        print(f"{name:8s} {form:20s} file {size / 2 ** 20:7.1f} MiB  session {m['session_s']:7.2f} s  "
              f"rss +{m['rss_mib']:7.1f} MiB  latency {m['latency_ms']} ms  err {err}", flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# ONNX forms in onnxruntime: dense vs decoder functions vs DequantizeLinear vs MatMulNBits", "",
             f"Run {meta['date']} on {meta['machine']}; command `{meta['command']}`; load average at start "
             f"{meta['load']}. rtn at ratio 0.15 (4-bit, g128){meta.get('embeddings', '')}. Each file in a fresh process, default session "
             "options, 2 intra-op threads; medians. functions+fast_start: the functions file opened by "
             "`rc.load` (weights decoded in torch, given to onnxruntime as initializers); its session time is the "
             "whole rc.load call.", "",
             "| model | form | file MiB | session s | RSS added MiB | latency ms (batch) | rel. error vs dense |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = ", ".join(f"{v:.2f} (b{k})" for k, v in r["latency_ms"].items())
        err = ", ".join(f"{v:.2e}" for v in r["output_rel_error"].values())
        lines.append(f"| {r['model']} | {r['form']} | {r['file_bytes'] / 2 ** 20:.1f} | {r['session_s']:.2f} | "
                     f"{r['rss_mib']:.0f} | {lat} | {err} |")
    lines += ["", "Ratios against dense (same run):", ""]
    for model in sorted({r["model"] for r in rows}):
        d = next(r for r in rows if r["model"] == model and r["form"] == "dense")
        for r in (r for r in rows if r["model"] == model and r["form"] != "dense"):
            lat = ", ".join(f"b{k} {v / d['latency_ms'][k]:.2f}x" for k, v in r["latency_ms"].items())
            lines.append(f"- {model} {r['form']}: file {r['file_bytes'] / d['file_bytes']:.3f}x, session "
                         f"{r['session_s'] / d['session_s']:.2f}x, RSS {r['rss_mib'] / max(d['rss_mib'], 1e-9):.2f}x, "
                         f"latency {lat}")
    lines += ["", "Issue-16 targets for the native int4 forms (standard, ort), same run: resident memory <= 0.35x "
              "dense, session creation <= 2x dense, latency <= 1.0x dense at batch 1 on the MLP:", ""]
    for model in sorted({r["model"] for r in rows}):
        d = next(r for r in rows if r["model"] == model and r["form"] == "dense")
        for r in (r for r in rows if r["model"] == model and r["form"] in ("standard", "ort")):
            rss, ses = r["rss_mib"] / max(d["rss_mib"], 1e-9), r["session_s"] / d["session_s"]
            b = min(r["latency_ms"], key=int)
            lat = r["latency_ms"][b] / d["latency_ms"][b]
            lines.append(f"- {model} {r['form']}: RSS {rss:.2f}x ({'met' if rss <= 0.35 else 'missed'}), session "
                         f"{ses:.2f}x ({'met' if ses <= 2 else 'missed'}), latency b{b} {lat:.2f}x "
                         f"({'met' if lat <= 1.0 else 'missed'})")
    for r in (r for r in rows if "max_abs_diff_vs_functions" in r):
        lines.append(f"- {r['model']} {r['form']}: largest output difference from the folded functions session "
                     f"{r['max_abs_diff_vs_functions']:.3g}")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1")))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp4096", "minilm"], choices=["mlp4096", "minilm"])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "onnx_forms"))
    p.add_argument("--compress-embeddings", action="store_true", help="compress the embedding tables too")
    args = p.parse_args()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": " ".join(["python", "benchmarks/onnx_forms.py", *sys.argv[1:]]),
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "embeddings": (", embedding tables compressed too (compress_embeddings=True)" if args.compress_embeddings
                           else ", embedding tables dense")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench(name, args, Path(tmp))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
