"""`riem-compile`'s input: load MODEL (.onnx, .pt2) or build it with --model-ref (+ weights),
and make the inputs it is checked on. torch and the frontends are imported only when used."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from riem_compiler.cli.common import _first_line, log
from riem_compiler.errors import InputError


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

