"""Data-free fitting of RieM parameters to one weight matrix.

The reference fits with plain Adam (lr 5e-5) for hours. We get there in seconds with:
- variable projection: W_hat is linear in (v, c), so every step solves them exactly by least
  squares on the current features and Adam only moves a, b, U, beta;
- a one-cycle learning-rate schedule at a much larger rate (3e-2);
- random row/column blocks per step when the matrix is large (unbiased for the squared loss);
- quantisation-aware final phase: states pass through per-dimension fake quantisation with a
  straight-through gradient, then (v, c) are re-solved against the quantised states and the
  rounded metric network, so the reported error is that of the stored artifact.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from riem_compiler import riem
from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import decode
from riem_compiler.metrics import relative_error

log = logging.getLogger("riem_compiler.fit")


@dataclass
class FitSettings:
    steps: int = 1000
    time_budget_s: float | None = None  # wall-clock guard; None: the steps alone decide the result
    lr: float = 3e-2
    init_scale: float = 3.0
    block: int = 256           # rows/cols sampled per step when the matrix is larger (fit_curve.md: more, cheaper steps win)
    qat_fraction: float = 0.25  # last fraction of steps with fake-quantised states
    seed: int = 0
    device: str = "cpu"


@dataclass
class FitResult:
    weight: CompressedWeight
    rel_error: float  # ||W - W_hat||_F / ||W||_F of the stored (quantised) artifact
    seconds: float
    steps: int  # steps done
    steps_planned: int = 0
    time_capped: bool = False  # the time budget stopped the fit before steps_planned


def _features(a, b, U, beta):
    """Phi[i, j, :] = sum_k sigmoid(A_k[i] + B_k[j]): W_hat = Phi @ v + c."""
    A = torch.einsum("iq,kmq->kim", a, U) + beta[:, None, :]
    B = torch.einsum("kjq,kmq->kjm", riem.shifted_states(b, U.shape[0]), U)
    phi = None
    for k in range(U.shape[0]):
        term = torch.sigmoid(A[k][:, None, :] + B[k][None, :, :])
        phi = term if phi is None else phi + term
    return phi


# elements per (rows x N_in x m) working chunk of the fused step: on CPU a few MB (stays in cache,
# few enough ops that dispatch overhead stays small); on a GPU large, so each branch is one kernel
CHUNK_FLOATS = 1 << 19
CHUNK_FLOATS_GPU = 1 << 26


def _chunk_rows(A: torch.Tensor, n_in: int) -> int:
    per = CHUNK_FLOATS if A.device.type == "cpu" else CHUNK_FLOATS_GPU
    return max(1, per // (n_in * A.shape[-1]))


class _FusedLoss(torch.autograd.Function):
    """Loss of one variable-projection step, mean((Phi v + c - T)^2) with (v, c) solved from Phi,
    as a function of A (K, N_out, m) and B (K, N_in, m).

    Autograd through `_features` stores K sigmoid tensors of N_out x N_in x m and walks each of
    them several times. Here the forward keeps only Phi (the sum over branches, needed for the
    readout solve), and the backward recomputes each branch's sigmoid in row chunks small enough
    to stay in cache: dL/dA_k[i] = v * sum_j G_ij s(1-s), dL/dB_k[j] = v * sum_i G_ij s(1-s), with
    G = dL/dW_hat. (v, c) are held fixed, as in the autograd form (variable projection: at the
    least-squares optimum the loss is stationary in them). Deterministic: fixed chunk order."""

    @staticmethod
    def forward(ctx, A, B, target):
        k_branches, n_out, m = A.shape
        n_in = B.shape[1]
        rows = _chunk_rows(A, n_in)
        phi = torch.empty(n_out, n_in, m, dtype=A.dtype, device=A.device)
        buf = torch.empty(min(rows, n_out), n_in, m, dtype=A.dtype, device=A.device)
        for r in range(0, n_out, rows):
            p = phi[r:r + rows]
            z = buf[: p.shape[0]]
            for k in range(k_branches):
                torch.add(A[k, r:r + rows, None, :], B[k, None, :, :], out=z)
                if k == 0:
                    torch.sigmoid(z, out=p)
                else:
                    p.add_(z.sigmoid_())
        v, c = _solve_readout(phi, target)
        resid = phi @ v + c - target
        del phi
        ctx.save_for_backward(A, B, resid, v)
        return (resid * resid).mean()

    @staticmethod
    def backward(ctx, grad):
        A, B, resid, v = ctx.saved_tensors
        k_branches, n_out, m = A.shape
        n_in = B.shape[1]
        rows = _chunk_rows(A, n_in)
        G = resid * (grad * 2.0 / resid.numel())  # dL/dW_hat
        gA = torch.empty_like(A)
        gB = torch.zeros_like(B)
        buf = torch.empty(min(rows, n_out), n_in, m, dtype=A.dtype, device=A.device)
        for r in range(0, n_out, rows):
            z = buf[: min(rows, n_out - r)]
            g = G[r:r + rows, :, None]
            for k in range(k_branches):
                torch.add(A[k, r:r + rows, None, :], B[k, None, :, :], out=z)
                z.sigmoid_()
                z.addcmul_(z, z, value=-1.0)  # s (1 - s)
                z.mul_(g)
                torch.sum(z, 1, out=gA[k, r:r + rows])
                gB[k] += z.sum(0)
        return gA * v, gB * v, None


def _solve_readout(phi: torch.Tensor, target: torch.Tensor, ridge: float = 1e-6):
    """Least squares for (v, c) given features; tiny ridge keeps it well posed."""
    m = phi.shape[-1]
    X = phi.reshape(-1, m)
    mean_x = X.mean(0)
    mean_t = target.mean()
    Xc = X - mean_x
    G = Xc.T @ Xc
    rhs = Xc.T @ (target.reshape(-1) - mean_t)
    G = G + ridge * (G.diagonal().mean() + 1e-12) * torch.eye(m, device=G.device, dtype=G.dtype)
    v = _solve_symmetric(G, rhs)
    return v, mean_t - mean_x @ v


def _solve_symmetric(G: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """G x = rhs for a ridged Gram matrix G: the plain LU solve, or, when that reports a
    singular G (degenerate features, a ridge lost to rounding), the pseudo-inverse solution.
    Never raises: a non-finite G gives a non-finite x, which the caller reports."""
    x, info = torch.linalg.solve_ex(G, rhs)
    if int(info) == 0 and bool(torch.isfinite(x).all()):
        return x
    if not bool(torch.isfinite(G).all() and torch.isfinite(rhs).all()):
        return torch.full_like(rhs, float("nan"))
    return torch.linalg.pinv(G, hermitian=True) @ rhs


def _solve_readout_chunked(a, b, U, beta, target, rows: int = 256):
    """Same least squares over the whole matrix, accumulated in row chunks (bounded memory)."""
    m = U.shape[1]
    dev = a.device
    G = torch.zeros(m + 1, m + 1, dtype=torch.float64, device=dev)
    rhs = torch.zeros(m + 1, dtype=torch.float64, device=dev)
    with torch.no_grad():
        for r in range(0, a.shape[0], rows):
            phi = _features(a[r:r + rows], b, U, beta).reshape(-1, m).double()
            X = torch.cat([phi, torch.ones(phi.shape[0], 1, dtype=phi.dtype, device=dev)], 1)
            G += X.T @ X
            rhs += X.T @ target[r:r + rows].reshape(-1).double()
    G += 1e-9 * (G.diagonal().mean() + 1e-12) * torch.eye(m + 1, dtype=G.dtype, device=dev)
    sol = _solve_symmetric(G, rhs)
    return sol[:m].float(), sol[m].float()


def fit_riem(
    weight: np.ndarray | torch.Tensor, q: int, m: int, state_bits: int = 8,
    metric_dtype: str = "float16", settings: FitSettings | None = None,
    k_branches: int = riem.K_BRANCHES,
) -> FitResult:
    """Fit RieM to `weight` (any shape; viewed as (shape[0], rest)) without data."""
    s = settings or FitSettings()
    t0 = time.perf_counter()
    shape = tuple(weight.shape)
    W = torch.as_tensor(np.asarray(weight, dtype=np.float32)).reshape(shape[0], -1)
    dev = torch.device(s.device)
    W = W.to(dev)
    n_out, n_in = W.shape
    sigma = W.std().clamp_min(1e-12) if W.numel() > 1 else W.abs().max().clamp_min(1e-12)
    Wn = W / sigma

    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    init = s.init_scale / math.sqrt(q)
    a = (torch.randn(n_out, q, generator=gen) * init).to(dev).requires_grad_()
    b = (torch.randn(n_in, q, generator=gen) * init).to(dev).requires_grad_()
    U = (torch.randn(k_branches, m, q, generator=gen) / math.sqrt(q)).to(dev).requires_grad_()
    beta = torch.zeros(k_branches, m, device=dev).requires_grad_()
    params = [a, b, U, beta]
    opt = torch.optim.Adam(params, lr=s.lr)
    steps = max(1, s.steps)
    qat_start = int(steps * (1.0 - s.qat_fraction)) if state_bits < 32 else steps
    full = n_out <= s.block and n_in <= s.block

    done = 0
    capped = False
    for step in range(steps):
        if s.time_budget_s is not None and time.perf_counter() - t0 > s.time_budget_s:
            log.warning("RieM fit %dx%d: time budget %.0f s reached after %d of %d steps; the result is "
                        "worse than a full fit and depends on machine load", n_out, n_in, s.time_budget_s,
                        step, steps)
            capped = True
            break
        frac = step / steps
        lr = s.lr * (min(1.0, frac / 0.05) if frac < 0.05 else 0.5 * (1 + math.cos(math.pi * (frac - 0.05) / 0.95)))
        for group in opt.param_groups:
            group["lr"] = max(lr, s.lr * 1e-3)
        quant = step >= qat_start
        aa = riem.fake_quantize_states(a, state_bits) if quant else a
        bb = riem.fake_quantize_states(b, state_bits) if quant else b
        if full:
            target = Wn
        else:
            rows = torch.randperm(n_out, generator=gen)[: s.block].to(dev)
            cols = torch.randperm(n_in, generator=gen)[: s.block].to(dev)
            aa, bb, target = aa[rows], bb[cols], Wn[rows][:, cols]
        A = torch.einsum("iq,kmq->kim", aa, U) + beta[:, None, :]
        B = torch.einsum("kjq,kmq->kjm", riem.shifted_states(bb, k_branches), U)
        loss = _FusedLoss.apply(A, B, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1

    with torch.no_grad():
        a_q = riem.fake_quantize_states(a.detach(), state_bits)
        b_q = riem.fake_quantize_states(b.detach(), state_bits)
        # round the metric net to its stored dtype, then solve the readout against what is stored
        U_s = U.detach().to(getattr(torch, metric_dtype)).float()
        beta_s = beta.detach().to(getattr(torch, metric_dtype)).float()
        v, c = _solve_readout_chunked(a_q, b_q, U_s, beta_s, Wn)
        factors = riem.RieMFactors(a.detach().cpu(), b.detach().cpu(), U_s.cpu(), beta_s.cpu(),
                                   (v * sigma).cpu(), (c * sigma).cpu())
    arrays = riem.store(factors, state_bits, metric_dtype)
    cw = CompressedWeight(
        method="riem", shape=shape,
        meta={"q": q, "m": m, "k_branches": k_branches, "state_bits": state_bits,
              "metric_dtype": metric_dtype},
        arrays=arrays,
    )
    rel = relative_error(W.cpu().numpy(), decode(cw))  # float64: float32 norms underflow for tiny weights
    return FitResult(cw, rel, time.perf_counter() - t0, done, steps, capped)
