"""ONNX files: writing a model (`save_onnx`) and a Result (`export_result_onnx`, behind `Result.export_onnx`).

This is the ONNX codegen's entry point. The graph rewrite is in onnx_rewrite.py, the torch
export in torch_to_onnx.py and the onnxruntime runner in ort_runner.py; the names tests and
benchmarks import from here are re-exported (`__all__`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from riem_compiler.codegen.onnx_rewrite import (DOMAIN, META_KEY, ONNX_FORMATS, check_onnx_format, check_rewritten,
                                                convert_onnx_format, function_protos, materialize_onnx, onnx_forms,
                                                read_compressed_onnx, rewrite_onnx)
from riem_compiler.codegen.ort_runner import OnnxRuntimeModel
from riem_compiler.codegen.torch_to_onnx import torch_result_to_onnx

__all__ = ["DOMAIN", "EXTERNAL_DATA_THRESHOLD", "META_KEY", "ONNX_FORMATS", "OnnxRuntimeModel", "check_rewritten",
           "convert_onnx_format", "export_result_onnx", "function_protos", "materialize_onnx", "onnx_forms",
           "read_compressed_onnx", "record_onnx_forms", "result_onnx", "rewrite_onnx", "save_onnx"]

EXTERNAL_DATA_THRESHOLD = 1_500_000_000  # bytes of tensors above which the file gets external data


def save_onnx(model: onnx.ModelProto, path) -> Path:
    """Write atomically (temporary folder beside the target, then rename); tensors go to an
    external data file "<name>.data" when they exceed EXTERNAL_DATA_THRESHOLD bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from riem_compiler.frontend.onnx_frontend import all_tensors

    tensor_bytes = sum(len(t.raw_data) for t in all_tensors(model))
    external = tensor_bytes > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, str(tmp / path.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            os.replace(tmp / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(tmp / path.name))
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def result_onnx(result, materialize: bool = False, onnx_format: str | None = None) -> onnx.ModelProto:
    """The compressed model of a Result as ONNX in `onnx_format` (None: the result's
    `config.onnx_format`), or plain ONNX with decoded weights when `materialize` is set."""
    fmt = onnx_format or getattr(result.config, "onnx_format", "auto")
    check_onnx_format(fmt)  # before a torch export or materialising: a bad option fails at once
    if result.source == "onnx":
        model = result.model
    else:
        model = torch_result_to_onnx(result)
    if materialize:
        return materialize_onnx(model)
    return convert_onnx_format(model, fmt)


def record_onnx_forms(report, model: onnx.ModelProto) -> dict:
    """Put each weight's ONNX form (and why, for a weight that kept the function form) into its
    report record's settings ("onnx_form", "onnx_note"); returns name -> form info."""
    forms = onnx_forms(model)
    for record in getattr(report, "layers", ()):
        record.settings.pop("onnx_form", None)
        record.settings.pop("onnx_note", None)
        if record.name in forms:
            record.settings.update(forms[record.name])
    return forms


def export_result_onnx(result, path, materialize: bool = False, onnx_format: str | None = None) -> Path:
    """`Result.export_onnx`: the compressed model as ONNX in `onnx_format` (default the config's, "auto":
    per layer MatMulNBits / GatherBlockQuantized / DequantizeLinear where the layout maps, else decoder
    functions; see `result_onnx` and onnx_rewrite.py), or plain ONNX with decoded weights when
    `materialize` is set. The report records which form each layer got."""
    model = result_onnx(result, materialize, onnx_format)
    if not materialize:
        record_onnx_forms(result.report, model)
    return save_onnx(model, path)
