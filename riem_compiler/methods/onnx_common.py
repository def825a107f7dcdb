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

    Every 8 codes fill exactly `bits` bytes (a unit), so the stream is read as a (units, bits) int32
    matrix and code t of a unit is a constant-column gather: from byte (t*bits)//8 on, three bytes
    (b0 + 256 b1 + 65536 b2) // 2^((t*bits) % 8) mod 2^bits (byte indices clamped to the unit:
    a clamped byte only lands above the code's bits). int32 per code throughout, and the byte and
    shift tables are 8 long: onnxruntime's constant folding holds every intermediate of every
    layer until it ends, so their size is the file's peak memory at session creation.
    """
    pow2 = op.Constant(value=np.array([1 << i for i in range(17)], dtype=np.int32))
    nbits = op.Constant(value_int=bits)
    eight = op.Constant(value_int=8)
    one = op.Constant(value_int=1)
    n = op.Squeeze(count)
    units = op.Div(n + op.Constant(value_int=7), eight)
    need = op.Reshape(units * nbits, op.Constant(value_ints=[1]))
    wide = op.Slice(op.Concat(packed, op.Constant(value=np.zeros(16, dtype=np.uint8)), axis=0),
                    op.Constant(value_ints=[0]), need)
    unit_bytes = op.Reshape(op.Cast(wide, to=6), op.Concat(op.Reshape(units, op.Constant(value_ints=[1])),
                                                           op.Reshape(nbits, op.Constant(value_ints=[1])), axis=0))
    start = op.Range(op.Constant(value_int=0), eight, one) * nbits
    first = op.Div(start, eight)
    last = nbits - one
    word = (op.Gather(unit_bytes, first, axis=1)
            + op.Gather(unit_bytes, op.Min(first + one, last), axis=1) * op.Constant(value=np.array(256, np.int32))
            + op.Gather(unit_bytes, op.Min(first + op.Constant(value_int=2), last), axis=1)
            * op.Constant(value=np.array(65536, np.int32)))
    code = op.Mod(op.Div(word, op.Gather(pow2, op.Mod(start, eight))), op.Gather(pow2, nbits))
    flat = op.Slice(op.Reshape(code, op.Constant(value_ints=[-1])), op.Constant(value_ints=[0]),
                    op.Reshape(n, op.Constant(value_ints=[1])))
    return op.Cast(flat, to=_F)


FUNCTIONS = {"UnpackBits": (UnpackBits, ())}
