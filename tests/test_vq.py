"""vq: codebook quantisation against a direct reference, its byte formula, its ONNX decoders on
grouped/padded/transposed layouts, the ratio ladder, and its error against rtn at equal bytes."""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

import riem_compiler as rc
from riem_compiler import methods
from riem_compiler.frontend.layers import LayerSpec
from riem_compiler.methods import rtn as rtn_m
from riem_compiler.methods import vq as vq_m
from test_methods import onnx_decoded

VQ = methods.get("vq")


def _heavy(shape, seed=0):
    """Student-t (3 degrees of freedom) weights with uneven row scales: heavy tails like trained layers."""
    g = np.random.default_rng(seed)
    w = g.standard_t(3, size=shape) * np.exp(0.3 * g.standard_normal((shape[0],) + (1,) * (len(shape) - 1)))
    return (w / 20).astype(np.float32)


def _reference_decode(cw) -> np.ndarray:
    """Written from the documented layout alone: bit j of code i is stream bit i*bits + j."""
    m = cw.meta
    n, d = (cw.shape[1], cw.shape[0]) if m.get("transposed") else (cw.shape[0], int(np.prod(cw.shape[1:])))
    v = -(-d // m["dim"])
    stream = np.unpackbits(cw.arrays["codes"], bitorder="little")
    codes = [sum(int(stream[i * m["bits"] + j]) << j for j in range(m["bits"])) for i in range(n * v)]
    book = cw.arrays["codebook"].astype(np.float64)
    out = np.zeros((n, d))
    for r in range(n):
        row = np.concatenate([book[codes[r * v + k]] for k in range(v)])[:d]
        out[r] = row * float(cw.arrays["scale"][r]) * float(cw.arrays["gain"][0])
    return out.T if m.get("transposed") else out.reshape(cw.shape)


def _serialised_bytes(cw, tmp_path) -> int:
    path = tmp_path / "w.safetensors"
    save_file({k: np.ascontiguousarray(a) for k, a in cw.arrays.items()}, str(path))
    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


@pytest.mark.parametrize("shape,dim,bits,in_axis", [((12, 10), 3, 5, 1), ((10, 12), 4, 3, 0),
                                                    ((6, 2, 3, 3), 4, 6, 1), ((8, 16), 2, 8, 1)])
def test_decode_codes_scales_and_bytes_match_a_direct_reference(shape, dim, bits, in_axis, tmp_path):
    w = _heavy(shape)
    cw = vq_m.fit_vq(w, dim, bits, in_axis=in_axis, iterations=4)
    decoded = methods.decode(cw)
    np.testing.assert_allclose(decoded, _reference_decode(cw), rtol=1e-6, atol=1e-7)
    # every vector holds its nearest codebook entry, and each row its least-squares scale
    M = w.reshape(shape[0], -1).astype(np.float64)
    M = M.T if in_axis == 0 else M
    n, d = M.shape
    v = -(-d // dim)
    rms = np.sqrt((M ** 2).mean(axis=1))
    padded = np.zeros((n, v * dim))
    padded[:, :d] = M / rms[:, None]
    book = cw.arrays["codebook"].astype(np.float64)
    dist = ((padded.reshape(-1, 1, dim) - book[None]) ** 2).sum(axis=2)
    codes = vq_m.bitpack.unpack(cw.arrays["codes"], bits, n * v)
    np.testing.assert_allclose(dist[np.arange(n * v), codes], dist.min(axis=1), rtol=1e-4, atol=1e-5)
    Q = book[codes].reshape(n, v * dim)[:, :d]
    ls = (M * Q).sum(axis=1) / (Q * Q).sum(axis=1)
    stored = cw.arrays["scale"].astype(np.float64) * float(cw.arrays["gain"][0])
    np.testing.assert_allclose(stored, ls, rtol=2e-3)
    # bytes: the formula, and exactly what safetensors writes
    formula = -(-n * v * bits // 8) + 2 * 2 ** bits * dim + 2 * n + 4
    assert cw.nbytes == formula == vq_m.vq_nbytes(shape, dim, bits, in_axis == 0) == _serialised_bytes(cw, tmp_path)


@pytest.mark.parametrize("shape,dim,bits,in_axis", [((10, 12), 4, 3, 0), ((6, 2, 3, 3), 4, 6, 1),
                                                    ((12, 10), 3, 9, 1), ((9, 7), 2, 12, 0)])
def test_onnx_decoder_matches_torch_and_round_trips(shape, dim, bits, in_axis):
    cw = vq_m.fit_vq(_heavy(shape, 1), dim, bits, in_axis=in_axis, iterations=3)
    assert VQ.onnx_call(cw).op_type == ("VQWeightT" if in_axis == 0 else "VQWeight")
    np.testing.assert_allclose(onnx_decoded(cw), methods.decode(cw), rtol=1e-5, atol=1e-7)


def test_codebook_with_room_for_every_vector_is_exact_up_to_float16():
    w = np.repeat(_heavy((4, 6)), 3, axis=0)  # 12 rows, 4 distinct: few distinct vectors
    cw = vq_m.fit_vq(w, 3, 5, iterations=5)
    assert rc.metrics.relative_error(w, methods.decode(cw)) < 2e-3


def test_deterministic_and_seeded():
    w = _heavy((40, 64))
    a, b = vq_m.fit_vq(w, 4, 6, seed=3), vq_m.fit_vq(w, 4, 6, seed=3)
    for key in a.arrays:
        assert a.arrays[key].tobytes() == b.arrays[key].tobytes()
    c = vq_m.fit_vq(w, 4, 6, seed=4)
    assert c.arrays["codebook"].tobytes() != a.arrays["codebook"].tobytes()


@pytest.mark.parametrize("dim", [1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 64, 128, 129, 200])
def test_seeding_distances_equal_numpys_row_sums_bit_for_bit(dim):
    # k-means++ draws its centres from these sums: any rounding difference would change the seeds
    rng = np.random.default_rng(dim)
    X = rng.standard_normal((1000, dim)).astype(np.float32)
    c = rng.standard_normal(dim).astype(np.float32)
    fast = vq_m.squared_distances(np.ascontiguousarray(X.T), c)
    assert fast.dtype == np.float32
    assert fast.tobytes() == ((X - c) ** 2).sum(axis=1).tobytes()


def test_fit_takes_the_best_rung_that_fits_and_refuses_tiny_layers():
    spec = LayerSpec("w", "linear", _heavy((128, 96)))
    settings = VQ.Settings()
    for ratio in (1 / 6, 1 / 10, 1 / 16):
        fitted = VQ.fit(spec, ratio, settings)
        cw = fitted.weight
        assert cw.nbytes <= ratio * spec.fp32_bytes
        rungs = vq_m.vq_rungs(spec.shape, ratio, settings)
        assert (cw.meta["dim"], cw.meta["bits"]) in rungs[:vq_m.FIT_TRIES]
        assert round(fitted.rel_error, 6) == min(fitted.report["tried"].values())
    fixed = VQ.fit(spec, 1 / 6, VQ.Settings(dim=4)).weight  # bits follow the ratio
    assert fixed.meta["dim"] == 4 and vq_m.vq_nbytes(spec.shape, 4, fixed.meta["bits"] + 1) > spec.fp32_bytes / 6
    with pytest.raises(ValueError, match="too small for vq"):
        VQ.fit(LayerSpec("w", "linear", _heavy((8, 8))), 0.25, settings)  # the codebook alone breaks it


def test_settings_from_cli_strings_and_bad_values():
    from riem_compiler.cli.arguments import _config_from_args, build_parser

    s = VQ.settings(rc.Config(method_options={"vq": {"dim": "4", "bits": "none"}}))
    assert s.dim == 4 and s.bits is None
    args = build_parser().parse_args(["m.onnx", "-o", "o", "--method", "vq", "--vq-dim", "3", "--vq-bits", "9",
                                      "--vq-iterations", "5"])
    s = VQ.settings(_config_from_args(args))
    assert (s.dim, s.bits, s.iterations) == (3, 9, 5)
    for bad in ({"dim": 0}, {"bits": 13}, {"dim": "x"}, {"iterations": -1}, {"sample": 0}):
        with pytest.raises(ValueError):
            VQ.Settings(**bad)


def test_degenerate_weights_decode_finite_and_scale_free():
    for w in (np.zeros((16, 12)), np.full((16, 12), 0.3), np.outer(np.arange(16.0), np.ones(12))):
        out = methods.decode(vq_m.fit_vq(w.astype(np.float32), 2, 4))
        assert np.isfinite(out).all()
        if w.any():  # constant rows: one codebook entry and the row scales hold them
            assert rc.metrics.relative_error(w, out) < 1e-3
        else:
            assert not out.any()
    base = _heavy((16, 12))
    reference = rc.metrics.relative_error(base, methods.decode(vq_m.fit_vq(base, 2, 4)))
    for factor in (1e-30, 1e30):  # the float32 gain keeps float16 scales in range
        w = (factor * base.astype(np.float64)).astype(np.float32)
        out = methods.decode(vq_m.fit_vq(w, 2, 4))
        assert np.isfinite(out).all()
        assert rc.metrics.relative_error(w, out) == pytest.approx(reference, rel=0.05)


def test_beats_rtn_at_equal_bytes_on_heavy_tailed_weights():
    """vq gets at most rtn's bytes. Measured on this 256x256 Student-t matrix: rtn3/g128 0.446
    (25600 B) vs vq 0.203 (vq8/d3, 24068 B); rtn2/g128 0.755 (17408 B) vs vq 0.359 (vq8/d5, 16388 B)."""
    spec = LayerSpec("w", "linear", _heavy((256, 256), 7))
    rtn = methods.get("rtn")
    for bits in (3, 2):
        theirs = rtn_m.fit_rtn(spec.weight, bits, 128)
        ours = VQ.fit(spec, theirs.nbytes / spec.fp32_bytes, VQ.Settings())
        theirs_error = rc.metrics.relative_error(spec.weight, methods.decode(theirs))
        print(bits, ours.rel_error, ours.weight.nbytes, VQ.label(ours.weight), theirs_error, theirs.nbytes)
        assert ours.weight.nbytes <= theirs.nbytes
        assert ours.rel_error < 0.6 * theirs_error
    # where rtn has no rung at all, vq still fits
    with pytest.raises(ValueError):
        rtn.fit(spec, 1 / 20, rtn.Settings())
    assert VQ.fit(spec, 1 / 20, VQ.Settings()).rel_error < 0.8


def test_optimize_with_vq_exports_onnx_and_reloads(tmp_path):
    import onnxruntime as ort
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(4, 48)
    res = rc.optimize(model, (x,), method="vq", ratio=0.3, min_weight_size=0, quiet=True,
                      method_options={"vq": {"iterations": 4}})
    assert {r.status for r in res.report.layers} == {"compressed"}
    for rec in res.report.layers:
        assert rec.bytes_after <= 0.3 * rec.bytes_before and "tried" in rec.settings
    with torch.no_grad():
        y = res.model(x).numpy()
    path = res.export_onnx(tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], y, rtol=1e-4, atol=1e-5)
    fresh = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    loaded = rc.load(res.save(tmp_path / "art"), model=fresh)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), y, rtol=1e-5, atol=1e-6)
    pytest.importorskip("tvm")
    # compact: the kernel decodes the stored arrays; float32 activations, so exact (int8: test_tvm_int8.py)
    built = rc.load(res.build_tvm(tmp_path / "tvm", int8_activations=False))
    np.testing.assert_allclose(np.asarray(built(x)), y, rtol=1e-5, atol=1e-5)
    manifest = json.loads((tmp_path / "tvm" / "manifest.json").read_text())
    assert {layer["storage"] for layer in manifest["layers"]} == {"compact"}


@pytest.mark.parametrize("shape,dim,bits", [((12, 10), 3, 5), ((6, 2, 3, 3), 4, 10), ((9, 7), 2, 12), ((8, 16), 2, 8)])
def test_tvm_kernel_matches_torch(shape, dim, bits):
    tvm = pytest.importorskip("tvm")
    from riem_compiler.codegen.tvm_build import TvmBuildOptions, make_target
    from riem_compiler.methods.vq import tvm as kernel

    cw = vq_m.fit_vq(_heavy(shape, 2), dim, bits, iterations=3)
    func = kernel.schedule_decode_cpu(kernel.decode_primfunc(cw, "decode_w"))
    lib = tvm.compile(func, target=make_target(TvmBuildOptions()))
    out = tvm.runtime.tensor(np.zeros(cw.shape, np.float32))
    lib["decode_w"](*[tvm.runtime.tensor(np.ascontiguousarray(cw.arrays[n])) for n in kernel.array_names(cw)], out)
    np.testing.assert_allclose(out.numpy(), methods.decode(cw), rtol=1e-6, atol=1e-7)
    transposed = vq_m.fit_vq(_heavy((9, 7), 2), 2, 4, in_axis=0, iterations=2)
    with pytest.raises(ValueError, match="transposed"):
        kernel.decode_primfunc(transposed, "d")


@pytest.mark.parametrize("in_axis", [1, 0])
def test_a_fit_in_chunks_of_rows_is_the_fit_in_one(monkeypatch, in_axis):
    """fit_vq normalises and codes the rows a chunk at a time (ROW_CHUNK_VALUES): the same arrays bit
    for bit as in one chunk, padded or not, whole or on screening rows."""
    from riem_compiler.methods import vq as vq_m

    r = np.random.default_rng(4)
    w = (r.standard_normal((90, 70)) * np.exp(r.standard_normal((90, 1)))).astype(np.float32)
    w = np.ascontiguousarray(w.T) if in_axis == 0 else w
    for dim, bits, rows in ((2, 8, None), (3, 9, None), (5, 6, np.arange(0, 90, 7)), (4, 10, np.arange(3, 90, 5))):
        fits = []
        for values in (1 << 24, 300):
            monkeypatch.setattr(vq_m, "ROW_CHUNK_VALUES", values)
            fits.append(vq_m.fit_vq(w, dim, bits, in_axis, 4, 0, 2048, rows))
        one, chunked = fits
        assert one.shape == chunked.shape and one.meta == chunked.meta
        for key in one.arrays:
            np.testing.assert_array_equal(one.arrays[key], chunked.arrays[key])


def test_a_fit_holds_little_besides_its_codes(monkeypatch):
    """Whole, the float64 matrix, its decoded copy, their products and the padded vectors took ~10x a
    weight's fp32 bytes per fit (two fits side by side: most of auto's peak on a 7B block); then the
    normalised float32 rows and the int64 permutation of every vector took 2x. Now: the codes (uint16 a
    vector), the int32 permutation while it is drawn, and chunks (small ones here, so that the bound is the
    weight's: the default chunks hold a few tens of MB at most), also for fits that share a Normalised."""
    import tracemalloc

    from riem_compiler.methods import vq as vq_m

    from riem_compiler import bitpack

    monkeypatch.setattr(vq_m, "ROW_CHUNK_VALUES", 1 << 16)
    monkeypatch.setattr(bitpack, "PACK_CHUNK", 1 << 16)  # packing's bit matrix: 5 bytes per bit of a chunk
    w = (np.random.default_rng(5).standard_normal((1024, 5632)) * 0.02).astype(np.float32)
    for dim, bits in ((2, 8), (5, 9)):
        tracemalloc.start()
        vq_m.fit_vq(w, dim, bits, 1, 2, 0, 8192)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= 0.6 * w.nbytes, (dim, bits, peak / w.nbytes)
    shared = vq_m.Normalised(w)
    tracemalloc.start()
    for dim, bits, rows in ((2, 8, None), (2, 7, np.arange(0, 1024, 8)), (4, 8, None)):
        vq_m.fit_vq(w, dim, bits, 1, 2, 0, 8192, rows, shared)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= 0.6 * w.nbytes, peak / w.nbytes


def test_the_shared_permutation_is_numpys():
    """Normalised.order shuffles a 4-byte arange with the generator's draws: the values of
    np.random.default_rng(seed).permutation(count), a prefix kept."""
    from riem_compiler.methods import vq as vq_m

    nrm = vq_m.Normalised(np.zeros((4, 4), np.float32))
    for seed, count, first in ((0, 10, 10), (3, 100_003, 5000), (7, 2_000_000, 65536)):
        got = nrm.order(seed, count, first)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.random.default_rng(seed).permutation(count)[:first])


@pytest.mark.parametrize("in_axis", [1, 0])
def test_an_eager_decode_in_chunks_is_the_traced_decode(monkeypatch, in_axis):
    """Scoring and the rewritten model decode eagerly, a chunk of rows at a time into one output (whole,
    the int64 codes, gathered vectors and scaled rows held 3-4x the weight): bit for bit the traced
    form, with codes that straddle bytes, padded vectors and both axes."""
    import torch

    from riem_compiler import bitpack
    from riem_compiler.methods import vq as vq_m

    monkeypatch.setattr(vq_m, "ROW_CHUNK_VALUES", 100)
    w = np.random.default_rng(9).standard_normal((45, 70)).astype(np.float32)
    w = np.ascontiguousarray(w.T) if in_axis == 0 else w
    for dim, bits in ((2, 8), (3, 9), (5, 7), (4, 10)):
        cw = vq_m.fit_vq(w, dim, bits, in_axis, 2, 0, 1024)
        t = {k: torch.from_numpy(np.asarray(a)) for k, a in cw.arrays.items()}
        traced = vq_m.decode_vq(cw, t)
        with bitpack.eager_numpy():
            eager = vq_m.decode_vq(cw, t)
        assert eager.is_contiguous() and torch.equal(traced, eager)
