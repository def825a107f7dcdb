"""riemq: RieM + affine quantisation of the residual. Decode against a reference written here
(RieM's plain formula plus a per-group dequantisation), exact bytes, torch == onnxruntime for the
grouped, transposed and conv layouts, the share checks, determinism, and the error against rtn
at equal bytes."""
import numpy as np
import pytest
import torch
from safetensors.numpy import save

import riem_compiler as rc
from riem_compiler import bitpack, methods, riem
from riem_compiler.frontend.layers import LayerSpec
from riem_compiler.methods import affine as am
from riem_compiler.methods import riemq as hm
from riem_compiler.methods.rtn.layout import quantised_shape
from test_methods import onnx_decoded

METHOD = methods.get("riemq")


def heavy_tailed(rows=64, cols=256, seed=3):
    return (np.random.default_rng(seed).standard_t(3, size=(rows, cols)) * 0.02).astype(np.float32)


def settings(**kw):
    return METHOD.settings(rc.Config(steps=kw.pop("steps", 30), method_options={"riemq": kw}))


def reference_decode(cw) -> np.ndarray:
    """RieM's formula (riem.reconstruct_reference) on the dequantised states plus
    (codes - zero) * scale per group of the affine part, transposed back when grouped that way."""
    rows, cols = cw.matrix_shape
    rm = cw.meta["riem"]
    r_arrays = {k[5:]: v for k, v in cw.arrays.items() if k.startswith("riem_")}
    f = riem.load_stored(r_arrays, (rows, cols), rm["q"], rm["state_bits"])
    R = np.asarray(riem.reconstruct_reference(f.a, f.b, f.U, f.beta, f.v, f.c), np.float64).reshape(rows, cols)
    qm = cw.meta["q"]
    flip = bool(qm.get("transposed")) != (qm["axis"] == "out")
    qr, qc = quantised_shape(cw.shape, flip)
    g = qc if qm["group_size"] is None else qm["group_size"]
    codes = bitpack.unpack(cw.arrays["q_codes"], qm["bits"], qr * qc).reshape(qr, qc).astype(np.float64)
    Q = np.empty((qr, qc))
    for j in range(qc):
        s = cw.arrays["q_scale"].reshape(qr, -1)[:, j // g].astype(np.float64)
        z = cw.arrays["q_zero"].reshape(qr, -1)[:, j // g].astype(np.float64)
        Q[:, j] = (codes[:, j] - z) * s
    return R + (Q.T if flip else Q)


@pytest.mark.parametrize("order", hm.ORDERS)
def test_decode_matches_the_reference_and_bytes_are_exact(order):
    W = heavy_tailed(24, 40)
    spec = LayerSpec("w", "linear", W)
    fitted = METHOD.fit(spec, 0.3, settings(order=order))
    cw = fitted.weight
    np.testing.assert_allclose(methods.decode(cw), reference_decode(cw), rtol=1e-4, atol=1e-5)
    # bytes: what safetensors writes, RieM's formula plus affine's, within the ratio
    data = save({k: np.ascontiguousarray(v) for k, v in cw.arrays.items()})
    header = int.from_bytes(data[:8], "little")
    assert len(data) - 8 - header == cw.nbytes
    rm, qm = cw.meta["riem"], cw.meta["q"]
    expected = (riem.stored_nbytes(24, 40, rm["q"], rm["m"], rm["state_bits"], rm["metric_dtype"], rm["k_branches"])
                + am.affine_nbytes(W.shape, qm["bits"], qm["group_size"], False))
    assert cw.nbytes == expected <= 0.3 * W.size * 4
    assert fitted.report["riem_bytes"] + fitted.report["q_bytes"] == cw.nbytes
    assert fitted.rel_error == pytest.approx(float(np.linalg.norm(W - reference_decode(cw)) / np.linalg.norm(W)),
                                             rel=1e-4)


@pytest.mark.parametrize("weight, in_axis", [((40, 24), 0), ((16, 8, 3, 3), 1)])
def test_transposed_and_conv_layouts_decode_the_same_in_onnxruntime(weight, in_axis):
    W = (np.random.default_rng(1).standard_normal(weight) / 6).astype(np.float32)
    cw = METHOD.fit(LayerSpec("w", "linear" if len(weight) == 2 else "conv2d", W, in_axis=in_axis), 0.3,
                    settings()).weight
    assert bool(cw.meta["q"].get("transposed")) == (in_axis == 0)
    ref = methods.decode(cw)
    # RieM's readout sums 6 * m sigmoid terms with large weights v (sum |v| ~ 200 here): float32
    # summation order (reference vs torch vs onnxruntime) moves the result by up to
    # 6 * sum|v| * eps32 (~1e-4) of a weight of ~0.5
    v = cw.arrays["riem_v"].astype(np.float32)
    atol = max(3e-5, 6 * float(np.abs(v).sum()) * float(np.finfo(np.float32).eps))
    np.testing.assert_allclose(ref, reference_decode(cw).reshape(weight), rtol=1e-4, atol=atol)
    np.testing.assert_allclose(onnx_decoded(cw), ref, rtol=1e-5, atol=atol)  # includes read_compressed_onnx


def test_share_checks_come_before_any_fit():
    spec = LayerSpec("w", "linear", heavy_tailed(64, 256))
    # 1/32 of fp32 is 1 bit per weight: affine's cheapest rung alone needs more
    with pytest.raises(ValueError, match="too few bytes for affine's cheapest rung"):
        METHOD.fit(spec, 1 / 32, settings(riem_share=0.1))
    with pytest.raises(ValueError, match="affine does not fit"):
        METHOD.fit(spec, 1 / 16, settings(riem_share=0.5, order="quant_first"))
    with pytest.raises(rc.InputError):
        settings(riem_share=1.5)


def test_a_share_too_large_is_capped_to_affines_cheapest_rung():
    """1/24 of a 384x384 is 1.33 bits per weight: a 0.4 share would leave affine 0.8 bits, so
    affine takes its cheapest rung (1-bit, one group per row: 1.083 bits) and RieM the rest."""
    s = settings(riem_share=0.4)
    assert hm.cheapest_rung((384, 384), s.affine_settings(), False) == (1, None)
    assert am.affine_nbytes((384, 384), 1, None, False) == 384 * 384 // 8 + 384 * 4
    torch.set_num_threads(1)
    W = heavy_tailed(64, 256)
    cw = METHOD.fit(LayerSpec("w", "linear", W), 1 / 24, settings(riem_share=0.4)).weight
    assert cw.meta["q"]["bits"] == 1 and cw.nbytes <= W.size * 4 / 24


def test_deterministic():
    spec = LayerSpec("w", "linear", heavy_tailed(24, 40))
    a, b = (METHOD.fit(spec, 0.3, settings(seed=5)).weight for _ in range(2))
    assert a.meta == b.meta and a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])


def test_equal_bytes_beats_rtn_on_heavy_tailed_weights():
    """Measured (64x256 Student-t, 150 steps, ratio 1/8, riem_share 0.25): riemq 0.310 (riem q3 +
    affine2/g32), rtn3/g128 0.436. On such unstructured noise affine alone (0.181) wins, and the
    default share 0.5 (0.467, affine down to 1 bit) loses to rtn too: RieM has nothing smooth to
    capture, and above 2 bits per weight its bytes cost affine a bit width. rtn here is its first
    setting that fits (choose="ladder"); rtn's default, the lowest-error setting within the budget,
    reaches 0.235 and beats riemq on this noise."""
    torch.set_num_threads(1)
    W = heavy_tailed()
    spec = LayerSpec("w", "linear", W)
    ours = METHOD.fit(spec, 1 / 8, settings(steps=150, riem_share=0.25))
    ladder = rc.Config(method_options={"rtn": {"choose": "ladder"}})
    rtn = methods.get("rtn").fit(spec, 1 / 8, methods.get("rtn").settings(ladder))
    assert ours.weight.nbytes <= W.size * 4 / 8
    assert ours.rel_error < 0.8 * rtn.rel_error
