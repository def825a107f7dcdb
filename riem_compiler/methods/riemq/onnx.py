"""ONNX decoders of riemq weights: RieM's RieMWeight plus affine's AffineWeight(T), added."""
from __future__ import annotations

from riem_compiler.methods.affine.onnx import AffineWeight, AffineWeightT
from riem_compiler.methods.onnx_common import FLOAT, RIEM, UINT8, op, script
from riem_compiler.methods.riem.onnx import RieMWeight


@script(RIEM)
def RieMQWeight(a_codes: UINT8, a_scale: FLOAT, a_offset: FLOAT, b_codes: UINT8, b_scale: FLOAT,
                b_offset: FLOAT, U, beta, v, c, codes: UINT8, scale, zero, shape: list[int], riem_rows: int,
                riem_cols: int, riem_bits: int, q_rows: int, q_cols: int, q_bits: int, q_group: int) -> FLOAT:
    """RieM part + affine part (groups along the weight's matrix view)."""
    r = RieMWeight(a_codes, a_scale, a_offset, b_codes, b_scale, b_offset, U, beta, v, c, shape=shape,
                   rows=riem_rows, cols=riem_cols, bits=riem_bits)
    q = AffineWeight(codes, scale, zero, shape=shape, rows=q_rows, cols=q_cols, bits=q_bits, group=q_group)
    return op.Add(r, q)


@script(RIEM)
def RieMQWeightT(a_codes: UINT8, a_scale: FLOAT, a_offset: FLOAT, b_codes: UINT8, b_scale: FLOAT,
                 b_offset: FLOAT, U, beta, v, c, codes: UINT8, scale, zero, shape: list[int], riem_rows: int,
                 riem_cols: int, riem_bits: int, q_rows: int, q_cols: int, q_bits: int, q_group: int) -> FLOAT:
    """RieM part + affine part grouped along the transposed matrix view."""
    r = RieMWeight(a_codes, a_scale, a_offset, b_codes, b_scale, b_offset, U, beta, v, c, shape=shape,
                   rows=riem_rows, cols=riem_cols, bits=riem_bits)
    q = AffineWeightT(codes, scale, zero, shape=shape, rows=q_rows, cols=q_cols, bits=q_bits, group=q_group)
    return op.Add(r, q)
