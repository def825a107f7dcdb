"""Check a compressed model against the original on generated inputs.

Inputs are generated, not sampled from data (the pass is data-free): float inputs are standard
normal, integer inputs are 0/1 (valid token ids, masks and indices for any vocabulary of two or
more), booleans random; all from a seeded generator. Shapes come from the torch example inputs,
from `--input-shape`, or from the ONNX graph inputs (a dynamic dimension becomes 1 unless given).

The number reported is the relative error over all outputs, ||y - y_ref|| / ||y_ref||, plus the
largest absolute difference. Positions where the original output is NaN/inf must be NaN/inf in
the compressed one too (then they are left out); a new NaN/inf makes the error infinite.
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


@dataclass
class Verification:
    """Outcome of running original and compressed model on the same generated inputs."""

    status: str  # "ok" | "skipped"
    rel_error: float | None = None
    max_abs_error: float | None = None
    inputs: list[dict] = field(default_factory=list)  # name, shape, dtype
    checked: str = ""  # what ran as the compressed model: "onnx file", "tvm artifact", "torch model"
    note: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("rel_error", "max_abs_error"):  # JSON has no inf/nan
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = str(d[k])
        return d

    def summary(self) -> str:
        if self.status != "ok":
            return f"verification skipped: {self.note}"
        shapes = ", ".join(f"{i['name']}{tuple(i['shape'])}" for i in self.inputs)
        text = (f"verification ({self.checked}, generated inputs {shapes}): output rel. error "
                f"{self.rel_error:.4g}, max abs error {self.max_abs_error:.4g}")
        return f"{text} ({self.note})" if self.note else text


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


def compare(reference, candidate) -> tuple[float, float, int]:
    """(relative L2 error, max abs error, number of NaN/inf reference values left out) of
    candidate outputs against reference outputs."""
    ref, out = as_numpy_list(reference), as_numpy_list(candidate)
    if len(ref) != len(out):
        raise ValueError(f"the compressed model returns {len(out)} outputs, the original {len(ref)}")
    num = den = 0.0
    max_abs = 0.0
    left_out = 0
    for r, o in zip(ref, out):
        if r.shape != o.shape:
            raise ValueError(f"output shape {o.shape} differs from the original's {r.shape}")
        fin_r, fin_o = np.isfinite(r), np.isfinite(o)
        if np.any(fin_r != fin_o):  # a new NaN/inf, or one of the original's that went away
            return math.inf, math.inf, left_out
        left_out += int(np.sum(~fin_r))
        diff = (o - r)[fin_r]
        num += float(np.sum(diff ** 2))
        den += float(np.sum(r[fin_r] ** 2))
        if diff.size:
            max_abs = max(max_abs, float(np.max(np.abs(diff))))
    rel = math.sqrt(num / den) if den > 0 else math.sqrt(num)
    return rel, max_abs, left_out


def describe(named_inputs: dict) -> list[dict]:
    out = []
    for name, x in named_inputs.items():
        shape = list(x.shape) if hasattr(x, "shape") else []
        out.append({"name": name, "shape": shape, "dtype": str(getattr(x, "dtype", type(x).__name__))})
    return out


def run_check(reference_fn, candidate_fn, named_inputs: dict, checked: str) -> Verification:
    """Run both callables on the inputs (they take the inputs positionally) and compare."""
    import torch

    args = tuple(named_inputs.values())
    with torch.no_grad():
        ref = reference_fn(*args)
        out = candidate_fn(*args)
    return _verification(ref, out, describe(named_inputs), checked)


def _verification(ref, out, inputs: list[dict], checked: str) -> Verification:
    rel, max_abs, left_out = compare(ref, out)
    total = sum(a.size for a in as_numpy_list(ref))
    note = ""
    if left_out:
        note = (f"{left_out} of {total} output values of the original model are NaN/inf (so are the compressed "
                "model's); the error is over the rest")
        log.warning("verification: %s", note)
    return Verification("ok", rel, max_abs, inputs, checked, note)


def verify_onnx(original, candidate, feeds: dict[str, np.ndarray], device: str = "cpu",
                checked: str = "onnx file") -> Verification:
    """Run two ONNX models (ModelProto or path) with onnxruntime on the same feeds."""
    from riem_compiler.codegen.onnx_export import OnnxRuntimeModel

    ref = OnnxRuntimeModel(original, device=device)
    cand = OnnxRuntimeModel(candidate, device=device)
    with_names = {k: feeds[k] for k in ref.input_names}
    reference = ref.session.run(None, with_names)
    compressed = cand.session.run(None, {k: feeds[k] for k in cand.input_names})
    return _verification(reference, compressed, describe(with_names), checked)
