"""`LayerSpec`: what a frontend found, the plain contract between frontends and the pass."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LAYER_KINDS = ("linear", "matmul", "conv1d", "conv2d")


@dataclass
class LayerSpec:
    """One compressible weight.

    name:   unique key of the weight (torch: parameter's qualified name, e.g. "fc1.weight";
            ONNX: the initializer / constant name).
    kind:   one of LAYER_KINDS.
    weight: float32 array in the layout the model stores it (Linear (out, in); Conv
            (out, in/groups, *kernel); a MatMul constant as it stands). Fitting views it as
            (shape[0], prod(shape[1:])).
    bias:   float32 array or None.
    attrs:  kind-specific attributes (stride, padding, dilation, groups, padding_mode, ...).
    module: torch: qualified name of the owning module ("" for functional use); ONNX: node name.
    """

    name: str
    kind: str
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)
    attrs: dict = field(default_factory=dict)
    module: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], int(np.prod(self.weight.shape[1:])))

    @property
    def fp32_bytes(self) -> int:
        return int(self.weight.size) * 4
