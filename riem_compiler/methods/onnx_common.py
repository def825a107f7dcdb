"""What every method's ONNX decoder shares: the function domain, its opset, and `UnpackBits`,
the ONNX form of the one bit-packing layout (riem_compiler/bitpack.py).

Imported only when an ONNX file is written (onnxscript is a slow import). Bodies are written
against opset 18 in onnxscript but use only ops whose signatures are the same from opset 13 on;
codegen/onnx_rewrite.function_protos stamps the model's own opset on each.
"""
from __future__ import annotations

import numpy as np
from onnxscript import FLOAT, INT64, UINT8, script  # noqa: F401  (re-exported for method bodies)
from onnxscript import opset18 as op
from onnxscript.values import Opset

DOMAIN = "riem_compiler"
DOMAIN_VERSION = 1
RIEM = Opset(DOMAIN, DOMAIN_VERSION)
_F = 1  # TensorProto.FLOAT


@script(RIEM)
def UnpackBits(packed: UINT8, count: INT64, bits: int) -> FLOAT:
    """`count` codes of `bits` (1..16) bits from a little-endian bit stream (riem.pack_codes).

    Code i starts at bit i*bits: it is read from the three bytes from byte (i*bits)//8 on, as
    (b0 + 256 b1 + 65536 b2) // 2^((i*bits) % 8) mod 2^bits. Every tensor is one int64 per code
    (no per-bit matrix; MatMul with a 1-D operand is slow in onnxruntime).
    """
    pow2 = op.Constant(value=np.array([1 << i for i in range(17)], dtype=np.int64))
    nbits = op.Constant(value_int=bits)
    eight = op.Constant(value_int=8)
    start = op.Range(op.Constant(value_int=0), op.Squeeze(count), op.Constant(value_int=1)) * nbits
    first = op.Div(start, eight)
    wide = op.Cast(op.Concat(packed, op.Constant(value=np.zeros(2, dtype=np.uint8)), axis=0), to=7)  # int64
    second = first + op.Constant(value_int=1)
    third = first + op.Constant(value_int=2)
    word = (op.Gather(wide, first) + op.Gather(wide, second) * op.Constant(value_int=256)
            + op.Gather(wide, third) * op.Constant(value_int=65536))
    code = op.Mod(op.Div(word, op.Gather(pow2, op.Mod(start, eight))), op.Gather(pow2, nbits))
    return op.Cast(code, to=_F)


FUNCTIONS = {"UnpackBits": (UnpackBits, ())}
