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

all-MiniLM-L6-v2 (`--models minilm`, sequence length 32) with `method="auto"` at 1/8 and 1/16 (default
settings), per plan: TVM fused, TVM decode-once, TVM with build_tvm's default mode "auto" (which picks
per layer and batch; the manifest says what it picked), onnxruntime dense (the float32 model), and
onnxruntime on the compressed model's `export_onnx` in the default ONNX format and, where its per-layer
forms differ, the `ort` format. Error against onnxruntime dense: relative Frobenius norm of the token
outputs (real tokens only) and the mean cosine of the mean-pooled sentence embeddings. Resident: VmRSS
as for the MLP, and the manifest's resident weight bytes against the dense bytes of the compressed
layers. A build or run that fails is recorded in its row (one line) instead of stopping the run.

    python benchmarks/tvm_lowbit.py --runs 20        # everything (about 30 minutes on 2 shared cores)
    python benchmarks/tvm_lowbit.py --models mlp --settings rtn4-g128 --batches 1
    python benchmarks/tvm_lowbit.py --models minilm --ratios 1/16 --batches 1 --runs 3 --out /tmp/x

Writes tvm_lowbit.md and .json (default under benchmarks/results/; `--out` for another folder) with
the command, settings, date, machine load (os.getloadavg before and after) and versions. The machine
is shared: ratios are taken within one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
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

log = logging.getLogger("tvm_lowbit")
MODELS = ("mlp", "minilm")
MINILM_RATIOS = "1/8,1/16"
MINILM_MODES = (("fused", "tvm fused"), ("decode-once", "tvm decode-once"), ("auto", "tvm auto"))
# the target, read off the "tvm auto" row at 1/16
TARGET_RATIO, TARGET_RESIDENT_X, TARGET_LATENCY_X = 1 / 16, 0.1, 1.0

SETTINGS = {  # label -> (method, ratio, method options)
    "rtn4-g128": ("rtn", 0.13, {"rtn": {"group_size": 128, "choose": "ladder"}}),
    "affine2-g64": ("affine", 0.09, {"affine": {"bits": 2, "group_size": 64, "iterations": 5}}),
    "vq-1/16": ("vq", 1 / 16, {"vq": {"iterations": 4}}),
    # 2 code bits + a float16 scale per 64 = 2.25 bits per weight (ratio 0.0703)
    "rotq2-g64": ("rotq", 0.08, {"rotq": {"bits": 2, "group_size": 64}}),
}


def median_ms(fn, runs: int) -> float:
    """Median milliseconds of `runs` calls of fn after 3 warm-up calls (also tvm_kernels.py's timer)."""
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

        # imported before the RSS baseline, as tvm is (it imports riem_compiler)
        from riem_compiler.heap import release_freed_heap

    def load(path):
        if kind == "tvm":
            return load_tvm(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    out, lat, rss, trimmed = {}, {}, None, None
    for tagged in paths:
        path, b = tagged.rsplit("@", 1)
        xs = batch_inputs(feeds, b)
        before = rss_bytes()
        model = load(path)
        if kind == "tvm":
            def run():
                y = model(*xs)
                return y[0] if isinstance(y, (tuple, list)) else y
        else:
            feed = {i.name: x for i, x in zip(model.get_inputs(), xs)}

            def run():
                return model.run(None, feed)[0]
        out[b] = np.asarray(run())
        if rss is None:
            rss = rss_bytes() - before
            if kind != "tvm":  # what the heap onnxruntime's constant folding freed still holds
                trimmed = rss_bytes() - before if release_freed_heap() else None
        lat[b] = median_ms(run, runs)
        model = run = None  # free before the next batch
    np.savez(feeds_path + f".{os.getpid()}.out.npz", **out)
    return {"rss_mib": rss / 2 ** 20, "latency_ms": lat, "out": feeds_path + f".{os.getpid()}.out.npz",
            "rss_trimmed_mib": None if trimmed is None else trimmed / 2 ** 20}


def batch_inputs(feeds: dict, b: str) -> list:
    """The model inputs of batch b from the feeds file (keys "<batch>.<input index>")."""
    n = sum(1 for k in feeds if k.split(".")[0] == b)
    return [feeds[f"{b}.{i}"] for i in range(n)]


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
    p.add_argument("--models", default=",".join(MODELS), help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--settings", default=",".join(SETTINGS), help="MLP compression settings")
    p.add_argument("--ratios", default=MINILM_RATIOS, help="MiniLM auto budgets (fractions like 1/16)")
    p.add_argument("--seq-len", type=int, default=32, help="MiniLM tokens per sentence")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--out", default=str(RESULTS), help="folder for tvm_lowbit.md and .json")
    p.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        kind, feeds_path, runs, *paths = args.measure
        print(json.dumps(measure(kind, paths, feeds_path, int(runs))))
        return
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("tvm", "riem_compiler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    models = parse_models(args.models)

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    batches = [int(b) for b in args.batches.split(",")]
    meta = {
        "command": "python benchmarks/tvm_lowbit.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "models": models, "batches": batches, "runs": args.runs,
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="tvm_lowbit_") as tmp_s:
        tmp = Path(tmp_s)
        if "mlp" in models:
            settings = args.settings.split(",")
            meta.update({"model": f"{LAYERS} x Linear({N}, {N}) + bias, ReLU between (torch for TVM; the same weights "
                                  "as ONNX)",
                         "settings": {k: SETTINGS[k] for k in settings},
                         "dense_weight_bytes": sum(4 * N * N for _ in range(LAYERS))})
            rows += run_mlp(settings, batches, args.runs, tmp / "mlp")
        if "minilm" in models:
            ratios = parse_ratios(args.ratios)
            meta["minilm"] = {"model": "all-MiniLM-L6-v2 (benchmarks.models.load_minilm), inputs "
                                       f"minilm_example_inputs(batch=B, seq_len={args.seq_len}); optimize's example "
                                       f"inputs at batch 1", "seq_len": args.seq_len, "ratios": ratios,
                              "method": "auto (default settings)"}
            minilm_rows, dense_bytes = run_minilm(ratios, batches, args.seq_len, args.runs, tmp / "minilm")
            meta["minilm"]["model_bytes"] = dense_bytes
            rows += minilm_rows
    meta.update({"load_before": load_before, "load_after": os.getloadavg(), "cpu_count": os.cpu_count(),
                 "machine": platform.processor() or platform.machine(), "elapsed_s": time.perf_counter() - t_start,
                 "versions": _versions()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tvm_lowbit.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = markdown(rows, meta)
    (out / "tvm_lowbit.md").write_text(md)
    print(md)


def parse_models(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise SystemExit(f"--models: unknown {unknown or text!r}; choose from {', '.join(MODELS)}")
    return models


def parse_ratios(text: str) -> list[float]:
    """"1/8,1/16" -> [0.125, 0.0625] (plain decimals work too)."""
    out = []
    for part in text.split(","):
        num, _, den = part.strip().partition("/")
        out.append(float(num) / float(den) if den else float(num))
    return out


def ratio_label(ratio: float) -> str:
    inv = 1 / ratio
    return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-9 else f"{ratio:g}"


def run_mlp(settings: list[str], batches: list[int], runs: int, tmp: Path) -> list[dict]:
    """The 4x4096 MLP rows (per setting: TVM fused, TVM decode-once, onnxruntime MatMulNBits where it maps)."""
    import torch

    import riem_compiler as rc

    tmp.mkdir(parents=True, exist_ok=True)
    model = mlp()
    rng = np.random.default_rng(0)
    feeds = {f"{b}.0": rng.standard_normal((b, N)).astype(np.float32) for b in batches}
    rows = []
    feeds_path = tmp / "feeds.npz"
    np.savez(feeds_path, **feeds)
    onnx_dense = to_onnx(model, tmp / "dense.onnx")
    forms = {"ort dense": ("ort", [str(onnx_dense) + f"@{b}" for b in batches], None)}
    info = {}
    for label in settings:
        method, ratio, options = SETTINGS[label]
        x1 = torch.from_numpy(feeds[f"{batches[0]}.0"])
        t0 = time.perf_counter()
        res = rc.optimize(model, example_inputs=(x1,), method=method, ratio=ratio, method_options=options,
                          min_weight_size=0, quiet=True)
        fit_s = time.perf_counter() - t0
        stored = sum(cw.nbytes for cw in res.compressed.values())
        labels = sorted({rc.methods.get(cw.method).label(cw) for cw in res.compressed.values()})
        for mode, form in (("fused", "tvm fused"), ("decode-once", "tvm decode-once")):
            paths, builds, int8_batches = [], [], []
            for b in batches:
                res.example_inputs = (torch.from_numpy(feeds[f"{b}.0"]),)
                t0 = time.perf_counter()
                out = res.build_tvm(tmp / f"{label.replace('/', '_')}_{mode}_b{b}", target="llvm", mode=mode)
                builds.append(time.perf_counter() - t0)
                paths.append(f"{out}@{b}")
                manifest = json.loads((out / "manifest.json").read_text())
                if any(row.get("activations") == "int8" for row in manifest["layers"]):
                    int8_batches.append(b)
            forms[f"{form} {label}"] = ("tvm", paths, label)
            info[f"{form} {label}"] = {
                "build_s": builds, "fit_s": fit_s, "stored_weight_bytes": stored, "layer_labels": labels,
                "decode": sorted({row["decode"] for row in manifest["layers"]}), "int8_batches": int8_batches,
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
                "fit_s": time.perf_counter() - t0,
                "stored_weight_bytes": sum(cw.nbytes for cw in ores.compressed.values()),
                "layer_forms": sorted({str(r.settings.get("onnx_form", "functions")) for r in ores.report.compressed})}
    # measure: every form in its own fresh process, forms in turn
    dense_out = None
    for name, (kind, paths, label) in forms.items():  # paths: "<file or dir>@<batch>"
        m = run_measure(kind, paths, feeds_path, runs)
        if dense_out is None:
            dense_out = m["out"]
        err = {b: float(np.linalg.norm(m["out"][b] - dense_out[b]) / np.linalg.norm(dense_out[b]))
               for b in m["out"]}
        row = {"model": "mlp", "form": name, "setting": label, "rss_mib": m["rss_mib"],
               "latency_ms": m["latency_ms"], "output_rel_error": err, **info.get(name, {})}
        rows.append(row)
        log.info("%-34s rss +%8.1f MiB  latency %s  err %s", name, m["rss_mib"], m["latency_ms"], err)
    return rows


def one_line(exc: BaseException) -> str:
    """The last non-empty line of an error (a failed build's or a child process's traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def layer_summary(manifest: dict) -> dict:
    """From a TVM manifest: per (method, where decoded, why) the layer count, and the resident weight
    bytes against the dense bytes of the compressed layers."""
    groups = {}
    for row in manifest["layers"]:
        decode = row["decode"] or "stored dense"
        if row.get("activations") == "int8":
            decode += ", int8 activations"
        key = (row["method"], decode, row["why"] or row["reason"])
        groups[key] = groups.get(key, 0) + 1
    return {"groups": [{"method": m, "decode": d, "why": w, "layers": n} for (m, d, w), n in sorted(
                groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or ""))],
            "resident_weight_bytes": sum(row["resident_bytes"] for row in manifest["layers"]),
            "dense_weight_bytes": sum(row["dense_bytes"] for row in manifest["layers"]),
            "stored_weight_bytes": sum(row["stored_bytes"] for row in manifest["layers"])}


def run_minilm(ratios: list[float], batches: list[int], seq_len: int, runs: int, tmp: Path) -> tuple[list[dict], int]:
    """The MiniLM rows: onnxruntime dense, then per auto plan the TVM modes and the compressed ONNX forms.
    Returns (rows, bytes of the float32 model's parameters)."""
    import riem_compiler as rc
    from benchmarks import models as bm
    from riem_compiler.api import torch_model_bytes

    tmp.mkdir(parents=True, exist_ok=True)
    model, tok = bm.load_minilm()
    inputs = {b: tuple(bm.minilm_example_inputs(tok, batch=b, seq_len=seq_len)) for b in batches}
    feeds_path = tmp / "feeds.npz"
    np.savez(feeds_path, **{f"{b}.{i}": t.numpy() for b, ts in inputs.items() for i, t in enumerate(ts)})
    forms = {}  # name -> (kind, paths, info)
    paths = []
    for b in batches:
        path = bm.export_minilm_onnx(tmp / f"dense_b{b}.onnx", model, tok, batch=b, seq_len=seq_len)
        paths.append(f"{path}@{b}")
    forms["ort dense"] = ("ort", paths, {"plan": None})
    for ratio in ratios:
        plan = f"auto-{ratio_label(ratio)}"
        t0 = time.perf_counter()
        res = rc.optimize(model, example_inputs=tuple(bm.minilm_example_inputs(tok, batch=1, seq_len=seq_len)),
                          method="auto", ratio=ratio, quiet=True)
        fit_s = time.perf_counter() - t0
        counts = {}
        for cw in res.compressed.values():
            counts[cw.method] = counts.get(cw.method, 0) + 1
        plan_info = {"plan": plan, "ratio": ratio, "fit_s": fit_s, "plan_methods": dict(sorted(counts.items())),
                     "stored_weight_bytes": sum(cw.nbytes for cw in res.compressed.values())}
        log.info("%s: %d layers %s, fitted in %.0f s", plan, len(res.compressed), counts, fit_s)
        for mode, form in MINILM_MODES:
            paths, info = [], {**plan_info, "mode": mode, "build_s": {}, "layers": {}, "errors": {}}
            for b in batches:
                res.example_inputs = inputs[b]
                t0 = time.perf_counter()
                try:
                    out = res.build_tvm(tmp / f"{plan.replace('/', '_')}_{mode}_b{b}", target="llvm", mode=mode)
                except Exception as exc:  # recorded in the row: one mode failing must not stop the run
                    info["errors"][str(b)] = one_line(exc)
                    log.warning("%s %s batch %d: build failed: %s", plan, form, b, info["errors"][str(b)])
                    continue
                info["build_s"][str(b)] = time.perf_counter() - t0
                info["layers"][str(b)] = layer_summary(json.loads((out / "manifest.json").read_text()))
                paths.append(f"{out}@{b}")
                log.info("%s %s batch %d built in %.0f s", plan, form, b, info["build_s"][str(b)])
            forms[f"{form} {plan}"] = ("tvm", paths, info)
        default_forms = None
        for fmt, form in (("auto", "ort default-format"), ("ort", "ort ort-format")):
            paths, info = [], {**plan_info, "onnx_format": fmt, "errors": {}}
            for b in batches:
                res.example_inputs = inputs[b]
                try:
                    path = res.export_onnx(tmp / f"{plan.replace('/', '_')}_{fmt}_b{b}.onnx", onnx_format=fmt)
                except Exception as exc:
                    info["errors"][str(b)] = one_line(exc)
                    log.warning("%s %s batch %d: export failed: %s", plan, form, b, info["errors"][str(b)])
                    continue
                layer_forms = {r.name: str(r.settings.get("onnx_form", "functions")) for r in res.report.compressed}
                info["layer_forms"] = count_values(layer_forms)
                if fmt == "auto":
                    default_forms = layer_forms
                elif layer_forms == default_forms:
                    break  # the same file as the default format: not measured twice
                paths.append(f"{path}@{b}")
            if fmt == "ort" and not paths and not info["errors"]:
                info["note"] = "the same per-layer forms as the default format: not measured twice"
                log.info("%s: onnx_format 'ort' writes the same per-layer forms as the default; not measured", plan)
            forms[f"{form} {plan}"] = ("ort", paths, info)
    rows = measure_minilm(forms, inputs, feeds_path, runs)
    return rows, torch_model_bytes(model)


def count_values(d: dict) -> dict:
    out = {}
    for v in d.values():
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def measure_minilm(forms: dict, inputs: dict, feeds_path: Path, runs: int) -> list[dict]:
    """Every form in its own fresh process, forms in turn; errors against onnxruntime dense (the first form)."""
    import torch

    from benchmarks.models import sentence_embedding

    rows, dense_out, dense_emb = [], None, {}
    for name, (kind, paths, info) in forms.items():
        row = {"model": "minilm", "form": name, "kind": kind, **info}
        row.setdefault("errors", {})
        if not paths:
            rows.append(row)
            continue
        try:
            m = run_measure(kind, paths, feeds_path, runs)
        except RuntimeError as exc:
            row["errors"]["measure"] = one_line(exc)
            log.warning("%s: measurement failed: %s", name, row["errors"]["measure"])
            rows.append(row)
            continue
        if dense_out is None:
            dense_out = m["out"]
        rel, cos = {}, {}
        for b, y in m["out"].items():
            ids, mask = inputs[int(b)]
            keep = mask.numpy().astype(bool)
            ref = dense_out[b]
            rel[b] = float(np.linalg.norm(y[keep] - ref[keep]) / np.linalg.norm(ref[keep]))
            if b not in dense_emb:
                dense_emb[b] = sentence_embedding(torch.from_numpy(ref), ids, mask)
            emb = sentence_embedding(torch.from_numpy(np.asarray(y, dtype=np.float32)), ids, mask)
            cos[b] = float((emb * dense_emb[b]).sum(1).mean())
        row.update({"rss_mib": m["rss_mib"], "latency_ms": m["latency_ms"], "output_rel_error": rel,
                    "embedding_cosine": cos})
        if m.get("rss_trimmed_mib") is not None:
            row["rss_trimmed_mib"] = m["rss_trimmed_mib"]
        rows.append(row)
        log.info("%-40s rss +%7.1f MiB  latency %s  err %s  cos %s", name, m["rss_mib"], m["latency_ms"], rel, cos)
    return rows


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
    """The results page: the MLP table (as before), then the MiniLM one; old JSON rows without a
    "model" field are MLP rows."""
    mlp_rows = [r for r in rows if r.get("model", "mlp") == "mlp"]
    minilm_rows = [r for r in rows if r.get("model") == "minilm"]
    head = ["```", json.dumps({k: meta[k] for k in ("command", "date", "load_before", "load_after", "cpu_count",
                                                   "machine", "runs", "elapsed_s", "versions")}), "```", ""]
    if mlp_rows:
        lines = ["# Low-bit weights at run time: TVM fused vs decode-once vs onnxruntime (4x4096 MLP)", ""] + head
        lines += markdown_mlp(mlp_rows, meta)
        if minilm_rows:
            lines += ["## all-MiniLM-L6-v2, auto plans", ""] + markdown_minilm(minilm_rows, meta)
    else:
        lines = ["# Low-bit weights at run time: TVM vs onnxruntime (all-MiniLM-L6-v2, auto plans)", ""] + head
        lines += markdown_minilm(minilm_rows, meta)
    return "\n".join(lines)


def markdown_mlp(rows, meta) -> list[str]:
    dense = next(r for r in rows if r["form"] == "ort dense")
    bs = [str(b) for b in meta["batches"]]
    lines = [f"Model: {meta['model']}; dense weights {meta['dense_weight_bytes'] / 2 ** 20:.0f} MiB. Resident: VmRSS "
             "added by loading the model and one call in a fresh process (x: against onnxruntime dense). Latency: "
             "median ms; (x) against onnxruntime dense in the same run. Error: relative Frobenius norm of the output "
             "against onnxruntime dense. TVM runs on every physical core (load_tvm sizes its thread pool; onnxruntime "
             "runs 2 threads); its kernels at 1-4 rows per call multiply int8 activations on an AVX-512 VNNI CPU "
             "where the method has that form (decode column), as MatMulNBits does at accuracy_level 4.", "",
             "| form | resident MiB (x dense) | " + " | ".join(f"batch {b} ms (x)" for b in bs) + " | error b1 | "
             "decode | weight bytes resident (manifest) | auto picks |",
             "|---|---|" + "---|" * len(bs) + "---|---|---|---|"]
    for r in rows:
        lat = " | ".join(f"{r['latency_ms'][b]:.2f} ({r['latency_ms'][b] / dense['latency_ms'][b]:.2f})" for b in bs)
        res_w = r.get("resident_weight_bytes")
        lines.append(f"| {r['form']} | {r['rss_mib']:.0f} ({r['rss_mib'] / dense['rss_mib']:.2f}) | {lat} | "
                     f"{r['output_rel_error'][bs[0]]:.2e} | {_decode_text(r)} | "
                     f"{'-' if res_w is None else f'{res_w / 2 ** 20:.1f} MiB'} | "
                     f"{', '.join(f'b{b}: {v}' for b, v in r['auto_picks'].items()) if 'auto_picks' in r else '-'} |")
    lines += ["", "Per-setting details (layer labels, stored bytes, build seconds) are in tvm_lowbit.json.", ""]
    return lines


def _decode_text(row: dict) -> str:
    """Where a row's weights are decoded, and at which batches its kernels take int8 activations."""
    text = ", ".join(row.get("decode", [])) or "-"
    if row.get("int8_batches"):
        text += " (int8 activations at b" + ", b".join(str(b) for b in row["int8_batches"]) + ")"
    return text


SHORT_DECODE = {"fused into the matmul": "fused", "fused into the matmul, int8 activations": "fused (int8 x)",
                "once at load": "at load", "per call": "per call",
                "stored dense": "stored dense"}


def _groups_text(summary: dict) -> str:
    """"rotq x13 fused, vq x20 per call" from a layer_summary (reasons are listed below the table)."""
    merged = {}
    for g in summary["groups"]:
        key = f"{g['method']} {SHORT_DECODE.get(g['decode'], g['decode'])}"
        merged[key] = merged.get(key, 0) + g["layers"]
    return ", ".join(f"{k.split(' ', 1)[0]} x{n} {k.split(' ', 1)[1]}" for k, n in merged.items())


def _x(value, ref) -> str:
    return f"{value / ref:.2f}" if ref else "-"


def markdown_minilm(rows, meta) -> list[str]:
    mm = meta.get("minilm", {})
    bs = [str(b) for b in meta["batches"]]
    b0 = bs[0]
    dense = next((r for r in rows if r["form"] == "ort dense" and "rss_mib" in r), None)
    if dense is None:
        return ["onnxruntime dense did not run, so nothing to compare against: " +
                json.dumps(next((r.get("errors") for r in rows if r["form"] == "ort dense"), {})), ""]
    compressed = next((s["dense_weight_bytes"] for r in rows for s in (r.get("layers") or {}).values()), None)
    rest = ("" if compressed is None else f", of which the compressed layers hold {compressed / 2 ** 20:.1f} MiB (the "
            "rest, embedding tables, LayerNorms and biases, stays float32 in every form)")
    lines = [f"Model: {mm.get('model', 'all-MiniLM-L6-v2')}; float32 parameters "
             f"{mm.get('model_bytes', 0) / 2 ** 20:.1f} MiB{rest}. Plans: `rc.optimize(method=\"auto\", ratio=R)` with "
             "default settings. Resident: VmRSS added by loading the model (batch "
             f"{b0} build/file) and one call in a fresh process, (x) against onnxruntime dense; for onnxruntime also "
             "after glibc's malloc_trim(0) (what riem_compiler's own loader calls after creating a session: the "
             "heap onnxruntime's constant folding of decoder functions freed goes back to the OS). Latency: median ms, "
             "(x) against onnxruntime dense in the same run; each TVM batch is its own build, each ONNX batch its "
             "own static-shape file. Error against onnxruntime dense at batch "
             f"{b0}: relative Frobenius norm of the token outputs (real tokens only), and the mean cosine of the "
             "mean-pooled sentence embeddings. Weights resident (manifest): the TVM manifest's resident bytes of "
             "the compressed layers, (x) against their float32 bytes; TVM `auto` picks per layer and batch, "
             "its layers column is per batch. Layers: per method, where the weight is decoded.", "",
             "| plan | form | resident MiB (x) | " + " | ".join(f"batch {b} ms (x)" for b in bs) +
             f" | rel. error b{b0} | cosine b{b0} | weights resident MiB (x) | layers | failed |",
             "|---|---|---|" + "---|" * len(bs) + "---|---|---|---|---|"]
    notes = {}
    for r in rows:
        plan = r.get("plan") or "-"
        form = r["form"].replace(f" {plan}", "") if plan != "-" else r["form"]
        if "rss_mib" in r:
            rss = f"{r['rss_mib']:.0f} ({_x(r['rss_mib'], dense['rss_mib'])})"
            if r.get("rss_trimmed_mib") is not None and r is not dense:
                rss += f"; {r['rss_trimmed_mib']:.0f} ({_x(r['rss_trimmed_mib'], dense['rss_mib'])}) after malloc_trim"
            lat = " | ".join(f"{r['latency_ms'][b]:.2f} ({_x(r['latency_ms'][b], dense['latency_ms'][b])})"
                             if b in r["latency_ms"] else "-" for b in bs)
            err = (f"{r['output_rel_error'][b0]:.2e}" if b0 in r["output_rel_error"] else "-")
            cos = (f"{r['embedding_cosine'][b0]:.4f}" if b0 in r["embedding_cosine"] else "-")
        else:
            rss, lat, err, cos = "-", " | ".join("-" for _ in bs), "-", "-"
        layers = r.get("layers") or {}
        if layers:
            first = layers.get(b0) or next(iter(layers.values()))
            weights = (f"{first['resident_weight_bytes'] / 2 ** 20:.1f} "
                       f"({_x(first['resident_weight_bytes'], first['dense_weight_bytes'])})")
            texts = {b: _groups_text(s) for b, s in layers.items()}
            if len(set(texts.values())) == 1:
                layer_text = next(iter(texts.values()))
            else:
                layer_text = "; ".join(f"b{b}: {t}" for b, t in texts.items())
            if r.get("mode") == "auto" and len({s["resident_weight_bytes"] for s in layers.values()}) > 1:
                weights = ", ".join(f"b{b}: {s['resident_weight_bytes'] / 2 ** 20:.1f} "
                                    f"({_x(s['resident_weight_bytes'], s['dense_weight_bytes'])})"
                                    for b, s in layers.items())
            add_notes(notes, r["form"], layers)
        elif "layer_forms" in r:
            weights = "-"
            layer_text = "ONNX " + ", ".join(f"{k} x{n}" for k, n in r["layer_forms"].items())
            if r.get("note"):
                layer_text += f"; {r['note']}"
        else:
            weights, layer_text = "-", "-"
        failed = "; ".join(f"{k if k == 'measure' else 'b' + k}: {v}" for k, v in r.get("errors", {}).items()) or "-"
        lines.append(f"| {plan} | {form} | {rss} | {lat} | {err} | {cos} | {weights} | {layer_text} | "
                     f"{failed.replace('|', '/')} |")
    lines += [""] + target_lines(rows, dense, bs)
    if notes:
        lines += ["", "Layers not fused into a matmul kernel, and why (from each build's manifest; decode-once rows "
                  "decode every layer at load by choice):", ""]
        for (form, place, why), (methods, batches) in notes.items():
            lines.append(f"- {form}: {', '.join(f'{m} x{n}' for m, n in methods.items())} {place} "
                         f"(batch {', '.join(batches)}): {why}")
    lines += ["", "Per-plan details (methods per plan, fit and build seconds, per-batch manifests, ONNX forms) are in "
              "tvm_lowbit.json.", ""]
    return lines


def add_notes(notes: dict, form: str, layers: dict) -> None:
    """Collect the layers a TVM row did not fuse: (form, where decoded, why) -> (method -> layers, batches).
    The decode-once mode's reason is the mode itself, so it is left out."""
    for b, summary in layers.items():
        for g in summary["groups"]:
            if g["decode"].startswith("fused into the matmul") or g["why"] == "mode 'decode-once'":
                continue
            key = (form, SHORT_DECODE.get(g["decode"], g["decode"]), g["why"] or "no reason recorded")
            methods, batches = notes.setdefault(key, ({}, []))
            if b not in batches:
                batches.append(b)
            if len(batches) == 1:  # counts from the first batch that has this reason
                methods[g["method"]] = methods.get(g["method"], 0) + g["layers"]


def target_lines(rows, dense, bs) -> list[str]:
    """The issue's target read off the TVM auto row at 1/16: resident compressed weights <= 0.1x their
    dense bytes, latency <= 1.0x onnxruntime dense."""
    want = f"tvm auto auto-{ratio_label(TARGET_RATIO)}"
    r = next((r for r in rows if r["form"] == want), None)
    head = (f"Target (issue 23): MiniLM auto at {ratio_label(TARGET_RATIO)} through TVM, resident compressed weights "
            f"at most {TARGET_RESIDENT_X}x dense and latency at most {TARGET_LATENCY_X}x onnxruntime dense: ")
    if r is None or not r.get("layers"):
        return [head + "not measured in this run."]
    parts, met = [], True
    for b in bs:
        s = r["layers"].get(b)
        if s is None:
            parts.append(f"b{b} not built")
            met = False
            continue
        wx = s["resident_weight_bytes"] / s["dense_weight_bytes"]
        lx = r["latency_ms"][b] / dense["latency_ms"][b] if b in r.get("latency_ms", {}) else None
        ok = wx <= TARGET_RESIDENT_X and lx is not None and lx <= TARGET_LATENCY_X
        met = met and ok
        parts.append(f"b{b} weights {wx:.2f}x, latency {'-' if lx is None else f'{lx:.2f}x'}"
                     f" ({'met' if ok else 'not met'})")
    return [head + "; ".join(parts) + f". Overall: {'met' if met else 'not met'}."]


if __name__ == "__main__":
    main()
