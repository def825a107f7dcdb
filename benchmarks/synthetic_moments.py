"""Can the synthetic input moments that `auto` plans with also shape the quantised weights? Two
output-aware fits at equal bytes, against plain `affine`, on all-MiniLM-L6-v2 (task metrics):

- GPTQ-style error feedback (Frantar et al. 2022) with M = E[x x^T] from synthetic inputs as the
  Hessian: columns are quantised in order (affine's grid, min-max per group from the updated
  weights) and each column's error is spread over the columns not yet quantised through the
  inverse of M + damp * mean(diag M) * I.
- AWQ-style input-channel scaling (Lin et al. 2023) from diag(M): W * s is quantised and the
  decoded weight divided by s, with s = (sqrt(diag M) / its geometric mean) ** alpha. (In a
  deployment s would be stored per input channel or folded into the previous op; here only the
  accuracy is measured.)

Synthetic inputs are the benchmark's random word-piece sequences (benchmarks/accuracy.py), so the
moments hold nothing from real text. Both fits lower the layers' output error on those moments;
the question is whether the task metrics follow. This is an experiment, not a method of the
library: its result decides whether one is worth building.

    python benchmarks/synthetic_moments.py          # about 15 min on 2 cores

Writes benchmarks/results/synthetic_moments.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import accuracy as acc  # noqa: E402
from riem_compiler import methods  # noqa: E402
from riem_compiler.metrics import relative_error  # noqa: E402
from riem_compiler.config import Config  # noqa: E402
from riem_compiler.frontend.torch_frontend import find_torch_layers  # noqa: E402
from riem_compiler.methods.affine import fit_affine, solve_affine  # noqa: E402
from riem_compiler.passes.sensitivity import SensitivitySettings, TorchSensitivity  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def gptq(weight: np.ndarray, moment: torch.Tensor, bits: int, group: int, damp: float) -> np.ndarray:
    """The decoded weight of GPTQ-style error feedback onto affine's grid (min-max per group)."""
    W = torch.tensor(weight, dtype=torch.float64)
    H = moment.double().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    qmax = (1 << bits) - 1
    for g0 in range(0, cols, group):
        g1 = min(g0 + group, cols)
        _, s16, z16 = solve_affine(W[:, g0:g1].numpy(), bits, g1 - g0, iterations=0)
        s, z = torch.tensor(s16[:, 0].astype(np.float64)), torch.tensor(z16[:, 0].astype(np.float64))
        for j in range(g0, g1):
            q = torch.clamp(torch.round(W[:, j] / s + z), 0, qmax)
            Q[:, j] = (q - z) * s
            err = (W[:, j] - Q[:, j]) / U[j, j]
            W[:, j + 1:] -= torch.outer(err, U[j, j + 1:])
    return Q.numpy().astype(np.float32)


def awq(weight: np.ndarray, moment: torch.Tensor, bits: int, group: int, alpha: float) -> np.ndarray:
    """The decoded weight of affine on W * s, divided by s (s from diag M, float16 as it would be stored)."""
    rms = torch.sqrt(torch.diag(moment.double())).numpy() + 1e-12
    s = ((rms / math.exp(float(np.mean(np.log(rms))))) ** alpha).astype(np.float16).astype(np.float32)
    cw = fit_affine(weight * s[None, :], bits, group, 1)
    return methods.decode(cw).reshape(weight.shape) / s[None, :]


def output_error(weight: np.ndarray, decoded: np.ndarray, moment: torch.Tensor) -> float:
    """tr(E M E^T) / tr(W M W^T): the layer's relative output error on the synthetic moments."""
    E, W, M = (torch.tensor(decoded - weight, dtype=torch.float64), torch.tensor(weight, dtype=torch.float64),
               moment.double())
    return float(torch.einsum("oi,ij,oj->", E, M, E) / torch.einsum("oi,ij,oj->", W, M, W))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--samples", type=int, default=128, help="synthetic sequences for the moments")
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    ap.add_argument("--damps", type=float, nargs="*", default=[0.01, 0.1, 1.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    load = [round(x, 2) for x in os.getloadavg()]
    task = acc.Task("minilm")
    specs = find_torch_layers(task.model, Config()).layers
    sens = TorchSensitivity(task.model, specs, task.example_inputs, task.refine_settings({}).input_sampler,
                            SensitivitySettings(seed=0, samples=args.samples))
    fits = [("affine", lambda w, m: methods.decode(fit_affine(w, args.bits, args.group, 1)).reshape(w.shape))]
    fits += [(f"awq alpha {a:g}", lambda w, m, a=a: awq(w, m, args.bits, args.group, a)) for a in args.alphas]
    fits += [(f"gptq damp {d:g}", lambda w, m, d=d: gptq(w, m, args.bits, args.group, d)) for d in args.damps]
    rows = [{"fit": "original", **task.metrics(task.model)}]
    for label, fit in fits:
        t0 = time.perf_counter()
        model = copy.deepcopy(task.model)
        params = dict(model.named_parameters())
        werr, oerr = [], []
        for spec in specs:
            w = np.asarray(spec.weight, np.float32)
            moment = sens.moments[spec.name].dense()[0]
            decoded = fit(w, moment)
            werr.append(relative_error(w, decoded))
            oerr.append(output_error(w, decoded, moment))
            with torch.no_grad():
                params[spec.name].copy_(torch.from_numpy(decoded).reshape(params[spec.name].shape))
        rows.append({"fit": label, **task.metrics(model), "weight_error": float(np.mean(werr)),
                     "synthetic_output_error": float(np.mean(oerr)), "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    meta = {"command": "python benchmarks/synthetic_moments.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "run": started, "load_average_at_start": load, "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "bits": args.bits, "group": args.group, "samples": args.samples, "threads": args.threads}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synthetic_moments.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Output-aware fits on synthetic moments (MiniLM)", "",
             f"Run {started} on {meta['machine']}; `{meta['command']}`; load average at start {load}. "
             f"All 36 Linear weights at {args.bits}-bit, groups of {args.group} inputs (affine's format: "
             f"{args.bits + 32 / args.group:g} bits per weight); moments from {args.samples} random word-piece "
             "sequences (benchmarks/accuracy.py's sampler). weight err = mean relative weight error; synthetic "
             "out. err = mean tr(E M E^T) / tr(W M W^T) over the layers, on the moments the fits used.", "",
             "| fit | WS353 | SimLex | polarity | emb. cosine | weight err | synthetic out. err | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.4f}" for k in ("ws353", "simlex", "polarity", "emb_cos")]
        extra = [f"{r[k]:.3f}" if k in r else "-" for k in ("weight_error", "synthetic_output_error")]
        lines.append(f"| {r['fit']} | " + " | ".join(cells + extra) + f" | {r.get('seconds', 0):.0f} |")
    (out / "synthetic_moments.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
