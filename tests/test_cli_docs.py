"""docs/CLI.md agrees with `riem-compile --help`: every flag the parser has is described there, and
every flag the page names exists (a renamed or removed flag fails here)."""
import re
from pathlib import Path

from riem_compiler.cli.arguments import build_parser

DOC = Path(__file__).resolve().parent.parent / "docs" / "CLI.md"


def _parser_flags() -> set[str]:
    return {o for action in build_parser()._actions for o in action.option_strings}


def _mentioned(flag: str, text: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", text) is not None


def test_every_flag_of_help_is_in_docs_cli():
    text = DOC.read_text()
    missing = sorted(f for f in _parser_flags() if not _mentioned(f, text))
    assert not missing, f"flags of riem-compile --help that docs/CLI.md does not describe: {missing}"


def test_every_flag_docs_cli_names_exists():
    flags = _parser_flags()
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", DOC.read_text()))
    unknown = sorted(named - flags)
    assert not unknown, f"docs/CLI.md names flags that riem-compile does not have: {unknown}"


def test_help_text_lists_the_flags_it_parses():
    text = build_parser().format_help()
    assert all(_mentioned(f, text) for f in _parser_flags())
