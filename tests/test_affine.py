"""affine: HQQ-style optimised asymmetric quantisation. Numerics against a per-group reference
written here, exact byte accounting, layouts (grouped, per-row, transposed, output-axis, conv)
through torch and onnxruntime, the ratio ladder, and the error gain over rtn at equal bytes."""
import numpy as np
import pytest
import torch
from safetensors.numpy import save

import riem_compiler as rc
from riem_compiler import bitpack, methods
from riem_compiler.errors import InputError
from riem_compiler.frontend.layers import LayerSpec
from riem_compiler.methods import affine as am
from riem_compiler.methods.rtn import fit_rtn
from test_methods import onnx_decoded

F16 = np.float16


def reference_group(x, bits, iterations, p):
    """One group, written out plainly: min-max start, then per iteration the lp shrinkage of the
    error in code units, a least-squares line target ~ s q - s z, float16 rounding, and the best
    iterate by squared error."""
    x = np.asarray(x, np.float64)
    qmax = 2 ** bits - 1
    lo, hi = x.min(), x.max()
    s = (hi - lo) / qmax if hi > lo else abs(hi)
    s = float(F16(max(s, am.F16_TINY)))
    z = float(F16(-lo / s))

    def quantise(s, z):
        q = np.clip(np.rint(x / s + z), 0, qmax)
        return q, float(np.sum((x - (q - z) * s) ** 2))

    q, err = quantise(s, z)
    best = (err, s, z, q)
    beta = am.BETA0
    for _ in range(iterations):
        e = x / s + z - q
        a = np.abs(e)
        with np.errstate(divide="ignore"):
            outlier = np.sign(e) * np.maximum(a - a ** (p - 1) / beta, 0)
        t = x - outlier * s
        dq = q - q.mean()
        if np.sum(dq * dq) > 0 and np.sum(dq * t) > 0:
            s = np.sum(dq * t) / np.sum(dq * dq)
        z = q.mean() - t.mean() / s
        beta *= am.penalty_growth(iterations)
        s, z = float(F16(max(s, am.F16_TINY))), float(F16(z))
        q, err = quantise(s, z)
        if err < best[0]:
            best = (err, s, z, q)
    return best


def reference_decode(W, bits, group, iterations=30, p=0.7):
    """The grouped (rows, cols) matrix decoded group by group with reference_group."""
    out = np.zeros(W.shape)
    for i in range(W.shape[0]):
        for start in range(0, W.shape[1], group):
            _, s, z, q = reference_group(W[i, start:start + group], bits, iterations, p)
            out[i, start:start + group] = (q - z) * s
    return out


def assert_matches_reference(decoded, ref, W):
    """The solver runs in float32 and the reference in float64: a float16 scale or zero may round
    the other way in a rare group. At least 97% of the weights decode as the reference's, and the
    squared error is within 0.5% of the reference's."""
    decoded, ref, W = (np.asarray(a, np.float64).reshape(np.shape(ref)) for a in (decoded, ref, W))
    same = np.isclose(decoded, ref, rtol=1e-6, atol=1e-7)
    assert same.mean() >= 0.97
    assert np.sum((decoded - W) ** 2) <= 1.005 * np.sum((ref - W) ** 2)


def heavy_tailed(rows=64, cols=256, seed=3):
    return (np.random.default_rng(seed).standard_t(3, size=(rows, cols)) * 0.02).astype(np.float32)


@pytest.mark.parametrize("bits,group,iterations", [(2, 8, 30), (3, 8, 0), (1, 5, 12), (4, 20, 30)])
def test_matches_the_per_group_reference(bits, group, iterations):
    W = heavy_tailed(6, 20, seed=bits)
    cw = am.fit_affine(W, bits, group, iterations=iterations)
    ref = reference_decode(W, bits, group, iterations)
    assert_matches_reference(methods.decode(cw), ref, W)
    # the stored codes are the reference's and unsigned < 2**bits
    codes = bitpack.unpack(cw.arrays["codes"], bits, W.size)
    assert codes.min() >= 0 and codes.max() < 2 ** bits


def test_solver_never_worse_than_min_max_per_group():
    W = heavy_tailed()
    for bits in (1, 2, 3, 4):
        opt = methods.decode(am.fit_affine(W, bits, 32))
        mm = methods.decode(am.fit_affine(W, bits, 32, iterations=0))
        per_group = lambda D: ((W - D) ** 2).reshape(64, -1, 32).sum(axis=2)  # noqa: E731
        assert (per_group(opt) <= per_group(mm) + 1e-12).all()


LAYOUTS = [  # (shape, in_axis, bits, group, axis)
    ((24, 40), 1, 2, 16, "in"),        # last group shorter
    ((24, 40), 1, 3, None, "in"),      # per row, 3-bit codes across byte boundaries
    ((40, 24), 0, 4, 16, "in"),        # (in, out) MatMul weight: transposed
    ((24, 40), 1, 2, 16, "out"),       # groups of outputs
    ((40, 24), 0, 1, 8, "out"),        # transposed and output axis: groups run down the stored matrix
    ((16, 8, 3, 3), 1, 4, 32, "in"),   # conv
    ((16, 8, 3, 3), 1, 8, 8, "out"),   # conv, groups of output channels
]


@pytest.mark.parametrize("shape,in_axis,bits,group,axis", LAYOUTS)
def test_layouts_decode_the_same_in_torch_onnxruntime_and_tvm(shape, in_axis, bits, group, axis):
    W = (np.random.default_rng(1).standard_normal(shape) / 5).astype(np.float32)
    cw = am.fit_affine(W, bits, group, in_axis=in_axis, axis=axis)
    ref = methods.decode(cw)
    assert ref.shape == shape
    np.testing.assert_allclose(onnx_decoded(cw), ref, rtol=1e-6, atol=1e-7)  # also reads it back
    # bytes: the formula == what safetensors serialises == cw.nbytes
    flip = am.flipped(in_axis == 0, axis)
    raw = save({k: np.ascontiguousarray(v) for k, v in cw.arrays.items()})
    header = int.from_bytes(raw[:8], "little")
    assert len(raw) - 8 - header == cw.nbytes == am.affine_nbytes(shape, bits, group, flip)
    rows, cols = (shape[0], int(np.prod(shape[1:])))
    if flip:
        rows, cols = cols, rows
    groups = -(-cols // (cols if group is None else group))
    assert cw.nbytes == -(-rows * cols * bits // 8) + 4 * rows * groups
    assert cw.arrays["scale"].dtype == np.float16 and cw.arrays["zero"].dtype == np.float16
    # TVM's decode kernel reads the same arrays the same way
    tvm = pytest.importorskip("tvm")
    from riem_compiler.codegen.tvm_build import TvmBuildOptions, make_target

    kernel = methods.get("affine").tvm_kernel()
    func = kernel.schedule_decode_cpu(kernel.decode_primfunc(cw, "decode_w"))
    lib = tvm.compile(func, target=make_target(TvmBuildOptions()))
    out = tvm.runtime.tensor(np.zeros(shape, np.float32))
    lib["decode_w"](*[tvm.runtime.tensor(np.ascontiguousarray(cw.arrays[n])) for n in kernel.array_names(cw)], out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-7)
    # the grouped matrix's groups are the reference's groups
    M = W.reshape(shape[0], -1)
    G = M.T if flip else M
    dec = reference_decode(G, bits, cols if group is None else group)
    assert_matches_reference(ref.reshape(shape[0], -1), dec.T if flip else dec, M)


def test_equal_bytes_beats_rtn_on_heavy_tailed_weights():
    """affine b/g128 (float16 scale + zero) and rtn b/g64 (float16 scale) store the same bytes.
    Measured relative errors (t3 weights 64x256): affine 0.154 / 0.285 / 0.472 vs rtn 0.179 /
    0.360 / 0.670 at 4 / 3 / 2 bits; min-max affine 0.171 / 0.363 / 0.845."""
    W = heavy_tailed()
    for bits, margin in ((4, 0.92), (3, 0.85), (2, 0.8)):
        a, r = am.fit_affine(W, bits, 128), fit_rtn(W, bits, 64)
        mm = am.fit_affine(W, bits, 128, iterations=0)
        assert a.nbytes == r.nbytes == mm.nbytes
        ea, er, em = (methods.relative_error(W, c) for c in (a, r, mm))
        assert ea < margin * er and ea < margin * em, (bits, ea, er, em)


def test_fit_picks_the_most_accurate_setting_within_the_ratio():
    W = heavy_tailed()
    spec = LayerSpec("w", "linear", W)
    method = methods.get("affine")
    settings = am.AffineSettings()
    for ratio in (1 / 8, 1 / 10, 1 / 16, 1 / 24):
        fitted = method.fit(spec, ratio, settings)
        assert fitted.weight.nbytes <= ratio * spec.fp32_bytes
        assert fitted.rel_error == pytest.approx(methods.relative_error(W, fitted.weight))
        m = fitted.weight.meta
        assert fitted.report["bits"] == m["bits"] and "group_size" in fitted.report
        # no other rung that fits is more accurate
        for bits, group in am.ladder(settings, W.shape[1]):
            if am.affine_nbytes(W.shape, bits, group) <= ratio * spec.fp32_bytes:
                other = methods.relative_error(W, am.fit_affine(W, bits, group))
                assert fitted.rel_error <= other + 1e-9, (ratio, bits, group, other, fitted.report)
    # fixed settings are honoured; too small a ratio is a ValueError with a reason
    fitted = method.fit(spec, 0.2, am.AffineSettings(bits=2, group_size=64, axis="out"))
    assert fitted.weight.meta == {"bits": 2, "group_size": 64, "axis": "out", "scale_dtype": "float16"}
    with pytest.raises(ValueError, match="too small"):  # 1 bit per weight: not even 1-bit codes per row fit
        method.fit(spec, 1 / 32, settings)


def test_deterministic_and_degenerate_weights():
    W = heavy_tailed()
    a, b = am.fit_affine(W, 2, 32), am.fit_affine(W.copy(), 2, 32)
    for k in a.arrays:
        assert a.arrays[k].tobytes() == b.arrays[k].tobytes()
    for w in (np.zeros((8, 40)), np.full((8, 40), -0.3), 1e-30 * W[:8, :40], np.outer(W[:8, 0], W[0, :40])):
        w = w.astype(np.float32)
        for bits in (1, 2, 4):
            dec = methods.decode(am.fit_affine(w, bits, 16))
            assert np.isfinite(dec).all()
            if not w.any() or np.ptp(w) == 0:
                np.testing.assert_allclose(dec, w, rtol=1e-3)  # zeros and constants are exact (float16)
    with pytest.raises(ValueError, match="float16"):
        am.fit_affine(1e30 * W, 4, 32)


def test_settings_validate_and_come_from_the_cli_as_text():
    s = methods.get("affine").settings(rc.Config(method_options={"affine": {"bits": "3", "group_size": "none"}}))
    assert s.bits == 3 and s.group_size is None
    for bad in ({"bits": 5}, {"axis": "rows"}, {"lp_norm": 1.5}, {"iterations": -1}, {"group_size": 0}):
        with pytest.raises(InputError):
            am.AffineSettings(**bad)


def test_optimize_with_affine_on_a_small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16)).eval()
    x = torch.randn(3, 64)
    res = rc.optimize(model, (x,), method="affine", ratio=0.125, min_weight_size=0, quiet=True)
    for rec in res.report.layers:
        assert rec.status == "compressed" and rec.bytes_after <= 0.125 * rec.bytes_before
    with torch.no_grad():
        assert torch.isfinite(res.model(x)).all()


@pytest.mark.parametrize("case,bits,group,n_in", [("matmul_right", 4, 32, 256), ("gemm_transB0", 2, 64, 256),
                                                  ("gemm_transB1", 4, None, 128), ("matmul_right", 2, 32, 80)])
def test_ort_form_is_matmulnbits_with_float_zero_points(case, bits, group, n_in):
    """onnx_format "ort": MatMulNBits with the float16 scale and zero Cast to float32 as zero
    points gives the function form's outputs; the arrays read back bit for bit; materialising
    restores the original graph. (n_in 80: the last block is padded.)"""
    import onnx
    from test_onnx_export import run
    from test_onnx_frontend import ALL, gemm_model, matmul_right_model

    from riem_compiler.codegen.onnx_export import materialize_onnx, read_compressed_onnx, rewrite_onnx
    from riem_compiler.codegen.onnx_rewrite import onnx_forms
    from riem_compiler.frontend.onnx_frontend import find_onnx_layers

    if case == "matmul_right":
        model, feeds = matmul_right_model(n_in=n_in, n_out=48)
    else:
        model, feeds = gemm_model(trans_b=int(case.endswith("1")), n_in=n_in, n_out=48)
    specs, _ = find_onnx_layers(model, ALL)
    comp = {s.name: am.fit_affine(s.weight, bits, group, in_axis=s.in_axis) for s in specs}
    ort_model = rewrite_onnx(model, specs, comp, "ort")
    onnx.checker.check_model(ort_model, full_check=True)
    ops = [n.op_type for n in ort_model.graph.node]
    assert ops.count("MatMulNBits") == 1 and onnx_forms(ort_model)["W"]["onnx_form"] == "ort", ops
    mm = next(n for n in ort_model.graph.node if n.op_type == "MatMulNBits")
    assert mm.input[3] and ops.count("Cast") == 2  # zero points given, scale and zero cast to float32
    back = read_compressed_onnx(ort_model)["W"]
    for k, a in comp["W"].arrays.items():
        assert back.arrays[k].dtype == a.dtype and back.arrays[k].tobytes() == a.tobytes()
    ref = run(rewrite_onnx(model, specs, comp), feeds)[0]
    np.testing.assert_allclose(run(ort_model, feeds)[0], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    plain = materialize_onnx(ort_model)
    assert [n.op_type for n in plain.graph.node] == [n.op_type for n in model.graph.node]
    np.testing.assert_allclose(run(plain, feeds)[0], ref, rtol=1e-5, atol=1e-5)


def test_ort_form_falls_back_with_a_reason():
    from test_onnx_frontend import ALL, matmul_right_model

    from riem_compiler.codegen.onnx_export import rewrite_onnx
    from riem_compiler.codegen.onnx_rewrite import onnx_forms
    from riem_compiler.frontend.onnx_frontend import find_onnx_layers

    model, _ = matmul_right_model(n_in=64, n_out=32)
    specs, _ = find_onnx_layers(model, ALL)
    for kwargs, why in (({"bits": 3, "group_size": 32}, "3-bit"), ({"bits": 8, "group_size": 32}, "8-bit"),
                        ({"bits": 4, "group_size": 32, "axis": "out"}, "output axis"),
                        ({"bits": 4, "group_size": 24}, "power of two")):
        comp = {s.name: am.fit_affine(s.weight, in_axis=s.in_axis, **kwargs) for s in specs}
        form = onnx_forms(rewrite_onnx(model, specs, comp, "ort"))["W"]
        assert form["onnx_form"] == "functions" and why in form["onnx_note"], (kwargs, form)


def test_penalty_schedule_ends_where_thirty_iterations_end():
    assert am.penalty_growth(30) == am.KAPPA  # the default schedule is bit-identical to before
    for n in (1, 10, 15):
        assert am.BETA0 * am.penalty_growth(n) ** n == pytest.approx(am.BETA_END, rel=1e-12)


def test_auto_candidates_run_the_auto_iterations():
    from riem_compiler.config import Config
    from riem_compiler.frontend.torch_frontend import find_torch_layers
    from riem_compiler.passes.auto import CandidateGrid

    W = heavy_tailed(48, 256)
    lin = torch.nn.Linear(256, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W))
    spec = find_torch_layers(torch.nn.Sequential(lin), Config(min_weight_size=0)).layers[0]
    got = [cw for cw in CandidateGrid()(spec, 0.125) if cw.method == "affine" and cw.meta["bits"] == 2
           and cw.meta["group_size"] == 64]
    assert len(got) == 1
    want = am.fit_affine(W, 2, 64, 1, "in", am.AUTO_ITERATIONS)
    longer = am.fit_affine(W, 2, 64, 1, "in", 30)
    for name in ("codes", "scale", "zero"):
        np.testing.assert_array_equal(got[0].arrays[name], want.arrays[name])
    assert any(not np.array_equal(got[0].arrays[k], longer.arrays[k]) for k in ("scale", "zero"))


@pytest.mark.parametrize("in_axis", [1, 0])
def test_solved_in_chunks_of_rows_is_solved_in_one(monkeypatch, in_axis):
    """Every step of the solve is per group: chunks of rows (SOLVE_CHUNK_VALUES) give the same codes,
    scales and zeros bit for bit, with partial groups, per-row groups, either axis, a constant block."""
    r = np.random.default_rng(6)
    w = (r.standard_normal((70, 90)) * np.exp(r.standard_normal((70, 1)))).astype(np.float32)
    w[:9] = 0.25
    w = np.ascontiguousarray(w.T) if in_axis == 0 else w
    for bits, group, axis in ((4, 64, "in"), (2, 32, "out"), (3, None, "in"), (8, 64, "in")):
        fits = []
        for values in (1 << 24, 200):
            monkeypatch.setattr(am, "SOLVE_CHUNK_VALUES", values)
            fits.append(am.fit_affine(w, bits, group, in_axis, axis, iterations=6))
        for key in fits[0].arrays:
            np.testing.assert_array_equal(fits[0].arrays[key], fits[1].arrays[key])


def test_a_solve_holds_little_besides_the_codes(monkeypatch):
    """Whole, a solve held ~9x the weight's fp32 bytes in float32 temporaries (a 4096x11008 layer on
    both workers: most of auto's peak after vq's). Small chunks here, so that the bound is the
    weight's: the default ones hold a few tens of MB."""
    import tracemalloc

    monkeypatch.setattr(am, "SOLVE_CHUNK_VALUES", 1 << 16)
    monkeypatch.setattr(bitpack, "PACK_CHUNK", 1 << 16)
    w = (np.random.default_rng(7).standard_normal((1024, 5632)) * 0.02).astype(np.float32)
    tracemalloc.start()
    am.fit_affine(w, 4, 64, iterations=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= 1.0 * w.nbytes, peak / w.nbytes  # 0.25x: the uint8 codes
