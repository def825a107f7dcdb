"""The method protocol: what every compression method provides, in one place per method.

A method module defines one `Method` subclass instance named `METHOD` and is listed once in
`methods/__init__.py`. Everything else (the pass, `auto`, refinement, ONNX and TVM codegen, the
fit cache, the CLI) asks the registry, never a method name.

Heavy backends stay out of method modules: a method's ONNX decoder bodies (onnxscript) live in
`<method>/onnx.py` and its TVM kernel, if any, is reached through `tvm_kernel()`, both imported
only when an artifact is built.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from riem_compiler.compressed import CompressedWeight


@dataclass(frozen=True)
class NoSettings:
    """For a method without options of its own."""


@dataclass
class Fitted:
    """One fitted layer: the stored weight, its relative error, and what the report shows."""

    weight: CompressedWeight
    rel_error: float
    report: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class RankEstimate:
    """A low-rank candidate auto has not fitted yet (`Method.screened_by_rank`): its settings' bytes on
    the whole weight, and the layer's `metrics.Spectrum`, from which auto takes the errors of the
    truncated SVD of its rank (the fit's, before its factors are rounded to their bits)."""

    method: str
    label: str
    family: str
    shape: tuple
    nbytes: int
    rank: int
    spectrum: object  # metrics.Spectrum, shared by the layer's estimates


@dataclass
class DecoderCall:
    """One ONNX node that decodes a CompressedWeight: op type, array keys in input order,
    attributes, domain (the project's function domain, or "" for a standard op)."""

    op_type: str
    inputs: list[str]
    attrs: dict = field(default_factory=dict)
    domain: str = "riem_compiler"


@dataclass
class NativeDecoder:
    """A standard-op ONNX form of one CompressedWeight (`Method.onnx_native`), used instead of the
    decoder function when `Config.onnx_format` asks for it.

    opset: the default-domain opset the nodes need. tensors: key -> numpy array (ml_dtypes int4
    allowed) stored as initializers; together exactly the CompressedWeight's bytes. nodes: a chain
    of (op_type, inputs, attrs); an input is a key of `tensors` or `constants`, or None for the
    previous node's output; the last node's output (dtype `output_dtype`) is the weight.
    encoding: the tag `Method.onnx_native_arrays` reads back. constants: small int64 operands
    (shapes) written as Constant nodes, not counted as weight bytes."""

    opset: int
    tensors: dict
    nodes: list
    output_dtype: str
    encoding: str
    constants: dict = field(default_factory=dict)


@dataclass
class NativeMatMul:
    """An onnxruntime `MatMulNBits` form of one CompressedWeight (`Method.onnx_matmul`, for
    onnx_format "ort"): the consuming MatMul / Gemm becomes
    MatMulNBits(A, B, scales[, zero_points][, g_idx][, bias]) (com.microsoft domain), so the weight
    is never a float tensor in the graph.

    tensors: "B" (uint8 (N, blocks, block bytes)), "scales" and optionally "zero_points", as
    numpy arrays stored as initializers; `cast_scales` when the scales are stored float16 and a
    Cast to float32 precedes the node. attrs: K, N, bits, block_size, accuracy_level.
    encoding: the tag `Method.onnx_native_arrays` reads back."""

    tensors: dict
    attrs: dict
    encoding: str
    cast_scales: bool = False


@dataclass
class NativeGather:
    """An onnxruntime `GatherBlockQuantized` form of one CompressedWeight used only as an embedding
    table (`Method.onnx_gather`, for onnx_format "ort"): each Gather(table, ids) becomes
    GatherBlockQuantized(data, ids, scales[, zero_points]) (com.microsoft domain), which
    dequantises only the gathered rows, so the table is never a float tensor.

    tensors: "data" (uint8 (V, D * bits / 8)), "scales" ((V, blocks)), as numpy arrays stored as
    initializers; `cast_scales` when the scales are stored float16 and a Cast to float32 precedes
    the node (the output has the scales' type). attrs: gather_axis, quantize_axis, block_size,
    bits. encoding: the tag `Method.onnx_native_arrays` reads back."""

    tensors: dict
    attrs: dict
    encoding: str
    cast_scales: bool = False


def settings_key(settings) -> str:
    """sha256 of a settings dataclass (its type name and every field): the fit-cache key part."""
    data = {"type": type(settings).__name__, **dataclasses.asdict(settings)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def screening_rows(spec, options: dict) -> np.ndarray:
    """The weight a candidate is fitted on: the layer's, or only its output rows options["rows"]."""
    rows = options.get("rows")
    return spec.weight if rows is None else np.take(spec.weight, rows, axis=spec.output_axis)


class Method:
    """Base class; a method overrides what it has. Class attributes:

    name: the registry key and `CompressedWeight.method`.
    Settings: its typed settings dataclass; `settings(config)` builds it from `rc.Config` (fields
        of the same name), and the CLI derives one flag per field from it.
    tvm_dense_reason: None when `tvm_kernel()` returns a module; otherwise why TVM artifacts store it dense.
    """

    name: str = ""
    Settings: type = NoSettings
    tvm_dense_reason: str | None = "no TVM decode kernel: the TVM artifact stores the decoded weight dense"
    # auto may first fit this method's candidates as estimates on a subset of a layer's output rows,
    # to choose which to fit whole (passes/auto.py, screening): True where `candidates` reads
    # options["rows"] and its error on those rows estimates the whole layer's
    screened_on_rows: bool = False
    # ... or first give each low-rank candidate the errors of the truncated SVD of its rank (a
    # `RankEstimate`: no factors), to fit whole only those that can matter: True where `candidates`
    # reads options["rank_estimates"]
    screened_by_rank: bool = False

    # ------------------------------------------------------------------ settings and fitting
    def settings(self, config) -> object:
        """This method's settings: Config fields of the same name, then config.method_options[name]."""
        fields = {f.name for f in dataclasses.fields(self.Settings)}
        values = {k: getattr(config, k) for k in fields if hasattr(config, k)}
        values.update(getattr(config, "method_options", {}).get(self.name, {}))
        return self.Settings(**values)

    def fit(self, spec, ratio: float, settings, index: int = 0) -> Fitted:
        """Fit `spec.weight` within ratio * its fp32 bytes; raise ValueError(reason) when the
        method cannot meet that ratio for this layer. `index` offsets seeds (one per layer)."""
        raise NotImplementedError(f"method {self.name!r} does not fit layers on its own")

    def candidates(self, spec, budget_ratio: float, options: dict, attempt) -> None:
        """Add this method's candidates for `auto` to a CandidateList with
        attempt(layer, label, fit_fn, *args, **kwargs), label being what `label` will call the
        fitted weight. `options` are its grid options; options["rows"] (screened_on_rows methods):
        fit estimates of the weight cut to these output rows (`screening_rows`); options["rank_estimates"]
        (screened_by_rank methods): add a `RankEstimate` per candidate instead of fitting it."""

    def nbytes_for_shape(self, cw: CompressedWeight, shape) -> int:
        """Bytes cw's settings take for a weight of `shape` (screened_on_rows methods: cw was fitted
        on a subset of that weight's output rows)."""
        raise NotImplementedError(f"method {self.name!r} is not screened on rows")

    # ------------------------------------------------------------------ decoding
    def decode_torch(self, cw: CompressedWeight, tensors: dict):
        """The float32 weight (any shape with cw's element count) from the stored arrays as torch
        tensors, with torch ops that trace under torch.export and export to ONNX."""
        raise NotImplementedError

    def family(self, cw: CompressedWeight) -> str:
        """Method plus the setting that defines a "single method" plan in `auto`."""
        return cw.method

    def label(self, cw: CompressedWeight) -> str:
        """Short human name of one fitted weight, e.g. rtn4/g128."""
        return self.family(cw)

    # ------------------------------------------------------------------ refinement
    def trainable(self, cw: CompressedWeight, param_name: str = ""):
        """A `methods.trainable.TrainableWeight` view for data-free refinement, or None."""
        return None

    # ------------------------------------------------------------------ backends
    def onnx_call(self, cw: CompressedWeight) -> DecoderCall:
        raise NotImplementedError

    def onnx_functions(self) -> dict:
        """name -> onnxscript function for the decoders `onnx_call` may name (with what they call)."""
        return {}

    def onnx_native(self, cw: CompressedWeight, onnx_format: str, table: bool = False):
        """A `NativeDecoder` in standard ONNX ops for onnx_format ("standard"), or a str saying why
        this weight keeps the decoder-function form (the default: no native form). table: every
        use is a Gather of rows (an embedding table), so row-major data suits it best."""
        return f"method {self.name!r} has no {onnx_format} ONNX form"

    def onnx_matmul(self, cw: CompressedWeight, in_out: bool):
        """A `NativeMatMul` for a weight consumed by MatMul/Gemm, or a str saying why not.
        in_out: the weight is used as an (in, out) matrix (x @ W); else as (out, in) (x @ W.T)."""
        return f"method {self.name!r} has no onnxruntime MatMulNBits form"

    def onnx_gather(self, cw: CompressedWeight):
        """A `NativeGather` for a weight used only as a Gather table, or a str saying why not."""
        return f"method {self.name!r} has no onnxruntime GatherBlockQuantized form"

    def onnx_native_arrays(self, meta: dict, shape, encoding: str, tensors: dict) -> dict:
        """Inverse of `onnx_native`: the CompressedWeight's arrays from its native initializers."""
        raise NotImplementedError(f"method {self.name!r} has no native ONNX form")

    def tvm_kernel(self):
        """This method's TVM kernel module (`<method>/tvm.py`, imported here so TVM loads only
        when an artifact is built), or None: then TVM artifacts store the weight dense, see
        tvm_dense_reason. Codegen asks the module for:

        array_names(cw) -> keys of cw.arrays in the kernel's argument order;
        decode_primfunc(cw, name) -> PrimFunc(those arrays..., W float32 in cw.shape);
        schedule_decode_cpu(func) -> the scheduled PrimFunc (LLVM target, no tuning record);
        fused_linear_primfunc(cw, rows, name, target_kind) -> y = x W^T with W decoded inside
            the reduction (optional; a PrimFunc, or a str saying why not for this weight), see
            `tvm_fused`.
        """
        return None

    def tvm_fusable(self, cw: CompressedWeight) -> str | None:
        """None when this weight has a fused dequantise-matmul kernel, the one build_tvm's mode "fused"
        runs a matmul weight with, so it stays in its stored bytes at run time; else why not. What
        `tvm_fused` checks first, and what `auto` with plan_for="tvm" keeps candidates by."""
        module = self.tvm_kernel()
        if module is None:
            return self.tvm_dense_reason or f"method {self.name!r} has no TVM kernel"
        if getattr(module, "fused_linear_primfunc", None) is None:
            return f"method {self.name!r} has no fused dequantise-matmul kernel"
        if len(cw.shape) != 2:
            return f"a {len(cw.shape)}-D weight (conv) is not a matmul operand"
        try:
            module.array_names(cw)
        except ValueError as exc:  # a layout its kernel does not read
            return str(exc)
        return None

    def tvm_fused(self, cw: CompressedWeight, rows: int, name: str, target_kind: str, for_memory: bool = False):
        """The fused dequantise-matmul PrimFunc y (rows, out) = x (rows, in) W^T for one 2-D weight,
        the weight read in its stored form inside the reduction, or a str saying why this weight is
        decoded once at load instead. for_memory: the build asks to keep weights compact even where
        the per-call decode costs more than the matmul (mode "fused"); otherwise (mode "auto") a
        method says no where fusing would be slower than decoding once."""
        why = self.tvm_fusable(cw)
        if why is not None:
            return why
        func = self.tvm_kernel().fused_linear_primfunc(cw, int(rows), name, target_kind=target_kind)
        if not for_memory and not isinstance(func, str) and func.attrs is not None \
                and func.attrs.get("riem.fused_slower_than_decode_once", False):
            return ("this layout's fused CPU kernel decodes a code per weight through a generic bit reader and "
                    "measured slower than decoding once (benchmarks/results/tvm_lowbit.md), so decoded once at "
                    "load (mode='fused' keeps it compact)")
        return func


def within_ratio(spec, ratio: float, cw: CompressedWeight) -> Fitted:
    """A method's fit of `spec` as the pass takes it: its relative error and meta, or ValueError
    when the stored bytes exceed ratio * the layer's fp32 bytes."""
    from riem_compiler.methods import relative_error

    if cw.nbytes > ratio * spec.fp32_bytes:
        raise ValueError(f"{cw.method} cannot meet ratio {ratio:g} for shape {spec.shape}")
    return Fitted(cw, relative_error(spec.weight, cw), dict(cw.meta))


def ratios_with(ratios, budget_ratio: float) -> list[float]:
    """A candidate ratio list plus the budget itself, largest first (auto's single-method plans
    then have a candidate at the budget)."""
    return sorted({float(r) for r in ratios} | {float(budget_ratio)}, reverse=True)


def matrix(weight) -> np.ndarray:
    """The (shape[0], prod(shape[1:])) float32 view every method fits."""
    from riem_compiler.errors import InputError

    w = np.asarray(weight, dtype=np.float32)
    if w.ndim < 2:
        raise InputError(f"expected a weight with at least 2 dimensions, got shape {w.shape}")
    return w.reshape(w.shape[0], -1)


def row_ranges(rows: int, values_per_row: int, values: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive ranges of whole rows of about `values` values each (at least one
    row): how the fits and eager decodes that work a chunk of rows at a time into whole-layer outputs
    split a layer (every step per row, so the chunks give the same values as one)."""
    step = max(1, values // max(1, values_per_row))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def fp32_bytes(shape) -> int:
    return int(np.prod(shape)) * 4
