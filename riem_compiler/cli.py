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
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from riem_compiler.errors import InputError
from riem_compiler.files import atomic_write, public_mode

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_VERIFY, EXIT_OUTPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM
TARGETS = ("onnx", "tvm-llvm", "tvm-cuda")
PROG = "riem-compile"
# files the tool may put into OUT; moved last so a reader never sees a manifest without its data
LAST_FILES = ("manifest.json", "model.onnx")

log = logging.getLogger("riem_compiler.cli")


class OutputError(Exception):
    """The output location cannot be written."""


class VerificationFailed(Exception):
    """The compressed model misses --max-error (or could not be checked while one was set)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; a KeyboardInterrupt so every cleanup path for Ctrl-C runs for it too."""


def _finite_float(text: str) -> float:
    """argparse type: a float that is not nan or +-inf (nan would silently disable checks)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
    return value


# ----------------------------------------------------------------------------- arguments

class _Parser(argparse.ArgumentParser):
    """argparse with the tool's one-line error format (no usage block), exit code 2."""

    def error(self, message: str):
        print(f"{PROG}: error: {' '.join(message.split())} (see {PROG} --help)", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)


def build_parser() -> argparse.ArgumentParser:
    from riem_compiler import __version__
    from riem_compiler.config import METHODS

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
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    g = p.add_argument_group("compression")
    g.add_argument("--ratio", type=_finite_float, default=0.25,
                   help="stored bytes per layer as a fraction of fp32 bytes; for auto the global budget (default 0.25)")
    g.add_argument("--method", choices=METHODS, default="riem", help="compression method (default: riem)")
    g.add_argument("--state-bits", type=int, default=8, help="RieM state bit width (default 8)")
    g.add_argument("--metric-dtype", default="float16", help="RieM metric network dtype: float16|float32")
    g.add_argument("--metric-units", type=int, default=16, metavar="M", help="RieM metric width m (default 16)")
    g.add_argument("--steps", type=int, default=1000, help="RieM fitting steps per layer (default 1000)")
    g.add_argument("--time-budget", type=_finite_float, default=None, metavar="S",
                   help="optional wall-clock cap on each RieM fit, in seconds (default: none, --steps alone decide; "
                        "a fit the cap stops is worse, depends on machine load, and is flagged in the report)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads per layer fit (Ray: CPUs per task); results are bit-identical for the same "
                        "seed, settings and thread count (default: torch's current setting locally, 1 on Ray)")
    g.add_argument("--error-ceiling", type=_finite_float, default=1.0,
                   help="keep a layer dense when its relative weight error is above this (default 1.0)")
    g.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="leave layers whose name matches this glob dense (repeat the flag for more)")
    g.add_argument("--ignore-type", action="append", default=[], metavar="KIND",
                   help="leave layers of this kind dense: linear, matmul, conv1d, conv2d (repeatable)")
    g.add_argument("--min-weight-size", type=int, default=1024, metavar="N",
                   help="leave weights with fewer elements dense (default 1024)")
    g.add_argument("--keep-first-last", action="store_true", help="leave the first and last layer dense")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="cpu", help="fitting device: cpu or cuda (default cpu)")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="run layer fits in-process (local) or as Ray tasks (needs riem-compiler[ray])")
    g.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: RAY_ADDRESS or a local one)")

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
                   help="fail (exit 3, write nothing) when the output rel. error on generated inputs exceeds E")
    v.add_argument("--no-verify", action="store_true", help="skip running original vs compressed model")
    v.add_argument("--verify-draws", type=int, default=8, metavar="N",
                   help="independent draws of generated inputs the check runs (default 8; at least 2)")
    v.add_argument("--report", metavar="FILE", help="report JSON path (default OUT/report.json); the PNG goes beside it")
    v.add_argument("--no-plot", action="store_true", help="do not draw report.png")

    b = p.add_argument_group("TVM targets")
    b.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials (0: default schedules)")
    b.add_argument("--tvm-mode", choices=("decode-once", "fused"), default="decode-once",
                   help="decode weights once at load (default) or reconstruct inside each call")
    b.add_argument("--arch", default="sm_80", help="CUDA architecture for tvm-cuda (default sm_80)")

    o = p.add_argument_group("output control")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no table; errors only")
    o.add_argument("-v", "--verbose", action="store_true", help="log each layer and stage")
    o.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    return p


def _config_from_args(args):
    from riem_compiler.config import Config
    from riem_compiler.fit_cache import default_cache_dir

    cache_dir = None if args.no_cache else str(Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir())
    return Config(ratio=args.ratio, method=args.method, state_bits=args.state_bits, metric_dtype=args.metric_dtype,
                  m=args.metric_units, steps=args.steps, time_budget_s=args.time_budget,
                  error_ceiling=args.error_ceiling, seed=args.seed, device=args.device, ignore=tuple(args.ignore),
                  ignore_types=tuple(args.ignore_type), min_weight_size=args.min_weight_size,
                  keep_first_last=args.keep_first_last, quiet=args.quiet, cache_dir=cache_dir,
                  executor=args.executor, ray_address=args.ray_address, threads=args.threads)


# ----------------------------------------------------------------------------- loading

@dataclass
class Loaded:
    """The model to compress, how to run the original, and the inputs to check it on."""

    source: str  # "onnx" | "torch"
    graph: object  # what optimize() gets
    original: object  # onnx.ModelProto or nn.Module (unmodified)
    description: str
    input_bytes: int = 0
    example_inputs: tuple | None = None  # torch
    check_inputs: dict = field(default_factory=dict)  # name -> array/tensor (verification)
    data_files: tuple = ()  # files read besides MODEL/--weights (ONNX external data), resolved


def load_model(args) -> Loaded:
    from riem_compiler.verify import parse_input_shape

    shapes = [parse_input_shape(s) for s in args.input_shape]
    path = Path(args.model) if args.model else None
    if path is not None and not path.exists():
        raise InputError(f"{path}: no such file")
    if path is not None and path.is_dir():
        raise InputError(f"{path} is a directory; pass a model file (.onnx, .pt2) or a weights file")
    suffix = path.suffix.lower() if path else ""
    if args.model_ref:
        if suffix in (".onnx", ".pt2"):
            raise InputError(f"{path} is a complete model ({suffix}); --model-ref is only for weight files")
        if path is not None and args.weights:
            raise InputError("give the weights either as MODEL or with --weights, not both")
        return _load_model_ref(args, path or (Path(args.weights) if args.weights else None), shapes)
    if path is None:
        raise InputError("no model given: pass MODEL (.onnx or .pt2), or --model-ref MODULE:FUNC")
    if suffix == ".onnx":
        return _load_onnx(path, shapes, args.seed)
    if suffix == ".pt2":
        return _load_pt2(path, shapes, args.seed, trusted=getattr(args, "allow_pickle", False))
    if suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        raise InputError(f"{path} holds weights only; also pass --model-ref MODULE:FUNC (a callable that "
                           "builds the nn.Module) and --input-shape")
    raise InputError(f"{path}: unknown model format {suffix or '(no suffix)'!r}; use .onnx, a torch.export "
                       ".pt2 program, or weights (.safetensors) with --model-ref")


def _load_onnx(path: Path, shapes, seed: int) -> Loaded:
    from riem_compiler.frontend.onnx_frontend import load_onnx_files
    from riem_compiler.verify import onnx_inputs

    model, data_files = load_onnx_files(path)
    size = path.stat().st_size + sum(f.stat().st_size for f in data_files)
    feeds = onnx_inputs(model, shapes, seed + 1)
    return Loaded("onnx", model, model, f"ONNX {path.name}", size, None, feeds, tuple(data_files))


def _load_pt2(path: Path, shapes, seed: int, trusted: bool = False) -> Loaded:
    """Without --allow-pickle (`trusted`) the archive is read in pt2_safety.safe_mode: nothing in
    it is unpickled beyond tensors, and stored code/expressions are checked before torch runs them."""
    import torch

    from riem_compiler import pt2_safety
    from riem_compiler.verify import torch_inputs, torch_inputs_like

    try:
        pt2_safety.check_entries(path, trusted)
        with pt2_safety.safe_mode(trusted):
            program = torch.export.load(str(path))
    except pt2_safety.Refused as exc:
        raise InputError(_pt2_refused(path, exc)) from None
    except Exception as exc:
        raise InputError(f"{path}: cannot load as a torch.export program ({_first_line(exc)}); "
                           "save one with torch.export.save(torch.export.export(model, inputs), path)") from None
    args, kwargs = program.example_inputs or ((), {})
    if kwargs:
        raise InputError(f"{path}: the program's example inputs use keyword arguments {sorted(kwargs)}; "
                           "export it with positional inputs")
    examples = torch_inputs(shapes, seed) if shapes else tuple(args)
    if not examples:
        raise InputError(f"{path}: the program stores no example inputs; pass --input-shape")
    check = torch_inputs_like(examples, seed + 1)
    try:
        with pt2_safety.safe_mode(trusted):  # .module() exec's the program's guard code
            module = program.module()
    except pt2_safety.Refused as exc:
        raise InputError(_pt2_refused(path, exc)) from None
    _check_runs(module, examples, path.name)
    return Loaded("torch", program, module, f"torch.export {path.name}", path.stat().st_size, tuple(examples),
                  _named(check))


def _pt2_refused(path: Path, exc) -> str:
    if not exc.helps:
        return f"{path}: {exc}; not loaded"
    return f"{path}: {exc}; not loaded. Pass --allow-pickle to load it anyway, only if you trust this file"


def _load_model_ref(args, weights: Path | None, shapes) -> Loaded:
    import torch

    from riem_compiler.verify import torch_inputs

    build = _resolve_ref(args.model_ref)
    try:
        with _user_code_path():
            model = build()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # also SystemExit and the like: the user's code must not end the tool
        raise InputError(f"--model-ref {args.model_ref}: calling it failed: {type(exc).__name__}: "
                           f"{_first_line(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"--model-ref {args.model_ref} returned {type(model).__name__}, not a torch.nn.Module")
    size = 0
    if weights is not None:
        state = _read_weights(weights, args.allow_pickle)
        size = weights.stat().st_size
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InputError(f"{weights} does not fit the model from {args.model_ref}: "
                               f"{' '.join(str(exc).split())[:400]}") from None
    else:
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        log.warning("no --weights given: compressing the weights %s builds itself", args.model_ref)
    model.eval()
    if not shapes:
        raise InputError("--model-ref needs --input-shape (one per model input, e.g. --input-shape 1,3,32,32) "
                           "to trace, export and verify the model")
    if any(s.name for s in shapes):
        log.info("input names in --input-shape are ignored for PyTorch models (inputs are positional)")
    examples = torch_inputs(shapes, args.seed)
    _check_runs(model, examples, args.model_ref)
    check = torch_inputs(shapes, args.seed + 1)
    return Loaded("torch", model, model, f"{args.model_ref}" + (f" + {weights.name}" if weights else ""), size,
                  examples, _named(check))


def _resolve_ref(ref: str):
    """'pkg.module:function' or 'path/to/file.py:function' -> the callable."""
    if ":" not in ref:
        raise InputError(f"--model-ref {ref!r}: expected MODULE:FUNCTION, e.g. mypkg.models:build")
    target, _, func = ref.rpartition(":")
    if target.endswith(".py"):
        file = Path(target)
        if not file.exists() and not file.is_symlink():
            raise InputError(f"--model-ref {ref!r}: {file} not found")
        if not file.is_file() or not os.access(file, os.R_OK):
            raise InputError(f"--model-ref {ref!r}: {file} is not a readable Python file")
    try:
        with _user_code_path():
            if target.endswith(".py"):
                spec = importlib.util.spec_from_file_location(f"_riem_model_ref_{file.stem}", file)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(target)
    except ImportError as exc:
        raise InputError(f"--model-ref {ref!r}: cannot import {target!r} ({_first_line(exc)})") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SyntaxError, SystemExit, anything the module's top level raises
        raise InputError(f"--model-ref {ref}: importing it failed: {type(exc).__name__}: {_first_line(exc)}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise InputError(f"--model-ref {ref!r}: {target!r} has no callable {func!r}")
    return fn


@contextlib.contextmanager
def _user_code_path():
    """While the --model-ref module is imported and called, the current folder is searched for
    modules, but after everything else on sys.path: a stray onnxscript.py or numpy.py there must
    not replace the tool's own dependencies (now or when they are imported later)."""
    try:
        cwd = os.getcwd()
    except OSError:  # the current folder was deleted
        cwd = None
    added = cwd is not None and cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _read_weights(path: Path, allow_pickle: bool) -> dict:
    import torch

    if not path.is_file():
        raise InputError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise InputError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        if not allow_pickle:
            raise InputError(f"{path} is a pickled checkpoint; unpickling can run code. Convert it to "
                               ".safetensors, or pass --allow-pickle to read it with torch.load(weights_only=True)")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{path}: torch.load(weights_only=True) refused or failed: {_first_line(exc)}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{path}: expected a state_dict (name -> tensor), got {type(state).__name__}")
        return state
    raise InputError(f"{path}: unknown weights format {suffix!r}; use .safetensors (or .pt/.pth with --allow-pickle)")


def _check_runs(module, inputs, what: str) -> None:
    """Run the original once so that a wrong --input-shape fails here, with a clear message."""
    import torch

    try:
        with torch.no_grad():
            module(*inputs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a forward that calls sys.exit() must not end the tool either
        shapes = ", ".join(str(tuple(getattr(x, "shape", ()))) for x in inputs)
        raise InputError(f"{what} fails on inputs of shape {shapes}: {type(exc).__name__}: "
                           f"{_first_line(exc)}; check --input-shape") from None


def _named(inputs) -> dict:
    return {f"input_{i}": x for i, x in enumerate(inputs)}


# ----------------------------------------------------------------------------- output

# names the tool may write into OUT besides report.json/report.png; --report must not be one of them
ARTIFACT_NAMES = ("model.onnx", "model.onnx.data", "model.so", "params.safetensors", "manifest.json",
                  "cuda_source.cu", "tuning")


def output_dir(out: Path) -> Path:
    """The real directory OUT names (symlinks and `..` resolved). A symlink to a directory is
    written through (the files go into its target, the link stays); a dangling symlink, a
    symlink loop or a symlink to a non-directory is refused (OutputError, exit 4)."""
    try:
        if out.is_symlink():
            try:
                target = out.resolve(strict=True)
            except (OSError, RuntimeError):  # dangling, or a loop
                raise OutputError(f"{out} is a symlink to {os.readlink(out)!r}, which does not exist; create "
                                  "that directory or pass another -o") from None
            if not target.is_dir():
                raise OutputError(f"{out} is a symlink to {target}, which is not a directory; -o takes a directory")
            return target
        return out.resolve()
    except (OSError, RuntimeError) as exc:  # name too long, a loop further up the path, ...
        raise OutputError(f"cannot write to {out}: {getattr(exc, 'strerror', None) or exc}") from None


def check_inputs_kept(out: Path, report: Path | None, inputs, plot: bool = True) -> None:
    """Refuse (InputError, exit 2) before any fitting an OUT that is, or holds, an input file
    (publishing would replace or delete it) and a --report whose JSON or PNG is an input or
    would be overwritten by an artifact in OUT. Paths are compared with symlinks and `..` resolved."""
    real_inputs = {}
    for given in inputs:
        real = _resolved(given)
        if real is not None:
            real_inputs.setdefault(real, Path(given))
    real_out = _resolved(out)  # None (a symlink loop): prepare_output refuses it
    for real, given in real_inputs.items():
        if real_out is not None and (real == real_out or real_out in real.parents):
            how = "is" if real == real_out else "contains"
            raise InputError(f"-o {out} {how} the input {given}; writing the output there would replace it. "
                             "Choose another output directory")
    if report is None:
        return
    png = report.with_suffix(".png")
    paths = [(report, f"--report {report}")] + [(png, f"the report picture {png} (beside --report)")] * plot
    for path, what in paths:
        real = _resolved(path)
        if real is None:
            raise OutputError(f"cannot write {what}: symlink loop")
        if real in real_inputs:
            raise InputError(f"{what} is the input {real_inputs[real]}; choose another report path")
        if real.parent == real_out and real.name in ARTIFACT_NAMES:
            raise InputError(f"{what} would be overwritten by the output's {real.name}; choose another report path")


def _resolved(path) -> Path | None:
    if path is None or str(path) == "":
        return None
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # symlink loop
        return None


def prepare_output(out: Path) -> Path:
    """Check OUT can be written (before any fitting) and make the staging folder beside it
    (beside the target directory when OUT is a symlink, so that publishing is a rename)."""
    real = output_dir(out)
    try:
        if real.exists() and not real.is_dir():
            raise OutputError(f"{out} exists and is not a directory; -o takes a directory")
        real.parent.mkdir(parents=True, exist_ok=True)
        if real.is_dir() and not os.access(real, os.W_OK):
            raise PermissionError(f"no write permission on {out}")
        staging = Path(tempfile.mkdtemp(prefix=f".{real.name}.partial-", dir=real.parent))
        public_mode(staging, directory=True)
        return staging
    except OSError as exc:
        raise OutputError(f"cannot write to {out}: {exc.strerror or exc}") from None


def publish(staging: Path, out: Path) -> None:
    """Move the finished files into OUT: the whole folder at once (one rename) when OUT is new
    or an empty directory, else file by file (each an atomic rename), model/manifest last.
    Safe against another run publishing to the same OUT at the same time: whatever it put
    there first is replaced, never a crash; both leave a complete output."""
    real = output_dir(out)
    try:
        if real != Path.cwd().resolve():  # never rename over the working directory
            try:
                os.replace(staging, real)  # POSIX rename: succeeds for a new path or an empty directory
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
        if not real.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory")
        replaced = Path(tempfile.mkdtemp(prefix=".replaced-", dir=staging))  # old folders, removed below
        for item in sorted(staging.iterdir(), key=lambda p: (p.name in LAST_FILES, p.name)):
            if item != replaced:
                _move_in(item, real / item.name, replaced)
        shutil.rmtree(staging)
    except OSError as exc:
        raise OutputError(f"cannot write to {out}: {exc.strerror or exc}") from None


def _move_in(item: Path, dest: Path, replaced: Path) -> None:
    """Rename item to dest. A directory in the way (or anything in the way of a directory) is
    first moved aside into `replaced`; retried if a concurrent run puts a new one there."""
    for attempt in range(20):
        if (dest.is_dir() and not dest.is_symlink()) or (item.is_dir() and (dest.exists() or dest.is_symlink())):
            try:
                os.replace(dest, replaced / f"{attempt}-{dest.name}")
            except FileNotFoundError:
                pass  # gone meanwhile (the other run moved it aside)
        try:
            os.replace(item, dest)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
    raise OSError(errno.EBUSY, f"{dest} keeps being replaced by another process")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(_json_safe(data), indent=2, default=str) + "\n"))


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


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
                         mode=args.tvm_mode, arch=args.arch, **options)


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
        from riem_compiler.codegen.onnx_export import OnnxRuntimeModel

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
    from riem_compiler.codegen.onnx_export import OnnxRuntimeModel
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


def _optional(args, what: str, fn) -> bool:
    """Run an optional step (report, plot, printing); a failure is one warning line, never an exit."""
    try:
        fn()
        return True
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        log.warning("could not %s (%s: %s); the model itself is written", what, type(exc).__name__, _first_line(exc))
        return False


def _write_reports(data: dict, res, json_path: Path, args, title: str) -> None:
    """report.json, then report.png beside it; each is optional (see _optional)."""
    if not _optional(args, f"write the report {json_path}", lambda: _write_json(json_path, data)) or args.no_plot:
        return
    try:
        import matplotlib  # noqa: F401  (an optional extra: riem-compiler[bench] or pip install matplotlib)
    except ImportError:
        log.warning("matplotlib is not installed: no report.png (pip install matplotlib)")
        return
    from riem_compiler.plots import save_report_png

    _optional(args, f"draw {json_path.with_suffix('.png')}",
              lambda: save_report_png(res.report, json_path.with_suffix(".png"), title))


def _cache_stats(res, config) -> dict:
    cached = sum(1 for r in res.report.layers if r.reason.startswith("from fit cache"))
    fitted = len(res.report.compressed) - cached
    return {"dir": config.cache_dir, "layers_from_cache": cached, "layers_fitted": fitted}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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




if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
