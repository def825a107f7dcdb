"""The affine grouped matrix's orientation and sizes, shared by the fit, the decoders and the
TVM kernel (which must not import the method module: that one imports it)."""
from __future__ import annotations

import math

from riem_compiler.methods.rtn.layout import quantised_shape


def flipped(transposed: bool, axis: str) -> bool:
    """Whether the grouped matrix is the transpose of the weight's (rows, cols) matrix view."""
    return bool(transposed) != (axis == "out")


def affine_layout(shape, group_size: int | None, flip: bool) -> tuple[int, int, int, int]:
    """(rows, cols, group, groups per row) of the grouped matrix; None: one group per row."""
    rows, cols = quantised_shape(shape, flip)
    g = cols if group_size is None else int(group_size)
    return rows, cols, g, math.ceil(cols / g)
