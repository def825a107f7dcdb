"""`python -m riem_compiler ...` runs the `riem-compile` command line."""
import sys

from riem_compiler.cli import main

if __name__ == "__main__":
    sys.exit(main())
