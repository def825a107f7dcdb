"""Reading a torch.export `.pt2` archive without running code that the file brings along.

`torch.export.load` trusts its input: it unpickles pickled weights, constants and example inputs
with `torch.load(weights_only=False)` (or plain `pickle.loads`), loads AOTInductor shared
libraries, hands shape expressions stored as text to `sympy.sympify` (which calls `eval`) and
compiles the stored guard code with `exec` when `.module()` is called, and FX pastes graph
attribute names unquoted into the Python it generates. The CLI therefore loads a
`.pt2` inside `safe_mode()` unless the user passed `--allow-pickle` (which means: I trust this
file, load it the way torch does). In safe mode:

- `torch.load` runs with `weights_only=True` (tensors and plain containers only), also for the
  sample inputs; `pickle.load(s)` and TorchScript object unpickling are refused;
- AOTInductor libraries are not loaded, and archive entries that name paths outside the archive
  are refused (`check_entries`);
- shape expressions, guard code, input paths and graph attribute names must be plain formulas
  and names (checked with `ast` before sympy/exec/FX code generation see them).

The patches are process-wide while `safe_mode` is active (the CLI loads before any worker
threads start). Anything refused raises `Refused` (its text says what). This narrows what a hostile file can
do; it does not make torch's format safe for untrusted input, and the docs say so. Written
against torch 2.13. It fails closed: where a torch version lacks one of the patched functions,
safe mode refuses the file (the check cannot be made), and only `--allow-pickle` loads it.
"""
from __future__ import annotations

import ast
import contextlib
import os
import pickle
import re
import zipfile
from pathlib import Path

# string constants and dictionary keys that may appear in shape expressions, guards and input
# paths: no quotes, backslashes or brackets, so they cannot end the string they are pasted into
_PLAIN_TEXT = re.compile(r"[\w .:+-]*")
_AOTI_DIR = "data/aotinductor/"
# tensor methods and module attributes that stored guard code may use
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_CALLS = frozenset({"int", "float", "abs", "min", "max", "round", "bool",
                          "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"})
_GUARD_MODULES = {"math": lambda name: not name.startswith("_"), "torch": lambda name: name.startswith("sym_")}


class Refused(Exception):
    """Safe mode refused something in the archive. `helps` is False when --allow-pickle would not help."""

    def __init__(self, reason: str, helps: bool = True):
        super().__init__(reason)
        self.helps = helps


def check_entries(path: Path, trusted: bool) -> None:
    """Refuse entry names that point outside the archive, and (unless trusted) compiled libraries."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a readable zip: torch.export.load reports that itself
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or re.match(r"[A-Za-z]:", name):
            raise Refused(f"archive entry {name[:80]!r} points outside the archive", helps=False)
        if not trusted and _AOTI_DIR in "/".join(parts):
            raise Refused(f"the archive holds an AOTInductor compiled library ({name[:80]!r}), "
                          "native code that loading would run")


@contextlib.contextmanager
def safe_mode(trusted: bool = False):
    """While active, torch.export.load / ExportedProgram.module() cannot run code from the file
    (see the module docstring). A refusal is raised as Refused even where torch catches it."""
    if trusted:
        yield
        return
    refusals: list[str] = []
    undo = _patch(refusals)
    try:
        yield
    except Refused:
        raise
    except Exception as exc:
        if refusals:
            raise Refused(refusals[0]) from exc
        raise
    finally:
        undo()
    if refusals:  # torch swallowed the refusal and went on: still refuse
        raise Refused(refusals[0])


def _patch(refusals: list[str]):
    import sympy
    import torch

    saved: list[tuple[object, str, object]] = []

    missing: list[str] = []

    def swap(owner, name, new, required: bool = True):
        if owner is not None and hasattr(owner, name):
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, new)
        elif required:
            missing.append(f"{getattr(owner, '__name__', owner)}.{name}")

    def refuse(reason: str):
        refusals.append(reason)
        raise Refused(reason)

    real_load = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            refuse(_weights_only_reason(exc))

    def no_pickle(*args, **kwargs):
        refuse("the archive holds a pickled Python object (unpickling it can run any code)")

    def no_script_object(*args, **kwargs):
        refuse("the archive holds a pickled TorchScript object")

    def no_aoti(*args, **kwargs):
        refuse("the archive holds an AOTInductor compiled library (native code)")

    real_sympify = sympy.sympify

    def sympify(a, *args, **kwargs):
        if isinstance(a, str) and not _plain_formula(a, _shape_calls()):
            refuse(f"shape expression {a[:60]!r} is not a plain formula (sympy would eval it)")
        return real_sympify(a, *args, **kwargs)

    swap(torch, "load", load)
    swap(getattr(torch, "serialization", None), "load", load, required=False)
    swap(pickle, "loads", no_pickle)
    swap(pickle, "load", no_pickle)
    swap(torch._C, "_pickle_load_obj", no_script_object)
    swap(sympy, "sympify", sympify)
    try:
        from torch.export.pt2_archive import _package

        swap(_package, "_load_aoti", no_aoti)
    except ImportError:
        missing.append("torch.export.pt2_archive._package")
    try:
        from torch.export import _unlift

        real_guards = _unlift._convert_guards_code_to_fn

        def guards_fn(guards_code, paths, *args, **kwargs):
            for code in guards_code:
                if not isinstance(code, str) or not _plain_formula(code, _GUARD_CALLS, _GUARD_METHODS,
                                                                   _GUARD_MODULES, subscripts=True):
                    refuse(f"guard {str(code)[:60]!r} is not a plain shape check (it would be exec'd)")
            for path in paths:
                if not _plain_path(path):
                    refuse(f"input path {str(path)[:60]!r} has names that are not plain")
            return real_guards(guards_code, paths, *args, **kwargs)

        swap(_unlift, "_convert_guards_code_to_fn", guards_fn)
    except (ImportError, AttributeError):
        missing.append("torch.export._unlift._convert_guards_code_to_fn")
    try:
        import torch.fx.graph as fx_graph

        real_format = fx_graph._format_target

        def format_target(base, target):
            if not all(e.isidentifier() or _PLAIN_TEXT.fullmatch(e) for e in str(target).split(".")):
                refuse(f"graph attribute name {str(target)[:60]!r} is not a plain name")
            return real_format(base, target)

        swap(fx_graph, "_format_target", format_target)
    except (ImportError, AttributeError):
        missing.append("torch.fx.graph._format_target")
    forced = os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # would turn weights_only off

    def undo():
        for owner, name, old in reversed(saved):
            setattr(owner, name, old)
        if forced is not None:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = forced

    if missing:  # fail closed: a loader we cannot check is not run on an untrusted file
        undo()
        raise Refused(f"this torch {torch.__version__} loads .pt2 files through functions the safety checks do not "
                      f"know ({', '.join(missing[:3])}), so the file cannot be checked")
    return undo


def _weights_only_reason(exc: BaseException) -> str:
    text = str(exc)
    found = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if found:
        return (f"the archive holds pickled data that needs the Python object {found.group(1)!r} "
                "(unpickling it can run any code)")
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    detail = found.group(1).strip()[:120] if found else "not plain tensors"
    return f"the archive holds pickled data that torch.load(weights_only=True) refuses ({detail})"


_SHAPE_CALLS_CACHE: frozenset[str] | None = None


def _shape_calls() -> frozenset[str]:
    """Names a stored shape expression may call: sympy's and torch's sympy classes (math objects)."""
    global _SHAPE_CALLS_CACHE
    if _SHAPE_CALLS_CACHE is None:
        import sympy
        import torch.utils._sympy.functions as torch_sympy

        _SHAPE_CALLS_CACHE = frozenset(
            name for ns in (vars(sympy), vars(torch_sympy)) for name, obj in ns.items()
            if isinstance(obj, type) and issubclass(obj, sympy.Basic) and not name.startswith("_"))
    return _SHAPE_CALLS_CACHE


_FORMULA_NODES = (ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Name,
                  ast.Load, ast.Constant, ast.keyword, ast.Tuple, ast.boolop, ast.operator, ast.unaryop,
                  ast.cmpop)


def _plain_formula(text: str, calls, methods=frozenset(), modules=None, subscripts=False) -> bool:
    """True when `text` is an expression of numbers, plain strings, names, arithmetic/comparisons
    and calls to `calls` (plus `x.method()` for `methods`, `module.attr` for `modules`)."""
    modules = modules or {}
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                if node.func.id not in calls:
                    return False
            elif not isinstance(node.func, ast.Attribute):  # attributes are checked on their own
                return False
        elif isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if node.attr.startswith("_"):
                return False
            if not (node.attr in methods or (owner in modules and modules[owner](node.attr))):
                return False
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str):
                if not _PLAIN_TEXT.fullmatch(value):
                    return False
            elif not isinstance(value, (int, float, bool, type(None))):
                return False
        elif isinstance(node, ast.Name):
            if node.id.startswith("_"):
                return False
        elif isinstance(node, ast.keyword):
            if node.arg is None:
                return False
        elif isinstance(node, (ast.Subscript, ast.Slice)):
            if not subscripts:
                return False
        elif not isinstance(node, _FORMULA_NODES):
            return False
    return True


def _plain_path(path) -> bool:
    from torch.utils._pytree import GetAttrKey, MappingKey, SequenceKey

    for key in path:
        if isinstance(key, SequenceKey):
            ok = isinstance(key.idx, int)
        elif isinstance(key, MappingKey):
            ok = isinstance(key.key, int) or (isinstance(key.key, str) and bool(_PLAIN_TEXT.fullmatch(key.key)))
        elif isinstance(key, GetAttrKey):
            ok = isinstance(key.name, str) and key.name.isidentifier()
        else:
            ok = False
        if not ok:
            return False
    return True
