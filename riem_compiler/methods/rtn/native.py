"""rtn in standard ONNX: one `DequantizeLinear` (opset 21 for int4 / blocks).

The stored codes are unsigned with offset 2**(bits-1) (bitpack layout). Standard ONNX needs a
zero point of the same shape as the scale (one per row or per block), which would add bytes the
CompressedWeight does not hold; signed codes (code - offset) with the zero point left out (0)
need none, so the file holds exactly `cw.nbytes`:
- 8 bits: int8 codes (the stored byte XOR 0x80);
- 4 bits: int4 codes, two per byte, first element in the low nibble (ONNX's int4 layout).

A 2-D weight is written input-major: the DequantizeLinear data is the (in, out) matrix (Q.T for
quantised matrix Q with rows = outputs), blocked along axis 0 (per group) or scaled along axis 1
(per output). That is the layout onnxruntime fuses with the consuming MatMul / Gemm into its
low-bit `MatMulNBits` kernel, so the weight stays 4/8-bit in memory and is never dequantised
per call. A weight stored (out, in) (Gemm transB=1, torch's Linear) gets a Transpose after the
DequantizeLinear; onnxruntime folds it into the Gemm (or cancels it against the Transpose torch's
exporter puts before a MatMul) before fusing. Float16 group scales are stored as they are and
Cast to float32 before the DequantizeLinear (a float32 output is what MatMulNBits fuses; the
Cast is constant-folded at session creation); so are float16 row scales (rtn takes them where a
float32 scale per short row, e.g. a depthwise or small Conv's, does not fit the budget). Measured in benchmarks/results/onnx_size_latency.md.
Weights of more than 2 dims (convolutions) use the (rows, cols) view, blocked along axis 1, then
a Reshape. 3/2-bit codes do not map (no int3/int2 in ONNX) and keep the function form.

An embedding table (`table=True`: every use is a Gather of rows) is written as it stands, (V, D)
blocked along axis 1 (per row: axis 0), with no Transpose: onnxruntime neither folds nor fuses a
DequantizeLinear before a Gather, so it dequantises the whole table on every call, and the
Transpose of the input-major layout more than doubled that (MiniLM's 30522x384 table, 2 threads:
33 ms vs 80 ms per call; the dense Gather 0.03 ms). onnx_format "ort" avoids it with
`GatherBlockQuantized` (`gather_rtn`), which dequantises only the gathered rows.
"""
from __future__ import annotations

import numpy as np

from riem_compiler import bitpack
from riem_compiler.methods.base import NativeDecoder, NativeGather, NativeMatMul
from riem_compiler.methods.rtn.layout import is_transposed, quantised_shape

ENCODING = "rtn-signed-v1"  # (rows, cols) data: weights of more than 2 dims
ENCODING_INPUT_MAJOR = "rtn-signed-in-major-v1"  # 2-D weights: (cols, rows) = (in, out) data
ENCODING_MATMULNBITS = "rtn-matmulnbits-v1"  # onnx_format "ort": MatMulNBits B (N, blocks, bytes)
ENCODING_GATHER = "rtn-gatherbq-v1"  # onnx_format "ort": GatherBlockQuantized data (V, D * bits / 8)
MATMULNBITS_BITS = (2, 4, 8)  # what onnxruntime's CPU kernel takes
GATHER_BITS = (4, 8)  # GatherBlockQuantized with uint8 data
# MatMulNBits accuracy_level: 4 multiplies int8-quantised activations (per block), the level
# onnxruntime itself gives the MatMulNBits it fuses from DequantizeLinear + MatMul. Level 0 (float
# activations) measured here 20x (2-bit) and 14x (8-bit) slower than dense at batch 1, 4096x4096.
ACCURACY_LEVEL = 4
XOR = {8: 0x80, 4: 0x88}


def native_rtn(cw, onnx_format: str, table: bool = False):
    """NativeDecoder for `cw`, or the reason it keeps the function form. table: an embedding
    table, written (V, D) as it stands."""
    if onnx_format != "standard":
        return f"onnx_format {onnx_format!r} has no rtn form"
    bits, group = int(cw.meta["bits"]), cw.meta.get("group_size")
    if bits not in XOR:
        return f"{bits}-bit codes have no standard ONNX integer type (int8/int4 only)"
    if int(cw.meta["offset"]) != 1 << (bits - 1):
        return "codes offset is not 2**(bits-1)"
    transposed = is_transposed(cw)
    rows, cols = quantised_shape(cw.shape, transposed)
    scale = np.asarray(cw.arrays["scale"])
    q = _signed_codes(cw, bits, rows * cols).reshape(rows, cols)
    scale = scale.reshape(rows) if group is None else scale.reshape(rows, -1)
    nodes, constants = [], {}
    scale_input = "scale"
    if scale.dtype != np.float32:  # float16 scales (groups, or rows): a float32 product for MatMulNBits
        nodes.append(("Cast", ["scale"], {"to": 1}))
        scale_input = None
    if table and len(cw.shape) == 2 and not transposed:  # row-major: a Gather reads rows
        attrs = {"axis": 0} if group is None else {"axis": 1, "block_size": int(group)}
        nodes.append(("DequantizeLinear", ["codes", scale_input], attrs))
        data, scale_t, encoding = q, scale, ENCODING
    elif len(cw.shape) == 2:  # input-major (in, out) data: what onnxruntime fuses into MatMulNBits
        data, scale_t = q.T, scale if group is None else scale.T
        attrs = {"axis": 1} if group is None else {"axis": 0, "block_size": int(group)}
        nodes.append(("DequantizeLinear", ["codes", scale_input], attrs))
        if not transposed:  # the weight itself is (out, in)
            nodes.append(("Transpose", [None], {"perm": [1, 0]}))
        encoding = ENCODING_INPUT_MAJOR
    else:
        data, scale_t = q, scale
        attrs = {"axis": 0} if group is None else {"axis": 1, "block_size": int(group)}
        nodes.append(("DequantizeLinear", ["codes", scale_input], attrs))
        constants["shape"] = np.array(cw.shape, dtype=np.int64)
        nodes.append(("Reshape", [None, "shape"], {}))
        encoding = ENCODING
    # int8 + float32 per-axis exists since opset 13; int4 and blocks need 21
    opset = 13 if bits == 8 and group is None else 21
    return NativeDecoder(opset, {"codes": np.ascontiguousarray(data), "scale": np.ascontiguousarray(scale_t)},
                         nodes, "float32", encoding, constants)


def matmulnbits_rtn(cw, in_out: bool):
    """NativeMatMul for an rtn weight used as x @ W (in_out) or x @ W.T, or why not.

    MatMulNBits holds B as (N, blocks, block_size * bits / 8): per output row, the codes of each
    block of K inputs packed from the low bits up, which is the bitpack layout of one row of the
    quantised matrix (rows = outputs, groups along the inputs), and its default zero point
    2**(bits-1) is rtn's offset, so no zero point is stored. A row whose K is not a multiple of the
    block is padded to whole blocks with zero-point codes (a few bytes more in the file)."""
    bits, group = int(cw.meta["bits"]), cw.meta.get("group_size")
    if len(cw.shape) != 2:
        return "only 2-D weights have a MatMulNBits form"
    if bits not in MATMULNBITS_BITS:
        return f"{bits}-bit codes: onnxruntime's MatMulNBits takes {MATMULNBITS_BITS}-bit"
    if int(cw.meta["offset"]) != 1 << (bits - 1):
        return "codes offset is not 2**(bits-1)"
    if is_transposed(cw) != in_out:
        return "the codes are grouped along the weight's output axis for this use"
    got = matmulnbits_blocks(cw, bits, group, pad_code=int(cw.meta["offset"]))
    if isinstance(got, str):
        return got
    B, attrs = got
    scale = np.asarray(cw.arrays["scale"]).reshape(B.shape[0], B.shape[1])
    return NativeMatMul({"B": B, "scales": scale.ravel()}, attrs, ENCODING_MATMULNBITS,
                        cast_scales=scale.dtype != np.float32)


def matmulnbits_blocks(cw, bits: int, group, pad_code: int):
    """(B, attrs) of MatMulNBits for packed codes of a 2-D weight grouped along its inputs, or why
    not: B is (N, blocks, block * bits / 8), each row's codes of one block from the low bits up; a
    row whose K is not a multiple of the block is padded to whole blocks with `pad_code`."""
    n, k = quantised_shape(cw.shape, is_transposed(cw))
    block = k if group is None else int(group)
    if block < 16 or block & (block - 1):
        return f"block of {block} inputs: MatMulNBits needs a power of two >= 16"
    blocks = -(-k // block)
    codes = bitpack.unpack(np.asarray(cw.arrays["codes"], dtype=np.uint8), bits, n * k).reshape(n, k)
    if blocks * block != k:
        codes = np.pad(codes, ((0, 0), (0, blocks * block - k)), constant_values=pad_code)
    B = bitpack.pack(codes.ravel(), bits).reshape(n, blocks, block * bits // 8)
    return B, {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": ACCURACY_LEVEL}


def gather_rtn(cw):
    """NativeGather for an rtn table (V, D) with groups along D, or why not.

    GatherBlockQuantized reads uint8 data (V, D * bits / 8), the codes of a row packed from the low
    bits up: the bitpack layout of the table when a row fills whole bytes. Its default zero point
    for uint8 data is 2**(bits-1), rtn's offset, so none is stored. The block must be a power of
    two >= 16; one scale per row uses one block of the next such power >= D (measured exact)."""
    bits, group = int(cw.meta["bits"]), cw.meta.get("group_size")
    if len(cw.shape) != 2 or is_transposed(cw):
        return "only a 2-D table with groups along its rows has a GatherBlockQuantized form"
    if bits not in GATHER_BITS:
        return f"{bits}-bit codes: onnxruntime's GatherBlockQuantized takes {GATHER_BITS}-bit"
    if int(cw.meta["offset"]) != 1 << (bits - 1):
        return "codes offset is not 2**(bits-1)"
    rows, cols = cw.shape
    if cols * bits % 8:
        return f"a row of {cols} {bits}-bit codes does not fill whole bytes"
    block = max(16, 1 << (cols - 1).bit_length()) if group is None else int(group)
    if block < 16 or block & (block - 1):
        return f"groups of {block}: GatherBlockQuantized needs a power of two >= 16"
    data = np.asarray(cw.arrays["codes"], dtype=np.uint8).reshape(rows, cols * bits // 8)
    scale = np.asarray(cw.arrays["scale"]).reshape(rows, -1)
    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits}
    return NativeGather({"data": data, "scales": scale}, attrs, ENCODING_GATHER,
                        cast_scales=scale.dtype != np.float32)


def _signed_codes(cw, bits: int, count: int) -> np.ndarray:
    """The stored codes minus the offset, as int8 or ml_dtypes.int4 (flat)."""
    packed = np.asarray(cw.arrays["codes"], dtype=np.uint8).ravel()
    if bits == 8:
        return (packed ^ np.uint8(XOR[8])).view(np.int8)[:count]  # u - 128
    import ml_dtypes

    nib = np.empty(2 * packed.size, dtype=np.int16)
    nib[0::2], nib[1::2] = packed & 0x0F, packed >> 4
    return (nib[:count] - 8).astype(ml_dtypes.int4)


def rtn_arrays_from_native(meta: dict, shape, encoding: str, tensors: dict) -> dict:
    """The CompressedWeight arrays (bit for bit) from the native initializers read as numpy."""
    if encoding not in (ENCODING, ENCODING_INPUT_MAJOR, ENCODING_MATMULNBITS, ENCODING_GATHER):
        raise ValueError(f"unknown rtn ONNX encoding {encoding!r}")
    bits = int(meta["bits"])
    rows, cols = quantised_shape(shape, bool(meta.get("transposed", False)))
    if encoding == ENCODING_GATHER:  # the stored bytes as they are
        scale = np.asarray(tensors["scales"])
        scale = scale.reshape(rows) if meta.get("group_size") is None else scale.reshape(rows, -1)
        return {"codes": np.ascontiguousarray(np.asarray(tensors["data"], dtype=np.uint8).ravel()),
                "scale": np.ascontiguousarray(scale)}
    if encoding == ENCODING_MATMULNBITS:
        B = np.asarray(tensors["B"], dtype=np.uint8)
        padded = B.shape[1] * B.shape[2] * 8 // bits
        codes = bitpack.unpack(B.ravel(), bits, rows * padded).reshape(rows, padded)[:, :cols]
        scale = np.asarray(tensors["scales"]).reshape(rows, -1)
        scale = scale.reshape(rows) if meta.get("group_size") is None else scale
        return {"codes": bitpack.pack(codes.ravel(), bits), "scale": np.ascontiguousarray(scale)}
    signed = np.asarray(tensors["codes"]).astype(np.int64)
    scale = np.asarray(tensors["scale"])
    if encoding == ENCODING_INPUT_MAJOR:  # (cols, rows) data, scale (groups, rows) or (rows,)
        signed = signed.reshape(cols, rows).T
        scale = scale.T
    codes = bitpack.pack(signed.ravel() + int(meta["offset"]), bits)
    scale = scale.reshape(rows) if meta.get("group_size") is None else scale.reshape(rows, -1)
    return {"codes": codes, "scale": np.ascontiguousarray(scale)}
