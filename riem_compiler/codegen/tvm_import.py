"""Import for the TVM build: the materialised torch model through torch.export into Relax.

The materialised model (plain Linear/Conv, parameter names unchanged) goes through
`torch.export` and `relax.frontend.torch.from_exported_program(keep_params_as_input=True)`,
so every weight is a parameter of `main` and nothing is folded into the library; `_Imported`
keeps the parameter names and values and the input/output specs the artifact records.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class _Imported:
    mod: object  # IRModule with "main"
    num_input: int
    param_names: list[str]  # torch names of main's params after the inputs, in order
    param_values: dict[str, np.ndarray]
    input_info: list[dict]
    output_info: list[dict]


def _import_torch(result) -> _Imported:
    """Materialised model -> torch.export -> Relax main(inputs..., params...)."""
    import torch
    from torch.export.graph_signature import InputKind
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from riem_compiler.passes.rewrite_torch import materialize

    if result.example_inputs is None:
        raise ValueError("build_tvm needs example inputs: call optimize(model, example_inputs=(x,), ...)")
    inputs = tuple(result.example_inputs)
    model = materialize(result.model).eval()
    with torch.no_grad():
        ep = torch.export.export(model, inputs)
        outputs = model(*inputs)
    mod = from_exported_program(ep, keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    values = [t.numpy() for t in params.get("main", [])]
    # Relax params are named after the export placeholders; unused ones (e.g. BatchNorm's
    # num_batches_tracked) are dropped by the importer, so map by name, not by position
    target_of = {s.arg.name: str(s.target) for s in ep.graph_signature.input_specs
                 if s.kind != InputKind.USER_INPUT}
    num_input = int(mod["main"].attrs["num_input"])
    fparams = mod["main"].params[num_input:]
    unknown = [v.name for v in fparams if v.name not in target_of]
    if unknown or len(values) != len(fparams):
        raise RuntimeError(f"parameter bookkeeping mismatch: Relax params {unknown[:5]} have no export "
                           f"placeholder, or {len(values)} values for {len(fparams)} params")
    names = [target_of[v.name] for v in fparams]
    for name, var, val in zip(names, fparams, values):
        shape = tuple(int(s) for s in var.ty.shape)
        if shape != tuple(val.shape):
            raise RuntimeError(f"parameter {name}: Relax shape {shape} != value shape {val.shape}")
    user = [t for t in inputs if isinstance(t, torch.Tensor)]
    in_specs = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    input_info = [{"name": s.arg.name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                  for s, t in zip(in_specs, user)]
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    output_info = [{"shape": list(o.shape), "dtype": str(o.dtype).replace("torch.", "")} for o in outs]
    return _Imported(mod, num_input, names, dict(zip(names, values)), input_info, output_info)
