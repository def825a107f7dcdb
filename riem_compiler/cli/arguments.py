"""`riem-compile`'s arguments: the argparse parser (one-line errors, exit 2) and the Config they give."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from riem_compiler.cli.common import EXIT_INPUT, PROG


def _config_default(name: str):
    """Config's default of one field: the flag's default, so the two cannot drift apart."""
    import dataclasses

    from riem_compiler.config import Config

    return next(f.default for f in dataclasses.fields(Config) if f.name == name)


TARGETS = ("onnx", "tvm-llvm", "tvm-cuda")


def _state_bits(text: str):
    return "auto" if text == "auto" else int(text)


def _finite_float(text: str) -> float:
    """argparse type: a float that is not nan or +-inf (nan would silently disable checks)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
    return value



class _Parser(argparse.ArgumentParser):
    """argparse with the tool's one-line error format (no usage block), exit code 2."""

    def error(self, message: str):
        print(f"{PROG}: error: {' '.join(message.split())} (see {PROG} --help)", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)


def build_parser() -> argparse.ArgumentParser:
    from riem_compiler import __version__
    from riem_compiler.config import METHODS, ONNX_FORMATS

    p = _Parser(
        prog=PROG,
        description="Data-free compression of Linear/Conv/MatMul weights (RieM and baselines); "
                    "writes ONNX or a compiled TVM module.",
        epilog="Exit codes: 0 ok, 1 compile/internal error, 2 bad input or option, 3 output error above "
               "--max-error (nothing written), 4 output not writable, 130 interrupted, 143 terminated (SIGTERM). "
               "--model-ref runs your Python code; use .pt2 files only from sources you trust (pickled objects "
               "and stored code in them are refused unless --allow-pickle). See docs/CLI.md.")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help=".onnx file, torch.export .pt2 program, or a weights file (.safetensors; .pt/.pth "
                        "with --allow-pickle) for --model-ref")
    p.add_argument("-o", "--output", metavar="OUT", help="output directory (created; files in it are replaced)")
    p.add_argument("--target", choices=TARGETS, default="onnx", help="artifact to write (default: onnx)")
    p.add_argument("--onnx-format", choices=ONNX_FORMATS, default=_config_default("onnx_format"),
                   help="ONNX form of compressed weights. auto (default): per layer the best native form that "
                        "maps (onnxruntime MatMulNBits for RTN/affine MatMul/Gemm weights, GatherBlockQuantized "
                        "for RTN tables, blocked DequantizeLinear for RTN Conv weights), else decoder functions "
                        "(riem, vq, rotq, svd, ...); functions: decoder functions for every layer, which "
                        "onnxruntime folds to dense float32 when it opens the file; standard: opset-21 "
                        "DequantizeLinear where a layout maps (8/4-bit RTN); ort: as auto, and RTN also chooses among "
                        "the 8/4-bit settings that map (at ratios above ~0.16 more weight error, e.g. 4-bit "
                        "groups instead of 7-bit codes at 0.25). The report says which form each layer got "
                        "and why")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    g = p.add_argument_group("compression")
    g.add_argument("--ratio", type=_finite_float, default=_config_default("ratio"),
                   help="stored bytes per layer as a fraction of fp32 bytes; for auto the global budget "
                        "(default %(default)s)")
    g.add_argument("--method", choices=METHODS, default=_config_default("method"),
                   help="compression method (default: %(default)s)")
    g.add_argument("--state-bits", type=_state_bits, default=_config_default("state_bits"),
                   help="RieM state bit width, or auto (riem: 8/6/4 chosen per layer by pilot fits; default %(default)s)")
    g.add_argument("--metric-dtype", default=_config_default("metric_dtype"),
                   help="RieM metric network dtype: float16|float32 (default %(default)s)")
    g.add_argument("--metric-units", type=int, default=_config_default("m"), metavar="M",
                   help="RieM metric width m (default %(default)s)")
    g.add_argument("--steps", type=int, default=_config_default("steps"),
                   help="RieM fitting steps per layer (default %(default)s)")
    g.add_argument("--time-budget", type=_finite_float, default=None, metavar="S",
                   help="optional wall-clock cap on each RieM fit, in seconds (default: none, --steps alone decide; "
                        "a fit the cap stops is worse, depends on machine load, and is flagged in the report)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads of each layer fit (Ray: CPUs per task); results are bit-identical for the same "
                        "seed, settings and thread count, whichever executor and worker count (default 1)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local executor: layer fits at once (default: the available cores // --threads)")
    g.add_argument("--auto-riem", action="store_true",
                   help="auto: also offer RieM candidates (fitted at ratio/2; seconds to minutes per layer; "
                        "they help small CNNs at very low budgets; default off)")
    g.add_argument("--plan-for", choices=("any", "onnx", "tvm"), default="any",
                   help="auto: plan for a deployment target: only candidates it runs in a compressed form, at "
                        "their run-time weight bytes. onnx: MatMulNBits / GatherBlockQuantized / DequantizeLinear "
                        "forms of the default --onnx-format (RTN, affine); tvm: methods with a fused dequantise-"
                        "matmul kernel (--tvm-mode fused keeps them compact); any (default): every candidate")
    g.add_argument("--error-ceiling", type=_finite_float, default=_config_default("error_ceiling"),
                   help="keep a layer dense when its relative weight error is above this (default %(default)s)")
    g.add_argument("--sensitivity", choices=("output", "weight"), default=_config_default("sensitivity"),
                   help="auto: what a candidate costs: its predicted share of the model's output error, measured "
                        "on synthetic inputs (output, default), or its size-weighted weight error (weight)")
    g.add_argument("--sensitivity-samples", type=int, default=_config_default("sensitivity_samples"), metavar="N",
                   help="auto: synthetic inputs for the output sensitivity (the first half run the per-layer "
                        "probes), and a quarter as many held out to measure plans for the report (default %(default)s)")
    g.add_argument("--sensitivity-inversion-steps", type=int, default=_config_default("sensitivity_inversion_steps"),
                   metavar="N", help="auto: BatchNorm-inversion steps that make the synthetic inputs of a torch model "
                                     "with BatchNorm (default %(default)s)")
    g.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="leave layers whose name matches this glob dense (repeat the flag for more)")
    g.add_argument("--ignore-type", action="append", default=[], metavar="KIND",
                   help="leave layers of this kind dense: linear, matmul, conv1d, conv2d, embedding (repeatable)")
    g.add_argument("--min-weight-size", type=int, default=_config_default("min_weight_size"), metavar="N",
                   help="leave weights with fewer elements dense (default %(default)s)")
    g.add_argument("--keep-first-last", action="store_true", help="leave the first and last layer dense")
    g.add_argument("--compress-embeddings", action="store_true",
                   help="also compress embedding tables (nn.Embedding, ONNX Gather of a constant table); "
                        "by default they stay dense and the report lists them as skipped")
    g.add_argument("--seed", type=int, default=_config_default("seed"), help="random seed (default %(default)s)")
    g.add_argument("--device", default=_config_default("device"), help="fitting device: cpu or cuda (default %(default)s)")
    g.add_argument("--executor", choices=("local", "ray"), default=_config_default("executor"),
                   help="run layer fits in-process (local) or as Ray tasks (needs riem-compiler[ray])")
    g.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: RAY_ADDRESS or a local one)")

    g.add_argument("--lr", type=_finite_float, default=_config_default("lr"),
                   help="RieM fitting learning rate (default %(default)s)")
    g.add_argument("--k-branches", type=int, default=_config_default("k_branches"), metavar="K",
                   help="RieM metric branches K (default %(default)s; ONNX export needs 6)")
    g.add_argument("--recompute", action="store_true",
                   help="torch/TVM models decode the weight on every call instead of once (saves memory)")
    g.add_argument("--no-fold-batchnorm", action="store_true",
                   help="keep BatchNorm layers as they are (default: fold each into the preceding Conv/Linear where "
                        "exact, before fitting; the report lists those kept and why)")
    g.add_argument("--dead-channels", action="store_true",
                   help="DFQ: zero the weights of channels whose BatchNorm output is constant, moving the constant "
                        "into a bias (PyTorch input)")
    g.add_argument("--equalize", action="store_true",
                   help="DFQ: cross-layer equalisation of channel ranges over Conv/Linear -> ReLU(6) -> Conv/Linear "
                        "(PyTorch input; the float model's outputs stay the same)")
    g.add_argument("--bias-correction", action=argparse.BooleanOptionalAction,
                   default=_config_default("bias_correction"),
                   help="DFQ: correct each layer's bias by its expected output shift after compression, from the "
                        "folded BatchNorm statistics (PyTorch input; on by default, --no-bias-correction turns it off; "
                        "ONNX input is not corrected)")
    g.add_argument("--input-scales", type=_finite_float, default=_config_default("input_scales"), metavar="ALPHA",
                   help="AWQ-style stored input-channel scales (PyTorch input): a Linear / ungrouped Conv weight is "
                        "fitted as W diag(s), s = (channel rms / geometric mean) ** a on synthetic inputs with a chosen "
                        "per layer among 0, ALPHA/2 and ALPHA, and its input multiplied by a stored float16 1/s "
                        "(counted in its bytes); 0 (default): off")
    g.add_argument("--refine", action="store_true",
                   help="data-free refinement toward the original's outputs on synthetic inputs (PyTorch input)")
    g.add_argument("--refine-steps", type=int, default=_config_default("refine_steps"), metavar="N",
                   help="refinement steps (default %(default)s)")
    _add_method_flags(p)

    t = p.add_argument_group("PyTorch input")
    t.add_argument("--model-ref", metavar="MODULE:FUNC",
                   help="Python callable returning the nn.Module (module path or file.py), e.g. mypkg.models:build; "
                        "this imports and runs that code, so use only code you trust")
    t.add_argument("--weights", metavar="FILE", help="weights for --model-ref (.safetensors; .pt/.pth with --allow-pickle)")
    t.add_argument("--allow-pickle", action="store_true",
                   help="allow .pt/.pth checkpoints (read with torch.load(weights_only=True)); for a .pt2: trust "
                        "it and load it as torch does, pickled objects and stored code included")
    t.add_argument("--input-shape", action="append", default=[], metavar="[NAME=]DIMS[:DTYPE]",
                   help="example/verification input shape, e.g. 1,3,8,8 or input_ids=1,16:int64 (repeat per input)")

    c = p.add_argument_group("cache")
    c.add_argument("--cache-dir", metavar="DIR",
                   help="fitted-layer cache (default $RIEM_CACHE_DIR or ~/.cache/riem_compiler/fits)")
    c.add_argument("--no-cache", action="store_true", help="neither read nor write the fit cache")
    c.add_argument("--clear-cache", action="store_true", help="empty the fit cache first (alone: just empty it)")

    v = p.add_argument_group("verification and reports")
    v.add_argument("--max-error", type=_finite_float, metavar="E",
                   help="fail (exit 3, write nothing) when the output error on generated inputs (relative to the "
                        "output's variation over the draws) exceeds E")
    v.add_argument("--no-verify", action="store_true", help="skip running original vs compressed model")
    v.add_argument("--verify-draws", type=int, default=8, metavar="N",
                   help="independent draws of generated inputs the check runs (default 8; at least 2)")
    v.add_argument("--report", metavar="FILE", help="report JSON path (default OUT/report.json); the PNG goes beside it")
    v.add_argument("--no-plot", action="store_true", help="do not draw report.png")

    b = p.add_argument_group("TVM targets")
    b.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials (0: default schedules)")
    b.add_argument("--tvm-mode", choices=("auto", "decode-once", "fused"), default="auto",
                   help="auto (default): per layer, a fused dequantise-matmul kernel where the method has one "
                        "(rtn, affine, vq), else decode once at load; decode-once: every weight decoded at load; "
                        "fused: every weight kept compact (fused kernels, other decodes per call)")
    b.add_argument("--tvm-float-activations", action="store_true",
                   help="keep float32 activations in every TVM kernel (default: rtn / affine / rotq / vq layers at "
                        "1-32 rows per call multiply their codes by an int8 copy of x on AVX-512 VNNI CPUs, "
                        "as onnxruntime's MatMulNBits does)")
    b.add_argument("--arch", default="sm_80", help="CUDA architecture for tvm-cuda (default sm_80)")

    o = p.add_argument_group("output control")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no table; errors only")
    o.add_argument("-v", "--verbose", action="store_true", help="log each layer and stage")
    o.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    return p


def _method_flags() -> list[tuple[str, str, object]]:
    """(method, field, default) for every method setting that is not a Config field (those have
    their own flags above): each becomes --METHOD-FIELD."""
    import dataclasses

    from riem_compiler import methods
    from riem_compiler.config import Config

    config_fields = {f.name for f in dataclasses.fields(Config)}
    return [(name, f.name, f.default) for name in methods.SELECTABLE
            for f in dataclasses.fields(methods.get(name).Settings) if f.name not in config_fields]


def _add_method_flags(p) -> None:
    g = p.add_argument_group("method settings (from each method's Settings; see riem_compiler/methods/)")
    for name, field, default in _method_flags():
        kind = type(default) if isinstance(default, (bool, int, float, str)) else str
        kind = _finite_float if kind is float else kind
        g.add_argument(f"--{name}-{field.replace('_', '-')}", dest=f"method__{name}__{field}", type=kind,
                       default=None, metavar=field.upper(), help=f"{name} {field} (default {default})")


def _method_options(args) -> dict:
    options: dict = {}
    for name, field, _ in _method_flags():
        value = getattr(args, f"method__{name}__{field}", None)
        if value is not None:
            options.setdefault(name, {})[field] = value
    return options


def _config_from_args(args):
    from riem_compiler.config import Config
    from riem_compiler.fit_cache import default_cache_dir

    cache_dir = None if args.no_cache else str(Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir())
    return Config(ratio=args.ratio, method=args.method, state_bits=args.state_bits, metric_dtype=args.metric_dtype,
                  m=args.metric_units, steps=args.steps, time_budget_s=args.time_budget,
                  error_ceiling=args.error_ceiling, seed=args.seed, device=args.device, ignore=tuple(args.ignore),
                  ignore_types=tuple(args.ignore_type), min_weight_size=args.min_weight_size,
                  keep_first_last=args.keep_first_last, compress_embeddings=args.compress_embeddings,
                  quiet=args.quiet, cache_dir=cache_dir,
                  executor=args.executor, ray_address=args.ray_address, threads=args.threads,
                  workers=args.workers, auto_riem=args.auto_riem, lr=args.lr,
                  k_branches=args.k_branches, recompute=args.recompute, refine=args.refine,
                  refine_steps=args.refine_steps, method_options=_method_options(args),
                  fold_batchnorm=not args.no_fold_batchnorm, dead_channels=args.dead_channels,
                  equalize=args.equalize, bias_correction=args.bias_correction, input_scales=args.input_scales,
                  onnx_format=args.onnx_format, sensitivity=args.sensitivity,
                  sensitivity_samples=args.sensitivity_samples,
                  sensitivity_inversion_steps=args.sensitivity_inversion_steps,
                  plan_for=None if args.plan_for == "any" else args.plan_for)

