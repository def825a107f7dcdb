"""Where per-layer fits run. An executor maps a job function over argument tuples and yields
results as they finish (any order); the pass only needs `map`."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from riem_compiler.errors import InputError


class LocalExecutor:
    """In-process, one layer after another (the default)."""

    def map(self, fn: Callable, jobs: Iterable[tuple]) -> Iterator:
        for args in jobs:
            yield fn(*args)


def make_executor(config) -> LocalExecutor:
    name = getattr(config, "executor", "local")
    if name == "local":
        return LocalExecutor()
    raise InputError(f"unknown executor {name!r}; use 'local'")
