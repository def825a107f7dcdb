"""Degenerate weights (rank-deficient, zero rows/columns, all zero, constant, tiny, huge, depthwise
and dead conv channels) never crash any method: each layer is compressed with a finite error
within its ratio, or kept dense with a reason, and the output model runs (issue 11: a third-party
depthwise-separable net made method="auto" raise LinAlgError from fit_svd's int8 solve)."""
import numpy as np
import pytest
import torch
from torch import nn

import riem_compiler as rc
from riem_compiler import methods
from riem_compiler.methods import dense as dense_m
from riem_compiler.methods import rtn as rtn_m
from riem_compiler.methods import svd as svd_m
from riem_compiler.methods import decode

METHODS = ("riem", "svd", "rtn", "tucker2", "affine", "vq", "rotq", "riemq", "auto")
RATIOS = (0.5, 0.25)


def _weights() -> dict[str, np.ndarray]:
    r = np.random.default_rng(0)
    zero_rc = r.standard_normal((64, 48))
    zero_rc[::3], zero_rc[:, ::4] = 0.0, 0.0
    dead = r.standard_normal((32, 16, 3, 3))
    dead[::2] = 0.0  # half the output channels dead
    w = {
        "rank1": np.outer(r.standard_normal(64), r.standard_normal(48)),
        "rank3": r.standard_normal((64, 3)) @ r.standard_normal((3, 48)),
        "zero_rows_cols": zero_rc,
        "zeros": np.zeros((64, 48)),
        "constant": np.full((64, 48), 0.3),
        "tiny": 1e-30 * r.standard_normal((64, 48)),
        "denormal": 1e-40 * r.standard_normal((64, 48)),  # float32 subnormals
        "huge": 1e30 * r.standard_normal((64, 48)),
        "depthwise": r.standard_normal((64, 1, 3, 3)),
        "dead_channels": dead,
    }
    return {k: v.astype(np.float32) for k, v in w.items()}


WEIGHTS = _weights()


def _model(w: np.ndarray) -> tuple[nn.Module, torch.Tensor]:
    """The degenerate layer followed by an ordinary one (so auto's budget is shared)."""
    g = torch.Generator().manual_seed(1)
    if w.ndim == 2:
        layer, x = nn.Linear(w.shape[1], w.shape[0]), torch.randn(3, w.shape[1], generator=g)
        tail = nn.Linear(w.shape[0], 32)
    else:
        groups = w.shape[0] if w.shape[1] == 1 else 1
        layer = nn.Conv2d(w.shape[1] * groups, w.shape[0], 3, padding=1, groups=groups)
        x = torch.randn(2, w.shape[1] * groups, 5, 5, generator=g)
        tail = nn.Conv2d(w.shape[0], 16, 3, padding=1)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
        layer.bias.zero_()
        tail.weight.copy_(0.1 * torch.randn(tail.weight.shape, generator=g))
    return nn.Sequential(layer, tail).eval(), x


# float16 casts of the 1e30 weight overflow (and warn); those candidates are dropped or skipped
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("method", METHODS)
def test_degenerate_weights_never_crash(method, ratio):
    for name, w in WEIGHTS.items():
        model, x = _model(w)
        res = rc.optimize(model, (x,), method=method, ratio=ratio, steps=30, min_weight_size=0, quiet=True,
                          threads=1)
        with torch.no_grad():
            y = res.model(x)
        assert torch.isfinite(y).all(), (name, method, ratio)
        records = {r.name: r for r in res.report.layers}
        assert len(records) == 2, (name, records)
        for rec in records.values():
            if rec.status == "compressed":
                assert rec.rel_error is not None and np.isfinite(rec.rel_error), (name, rec)
                if method != "auto":
                    assert rec.bytes_after <= ratio * rec.bytes_before, (name, rec)
            else:
                assert rec.status == "skipped" and rec.reason, (name, rec)
        if method == "auto":
            assert sum(r.bytes_after for r in records.values()) <= ratio * sum(
                r.bytes_before for r in records.values()), name
        first = "0.weight"
        if name == "zeros" and first in res.compressed:
            assert np.array_equal(decode(res.compressed[first]), np.zeros_like(w)), (method, ratio)
        for key, cw in res.compressed.items():
            assert np.isfinite(decode(cw)).all(), (name, key)
        if first in res.compressed:
            # the reported error is the stored artifact's, measured in float64
            assert records[first].rel_error == pytest.approx(
                methods.relative_error(w, res.compressed[first]), rel=1e-3, abs=1e-6), (name, records[first])




def _old_fit_svd_int8_right(weight, ratio):
    """fit_svd's int8 right-factor solve before the fix (the plain normal equations)."""
    M = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    rank = svd_m.svd_rank_for_ratio(weight.shape, ratio, 8)
    U, S, Vt = svd_m.matrix_svd(M)
    left = U[:, :rank] * np.sqrt(S[:rank])
    codes, scale = svd_m._quantize_rows_int8(left)
    left_q = codes.astype(np.float64) * scale[:, None]
    return np.linalg.solve(left_q.T @ left_q, left_q.T @ M)


@pytest.mark.parametrize("name", ["rank3", "zeros", "constant"])
def test_fit_svd_int8_on_rank_deficient_weight_reproduces_and_fixes_issue_11(name):
    """A rank-3 weight fitted at a higher rank: the extra columns of the quantised left factor
    are all zero, so its Gram matrix is singular; the old solve raised LinAlgError."""
    w = WEIGHTS[name]
    with pytest.raises(np.linalg.LinAlgError):
        _old_fit_svd_int8_right(w, 0.5)
    cw = svd_m.fit_svd(w, 0.5, 8)
    assert cw.meta["rank"] > 3
    err = methods.relative_error(w, cw)
    assert np.isfinite(err) and err < 0.02, err
    assert np.isfinite(decode(cw)).all()


def test_solve_least_squares_matches_lstsq():
    r = np.random.default_rng(2)
    b = r.standard_normal((50, 7))
    full = r.standard_normal((50, 10))
    cases = [full, np.c_[full[:, :6], np.zeros((50, 4))], full[:, [0, 1, 2, 2, 3]], np.zeros((50, 5)),
             full[:, :8] * np.logspace(0, -6, 8)]
    for A in cases:
        x = svd_m.solve_least_squares(A, b)
        ref = np.linalg.lstsq(A, b, rcond=None)[0]
        assert np.linalg.norm(A @ x - b) == pytest.approx(np.linalg.norm(A @ ref - b), rel=1e-9, abs=1e-12)
        assert np.linalg.norm(x) <= np.linalg.norm(ref) * (1 + 1e-6) + 1e-12  # the minimum-norm one
    # well-conditioned: exactly the plain normal-equations solve (results unchanged)
    np.testing.assert_array_equal(svd_m.solve_least_squares(full, b), np.linalg.solve(full.T @ full, full.T @ b))


def test_auto_drops_a_failing_candidate_not_the_run():
    from riem_compiler.frontend.layers import LayerSpec
    from riem_compiler.passes import auto

    w = WEIGHTS["rank3"]
    spec = LayerSpec("l.weight", "linear", w)

    def broken(weight, ratio):
        raise RuntimeError("boom")

    grid = auto.CandidateGrid(riem_fit=broken, riem_ratios=(0.125,))
    result = auto.choose_methods_detailed([spec], 0.25, grid)
    assert result.dropped == 2 and result.choices[0].dropped == 2  # riem at 0.125 and at the budget
    assert "dropped" in result.choices[0].reason and "dropped" in result.table()
    assert np.isfinite(result.choices[0].rel_error) and result.nbytes <= 0.25 * spec.fp32_bytes

    def source(spec, ratio):  # a non-finite candidate is dropped; a failing source keeps dense32
        bad = dense_m.fit_dense(np.full(spec.shape, np.inf, np.float32), "float16")
        return [bad, rtn_m.fit_rtn(spec.weight, 4, 32)]

    result = auto.choose_methods_detailed([spec], 0.25, source)
    assert result.dropped == 1 and result.choices[0].method == "rtn"

    def failing(spec, ratio):
        raise ValueError("no")

    result = auto.choose_methods_detailed([spec], 1.0, failing)
    assert result.choices[0].label == "dense32" and result.choices[0].rel_error == 0.0


def test_readout_solve_survives_a_singular_gram_matrix():
    from riem_compiler.methods.riem.fit import _solve_readout, _solve_symmetric

    G = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # exactly singular
    x = _solve_symmetric(G, torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.allclose(G @ x, torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.equal(_solve_symmetric(torch.zeros(3, 3), torch.zeros(3)), torch.zeros(3))
    assert torch.isnan(_solve_symmetric(torch.full((2, 2), float("nan")), torch.ones(2))).all()
    v, c = _solve_readout(torch.ones(3, 4, 5), torch.full((4, 5), 0.5))  # constant features (m, rows, cols)
    assert torch.isfinite(v).all() and float(c) == pytest.approx(0.5)
