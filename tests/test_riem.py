"""RieM operator: formula, quantisation, storage and byte accounting."""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from riem_compiler import bitpack, riem
from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import decode


def random_factors(n_out=7, n_in=5, q=6, m=4, k=riem.K_BRANCHES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return riem.RieMFactors(torch.randn(n_out, q, generator=g), torch.randn(n_in, q, generator=g),
                            torch.randn(k, m, q, generator=g) * 0.5, torch.randn(k, m, generator=g),
                            torch.randn(m, generator=g), torch.randn((), generator=g))


def test_shifts_follow_floor_rule():
    assert riem.branch_shifts(12, 6) == [0, 2, 4, 6, 8, 10]
    assert riem.branch_shifts(5, 6) == [0, 0, 1, 2, 3, 4]
    b = torch.arange(4.0).reshape(1, 4)
    # cyclic left shift: coordinate d+s moves to d
    assert riem.shifted_states(b, 2)[1].tolist() == [[2.0, 3.0, 0.0, 1.0]]


@pytest.mark.parametrize("q,m,k", [(6, 4, 6), (5, 3, 6), (4, 2, 3)])
def test_vectorised_reconstruction_matches_per_element_formula(q, m, k):
    f = random_factors(q=q, m=m, k=k)
    fast = riem.reconstruct(f.a, f.b, f.U, f.beta, f.v, f.c).double().numpy()
    slow = riem.reconstruct_reference(f.a, f.b, f.U, f.beta, f.v, f.c)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    chunked = riem.reconstruct(f.a, f.b, f.U, f.beta, f.v, f.c, row_chunk=3).double().numpy()
    np.testing.assert_allclose(chunked, slow, rtol=1e-5, atol=1e-5)


def test_parameter_count():
    assert riem.parameter_count(128, 256, 10, 16, 6) == 384 * 10 + 6 * 16 * 11 + 16 + 1


@pytest.mark.parametrize("bits", [4, 6, 8, 16])
def test_pack_unpack_round_trip(bits, rng):
    codes = rng.integers(0, 1 << bits, size=101)
    packed = bitpack.pack(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == bitpack.packed_nbytes(101, bits)
    np.testing.assert_array_equal(bitpack.unpack(packed, bits, 101), codes)


@pytest.mark.parametrize("bits", [4, 6, 8, 16])
def test_state_quantisation_error_is_bounded_by_half_a_step(bits):
    x = torch.randn(50, 7)
    codes, scale, lo = riem.quantize_states(x, bits)
    err = (codes * scale + lo - x).abs()
    assert torch.all(err <= scale / 2 + 1e-6)
    assert codes.max() <= (1 << bits) - 1 and codes.min() >= 0


@pytest.mark.parametrize("bits", [32, 16, 8, 6, 4])
@pytest.mark.parametrize("metric_dtype", ["float16", "float32"])
def test_stored_bytes_equal_serialised_bytes(bits, metric_dtype, tmp_path):
    f = random_factors(n_out=33, n_in=21, q=9, m=5)
    arrays = riem.store(f, bits, metric_dtype)
    cw = CompressedWeight("riem", (33, 21), {"q": 9, "m": 5, "k_branches": 6, "state_bits": bits,
                                              "metric_dtype": metric_dtype}, arrays)
    expected = riem.stored_nbytes(33, 21, 9, 5, bits, metric_dtype)
    assert cw.nbytes == expected
    path = tmp_path / "w.safetensors"
    save_file(arrays, str(path))
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    data_bytes = len(raw) - 8 - header_len
    assert data_bytes == expected
    assert {k for k in header if k != "__metadata__"} == set(arrays)


@pytest.mark.parametrize("bits", [32, 16, 8, 6, 4])
def test_store_then_decode_matches_dequantised_factors(bits):
    f = random_factors(n_out=12, n_in=10, q=8, m=4)
    arrays = riem.store(f, bits, "float32")
    cw = CompressedWeight("riem", (12, 10), {"q": 8, "m": 4, "k_branches": 6, "state_bits": bits,
                                              "metric_dtype": "float32"}, arrays)
    a = riem.fake_quantize_states(f.a, bits)
    b = riem.fake_quantize_states(f.b, bits)
    expected = riem.reconstruct(a, b, f.U, f.beta, f.v, f.c).numpy()
    np.testing.assert_allclose(decode(cw), expected, rtol=1e-5, atol=1e-5)
    back = riem.load_stored(arrays, (12, 10), 8, bits)
    np.testing.assert_allclose(back.a.numpy(), a.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ratio,bits", [(0.25, 8), (0.125, 4), (0.5, 32), (0.0625, 8)])
def test_choose_size_meets_the_ratio_and_is_maximal(ratio, bits):
    q, m = riem.choose_size(384, 1536, ratio, bits, "float16", 16)
    budget = ratio * 384 * 1536 * 4
    assert riem.stored_nbytes(384, 1536, q, m, bits, "float16") <= budget
    assert riem.stored_nbytes(384, 1536, q + 1, m, bits, "float16") > budget


def test_choose_size_returns_none_when_nothing_fits():
    assert riem.choose_size(2, 2, 0.01, 8, "float16", 16) is None


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (64, 200), (10, 128)])
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.125, 0.03])
def test_balanced_sizing_has_no_dead_state_dimensions(shape, ratio):
    """"balanced" never leaves q above K*m while the metric net can still grow, stays within the
    budget, and only ever widens m from the default; "max_q" is the old rule."""
    from riem_compiler import riem as R

    old = R.choose_size(*shape, ratio, 8, "float16", 16)
    new = R.choose_size(*shape, ratio, 8, "float16", 16, sizing="balanced")
    if old is None:
        assert new is None
        return
    q, m = new
    assert R.stored_nbytes(*shape, q, m, 8, "float16") <= ratio * shape[0] * shape[1] * 4
    assert m >= old[1] and q <= old[0]
    assert q <= R.K_BRANCHES * m or m == R.MAX_M or R.choose_size(*shape, ratio, 8, "float16", m + 1)[1] != m + 1
    if old[0] <= R.K_BRANCHES * old[1]:
        assert new == old


def test_sizing_setting_reaches_the_fit():
    import riem_compiler as rc
    from riem_compiler.errors import InputError

    with pytest.raises(InputError, match="sizing"):
        rc.methods.get("riem").settings(rc.Config(method_options={"riem": {"sizing": "biggest"}}))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(96, 96))
    res = rc.optimize(net, example_inputs=(torch.randn(2, 96),), method="riem", ratio=0.3, steps=5,
                      min_weight_size=0, quiet=True, method_options={"riem": {"sizing": "balanced"}})
    (record,) = res.report.compressed
    q, m = record.settings["q"], record.settings["m"]
    assert (q, m) == rc.riem.choose_size(96, 96, 0.3, 8, "float16", 16, sizing="balanced")
    assert q <= 6 * m
