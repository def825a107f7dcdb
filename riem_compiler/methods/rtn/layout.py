"""The rtn quantised matrix's orientation, shared by the fit, the decoders and the ONNX forms."""
from __future__ import annotations

import numpy as np


def quantised_shape(shape, transposed: bool = False) -> tuple[int, int]:
    """(rows, cols) of the quantised matrix: the matrix view, or its transpose."""
    n, d = shape[0], int(np.prod(shape[1:]))
    return (d, n) if transposed else (n, d)


def is_transposed(cw) -> bool:
    """Whether the codes describe W.T (meta "transposed"; absent in files written before it)."""
    return bool(cw.meta.get("transposed", False))
