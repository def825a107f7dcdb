"""The method registry: name -> the module that owns everything about that method.

Adding a method is one module (see README "Adding a method") plus one line in `MODULES`.
Modules are imported on first use, so `import riem_compiler` stays light.
"""
from __future__ import annotations

import importlib

import numpy as np

MODULES = {  # in this order `auto` asks them for candidates
    "dense": "riem_compiler.methods.dense",
    "rtn": "riem_compiler.methods.rtn",
    "svd": "riem_compiler.methods.svd",
    "tucker2": "riem_compiler.methods.tucker2",
    "affine": "riem_compiler.methods.affine",
    "riem": "riem_compiler.methods.riem",
    "vq": "riem_compiler.methods.vq",
    "rotq": "riem_compiler.methods.rotq",
    "riemq": "riem_compiler.methods.riemq",
}
# methods a user can pick for every layer (dense is auto's "keep it" candidate), plus the planner
SELECTABLE = ("riem", "svd", "rtn", "tucker2", "affine", "vq", "rotq", "riemq")
PLANNER = "auto"


def get(name: str):
    """The `Method` registered as `name`."""
    if name not in MODULES:
        raise ValueError(f"unknown compression method {name!r}; known: {sorted(MODULES)}")
    return importlib.import_module(MODULES[name]).METHOD


def all_methods() -> list:
    return [get(name) for name in MODULES]


def decode_torch(cw, tensors: dict):
    """The float32 weight, in cw's shape, from its stored arrays given as torch tensors."""
    return get(cw.method).decode_torch(cw, tensors).reshape(cw.shape)


def decode(cw) -> np.ndarray:
    """The float32 weight, in cw's shape (numpy): the caller's own array (never a view of cw's, so it
    may be written), C-contiguous in torch's 64-byte aligned memory, so that callers reshape it without
    a copy and swap it into a model as it is (the same kernels, whatever allocator made the decode)."""
    import torch

    from riem_compiler.bitpack import eager_numpy

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in cw.arrays.items()}
    with torch.no_grad(), eager_numpy():
        out = decode_torch(cw, tensors)
        if (not out.is_contiguous() or out.data_ptr() % ALIGNMENT
                or any(np.may_share_memory(out.numpy(), a) for a in cw.arrays.values())):
            out = torch.empty(out.shape, dtype=out.dtype).copy_(out)
        return out.numpy()


ALIGNMENT = 64  # bytes: torch's CPU allocator's alignment


def relative_error(weight, cw) -> float:
    """`metrics.relative_error` of what `cw` stores."""
    from riem_compiler.metrics import relative_error as rel

    return rel(weight, decode(cw))
