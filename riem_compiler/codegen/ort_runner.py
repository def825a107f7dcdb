"""Running an ONNX model with onnxruntime as a callable model (`OnnxRuntimeModel`).

Kept apart from the rewrite so that running a written .onnx file (verification, the CLI, the
Python API) needs only onnx, numpy and onnxruntime.
"""
from __future__ import annotations

import numpy as np
import onnx

from riem_compiler.heap import release_freed_heap


class OnnxRuntimeModel:
    """A .onnx file (or ModelProto) run by onnxruntime, called like a model.

    Takes numpy arrays or torch tensors (positional in graph-input order, or by name) and
    returns the same kind; a single output is returned bare.

    fast_start: decode the function-form compressed weights here (torch) and give onnxruntime
    plain initializers, instead of letting it constant-fold the decoder functions at session
    creation (slow, and ~10x the memory; codegen/onnx_fast_load.py). Other models open as usual.
    Off by default here: verification and the decoder tests must run the file's own decoders.
    `decoded` lists the weights decoded at load (empty when onnxruntime ran the decoders).
    After the session is created, the heap its constant folding freed goes back to the OS
    (`release_freed_heap`).
    """

    def __init__(self, path_or_model, device: str = "cpu", session_options=None, fast_start: bool = False):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda"):
            providers.insert(0, "CUDAExecutionProvider")
        self.session, self.decoded = None, []
        if fast_start:
            from riem_compiler.codegen.onnx_fast_load import fast_start_session

            started = fast_start_session(path_or_model, providers, session_options)
            if started is not None:
                self.session, self.decoded = started
        if self.session is None:
            source = (path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto)
                      else str(path_or_model))
            self.session = ort.InferenceSession(source, sess_options=session_options, providers=providers)
        release_freed_heap()  # both paths: folding (above) or decoding in torch (fast start) leave freed heap
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *args, **kwargs):
        if len(args) > len(self.input_names):
            raise TypeError(f"model takes {len(self.input_names)} inputs {self.input_names}, got {len(args)}")
        named = {**dict(zip(self.input_names, args)), **kwargs}
        as_torch = False
        feeds = {}
        for k, v in named.items():
            if hasattr(v, "detach"):
                as_torch = True
                v = v.detach().cpu().numpy()
            feeds[k] = np.asarray(v)
        outs = self.session.run(None, feeds)
        if as_torch:
            import torch

            outs = [torch.from_numpy(np.ascontiguousarray(o)) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)
