"""Imports inside riem_compiler go one way: no cycles, and no module imports a higher layer.

Every import counts, also those inside functions (lazy imports are still dependencies).
Layers, lowest first: the shared core; frontends; methods; the pass (and config, cache,
executors); codegen; api (and verification, plots); cli. The package's own __init__ is the public
facade on top and is not counted.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "riem_compiler"
LAYERS = [  # (layer, module prefixes); the first matching prefix decides
    ("core", ["riem_compiler.errors", "riem_compiler.files", "riem_compiler.compressed", "riem_compiler.bitpack",
              "riem_compiler.metrics", "riem_compiler.riem", "riem_compiler.report", "riem_compiler.version",
              "riem_compiler.pt2_safety", "riem_compiler.examples", "riem_compiler.heap"]),
    ("frontend", ["riem_compiler.frontend"]),
    ("methods", ["riem_compiler.methods"]),
    ("passes", ["riem_compiler.passes", "riem_compiler.config", "riem_compiler.fit_cache"]),
    ("codegen", ["riem_compiler.codegen"]),
    ("api", ["riem_compiler.api", "riem_compiler.verify", "riem_compiler.plots"]),
    ("cli", ["riem_compiler.cli", "riem_compiler.__main__"]),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(mod: str) -> str:
    for name, prefixes in LAYERS:
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return name
    raise AssertionError(f"{mod} is in no layer: add it to LAYERS in {__file__}")


def imports(mod: str, path: Path, known: set[str]) -> set[str]:
    """riem_compiler modules `mod` imports (a `from pkg import name` of a submodule counts as that)."""
    tree = ast.parse(path.read_text())
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != "riem_compiler" and name != mod:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items() if m != "riem_compiler"}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of graph g (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d not in g:
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_only_go_down():
    bad = [f"{m} ({layer(m)}) imports {d} ({layer(d)})"
           for m, deps in sorted(graph().items()) for d in sorted(deps)
           if RANK[layer(d)] > RANK[layer(m)]]
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # a lazy import inside a function is seen too
    src = "def f():\n    from riem_compiler.api import optimize\n"
    tree_imports = imports("riem_compiler.errors", _write(src), set(modules()))
    assert tree_imports == {"riem_compiler.api"} and RANK[layer("riem_compiler.api")] > RANK["core"]


def _write(text: str) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "probe.py"
    path.write_text(text)
    return path


def test_heavy_backends_stay_lazy():
    """import riem_compiler and a whole torch compression with every method load neither
    onnxscript nor tvm: they come in only when an ONNX file or TVM artifact is built."""
    import subprocess
    import sys

    code = ("import sys, torch, riem_compiler as rc\n"
            "assert 'onnxscript' not in sys.modules and 'tvm' not in sys.modules, 'import'\n"
            "m = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))\n"
            "for method in ('rtn', 'svd', 'riem', 'auto'):\n"
            "    rc.optimize(m, (torch.randn(2, 32),), method=method, ratio=0.3, steps=5, min_weight_size=0, quiet=True)\n"
            "print(sorted(k for k in ('onnxscript', 'tvm') if k in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
