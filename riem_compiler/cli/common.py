"""What every part of the `riem-compile` command line shares: exit codes, the program name,
the exceptions that map to an exit code, the logger and the one-line form of an exception."""
from __future__ import annotations

import logging

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_VERIFY, EXIT_OUTPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM
PROG = "riem-compile"

log = logging.getLogger("riem_compiler.cli")


class OutputError(Exception):
    """The output location cannot be written."""


class VerificationFailed(Exception):
    """The compressed model misses --max-error (or could not be checked while one was set)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; a KeyboardInterrupt so every cleanup path for Ctrl-C runs for it too."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

