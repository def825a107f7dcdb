"""dense: the weight kept as float32 or float16 (auto's "do not compress" candidate).

The smallest real method, and the example in README "Adding a method": settings, fit, byte
count (the arrays' nbytes), candidates, decoders for torch and ONNX, a trainable view, and the
TVM statement, all here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.methods.base import DecoderCall, Method, within_ratio

DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class DenseSettings:
    dtype: str = "float16"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise InputError(f"dense dtype must be one of {DTYPES}; got {self.dtype!r}")


def fit_dense(weight, dtype: str = "float16") -> CompressedWeight:
    """Keep the weight uncompressed (float32) or cast to float16."""
    if dtype not in DTYPES:
        raise InputError(f"dense dtype must be one of {DTYPES}, got {dtype!r}")
    w = np.asarray(weight, dtype=np.float32)
    return CompressedWeight("dense", tuple(w.shape), {"dtype": dtype}, {"weight": w.astype(dtype)})


class Dense(Method):
    name = "dense"
    Settings = DenseSettings
    # kept dense by choice: no decode to run, so the artifact holds the model's float32 parameter
    # (for dtype float16 that is twice the bytes counted here)
    tvm_dense_reason = "kept dense by choice (method 'dense'); the TVM artifact stores it as a float32 parameter"

    def fit(self, spec, ratio, settings, index=0):
        return within_ratio(spec, ratio, fit_dense(spec.weight, settings.dtype))

    def candidates(self, spec, budget_ratio, options, attempt):
        for dtype in options.get("dtypes", ("float16", "float32")):
            attempt(spec.name, f"dense {dtype}", fit_dense, spec.weight, dtype)

    def decode_torch(self, cw, tensors):
        import torch

        return tensors["weight"].to(torch.float32)

    def family(self, cw):
        return "dense16" if cw.meta["dtype"] == "float16" else "dense32"

    def trainable(self, cw, param_name=""):
        from riem_compiler.methods.trainable import FloatArraysView

        return FloatArraysView(cw, param_name)

    def onnx_call(self, cw):
        import onnx

        return DecoderCall("Cast", ["weight"], {"to": onnx.TensorProto.FLOAT}, domain="")


METHOD = Dense()
