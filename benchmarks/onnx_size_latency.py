"""ONNX file size, onnxruntime session-creation time and steady-state latency, dense vs RieM.

For all-MiniLM-L6-v2 (exported from the pure-torch encoder in benchmarks/models.py) and the
digits conv net: export the dense model to ONNX, compress the ONNX file with
`riem_compiler.optimize`, write the compressed ONNX (decoder functions) and its materialised twin,
then measure in the same run:
- file bytes before/after, and the bytes of the compressed layers (reported ratio) vs the file;
- onnxruntime session creation with default options and with ORT_DISABLE_ALL;
- whether onnxruntime folds the decoders into constants (optimised graph written by ORT: decoder
  ops left or not);
- steady-state latency (median) of dense vs compressed, default options; compressed with
  ORT_DISABLE_ALL too (the decoder then runs on every call);
- output error of the compressed model vs the dense one, and vs its materialised twin.

Fit setting: session times and latency do not depend on how well the layers were fitted, but
the error/accuracy columns do. --steps / --time-budget set the per-layer fit (defaults: the
library's Config defaults; --quick uses a few steps and only checks that everything runs). The
published numbers must come from a full run on a quiet machine: on a loaded machine the time
budget cuts fits short (an earlier run at 300 steps / 10 s per layer under heavy load left
per-layer relative error ~0.98, i.e. useless accuracy columns); check mean_layer_rel_error.

Usage: python benchmarks/onnx_size_latency.py [--quick] [--models minilm digits_cnn]
       [--steps N] [--time-budget SECONDS_PER_LAYER] [--ratio R] [--runs N]
Writes benchmarks/results/onnx_size_latency{,_quick}.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import riem_compiler as rc  # noqa: E402
from benchmarks import models  # noqa: E402
from riem_compiler.codegen.onnx_export import DOMAIN, materialize_onnx, save_onnx  # noqa: E402
from riem_compiler.config import Config  # noqa: E402
from riem_compiler.frontend.onnx_frontend import load_onnx  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# per-layer fit for the error/accuracy columns; see the module docstring
FIT_STEPS, FIT_SECONDS = Config.steps, Config.time_budget_s
QUICK_STEPS, QUICK_SECONDS = 40, 2.0


def export_dense(name: str, out_dir: Path, quick: bool):
    """(dense .onnx path, feeds) for one model: one self-contained file (the exporter's external
    data is folded back in), so before/after sizes compare like for like."""
    path = out_dir / f"{name}.export.onnx"
    if name == "minilm":
        model, tok = models.load_minilm()
        seq = 16 if quick else 32
        models.export_minilm_onnx(path, model, tok, batch=2, seq_len=seq)
        ids, mask = models.minilm_example_inputs(tok, batch=2, seq_len=seq)
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    elif name == "digits_cnn":
        model = models.digits_cnn()
        (x,) = models.digits_example_inputs(batch=32)
        # optimize=True folds the exporter's CastLike/Expand zero-bias pattern; with optimize=False
        # onnxruntime cannot fuse BatchNorm into the convs of the dense file, which distorts the baseline
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["logits"],
                          dynamo=True, optimize=True)
        feeds = {"x": x.numpy()}
    else:
        raise SystemExit(f"unknown model {name!r}; choose from minilm, digits_cnn")
    dense = save_onnx(load_onnx(path), out_dir / f"{name}.onnx")
    return dense, feeds


def session(path: Path, disable: bool = False, optimized_out: Path | None = None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if disable:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_out is not None:
        opts.optimized_model_filepath = str(optimized_out)
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - t0


def creation_time(path: Path, disable: bool, repeats: int) -> float:
    return statistics.median(session(path, disable)[1] for _ in range(repeats))


def latency(sess, feeds, runs: int) -> float:
    for _ in range(max(3, runs // 10)):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decoder_ops_after_optimisation(path: Path, tmp: Path) -> int:
    """Nodes of the custom domain (or Sigmoid from their bodies) left in ORT's optimised graph."""
    out = tmp / f"{path.stem}.ort_optimized.onnx"
    session(path, optimized_out=out)
    g = onnx.load(str(out), load_external_data=False)
    return sum(1 for n in g.graph.node if n.domain == DOMAIN or n.op_type in ("BitShift", "Sigmoid"))


def digits_accuracy(sess, batch: int = 32) -> float:
    """Test accuracy through onnxruntime; the export has a static batch, so whole batches only."""
    _, _, x_test, y_test = models.digits_data()
    n = (len(x_test) // batch) * batch
    preds = [sess.run(None, {"x": x_test[i:i + batch].numpy()})[0].argmax(1) for i in range(0, n, batch)]
    return float((np.concatenate(preds) == y_test[:n].numpy()).mean())


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench(name: str, args, tmp: Path) -> dict:
    dense_path, feeds = export_dense(name, tmp, args.quick)
    t0 = time.perf_counter()
    res = rc.optimize(str(dense_path), ratio=args.ratio, steps=args.steps, time_budget_s=args.time_budget,
                      error_ceiling=10.0, quiet=True)
    fit_s = time.perf_counter() - t0
    riem_path = res.export_onnx(tmp / f"{name}.riem.onnx")
    plain_path = save_onnx(materialize_onnx(res.model), tmp / f"{name}.materialized.onnx")
    onnx.checker.check_model(str(riem_path), full_check=True)
    checker = "pass"

    dense_bytes = sum(int(np.prod(cw.shape)) * 4 for cw in res.compressed.values())
    stored_bytes = sum(cw.nbytes for cw in res.compressed.values())
    size_before, size_after = dense_path.stat().st_size, riem_path.stat().st_size

    reps = 3 if args.quick else 5
    create = {
        "dense_default_s": creation_time(dense_path, False, reps),
        "dense_disable_all_s": creation_time(dense_path, True, reps),
        "riem_default_s": creation_time(riem_path, False, reps),
        "riem_disable_all_s": creation_time(riem_path, True, reps),
    }
    folded_left = decoder_ops_after_optimisation(riem_path, tmp)

    runs = args.runs
    s_dense, _ = session(dense_path)
    s_riem, _ = session(riem_path)
    s_plain, _ = session(plain_path)
    s_riem_raw, _ = session(riem_path, disable=True)
    # alternate dense / riem / materialised three times so drift on the shared machine hits all
    lat = {"dense": [], "riem": [], "plain": []}
    for _ in range(3):
        for key, sess in (("dense", s_dense), ("riem", s_riem), ("plain", s_plain)):
            lat[key].append(latency(sess, feeds, runs))
    lat_dense, lat_riem, lat_plain = (min(lat[k]) for k in ("dense", "riem", "plain"))
    lat_riem_raw = latency(s_riem_raw, feeds, max(5, runs // 10))

    y_dense = s_dense.run(None, feeds)[0]
    y_riem = s_riem.run(None, feeds)[0]
    y_plain = s_plain.run(None, feeds)[0]
    y_raw = s_riem_raw.run(None, feeds)[0]
    out = {
        "model": name, "fit_steps": args.steps, "fit_time_budget_s": args.time_budget,
        "layers_compressed": len(res.compressed), "layers_skipped": len(res.specs) - len(res.compressed),
        "fit_seconds": fit_s, "checker_full": checker,
        "file_bytes_before": size_before, "file_bytes_after": size_after, "file_ratio": size_after / size_before,
        "layer_bytes_dense": dense_bytes, "layer_bytes_stored": stored_bytes, "layer_ratio": stored_bytes / dense_bytes,
        "file_bytes_expected": size_before - dense_bytes + stored_bytes,
        "file_overhead_bytes": size_after - (size_before - dense_bytes + stored_bytes),
        "materialized_bytes": plain_path.stat().st_size,
        **create,
        "session_ratio_default": create["riem_default_s"] / create["dense_default_s"],
        "ort_folds_decoders": folded_left == 0, "decoder_nodes_after_ort_opt": folded_left,
        "latency_dense_ms": lat_dense * 1e3, "latency_riem_ms": lat_riem * 1e3,
        "latency_ratio": lat_riem / lat_dense, "latency_materialized_ms": lat_plain * 1e3, "latency_riem_disable_all_ms": lat_riem_raw * 1e3,
        "out_rel_err_vs_dense": rel_err(y_riem, y_dense), "out_max_abs_vs_materialized": float(np.abs(y_riem - y_plain).max()),
        "out_max_abs_disable_all_vs_default": float(np.abs(y_raw - y_riem).max()),
        "mean_layer_rel_error": float(np.mean([r.rel_error for r in res.report if r.status == "compressed"]))
        if res.compressed else None,
    }
    if name == "digits_cnn":
        out["accuracy_dense"], out["accuracy_riem"] = digits_accuracy(s_dense), digits_accuracy(s_riem)
    return out


COLUMNS = [("model", "{}"), ("fit_steps", "{}"), ("layers_compressed", "{}"), ("file_bytes_before", "{:,}"), ("file_bytes_after", "{:,}"),
           ("file_ratio", "{:.3f}"), ("layer_ratio", "{:.3f}"), ("file_overhead_bytes", "{:,}"),
           ("dense_default_s", "{:.3f}"), ("riem_default_s", "{:.3f}"), ("riem_disable_all_s", "{:.3f}"),
           ("ort_folds_decoders", "{}"), ("latency_dense_ms", "{:.3f}"), ("latency_riem_ms", "{:.3f}"),
           ("latency_ratio", "{:.3f}"), ("latency_riem_disable_all_ms", "{:.2f}"), ("out_rel_err_vs_dense", "{:.4f}"),
           ("out_max_abs_vs_materialized", "{:.2e}"), ("mean_layer_rel_error", "{:.3f}"),
           ("accuracy_dense", "{:.4f}"), ("accuracy_riem", "{:.4f}")]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(f.format(r[c]) if r.get(c) is not None else "-" for c, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few fit steps, shorter sequence, fewer timing runs")
    p.add_argument("--models", nargs="+", default=["minilm", "digits_cnn"])
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=None,
                   help=f"fit steps per layer (default {FIT_STEPS}; --quick: {QUICK_STEPS})")
    p.add_argument("--time-budget", type=float, default=None,
                   help=f"fit seconds per layer, a cap on top of --steps (default {FIT_SECONDS:g}; --quick: {QUICK_SECONDS:g})")
    p.add_argument("--runs", type=int, default=None)
    args = p.parse_args()
    args.steps = args.steps or (QUICK_STEPS if args.quick else FIT_STEPS)
    args.time_budget = args.time_budget or (QUICK_SECONDS if args.quick else FIT_SECONDS)
    args.runs = args.runs or (20 if args.quick else 100)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    suffix = "_quick" if args.quick else ""
    json_path = RESULTS / f"onnx_size_latency{suffix}.json"
    old = json.loads(json_path.read_text()) if json_path.exists() else {"env": {}, "rows": []}
    # rows of models not run this time are kept, so models can be measured in separate runs
    kept = [{"fit_steps": old["env"].get("steps"), "fit_time_budget_s": old["env"].get("time_budget_s"), **r}
            for r in old["rows"] if r["model"] not in args.models]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(bench(name, args, Path(tmp)))
            print(json.dumps(rows[-1], indent=1), flush=True)
    env = {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": ort.__version__,
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": 2,
           "quick": args.quick, "ratio": args.ratio, "runs": args.runs}
    rows = sorted(kept + rows, key=lambda r: r["model"])
    md = (f"# ONNX size and latency (dense vs RieM decoder functions)\n\n{table(rows)}\n\n"
          "file_ratio: compressed .onnx bytes / dense .onnx bytes (embeddings, LayerNorm, biases stay dense); "
          "layer_ratio: stored bytes / fp32 bytes of the compressed layers (what the report states); "
          "file_overhead_bytes: file bytes minus (dense file - dense layer bytes + stored bytes). "
          "mean_layer_rel_error: mean ||W - W_hat||_F / ||W||_F over compressed layers (fit quality; the "
          "error/accuracy columns mean little when it is near 1). "
          "fit_steps: RieM fit steps per layer of that row's run. "
          "Session times are medians; latency is the median per call, onnxruntime CPU, 2 threads, same run "
          "(rows of different models may come from different runs: `python benchmarks/onnx_size_latency.py "
          "--models NAME --steps N`).\n\n"
          f"Environment: `{json.dumps(env)}`\n\n"
          "Why session creation is slow for large models and what the decoder body costs: "
          "`onnx_decoder_body.md`.\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"onnx_size_latency{suffix}.md").write_text(md)
    json_path.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
