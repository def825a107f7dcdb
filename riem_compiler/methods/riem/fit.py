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


def branch_inputs(a, b, U, beta):
    """(A, B) of shapes (K, m, N_out) and (K, m, N_in): branch k's metric-net input for row i and
    column j is A[k, :, i] + B[k, :, j]. The width m is the outer axis so that every elementwise
    pass over a (rows, cols) block runs along its contiguous columns (m is 5-48: with m innermost
    the broadcast add and the product with dL/dW_hat ran 3-5x slower). B_k = U_k S^{s_k} b is
    computed as (U_k rolled by s_k) b: one matrix product for all branches, no shifted copies of b."""
    k_branches, m, q = U.shape
    A = (U.reshape(k_branches * m, q) @ a.T).view(k_branches, m, -1) + beta[:, :, None]
    rolled = torch.stack([torch.roll(U[k], s, dims=-1) for k, s in enumerate(riem.branch_shifts(q, k_branches))])
    B = (rolled.reshape(k_branches * m, q) @ b.T).view(k_branches, m, -1)
    return A, B


def _features(a, b, U, beta):
    """Phi[:, i, j] = sum_k sigmoid(U_k a_i + U_k S^{s_k} b_j + beta_k), shape (m, N_out, N_in):
    W_hat = v . Phi + c. The formula as written (riem.py), with shifted copies of b."""
    A = torch.einsum("iq,kmq->kmi", a, U) + beta[:, :, None]
    B = torch.einsum("kjq,kmq->kmj", riem.shifted_states(b, U.shape[0]), U)
    phi = None
    for k in range(U.shape[0]):
        term = torch.sigmoid(A[k][:, :, None] + B[k][:, None, :])
        phi = term if phi is None else phi + term
    return phi


def _readout(phi: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """W_hat = v . Phi + c for features of shape (m, rows, cols)."""
    return torch.tensordot(v, phi, dims=1) + c


# elements per (m x rows x N_in) working chunk of the fused step: on CPU a few MB (stays in cache,
# few enough ops that dispatch overhead stays small); on a GPU large, so each branch is one kernel
CHUNK_FLOATS = 1 << 19
CHUNK_FLOATS_GPU = 1 << 26
# sigmoid(a + b) = e^a / (e^a + e^-b): a broadcast add and a division per element instead of an add
# and a sigmoid (2x faster on this CPU), and a branch adds into the sum in the same pass as its division
# (addcdiv: the forward's sum over branches 1.7x faster than 1 / (1 + e^-a e^-b) computed and added).
# Used while every |a|, |b| is below this, so that e^a and e^-b are finite, nonzero normal numbers and
# their sum is finite; otherwise the step takes torch.sigmoid.
EXP_FORM_LIMIT = 80.0


def _chunk_rows(A: torch.Tensor, n_in: int) -> int:
    per = CHUNK_FLOATS if A.device.type == "cpu" else CHUNK_FLOATS_GPU
    return max(1, per // (n_in * A.shape[1]))


class _Workspace:
    """Buffers of the fused step, kept across the steps of one fit: fresh multi-MB tensors every
    step cost a page fault per 4 KiB on first write (a third of the step time on this CPU)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]


class _BranchSigmoid:
    """sigmoid(A[k, :, rows, None] + B[k, :, None, :]) into a (m, rows, N_in) buffer, by the
    exponential form (EXP_FORM_LIMIT) when the step's A and B allow it."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        self.A, self.B = A, B
        limit = max(float(A.abs().max()), float(B.abs().max())) if A.numel() and B.numel() else 0.0
        self.exps = (torch.exp(A), torch.exp(-B)) if limit < EXP_FORM_LIMIT else None

    def __call__(self, k: int, r: int, rows: int, out: torch.Tensor) -> torch.Tensor:
        if self.exps is None:
            torch.add(self.A[k, :, r:r + rows, None], self.B[k, :, None, :], out=out)
            return out.sigmoid_()
        numerator = self._exp_sum(k, r, rows, out)
        return torch.div(numerator, out, out=out)

    def _exp_sum(self, k: int, r: int, rows: int, out: torch.Tensor) -> torch.Tensor:
        """e^a + e^-b into `out`; returns the numerator e^a (broadcast along the columns)."""
        ea, eb = self.exps
        numerator = ea[k, :, r:r + rows, None]
        torch.add(numerator, eb[k, :, None, :], out=out)
        return numerator

    def branch_sum(self, r: int, rows: int, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """Phi's rows r..r+rows (the sum over the branches) into `out`, with `scratch` of its size."""
        self(0, r, rows, out)
        for k in range(1, self.A.shape[0]):
            if self.exps is None:
                out.add_(self(k, r, rows, scratch))
                continue
            out.addcdiv_(self._exp_sum(k, r, rows, scratch), scratch)
        return out


class _FusedLoss(torch.autograd.Function):
    """Loss of one variable-projection step, mean((v . Phi + c - T)^2) with (v, c) solved from Phi,
    as a function of A (K, m, N_out) and B (K, m, N_in) (`branch_inputs`).

    Autograd through `_features` stores K sigmoid tensors of m x N_out x N_in and walks each of
    them several times. Here the forward keeps only Phi (the sum over branches, needed for the
    readout solve), and the backward recomputes each branch's sigmoid in row chunks small enough
    to stay in cache: dL/dA_k[:, i] = v * sum_j G_ij s(1-s), dL/dB_k[:, j] = v * sum_i G_ij s(1-s),
    with G = dL/dW_hat. (v, c) are held fixed, as in the autograd form (variable projection: at
    the least-squares optimum the loss is stationary in them). Deterministic: fixed chunk order.
    `ws`: a _Workspace reused across steps (None: a fresh one)."""

    @staticmethod
    def forward(ctx, A, B, target, ws=None):
        ws = ws or _Workspace()
        _, m, n_out = A.shape
        n_in = B.shape[2]
        rows = _chunk_rows(A, n_in)
        sig = _BranchSigmoid(A, B)
        phi = ws.get("phi", m * n_out * n_in, A).view(m, n_out, n_in)
        buf = ws.get("chunk", m * min(rows, n_out) * n_in, A)
        for r in range(0, n_out, rows):
            p = phi[:, r:r + rows]
            sig.branch_sum(r, rows, p, buf[: p.numel()].view(p.shape))
        v, c = _solve_readout(phi, target, centred=ws.get("centred", phi.numel(), A))
        resid = _readout(phi, v, c) - target
        ctx.save_for_backward(A, B, resid, v)
        ctx.ws, ctx.sig = ws, sig  # the backward recomputes the same sigmoids from the same exponentials
        return (resid * resid).mean()

    @staticmethod
    def backward(ctx, grad):
        A, B, resid, v = ctx.saved_tensors
        k_branches, m, n_out = A.shape
        n_in = B.shape[2]
        rows = _chunk_rows(A, n_in)
        sig = ctx.sig
        G = resid * (grad * 2.0 / resid.numel())  # dL/dW_hat
        gA = torch.empty_like(A)
        gB = torch.zeros_like(B)
        buf = ctx.ws.get("chunk", m * min(rows, n_out) * n_in, A)
        for r in range(0, n_out, rows):
            n = min(rows, n_out - r)
            z = buf[: m * n * n_in].view(m, n, n_in)
            g = G[None, r:r + rows, :]
            for k in range(k_branches):
                sig(k, r, rows, z)
                z.addcmul_(z, z, value=-1.0)  # s (1 - s)
                z.mul_(g)
                torch.sum(z, 2, out=gA[k, :, r:r + rows])
                gB[k] += z.sum(1)
        return gA * v[:, None], gB * v[:, None], None, None


def _solve_readout(phi: torch.Tensor, target: torch.Tensor, ridge: float = 1e-6,
                   centred: torch.Tensor | None = None):
    """Least squares for (v, c) given features (m, rows, cols); tiny ridge keeps it well posed.
    centred: a buffer of phi's size for the centred features (None: allocated)."""
    m = phi.shape[0]
    X = phi.reshape(m, -1)
    mean_x = X.mean(1)
    mean_t = target.mean()
    Xc = torch.sub(X, mean_x[:, None], out=None if centred is None else centred.view(X.shape))
    G = Xc @ Xc.T
    rhs = Xc @ (target.reshape(-1) - mean_t)
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
    """Same least squares over the whole matrix, accumulated in row chunks (bounded memory): the
    features of each chunk in float32, shifted by the first chunk's mean so that their float32
    Gram matrix carries no large common term, summed in float64."""
    m = U.shape[1]
    n_out, n_in = target.shape
    sig = _BranchSigmoid(*branch_inputs(a, b, U, beta))
    phi = torch.empty(m * min(rows, n_out) * n_in, dtype=a.dtype, device=a.device)
    buf = torch.empty_like(phi)
    G = torch.zeros(m + 1, m + 1, dtype=torch.float64, device=a.device)
    rhs = torch.zeros(m + 1, dtype=torch.float64, device=a.device)
    shift = None
    for r in range(0, n_out, rows):
        n = min(rows, n_out - r)
        p = phi[: m * n * n_in].view(m, n, n_in)
        X = sig.branch_sum(r, rows, p, buf[: p.numel()].view(p.shape)).view(m, -1)
        shift = X.mean(1, keepdim=True) if shift is None else shift
        X -= shift
        t = target[r:r + n].reshape(-1)
        G[:m, :m] += (X @ X.T).double()
        G[:m, m] += X.sum(1).double()
        G[m, m] += X.shape[1]
        rhs[:m] += (X @ t).double()
        rhs[m] += t.double().sum()
    G[m, :m] = G[:m, m]
    G += 1e-9 * (G.diagonal().mean() + 1e-12) * torch.eye(m + 1, dtype=G.dtype, device=G.device)
    sol = _solve_symmetric(G, rhs)
    return sol[:m].float(), (sol[m] - sol[:m] @ shift[:, 0].double()).float()


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam, fused into one kernel where torch has it for the device (on this CPU 8x faster than
    the per-tensor loop on a 30522x186 state matrix, which moves every step: the rows outside the
    sampled block still move by their momentum)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def fit_riem(
    weight: np.ndarray | torch.Tensor, q: int, m: int, state_bits: int = 8,
    metric_dtype: str = "float16", settings: FitSettings | None = None,
    k_branches: int = riem.K_BRANCHES,
) -> FitResult:
    """Fit RieM to `weight` (any shape; viewed as (shape[0], rest)) without data."""
    s = settings or FitSettings()
    t0 = time.perf_counter()
    shape = tuple(weight.shape)
    # numpy copied: a spec's weight is a read-only view of the model's tensor, which torch.as_tensor
    # would share with a warning (nothing here writes W)
    W = (weight.detach().float() if isinstance(weight, torch.Tensor) else
         torch.from_numpy(np.array(weight, dtype=np.float32))).reshape(shape[0], -1)
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
    opt = _adam(params, s.lr)
    ws = _Workspace()
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
        if full:
            aa, bb, target = a, b, Wn
        else:
            rows = torch.randperm(n_out, generator=gen)[: s.block].to(dev)
            cols = torch.randperm(n_in, generator=gen)[: s.block].to(dev)
            aa, bb, target = a[rows], b[cols], Wn[rows][:, cols]
        if quant:  # the sampled states on the grid of all of them: only the block is quantised
            with torch.no_grad():
                grids = riem.state_grid(a, state_bits), riem.state_grid(b, state_bits)
            aa = riem.fake_quantize_states(aa, state_bits, grids[0])
            bb = riem.fake_quantize_states(bb, state_bits, grids[1])
        A, B = branch_inputs(aa, bb, U, beta)
        loss = _FusedLoss.apply(A, B, target, ws)
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
