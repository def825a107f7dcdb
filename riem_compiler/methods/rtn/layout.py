"""The rtn quantised matrix's orientation, shared by the fit, the decoders and the ONNX forms."""
from __future__ import annotations

import numpy as np

from riem_compiler.errors import InputError


def quantised_shape(shape, transposed: bool = False) -> tuple[int, int]:
    """(rows, cols) of the quantised matrix: the matrix view, or its transpose."""
    n, d = shape[0], int(np.prod(shape[1:]))
    return (d, n) if transposed else (n, d)


def is_transposed(cw) -> bool:
    """Whether the codes describe W.T (meta "transposed"; absent in files written before it)."""
    return bool(cw.meta.get("transposed", False))


def weight_layout(weight, in_axis: int, method: str) -> tuple[tuple, bool]:
    """(shape, transposed) of a weight a quantiser fits along `in_axis` (0: a 2-D (in, out)
    weight, quantised as its transpose); InputError for in_axis 0 on a weight that is not 2-D."""
    shape = tuple(np.shape(weight))
    transposed = in_axis == 0
    if transposed and len(shape) != 2:
        raise InputError(f"{method} in_axis 0 needs a 2-D weight, got shape {shape}")
    return shape, transposed
