"""`riem-compile`: compress a model file from the command line and write deployable artifacts.

    riem-compile model.onnx -o out/                      # out/model.onnx, report.json, report.png
    riem-compile prog.pt2 -o out/ --target tvm-llvm      # torch.export program -> TVM artifact
    riem-compile w.safetensors --model-ref pkg.mod:build --input-shape 1,3,32,32 -o out/

Everything is written to a hidden staging folder beside OUT first and moved into place only
after it is complete and verified, so a failed or interrupted run never leaves a half-written
model. Fitted layers are cached on disk (see fit_cache), so an interrupted run resumes.

Exit codes: 0 done; 1 internal or compile error; 2 bad input or option (including an OUT or
--report that is, or holds, an input file); 3 output error above --max-error (nothing written);
4 cannot write the output (OUT a file, a dangling symlink, no permission); 130 interrupted
(SIGINT/Ctrl-C); 143 terminated (SIGTERM). Interrupted or terminated runs write nothing.

This module runs the stages and maps errors to exit codes; its parts: cli.arguments (the parser and the
Config from it), cli.inputs (loading MODEL / --model-ref), cli.output (checking, staging and
publishing OUT, report files), cli.common (exit codes and exceptions they all share).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

from riem_compiler.cli.arguments import TARGETS, _config_from_args, build_parser
from riem_compiler.cli.common import (EXIT_ERROR, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_OUTPUT,
                                      EXIT_TERMINATED, EXIT_VERIFY, PROG, OutputError, Terminated,
                                      VerificationFailed, _first_line, log)
from riem_compiler.cli.inputs import Loaded, load_model
from riem_compiler.cli.output import (ARTIFACT_NAMES, LAST_FILES, _kib, _optional, _size, _write_reports,
                                      check_inputs_kept, output_dir, prepare_output, publish)
from riem_compiler.errors import InputError

__all__ = ["main", "run", "build_parser", "load_model", "Loaded", "write_artifact", "verify_artifact",
           "output_dir", "check_inputs_kept", "prepare_output", "publish", "OutputError", "VerificationFailed",
           "Terminated", "EXIT_OK", "EXIT_ERROR", "EXIT_INPUT", "EXIT_VERIFY", "EXIT_OUTPUT", "EXIT_INTERRUPTED",
           "EXIT_TERMINATED", "TARGETS", "PROG", "LAST_FILES", "ARTIFACT_NAMES"]


# ----------------------------------------------------------------------------- stages

def write_artifact(res, args, staging: Path, out: Path) -> Path:
    """Write the target's files into staging; returns the main file/folder (inside staging)."""
    if args.target == "onnx":
        return res.export_onnx(staging / "model.onnx")
    options = {}
    previous_db = out / "tuning"
    if (previous_db / "database_tuning_record.json").is_file():
        options["tuning_db"] = str(previous_db)  # reuse an earlier tuning run of the same OUT
    return res.build_tvm(staging, target=args.target.split("-", 1)[1], tune_trials=args.tune_trials,
                         mode=args.tvm_mode, arch=args.arch, int8_activations=not args.tvm_float_activations,
                         **options)


def verify_artifact(res, loaded: Loaded, args, staging: Path):
    """Run original and compressed model on several draws of generated inputs; the compressed
    model is the written artifact itself where this machine can run it."""
    from riem_compiler.verify import Verification, input_draws, run_check, verify_onnx

    if not loaded.check_inputs:
        return Verification("skipped", note="no inputs to generate")
    draws = input_draws(loaded.check_inputs, args.verify_draws, args.seed + 2)
    if loaded.source == "onnx":
        return verify_onnx(loaded.original, staging / "model.onnx", draws, _ort_device(args))
    if args.target == "onnx":
        from riem_compiler.codegen.ort_runner import OnnxRuntimeModel

        return run_check(loaded.original, OnnxRuntimeModel(staging / "model.onnx", device=_ort_device(args)),
                         draws, "onnx file")
    if args.target == "tvm-llvm" or _cuda_available():
        from riem_compiler.codegen.tvm_runtime import load_tvm

        device = "cuda" if args.target == "tvm-cuda" else "cpu"
        return run_check(loaded.original, load_tvm(staging, device=device), draws, "tvm artifact")
    v = run_check(loaded.original, res.model, draws, "compressed torch model")
    v.note = "; ".join(filter(None, ["no CUDA device here: checked the compressed torch model, not the CUDA artifact", v.note]))
    return v


def _check_loads(path: Path, loaded: Loaded, args) -> None:
    """Raise RiemError (exit 1, nothing written) when onnxruntime cannot open the written model
    although it opens the original (or the original is a torch model)."""
    from riem_compiler.codegen.ort_runner import OnnxRuntimeModel
    from riem_compiler.errors import RiemError

    try:
        OnnxRuntimeModel(path, device="cpu")
        return
    except Exception as exc:
        problem = f"{type(exc).__name__}: {_first_line(exc)}"
    if loaded.source == "onnx":
        try:
            OnnxRuntimeModel(loaded.original, device="cpu")
        except Exception:
            return  # the original does not load here either: the check cannot judge
    raise RiemError(f"internal error: onnxruntime cannot load the written model.onnx ({problem}); nothing written")


def _ort_device(args) -> str:
    return "cuda" if str(args.device).startswith("cuda") else "cpu"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args, parser) -> int:
    from riem_compiler import __version__
    from riem_compiler.api import optimize
    from riem_compiler.fit_cache import FitCache
    from riem_compiler.verify import Verification

    t_start = time.perf_counter()
    config = _config_from_args(args)
    if args.clear_cache:
        if config.cache_dir is None:
            raise InputError("--clear-cache with --no-cache: nothing to clear")
        n = FitCache(config.cache_dir).clear()
        _say(args, f"cleared {n} cached fits from {config.cache_dir}")
        if not args.model and not args.model_ref:
            return EXIT_OK
    if not args.output:
        parser.error("the output directory is required: -o OUT")
    if args.max_error is not None and args.no_verify:
        raise InputError("--max-error needs verification; drop --no-verify")
    if args.verify_draws < 2:
        raise InputError(f"--verify-draws must be at least 2 (the check compares the output's variation across "
                         f"draws); got {args.verify_draws}")
    if args.max_error is not None and not args.max_error > 0:
        raise InputError(f"--max-error must be positive; got {args.max_error}")
    out = Path(args.output)
    report_path = Path(args.report) if args.report else None
    if report_path is not None:
        if os.path.isdir(report_path):  # (no OSError for a name too long)
            raise OutputError(f"--report {report_path} is a directory; give a file name like report.json")
        try:
            report_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write the report to {report_path}: {exc.strerror or exc}") from None
        if not os.access(report_path.parent, os.W_OK):
            raise OutputError(f"cannot write the report to {report_path}: no write permission")
    ref_file = args.model_ref.rpartition(":")[0] if args.model_ref and ":" in args.model_ref else ""
    inputs = [args.model, args.weights, ref_file if ref_file.endswith(".py") else None]
    check_inputs_kept(out, report_path, inputs, plot=not args.no_plot)
    if str(config.device).startswith("cuda") and not _cuda_available():
        raise InputError(f"--device {config.device}: no CUDA device is visible here; use --device cpu")

    loaded = load_model(args)
    if loaded.source == "onnx" and args.refine:
        raise InputError("--refine needs a PyTorch model (.pt2 or --model-ref): it trains through torch")
    if loaded.source == "onnx" and args.target != "onnx":
        raise InputError(f"--target {args.target} needs a PyTorch model (.pt2 or --model-ref); "
                           "ONNX input supports --target onnx")
    check_inputs_kept(out, report_path, [*inputs, *loaded.data_files], plot=not args.no_plot)  # + external data
    staging = prepare_output(out)
    try:
        timings = {"load": time.perf_counter() - t_start}
        t0 = time.perf_counter()
        res = optimize(loaded.graph, loaded.example_inputs, config=config)
        timings["compress"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            write_artifact(res, args, staging, out)
        except OSError as exc:
            raise OutputError(f"cannot write the artifact ({exc.strerror or exc})") from None
        timings["write"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if args.no_verify:
            verification = Verification("skipped", note="--no-verify")
        else:
            try:
                verification = verify_artifact(res, loaded, args, staging)
            except Exception as exc:
                if args.debug:
                    traceback.print_exc()
                if args.target == "onnx":
                    _check_loads(staging / "model.onnx", loaded, args)  # an unloadable model is never a success
                verification = Verification("skipped", note=f"could not run the models: {type(exc).__name__}: "
                                                            f"{_first_line(exc)}")
        timings["verify"] = time.perf_counter() - t0
        if verification.status == "ok":
            res.report.output_error = verification.rel_error
        else:
            log.warning("%s", verification.summary())
        if res.report.time_capped:
            log.warning("the --time-budget cap stopped %d layer fit(s) early (%s): their result is worse than a full "
                        "fit and depends on machine load; drop --time-budget for a reproducible result",
                        len(res.report.time_capped), ", ".join(r.name for r in res.report.time_capped[:5]))

        failed = None
        if args.max_error is not None:
            if verification.status != "ok":
                failed = f"--max-error {args.max_error:g} set but the output could not be verified: {verification.note}"
            elif not verification.rel_error <= args.max_error:
                failed = (f"output error {verification.rel_error:.4g} (relative to the output's variation over "
                          f"{verification.draws} draws) exceeds --max-error {args.max_error:g}; nothing written "
                          "(raise --ratio or --steps, or --ignore sensitive layers)")
        timings["total"] = time.perf_counter() - t_start
        data = {"riem_compiler": __version__, "command": [PROG, *args._argv],
                "input": {"model": args.model, "model_ref": args.model_ref, "weights": args.weights,
                          "format": loaded.source, "description": loaded.description, "bytes": loaded.input_bytes},
                "target": args.target, "output": str(out), "config": config.to_dict(),
                **res.report.to_dict(), "verification": verification.to_dict(),
                "cache": _cache_stats(res, config), "seconds": {k: round(v, 3) for k, v in timings.items()},
                "status": "failed" if failed else "ok"}
        if failed:
            _optional(args, "print the report", lambda: None if args.quiet else print(res.report))
            if report_path is not None:
                _write_reports(data, res, report_path, args, f"{loaded.description} (FAILED --max-error)")
            raise VerificationFailed(failed)
        files = {p.name: _size(p) for p in sorted(staging.iterdir())}
        data["files"] = files
        publish(staging, out)  # the model is in place before anything optional runs
        args._published = out
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    # from here on a failure is reported and never costs the written model
    _write_reports(data, res, report_path or out / "report.json", args, f"{loaded.description} -> {args.target}")
    if not args.quiet:
        _optional(args, "print the report", lambda: print(res.report))
        _optional(args, "print the verification", lambda: print(verification.summary()))
        main_file = "model.onnx" if args.target == "onnx" else "model.so + params.safetensors"
        size = files.get("model.onnx", 0) + files.get("model.onnx.data", 0) if args.target == "onnx" else \
            files.get("params.safetensors", 0)
        print(f"wrote {out}/ ({main_file}: {_kib(size)}; input {_kib(loaded.input_bytes)}) "
              f"in {timings['total']:.1f} s")
    return EXIT_OK


def _cache_stats(res, config) -> dict:
    cached = sum(1 for r in res.report.layers if r.reason.startswith("from fit cache"))
    fitted = len(res.report.compressed) - cached
    return {"dir": config.cache_dir, "layers_from_cache": cached, "layers_fitted": fitted}


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text)


# ----------------------------------------------------------------------------- entry point

def _setup_logging(args):
    """Send the package's log records to stderr at the chosen level; returns an undo function
    (main() is also called in-process, e.g. by tests, and must leave logging as it found it)."""
    level = logging.ERROR if args.quiet else logging.DEBUG if args.debug else logging.INFO if args.verbose \
        else logging.WARNING
    logger = logging.getLogger("riem_compiler")
    saved = (logger.level, logger.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    # torch's exporter logs notes like "torchvision is not installed" at WARNING: only with -v
    torch_logger = logging.getLogger("torch")
    torch_saved = torch_logger.level
    if not (args.verbose or args.debug):
        torch_logger.setLevel(logging.ERROR)

    def undo():
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        torch_logger.setLevel(torch_saved)

    return undo


def _error(code: int, message: str) -> int:
    # one line, whatever the message holds (a path given with a newline in it, say)
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _handle_sigterm():
    """While main() runs, turn SIGTERM (kill, a job scheduler's stop, `timeout`) into Terminated,
    a KeyboardInterrupt, so it ends like Ctrl-C: staging removed, nothing written. Returns the
    undo function. Signal handlers can only be set in the main thread: elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the cleanup finish
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main interpreter
        return lambda: None

    def undo():
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return undo


def main(argv=None) -> int:
    """Console entry point (`riem-compile`, `python -m riem_compiler`); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    undo_logging = _setup_logging(args)
    undo_sigterm = _handle_sigterm()
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.simplefilter("ignore")  # torch/onnx deprecation chatter is not the user's business
            return _run_reporting_errors(args, parser)
    except Terminated:  # arrived after run() ended, while reporting
        return _error(EXIT_TERMINATED, "terminated (SIGTERM)")
    finally:
        undo_sigterm()
        undo_logging()


def _run_reporting_errors(args, parser) -> int:
    from riem_compiler.errors import RiemError

    try:
        return run(args, parser)
    except KeyboardInterrupt as exc:
        what, code = ("terminated (SIGTERM)", EXIT_TERMINATED) if isinstance(exc, Terminated) else \
            ("interrupted", EXIT_INTERRUPTED)
        if getattr(args, "_published", None):
            return _error(code, f"{what} after the model was written to {args._published}; the report may be missing")
        where = "" if args.no_cache else " (layers fitted so far are cached: run the same command to resume)"
        return _error(code, f"{what}; nothing written{where}")
    except InputError as exc:
        return _report_exc(args, EXIT_INPUT, str(exc))
    except VerificationFailed as exc:
        return _report_exc(args, EXIT_VERIFY, str(exc))
    except OutputError as exc:
        return _report_exc(args, EXIT_OUTPUT, str(exc))
    except RiemError as exc:
        return _report_exc(args, EXIT_ERROR, str(exc))
    except MemoryError:
        return _report_exc(args, EXIT_ERROR, "out of memory; try a smaller model, --device cpu or --method rtn")
    except Exception as exc:  # anything else is a bug or an unsupported model: one line unless --debug
        return _report_exc(args, EXIT_ERROR, f"{type(exc).__name__}: {_first_line(exc)} "
                                             "(rerun with --debug for the traceback)")


def _report_exc(args, code: int, message: str) -> int:
    if args.debug:
        traceback.print_exc()
    return _error(code, message)
