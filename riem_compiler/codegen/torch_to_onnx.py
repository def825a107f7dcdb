"""The torch-to-ONNX export of a compressed torch Result.

torch.onnx.export cannot see inside the RieM modules, so `torch_result_to_onnx` exports a
materialised copy (plain layers, same parameter names) and hands its initializers to the graph
rewrite (onnx_rewrite.py) to put the compressed weights back.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from riem_compiler import methods
from riem_compiler.codegen.onnx_rewrite import rewrite_onnx

log = logging.getLogger("riem_compiler.onnx_export")  # the ONNX codegen's logger, as before the split


def torch_result_to_onnx(result) -> onnx.ModelProto:
    """Export a compressed torch model: export a materialised copy (plain Linear/Conv, same
    parameter names) with torch.onnx.export(dynamo=True, optimize=False), which keeps every
    parameter as an initializer of the same name, then put the compressed weights back in."""
    import torch

    from riem_compiler.errors import InputError, RiemError
    from riem_compiler.passes.rewrite_torch import materialize

    if result.example_inputs is None:
        raise InputError("export_onnx of a PyTorch result needs example inputs: pass example_inputs= to optimize()")
    inputs = result.example_inputs
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    plain = materialize(result.model).eval()
    with torch.no_grad():
        program = torch.onnx.export(plain, inputs, dynamo=True, optimize=False, verbose=False)
    model = program.model_proto
    found = {}
    from riem_compiler.frontend.onnx_frontend import iter_graphs

    tensors = {t.name: t for _, g in iter_graphs(model.graph) for t in g.initializer}
    for name, cw in result.compressed.items():
        t = tensors.get(name)
        if t is None or tuple(t.dims) != tuple(cw.shape):
            log.warning("export_onnx: weight %s is not an initializer of the exported graph; left dense", name)
            continue
        if not np.allclose(numpy_helper.to_array(t).astype(np.float32), methods.decode(cw), atol=1e-5, rtol=1e-4):
            log.warning("export_onnx: initializer %s does not hold the decoded weight; left dense", name)
            continue
        found[name] = cw
    if result.compressed and not found:
        raise RiemError("export_onnx: none of the compressed weights appear as initializers of the exported "
                        "ONNX graph, so the file would not be compressed")
    return rewrite_onnx(model, None, found)
