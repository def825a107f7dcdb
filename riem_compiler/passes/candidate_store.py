"""Where auto keeps the arrays of the candidates it holds while it plans: in files, not in memory.

auto needs every candidate's bytes and errors to plan, but the arrays only of the few it swaps in,
measures or picks. Held in memory they grew with the model's depth (1.5-1.7x the fp32 weights of
a 1B-decoder stack after the first pass: float16 copies, int8 SVD factors, ...). Here each array
of at least `min_bytes` is written once to a temporary directory and mapped back copy-on-write
(`np.load(mmap_mode="c")`): the same bytes, writable in memory (torch takes them without a
warning) and never written back, read from disk only where a decode touches them. `close()`
removes the directory; mapped arrays stay valid until the last one is dropped.

A failed write (no space, no temporary directory) keeps that candidate in memory and says so
once: the store only lowers memory, it never changes or loses a fit.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from riem_compiler.compressed import CompressedWeight

log = logging.getLogger("riem_compiler.auto")

MIN_BYTES = 1 << 20  # smaller arrays stay in memory: a file each would cost more than it frees


class CandidateStore:
    def __init__(self, min_bytes: int = MIN_BYTES, directory: str | None = None):
        self.min_bytes = min_bytes
        self._parent = directory
        self._dir: Path | None = None
        self._count = 0
        self.spilled_bytes = 0  # bytes written to files over the store's life
        self._failed = False

    def hold(self, cw: CompressedWeight) -> CompressedWeight:
        """`cw` with its large arrays mapped from files (the same record when nothing is large
        enough, or when writing fails)."""
        large = [k for k, a in cw.arrays.items() if a.nbytes >= self.min_bytes and not isinstance(a, np.memmap)]
        if not large or self._failed:
            return cw
        arrays = dict(cw.arrays)
        try:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="riem-auto-candidates-", dir=self._parent))
            for key in large:
                path = self._dir / f"{self._count}.npy"
                self._count += 1
                np.save(path, np.ascontiguousarray(cw.arrays[key]), allow_pickle=False)
                arrays[key] = np.load(path, mmap_mode="c", allow_pickle=False)
                self.spilled_bytes += arrays[key].nbytes
        except OSError as exc:
            self._failed = True
            log.warning("auto: cannot write held candidates to %s (%s); they stay in memory",
                        self._dir or tempfile.gettempdir(), exc)
            return cw
        return CompressedWeight(cw.method, cw.shape, cw.meta, arrays)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def in_memory(cw: CompressedWeight) -> CompressedWeight:
    """`cw` with every mapped array read into memory (what a result hands on)."""
    if not any(isinstance(a, np.memmap) for a in cw.arrays.values()):
        return cw
    return CompressedWeight(cw.method, cw.shape, cw.meta,
                            {k: np.array(a) if isinstance(a, np.memmap) else a for k, a in cw.arrays.items()})
