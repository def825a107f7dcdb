"""Giving the C heap's freed pages back to the OS.

glibc keeps freed blocks below its mmap threshold mapped, so a process that made and dropped
large temporaries (onnxruntime's constant folding) keeps their pages resident until it calls
malloc_trim. Not for hot loops: the next large allocations fault their pages in again (trimming
after every auto layer job made auto 2-18% slower, same-day reruns on MiniLM and the ImageNet CNNs).
"""
from __future__ import annotations

import ctypes
import functools


def release_freed_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim(0)`); True where it ran.

    onnxruntime constant-folds a decoder-function file at session creation and keeps every folded
    intermediate until the pass ends; glibc then keeps the freed heap mapped. Measured on MiniLM's
    `auto` plan at 1/8 (31 function-form layers): 995 MiB added by the session, 107 MiB after
    this call (dense file: 67 MiB; tvm_lowbit.md). The peak during session creation is not changed by it.
    A process that opens such a file with stock onnxruntime gets the same by calling malloc_trim
    itself, or by starting with GLIBC_TUNABLES=glibc.malloc.trim_threshold=0."""
    trim = _malloc_trim()
    if trim is None:  # not glibc (macOS, musl, Windows): nothing to give back
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim from the process's own symbols, looked up once (no library search:
    ctypes.util.find_library runs a subprocess), or None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim
