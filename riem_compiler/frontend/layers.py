"""`LayerSpec`: what a frontend found, the plain contract between frontends and the pass."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

LAYER_KINDS = ("linear", "matmul", "conv1d", "conv2d", "embedding")
EMBEDDING_SKIP = "embedding table (compress_embeddings=False)"


@dataclass
class LayerSpec:
    """One compressible weight.

    name:   unique key of the weight (torch: parameter's qualified name, e.g. "fc1.weight";
            ONNX: the initializer / constant name).
    kind:   one of LAYER_KINDS.
    weight: float32 array in the layout the model stores it (Linear (out, in); Conv
            (out, in/groups, *kernel); a MatMul constant as it stands; an embedding table
            (vocabulary, dim), whose rows are gathered). Fitting views it as
            (shape[0], prod(shape[1:])).
    bias:   float32 array or None.
    attrs:  frontend-specific attributes (torch: padding, padding_mode; ONNX: op_type, pads,
            consumers, ...). Not for anything the pass decides on: read the typed fields below.
    module: torch: qualified name of the owning module ("" for functional use); ONNX: node name.
    groups, stride, dilation: convolution attributes, written the same way by both frontends
            (torch `groups`/`stride`/`dilation`, ONNX `group`/`strides`/`dilations`); one int per
            spatial dimension; groups 1 and empty tuples for Linear/MatMul.
    in_axis: the weight axis that is summed against the layer's input: 1 for Linear/Conv
            (out, in, ...), a Gemm with transB=1 and the left operand of a MatMul; 0 for the right
            operand of a MatMul or a Gemm with transB=0 ((in, out), x @ W). Grouped quantisers
            group along it (the runtimes' fused low-bit kernels block the reduction axis). The
            torch frontend writes 1 for functional matmul weights too (transposes on the way
            are not tracked). An embedding table has 1: each gathered row is quantised in groups
            of its own values, the layout the gather kernels read.
    """

    name: str
    kind: str
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)
    attrs: dict = field(default_factory=dict)
    module: str = ""
    groups: int = 1
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    in_axis: int = 1

    def __post_init__(self):
        self.groups = int(self.groups)
        self.stride = tuple(int(s) for s in self.stride)
        self.dilation = tuple(int(d) for d in self.dilation)
        if self.groups < 1:
            raise ValueError(f"{self.name}: groups must be >= 1, got {self.groups}")
        self.in_axis = int(self.in_axis)
        if self.in_axis not in (0, 1) or (self.in_axis == 0 and self.weight.ndim != 2):
            raise ValueError(f"{self.name}: in_axis must be 1, or 0 for a 2-D weight; got {self.in_axis}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def output_axis(self) -> int:
        """The weight axis of the layer's outputs (its rows)."""
        return 1 if self.in_axis == 0 else 0

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], int(np.prod(self.weight.shape[1:])))

    @property
    def fp32_bytes(self) -> int:
        return int(self.weight.size) * 4


def apply_scope(specs: list[LayerSpec], config) -> tuple[list[LayerSpec], list[tuple[LayerSpec, str]]]:
    """Ignored names/types, embeddings unless config.compress_embeddings, minimum size, keep
    first/last: (kept, [(spec, reason) skipped]).

    Patterns match the weight name, the owning module/node name or any consumer node name."""
    kept, skipped = [], []
    for spec in specs:
        names = [spec.name, spec.module, *spec.attrs.get("consumers", [])]
        pattern = next((p for p in config.ignore if any(n and fnmatch.fnmatchcase(n, p) for n in names)), None)
        if pattern is not None:
            skipped.append((spec, f"matches ignore pattern {pattern!r}"))
        elif spec.kind in config.ignore_types:
            skipped.append((spec, f"layer type {spec.kind!r} is ignored"))
        elif spec.kind == "embedding" and not config.compress_embeddings:
            skipped.append((spec, EMBEDDING_SKIP))
        elif spec.weight.size < config.min_weight_size:
            skipped.append((spec, f"{spec.weight.size} weights < min_weight_size {config.min_weight_size}"))
        else:
            kept.append(spec)
    if config.keep_first_last and kept:
        ends = {kept[0].name, kept[-1].name}
        skipped += [(s, "first/last layer kept (keep_first_last)") for s in kept if s.name in ends]
        kept = [s for s in kept if s.name not in ends]
    return kept, skipped
