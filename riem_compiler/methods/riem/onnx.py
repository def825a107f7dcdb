"""ONNX decoders of RieM weights: RieMWeight (bit-packed states) and RieMMatrix (float states)."""
from __future__ import annotations

from riem_compiler.methods.onnx_common import FLOAT, RIEM, UINT8, UnpackBits, _F, op, script


@script(RIEM)
def RieMStates(codes: UINT8, scale: FLOAT, offset: FLOAT, rows: int, bits: int) -> FLOAT:
    """Per-dimension dequantisation of packed state codes: (rows, q) = codes * scale + offset."""
    q = op.Shape(scale)
    n = op.Reshape(op.Constant(value_int=rows), op.Constant(value_ints=[1]))
    values = UnpackBits(codes, op.Mul(n, q), bits=bits)
    return op.Reshape(values, op.Concat(n, q, axis=0)) * scale + offset


@script(RIEM)
def RieMBranch(a: FLOAT, bt: FLOAT, U: FLOAT, beta: FLOAT, v_row: FLOAT, k: int, branches: int) -> FLOAT:
    """Branch k as (rows, 1, cols): v^T sigmoid(A_k[:, :, None] + B_k^T[None, :, :]) per row.

    a (rows, q), bt (q, cols): states (b transposed); U (K, m, q), beta (K, m) float32; v_row (1, m).
    The roll of b is moved onto U_k (small): (S^s b) U_k^T = b U'_k^T with U'_k[:, e] = U_k[:, (e-s) mod q].
    Layout (rows, m, cols): the broadcast Add runs along cols, and the readout is a batched
    (1, m) x (m, cols) MatMul straight from the Sigmoid output, so the only large tensors are the
    Add and Sigmoid outputs, (rows, m, cols) each (these dominate onnxruntime's constant folding,
    which copies every folded tensor).
    """
    index = op.Constant(value_int=k)
    q = op.Gather(op.Shape(bt), op.Constant(value_int=0))
    shift = op.Div(index * q, op.Constant(value_int=branches))  # s_k = floor(k q / K)
    rolled = op.Mod(op.Range(op.Constant(value_int=0), q, op.Constant(value_int=1)) - shift + q, q)
    Uk = op.Gather(U, index, axis=0)  # (m, q)
    A = op.MatMul(a, op.Transpose(Uk, perm=[1, 0])) + op.Gather(beta, index, axis=0)  # (rows, m)
    B = op.MatMul(op.Gather(Uk, rolled, axis=1), bt)  # (m, cols)
    S = op.Sigmoid(op.Unsqueeze(A, op.Constant(value_ints=[2])) + op.Unsqueeze(B, op.Constant(value_ints=[0])))
    return op.MatMul(v_row, S)


@script(RIEM)
def RieMMatrix(a: FLOAT, b: FLOAT, U, beta, v, c, shape: list[int]) -> FLOAT:
    """W = c + sum_k sigmoid(a U_k^T + beta_k + (S^{s_k} b) U_k^T) @ v, reshaped to `shape`.

    The K = 6 branches (riem.K_BRANCHES) are six RieMBranch calls summed, so evaluation (and
    onnxruntime's constant folding) never holds more than one (rows, m, cols) tensor per branch.
    """
    Uf = op.Cast(U, to=_F)
    betaf = op.Cast(beta, to=_F)
    v_row = op.Unsqueeze(op.Cast(v, to=_F), op.Constant(value_ints=[0]))
    bt = op.Transpose(b, perm=[1, 0])
    W = op.Sum(RieMBranch(a, bt, Uf, betaf, v_row, k=0, branches=6),
               RieMBranch(a, bt, Uf, betaf, v_row, k=1, branches=6),
               RieMBranch(a, bt, Uf, betaf, v_row, k=2, branches=6),
               RieMBranch(a, bt, Uf, betaf, v_row, k=3, branches=6),
               RieMBranch(a, bt, Uf, betaf, v_row, k=4, branches=6),
               RieMBranch(a, bt, Uf, betaf, v_row, k=5, branches=6))
    return op.Reshape(W + op.Cast(c, to=_F), op.Constant(value_ints=shape))


@script(RIEM)
def RieMWeight(a_codes: UINT8, a_scale: FLOAT, a_offset: FLOAT, b_codes: UINT8, b_scale: FLOAT,
               b_offset: FLOAT, U, beta, v, c, shape: list[int], rows: int, cols: int, bits: int) -> FLOAT:
    """RieM weight from bit-packed neuron states and the metric network."""
    a = RieMStates(a_codes, a_scale, a_offset, rows=rows, bits=bits)
    b = RieMStates(b_codes, b_scale, b_offset, rows=cols, bits=bits)
    return RieMMatrix(a, b, U, beta, v, c, shape=shape)
