"""`python -m riem_compiler.cli ...`: the same as `riem-compile ...`."""
import sys

from riem_compiler.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
