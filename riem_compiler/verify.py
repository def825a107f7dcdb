"""Check a compressed model against the original on generated inputs.

Inputs are generated, not sampled from data (the pass is data-free): float inputs are standard
normal, integer inputs are 0/1 (valid token ids, masks and indices for any vocabulary of two or
more), booleans random; all from a seeded generator. Shapes come from the torch example inputs,
from `--input-shape`, or from the ONNX graph inputs (a dynamic dimension becomes 1 unless given).

One draw of inputs can mislead (a lucky batch, or one on which the original's output happens to
be constant), so the check runs several independent draws (`DRAWS`) and reports:

- `rel_error`: ||y - y_ref|| over all draws, relative to the original output's variation across
  the draws, ||y_ref - mean_draws(y_ref)||. An error that is small only next to a large constant
  part of the output is not small;
- its spread per draw (min, median, max), and the error relative to the output's norm;
- status "degenerate" when the original's output does not vary over the draws: then the check
  cannot judge the compressed model, says so, and `--max-error` fails.

Positions where the original output is NaN/inf must be NaN/inf in the compressed one too (then
they are left out); a new NaN/inf makes the error infinite.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from riem_compiler.errors import InputError

log = logging.getLogger("riem_compiler.verify")

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
              "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


@dataclass
class InputShape:
    """One `--input-shape`: optional input name, dims, optional dtype (default float32)."""

    dims: tuple[int, ...]
    dtype: str = "float32"
    name: str | None = None


def parse_input_shape(text: str) -> InputShape:
    """Parse "1,3,8,8", "1,16:int64" or "input_ids=1,16:int64"."""
    raw = text.strip()
    name = None
    if "=" in raw:
        name, raw = (p.strip() for p in raw.split("=", 1))
    dtype = "float32"
    if ":" in raw:
        raw, dtype = (p.strip() for p in raw.rsplit(":", 1))
    if dtype not in _NP_DTYPES:
        raise InputError(f"--input-shape {text!r}: unknown dtype {dtype!r}; use one of {sorted(_NP_DTYPES)}")
    try:
        dims = tuple(int(d) for d in raw.replace("x", ",").split(",") if d.strip() != "")
    except ValueError:
        raise InputError(f"--input-shape {text!r}: expected comma-separated integers like 1,3,8,8 "
                         "(optionally NAME=1,3,8,8 and :DTYPE)") from None
    if any(d < 0 for d in dims):
        raise InputError(f"--input-shape {text!r}: dimensions must be >= 0")
    return InputShape(dims, dtype, name or None)


def generate(shape, dtype: str, rng: np.random.Generator) -> np.ndarray:
    dt = np.dtype(_NP_DTYPES.get(dtype, dtype))
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.integers(0, 2, size=shape).astype(dt)


def torch_inputs(shapes: list[InputShape], seed: int = 0) -> tuple:
    """Example inputs for a torch model from --input-shape values."""
    import torch

    rng = np.random.default_rng(seed)
    return tuple(torch.from_numpy(generate(s.dims, s.dtype, rng)) for s in shapes)


def torch_inputs_like(examples, seed: int = 0) -> tuple:
    """Fresh inputs with the shapes of `examples`: new normal values for float tensors; integer
    and bool tensors are copied (their valid range is the model's business)."""
    import torch

    rng = np.random.default_rng(seed)
    out = []
    for x in examples:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out.append(torch.from_numpy(rng.standard_normal(tuple(x.shape)).astype(np.float32)).to(x.dtype))
        elif isinstance(x, torch.Tensor):
            out.append(x.clone())
        else:
            out.append(x)
    return tuple(out)


def onnx_inputs(model, shapes: list[InputShape] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for every graph input of an ONNX model that is not an initializer.

    `shapes` may name inputs (NAME=dims) or list them in graph order; dynamic dimensions not
    covered become 1.
    """
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    shapes = list(shapes or [])
    named = {s.name: s for s in shapes if s.name}
    positional = [s for s in shapes if not s.name]
    unknown = sorted(set(named) - {i.name for i in graph_inputs})
    if unknown:
        raise InputError(f"--input-shape names {unknown}, but the model's inputs are {[i.name for i in graph_inputs]}")
    if len(positional) > len(graph_inputs):
        raise InputError(f"{len(positional)} --input-shape values for a model with {len(graph_inputs)} inputs")
    rng = np.random.default_rng(seed)
    feeds = {}
    for k, inp in enumerate(graph_inputs):
        ttype = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise InputError(f"model input {inp.name!r} is not a tensor; verification cannot generate it")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        given = named.get(inp.name) or (positional[k] if k < len(positional) else None)
        if given is not None:
            dims = given.dims
            if ttype.HasField("shape") and len(dims) != len(ttype.shape.dim):
                raise InputError(f"--input-shape for {inp.name!r} has {len(dims)} dims; the model says "
                                 f"{len(ttype.shape.dim)}")
        elif ttype.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in ttype.shape.dim)
            dynamic = [d.dim_param or "?" for d in ttype.shape.dim if not (d.HasField("dim_value") and d.dim_value > 0)]
            if dynamic:
                log.info("input %s: dynamic dims %s set to 1 for verification (use --input-shape to choose)",
                         inp.name, dynamic)
        else:
            raise InputError(f"model input {inp.name!r} has no shape; pass --input-shape {inp.name}=...")
        feeds[inp.name] = generate(dims, dtype.name, rng)
    return feeds


DRAWS = 8  # independent draws of generated inputs per check
DEGENERATE = 1e-10  # output variation below this fraction of its energy: the check cannot judge


@dataclass
class Verification:
    """Outcome of running original and compressed model on the same generated inputs."""

    status: str  # "ok" | "degenerate" (the original's output does not vary: cannot judge) | "skipped"
    rel_error: float | None = None  # pooled over draws, relative to the output's variation across draws
    max_abs_error: float | None = None
    inputs: list[dict] = field(default_factory=list)  # name, shape, dtype (of one draw)
    checked: str = ""  # what ran as the compressed model: "onnx file", "tvm artifact", "torch model"
    note: str = ""
    draws: int = 0
    spread: dict | None = None  # min / median / max of the per-draw error (same normalisation)
    rel_to_norm: float | None = None  # ||y - y_ref|| / ||y_ref|| pooled over draws

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("rel_error", "max_abs_error", "rel_to_norm"):  # JSON has no inf/nan
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = str(d[k])
        if d["spread"]:
            d["spread"] = {k: v if math.isfinite(v) else str(v) for k, v in d["spread"].items()}
        return d

    def summary(self) -> str:
        if self.status == "skipped":
            return f"verification skipped: {self.note}"
        shapes = ", ".join(f"{i['name']}{tuple(i['shape'])}" for i in self.inputs)
        where = f"{self.checked}, {self.draws} draws of generated inputs {shapes}"
        if self.status == "degenerate":
            return f"verification cannot judge ({where}): {self.note}"
        sp = self.spread or {}
        text = (f"verification ({where}): output error {self.rel_error:.4g} of the output's variation "
                f"(per draw median {sp.get('median', math.nan):.4g}, range {sp.get('min', math.nan):.4g}-"
                f"{sp.get('max', math.nan):.4g}), {self.rel_to_norm:.4g} of its norm; max abs error "
                f"{self.max_abs_error:.4g}")
        return f"{text} ({self.note})" if self.note else text


def input_draws(first: dict, n: int = DRAWS, seed: int = 0) -> list[dict]:
    """`first` and n-1 fresh draws with its names, shapes and dtypes (numpy or torch): floats
    standard normal, integers uniform over the range `first` spans (copied when it spans one
    value, e.g. an all-ones mask), booleans random."""
    rng = np.random.default_rng(seed)
    draws = [dict(first)]
    for _ in range(n - 1):
        draw = {}
        for name, x in first.items():
            arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
            if arr.dtype.kind in "fb":
                new = generate(arr.shape, arr.dtype.name, rng)
            elif arr.dtype.kind in "iu" and arr.size and arr.max() > arr.min():
                new = rng.integers(int(arr.min()), int(arr.max()) + 1, size=arr.shape).astype(arr.dtype)
            else:
                new = arr.copy()
            if hasattr(x, "detach"):
                import torch

                new = torch.from_numpy(np.ascontiguousarray(new)).to(x.device)
            draw[name] = new
        draws.append(draw)
    return draws


def as_numpy_list(out) -> list[np.ndarray]:
    """Flatten model outputs (tensor, array, tuple/list/dict of them) to float64 numpy arrays."""
    if out is None:
        return []
    if hasattr(out, "detach"):
        return [out.detach().cpu().double().numpy()]
    if isinstance(out, np.ndarray):
        return [out.astype(np.float64)]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in as_numpy_list(o)]
    if isinstance(out, (int, float, np.generic)):
        return [np.asarray(out, dtype=np.float64)]
    return []


def describe(named_inputs: dict) -> list[dict]:
    out = []
    for name, x in named_inputs.items():
        shape = list(x.shape) if hasattr(x, "shape") else []
        out.append({"name": name, "shape": shape, "dtype": str(getattr(x, "dtype", type(x).__name__))})
    return out


def run_check(reference_fn, candidate_fn, draws: list[dict], checked: str) -> Verification:
    """Run both callables on each draw of named inputs (passed positionally) and compare."""
    import torch

    refs, outs = [], []
    with torch.no_grad():
        for named in draws:
            args = tuple(named.values())
            refs.append(reference_fn(*args))
            outs.append(candidate_fn(*args))
    return judge(refs, outs, describe(draws[0]), checked)


def judge(refs: list, outs: list, inputs: list[dict], checked: str) -> Verification:
    """Verification of candidate outputs `outs` against reference outputs `refs`, one per draw."""
    ref = [as_numpy_list(r) for r in refs]
    out = [as_numpy_list(o) for o in outs]
    n = len(ref)
    for r_k, o_k in zip(ref, out):
        if len(r_k) != len(o_k):
            raise ValueError(f"the compressed model returns {len(o_k)} outputs, the original {len(r_k)}")
        for r, o in zip(r_k, o_k):
            if r.shape != o.shape:
                raise ValueError(f"output shape {o.shape} differs from the original's {r.shape}")
    total = sum(a.size for r_k in ref for a in r_k)
    left_out, max_abs = 0, 0.0
    num = np.zeros(n)
    energy = np.zeros(n)
    variation = np.zeros(n)
    for j in range(len(ref[0]) if ref else 0):
        r = np.stack([r_k[j] for r_k in ref])  # (draws, *output shape)
        o = np.stack([o_k[j] for o_k in out])
        fin_r, fin_o = np.isfinite(r), np.isfinite(o)
        if np.any(fin_r != fin_o):  # a new NaN/inf, or one of the original's that went away
            return Verification("ok", math.inf, math.inf, inputs, checked, "the compressed model's outputs have "
                                "NaN/inf where the original's do not (or the reverse)", n,
                                {"min": math.inf, "median": math.inf, "max": math.inf}, math.inf)
        left_out += int(np.sum(~fin_r))
        everywhere = np.all(fin_r, axis=0)  # positions finite in every draw
        diff = np.where(fin_r, o - r, 0.0)
        num += np.sum(diff.reshape(n, -1) ** 2, axis=1)
        energy += np.sum(np.where(fin_r, r, 0.0).reshape(n, -1) ** 2, axis=1)
        centred = np.where(everywhere, r - np.where(everywhere, r, 0.0).mean(axis=0), 0.0)
        variation += np.sum(centred.reshape(n, -1) ** 2, axis=1)
        if diff.size:
            max_abs = max(max_abs, float(np.max(np.abs(diff))))
    notes = []
    if left_out:
        notes.append(f"{left_out} of {total} output values of the original model are NaN/inf (so are the "
                     "compressed model's); the error is over the rest")
        log.warning("verification: %s", notes[-1])
    rel_to_norm = math.sqrt(num.sum() / energy.sum()) if energy.sum() > 0 else math.sqrt(num.sum())
    if n < 2 or not variation.sum() > DEGENERATE * max(energy.sum(), 1e-300):
        what = "is the same for every draw" if n >= 2 else "was checked on a single draw"
        notes.append(f"the original model's output {what} of generated inputs, so the check cannot tell a good "
                     f"compression from a bad one (error relative to the output's norm: {rel_to_norm:.4g}); "
                     "pass --input-shape / inputs that exercise the model")
        return Verification("degenerate", None, max_abs, inputs, checked, "; ".join(notes), n, None, rel_to_norm)
    per_draw = np.sqrt(num / (variation.sum() / n))
    spread = {"min": float(per_draw.min()), "median": float(np.median(per_draw)), "max": float(per_draw.max())}
    rel = math.sqrt(num.sum() / variation.sum())
    return Verification("ok", rel, max_abs, inputs, checked, "; ".join(notes), n, spread, rel_to_norm)


def verify_onnx(original, candidate, draws: list[dict[str, np.ndarray]], device: str = "cpu",
                checked: str = "onnx file") -> Verification:
    """Run two ONNX models (ModelProto or path) with onnxruntime on the same draws of feeds."""
    from riem_compiler.codegen.ort_runner import OnnxRuntimeModel

    ref = OnnxRuntimeModel(original, device=device)
    cand = OnnxRuntimeModel(candidate, device=device)
    refs = [ref.session.run(None, {k: feeds[k] for k in ref.input_names}) for feeds in draws]
    outs = [cand.session.run(None, {k: feeds[k] for k in cand.input_names}) for feeds in draws]
    return judge(refs, outs, describe({k: draws[0][k] for k in ref.input_names}), checked)
