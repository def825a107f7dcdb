"""Baseline methods: numerics against direct numpy math, exact stored bytes, budget fitting, export."""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from riem_compiler import bitpack, methods
from riem_compiler.methods import decode, decode_torch
from riem_compiler.methods import dense as dense_m
from riem_compiler.methods import rtn as rtn_m
from riem_compiler.methods import svd as svd_m
from riem_compiler.methods import tucker2 as tucker2_m


def _rng(seed=0):
    return np.random.default_rng(seed)


def _lowrank_plus_noise(n, d, rank, noise=0.05, seed=0):
    r = _rng(seed)
    return (r.standard_normal((n, rank)) @ r.standard_normal((rank, d)) / np.sqrt(rank)
            + noise * r.standard_normal((n, d))).astype(np.float32)


def _stored_bytes(cw, tmp_path):
    """Tensor bytes of the arrays written by safetensors: file size - 8 - header length."""
    path = tmp_path / f"{cw.method}.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in cw.arrays.items()}, str(path))
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    assert set(header) - {"__metadata__"} == set(cw.arrays)
    return len(raw) - 8 - header_len


def _rel(w, w_hat):
    return np.linalg.norm(w - w_hat) / np.linalg.norm(w)


def test_methods_registered():
    for name in ("dense", "svd", "tucker2", "rtn", "riem"):
        assert methods.get(name).name == name


# ----------------------------------------------------------------------------- svd

@pytest.mark.parametrize("factor_bits", [32, 16, 8])
def test_svd_numerics(factor_bits):
    w = _lowrank_plus_noise(48, 40, 6)
    cw = svd_m.fit_svd(w, 0.3, factor_bits)
    rank = cw.meta["rank"]
    U, S, Vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    optimum = np.sqrt(np.sum(S[rank:] ** 2)) / np.linalg.norm(S)  # Eckart-Young
    w_hat = decode(cw)
    assert w_hat.shape == w.shape and w_hat.dtype == np.float32
    if factor_bits == 8:
        a = cw.arrays
        assert a["left_codes"].dtype == np.int8 and np.abs(a["left_codes"].astype(int)).max() <= 127
        direct = (a["left_codes"] * a["left_scale"][:, None]) @ (a["right_codes"] * a["right_scale"][:, None])
        tol = 5e-3  # int8 factor rounding adds ~0.1-0.3% of ||W||
    else:
        direct = cw.arrays["left"].astype(np.float64) @ cw.arrays["right"].astype(np.float64)
        tol = 1e-3 if factor_bits == 16 else 1e-6
    np.testing.assert_allclose(w_hat, direct, rtol=1e-5, atol=1e-5)
    if factor_bits == 32:  # exactly the truncated SVD
        np.testing.assert_allclose(w_hat, (U[:, :rank] * S[:rank]) @ Vt[:rank], rtol=1e-4, atol=1e-5)
    assert optimum - 1e-6 <= methods.relative_error(w, cw) <= optimum + tol
    assert methods.relative_error(w, cw) == pytest.approx(_rel(w, w_hat), rel=1e-6)


@pytest.mark.parametrize("factor_bits", [32, 16, 8])
@pytest.mark.parametrize("ratio", [0.05, 0.125, 0.25, 0.5])
def test_svd_rank_fits_budget(factor_bits, ratio):
    shape = (64, 3, 4, 4)  # a conv weight, viewed as a 64 x 48 matrix
    w = _rng(1).standard_normal(shape).astype(np.float32)
    cw = svd_m.fit_svd(w, ratio, factor_bits)
    budget = ratio * w.size * 4
    assert cw.nbytes == svd_m.svd_nbytes(shape, cw.meta["rank"], factor_bits) <= budget
    assert cw.meta["rank"] == 48 or svd_m.svd_nbytes(shape, cw.meta["rank"] + 1, factor_bits) > budget
    assert decode(cw).shape == shape


def test_svd_too_small_ratio_raises():
    with pytest.raises(ValueError, match="too small"):
        svd_m.fit_svd(np.ones((64, 64), np.float32), 0.001)
    with pytest.raises(ValueError, match="factor_bits"):
        svd_m.svd_nbytes((4, 4), 1, 4)


def test_svd_int8_beats_fp16_at_same_bytes():
    w = _lowrank_plus_noise(96, 80, 40, noise=0.2)
    assert methods.relative_error(w, svd_m.fit_svd(w, 0.25, 8)) < methods.relative_error(w, svd_m.fit_svd(w, 0.25, 16))


# ----------------------------------------------------------------------------- rtn

def _rtn_reference(w, bits, group):
    """Direct numpy round-to-nearest with the stored scale dtype."""
    m = w.reshape(w.shape[0], -1).astype(np.float32)
    n, d = m.shape
    g = d if group is None else group
    qmax = 2 ** (bits - 1) - 1
    sdtype = np.float32 if group is None else np.float16
    out = np.empty_like(m)
    for i in range(n):
        for start in range(0, d, g):
            block = m[i, start:start + g]
            scale = np.float32(sdtype(max(np.abs(block).max() / qmax, np.finfo(sdtype).smallest_subnormal)))
            out[i, start:start + g] = np.clip(np.rint(block / scale), -qmax, qmax) * scale
    return out.reshape(w.shape)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 128), (4, None), (3, 128), (2, 128), (3, 16)])
def test_rtn_numerics(bits, group):
    w = _rng(2).standard_normal((24, 300)).astype(np.float32)  # 300 = 128 + 128 + 44: short last group
    w[3] = 0.0  # an all-zero row must not divide by zero
    cw = rtn_m.fit_rtn(w, bits, group)
    w_hat = decode(cw)
    np.testing.assert_allclose(w_hat, _rtn_reference(w, bits, group), rtol=1e-6, atol=1e-7)
    assert np.all(w_hat[3] == 0)
    codes = bitpack.unpack(cw.arrays["codes"], bits, w.size)
    qmax = 2 ** (bits - 1) - 1
    assert codes.min() >= 2 ** (bits - 1) - qmax and codes.max() <= 2 ** (bits - 1) + qmax
    n_groups = 1 if group is None else -(-300 // group)
    assert cw.arrays["scale"].size == 24 * n_groups


def test_rtn_conv_weight_groups_along_flattened_inputs():
    w = _rng(3).standard_normal((8, 4, 3, 3)).astype(np.float32)  # 36 inputs, groups of 16
    cw = rtn_m.fit_rtn(w, 4, 16)
    assert cw.arrays["scale"].shape == (8, 3)
    np.testing.assert_allclose(decode(cw), _rtn_reference(w, 4, 16), rtol=1e-6, atol=1e-7)


def test_rtn_error_decreases_with_bits():
    w = _rng(4).standard_normal((32, 256)).astype(np.float32)
    errors = [methods.relative_error(w, rtn_m.fit_rtn(w, b, 128)) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01


def test_rtn_settings_for_ratio():
    shape = (384, 384)
    # int8 per channel is 1/4 of fp32 plus its scales, so exactly 1/4 falls to 4-bit groups
    assert rtn_m.rtn_settings_for_ratio(shape=shape, ratio=0.25) == (4, 128)
    assert rtn_m.rtn_settings_for_ratio(shape=shape, ratio=0.26) == (8, None)
    assert rtn_m.rtn_settings_for_ratio(shape=shape, ratio=0.125) == (3, 128)
    assert rtn_m.rtn_settings_for_ratio(shape=shape, ratio=0.01) is None
    for ratio in (0.07, 0.1, 0.13, 0.3):
        bits, group = rtn_m.rtn_settings_for_ratio(shape=shape, ratio=ratio)
        assert rtn_m.fit_rtn(np.ones(shape, np.float32), bits, group).nbytes <= ratio * 384 * 384 * 4


def test_rtn_settings_without_shape_use_wide_matrix_bytes():
    assert rtn_m.rtn_settings_for_ratio(0.25) == (8, None)
    assert rtn_m.rtn_settings_for_ratio(0.13) == (4, 128)
    assert rtn_m.rtn_settings_for_ratio(0.125) == (4, None)
    assert rtn_m.rtn_settings_for_ratio(0.01) is None


def test_method_fit_dispatch_and_budget():
    from riem_compiler.frontend.layers import LayerSpec

    w = _rng(10).standard_normal((48, 64)).astype(np.float32)
    conv = _rng(10).standard_normal((16, 8, 3, 3)).astype(np.float32)

    def fit(method, weight, ratio):
        m = methods.get(method)
        spec = LayerSpec("w", "conv2d" if weight.ndim == 4 else "linear", weight)
        return m.fit(spec, ratio, m.Settings()).weight

    for method, weight in (("svd", w), ("rtn", w), ("tucker2", conv), ("svd", conv), ("rtn", conv)):
        cw = fit(method, weight, 0.2)
        assert cw.method == method and cw.nbytes <= 0.2 * weight.size * 4
    # 0.8 bytes per weight: 6-bit codes with float16 row scales (0.78); the old ladder fell to 4 bits
    assert fit("rtn", w, 0.2).meta["bits"] == 6
    with pytest.raises(ValueError, match="unknown compression method"):
        methods.get("lowrank")
    with pytest.raises(ValueError, match="too small"):
        fit("rtn", w, 0.01)


def test_rtn_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        rtn_m.fit_rtn(np.ones((4, 4), np.float32), 9)


# ----------------------------------------------------------------------------- tucker-2

def _tucker_tensor(out_ch, in_ch, r_out, r_in, kernel=(3, 3), seed=5):
    r = _rng(seed)
    core = r.standard_normal((r_out, r_in, *kernel))
    out_f = np.linalg.qr(r.standard_normal((out_ch, r_out)))[0]
    in_f = np.linalg.qr(r.standard_normal((in_ch, r_in)))[0]
    return np.einsum("rs...,or,is->oi...", core, out_f, in_f).astype(np.float32)


def test_tucker2_recovers_exact_low_rank():
    w = _tucker_tensor(32, 16, 8, 4)
    cw = tucker2_m.fit_tucker2(w, 0.25)
    r_out, r_in = cw.meta["ranks"]
    assert r_out >= 8 and r_in >= 4
    a = {k: v.astype(np.float64) for k, v in cw.arrays.items()}
    direct = np.einsum("or,rs...,is->oi...", a["out_factor"], a["core"], a["in_factor"])
    np.testing.assert_allclose(decode(cw), direct, rtol=1e-5, atol=1e-5)
    assert methods.relative_error(w, cw) < 2e-3  # float16 storage only
    assert cw.nbytes == tucker2_m.tucker2_nbytes(w.shape, (r_out, r_in)) <= 0.25 * w.size * 4


def test_tucker2_beats_truncated_conv_svd_on_tucker_weight():
    w = _tucker_tensor(32, 16, 8, 4) + 0.005 * _rng(6).standard_normal((32, 16, 3, 3)).astype(np.float32)
    for rule in ("energy", "proportional"):  # both rank rules reach ranks >= (8, 4) at 0.1
        tucker = tucker2_m.fit_tucker2(w, 0.1, rank_rule=rule)
        assert methods.relative_error(w, tucker) < 0.05 < methods.relative_error(w, svd_m.fit_svd(w, 0.1, 16))


def test_tucker2_rejects_non_kxk_and_grouped():
    with pytest.raises(ValueError, match="more than one tap"):
        tucker2_m.fit_tucker2(np.ones((8, 4, 1, 1), np.float32), 0.5)
    with pytest.raises(ValueError, match="groups"):
        tucker2_m.fit_tucker2(np.ones((8, 4, 3, 3), np.float32), 0.5, groups=2)


# ----------------------------------------------------------------------------- shared contract

def _all_methods():
    w = _lowrank_plus_noise(40, 72, 8)
    conv = _tucker_tensor(16, 8, 4, 3)
    return [
        (w, dense_m.fit_dense(w, "float16")), (w, dense_m.fit_dense(w, "float32")),
        (w, svd_m.fit_svd(w, 0.25, 32)), (w, svd_m.fit_svd(w, 0.25, 16)), (w, svd_m.fit_svd(w, 0.25, 8)),
        (conv, tucker2_m.fit_tucker2(conv, 0.3)),
        (w, rtn_m.fit_rtn(w, 8, None)), (w, rtn_m.fit_rtn(w, 4, 32)), (w, rtn_m.fit_rtn(w, 3, 32)),
        (w, rtn_m.fit_rtn(w, 2, None)),
    ]


def test_nbytes_is_what_safetensors_writes(tmp_path):
    for w, cw in _all_methods():
        assert cw.nbytes == _stored_bytes(cw, tmp_path), cw.method
    w = _rng(7).standard_normal((40, 72)).astype(np.float32)
    assert rtn_m.fit_rtn(w, 3, 32).nbytes == rtn_m.rtn_nbytes(w.shape, 3, 32) == -(-40 * 72 * 3 // 8) + 40 * 3 * 2
    assert rtn_m.fit_rtn(w, 8, None).nbytes == 40 * 72 + 40 * 4


def test_deterministic_and_decode_torch_matches_reconstruct():
    first, second = _all_methods(), _all_methods()
    for (w, a), (_, b) in zip(first, second):
        assert a.meta == b.meta and a.arrays.keys() == b.arrays.keys()
        for k in a.arrays:
            np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.arrays.items()}
        np.testing.assert_array_equal(decode_torch(a, tensors).numpy(), decode(a))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_unpack_codes_exportable_matches_numpy(bits):
    codes = _rng(8).integers(0, 2 ** bits, size=257)
    packed = torch.from_numpy(bitpack.pack(codes, bits))
    np.testing.assert_array_equal(bitpack.unpack_torch(packed, bits, 257).numpy(), codes)


class _Decoded(torch.nn.Module):
    """x @ W_hat^T with W_hat decoded from buffers (what a rewritten layer does)."""

    def __init__(self, cw):
        super().__init__()
        self.cw, self.names = cw, list(cw.arrays)
        for k, v in cw.arrays.items():
            self.register_buffer(k, torch.from_numpy(np.ascontiguousarray(v)))

    def forward(self, x):
        w = decode_torch(self.cw, {k: getattr(self, k) for k in self.names})
        return x @ w.reshape(w.shape[0], -1).T


def test_decoders_export_to_standard_onnx():
    ort = pytest.importorskip("onnxruntime")
    w = _rng(9).standard_normal((12, 40)).astype(np.float32)
    conv = _rng(9).standard_normal((6, 4, 3, 3)).astype(np.float32)
    for cw in (rtn_m.fit_rtn(w, 3, 16), svd_m.fit_svd(w, 0.3, 8), tucker2_m.fit_tucker2(conv, 0.5)):
        module = _Decoded(cw).eval()
        x = torch.randn(2, int(np.prod(cw.shape[1:])))
        proto = torch.onnx.export(module, (x,), dynamo=True, optimize=False).model_proto
        assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
        sess = ort.InferenceSession(proto.SerializeToString())
        y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(y, module(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["energy", "proportional"])
@pytest.mark.parametrize("ratio", [1 / 16, 1 / 32])
def test_tucker2_small_budgets_choose_ranks_that_decode(rule, ratio):
    w = np.random.default_rng(3).normal(size=(32, 32, 3, 3)).astype(np.float32)
    cw = tucker2_m.fit_tucker2(w, ratio, rank_rule=rule)
    r_out, r_in = cw.meta["ranks"]
    assert r_out <= r_in * 9 and r_in <= r_out * 9
    assert cw.arrays["out_factor"].shape == (32, r_out) and cw.arrays["in_factor"].shape == (32, r_in)
    assert decode(cw).shape == w.shape and cw.nbytes <= ratio * w.size * 4


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)])
def test_matrix_svd_through_the_gram_matrix_matches_lapack(shape):
    """matrix_svd's eigen-decomposition of the shorter side's Gram matrix gives LAPACK's singular
    values and truncations, orthonormal factors, and exact zero directions on rank-deficient input."""
    r = _rng(3)
    M = r.standard_normal(shape) * np.exp(r.standard_normal(shape[1]))  # an uneven spectrum
    U, S, Vt = svd_m.matrix_svd(M)
    U0, S0, Vt0 = np.linalg.svd(M, full_matrices=False)
    np.testing.assert_allclose(S, S0, rtol=1e-10, atol=1e-12 * S0[0])
    k = min(shape)
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(k), atol=1e-10)
    for rank in (1, k // 3, k):
        np.testing.assert_allclose((U[:, :rank] * S[:rank]) @ Vt[:rank], (U0[:, :rank] * S0[:rank]) @ Vt0[:rank],
                                   atol=1e-10 * S0[0])
    low = r.standard_normal((shape[0], 3)) @ r.standard_normal((3, shape[1]))
    U, S, Vt = svd_m.matrix_svd(low)
    assert np.isfinite(U).all() and np.isfinite(Vt).all()
    np.testing.assert_allclose((U * S) @ Vt, low, atol=1e-12 * np.abs(low).max())
    U, S, Vt = svd_m.matrix_svd(np.zeros(shape))
    assert not S.any() and np.isfinite(U).all() and np.isfinite(Vt).all() and not ((U * S) @ Vt).any()


def test_svd_candidates_skip_factors_as_large_as_the_matrix():
    """No candidate rank stores as many numbers as the matrix (rank * (n + d) >= n * d)."""
    from riem_compiler.frontend.layers import LayerSpec

    w = (0.02 * _rng(4).standard_normal((64, 48))).astype(np.float32)
    got = []

    def attempt(layer, what, fit, *args, keep=True, **kwargs):
        result = fit(*args, **kwargs)
        if keep:
            got.append(result)
        return result

    svd_m.SVD().candidates(LayerSpec("w", "linear", w), 0.5, {"ratios": (1.0, 0.5, 0.25)}, attempt)
    ranks = {(cw.meta["factor_bits"], cw.meta["rank"]) for cw in got}
    assert ranks and all(rank * (64 + 48) < 64 * 48 for _, rank in ranks)
    # ratio 0.5: float16 rank 27 (just below 64 * 48 / (64 + 48) = 27.4) stays; int8 rank 50 goes
    assert (16, 27) in ranks and (8, 24) in ranks and (8, 50) not in ranks
