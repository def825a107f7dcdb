"""`Config`: every option of `optimize`, validated at the boundary."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from riem_compiler import methods, riem
from riem_compiler.errors import InputError
from riem_compiler.frontend.layers import LAYER_KINDS
from riem_compiler.methods.targets import PLAN_TARGETS

METHODS = (*methods.SELECTABLE, methods.PLANNER)  # what `method=` takes
FLOAT_FIELDS = ("ratio", "time_budget_s", "lr", "error_ceiling", "input_scales")  # each must be finite
NONE_ALLOWED = ("time_budget_s",)  # None: no cap
SENSITIVITIES = ("output", "weight")  # auto's candidate cost (passes/sensitivity.py)
PREPROCESS_FIELDS = ("fold_batchnorm", "dead_channels", "equalize", "bias_correction")
# the date Config's defaults last changed in a way that changes results (auto: RieM candidates opt-in,
# one torch thread per fit job; ONNX export: native forms per layer; ".2": affine's solver in float32
# with an early stop, numpy BLAS threads pinned per job; ".3": no early stop; "2026-12-07": 25 BatchNorm-
# inversion steps (were 100), auto's affine candidates at 15 iterations (were 30), probes on half the
# sensitivity samples (were all); ".2": bias correction from folded BatchNorm statistics on by default;
# ".3": auto screens rtn/affine/rotq/vq candidates on a subset of rows and fits whole only those near
# its plan; "2026-12-08": and svd's by the truncated SVD's errors from the layer's spectrum); results
# pages name it
DEFAULTS_VERSION = "2026-12-08"
ONNX_FORMATS = ("auto", "functions", "standard", "ort")  # how compressed weights are written to ONNX (codegen/onnx_rewrite.py)


@dataclass
class Config:
    """Options of the compression pass.

    ratio: target stored bytes per layer as a fraction of its fp32 weight bytes (0 < ratio < 1);
        for method="auto" the global budget over all compressible layers.
    """

    ratio: float = 0.25
    method: str = "riem"
    state_bits: int | str = 8  # "auto" (method riem): 8/6/4 chosen per layer by pilot fits
    metric_dtype: str = "float16"
    m: int = 16
    k_branches: int = riem.K_BRANCHES
    steps: int = 1000
    time_budget_s: float | None = None  # optional per-layer wall-clock cap (a visible guard; None: no cap)
    lr: float = 3e-2
    error_ceiling: float = 1.0
    seed: int = 0
    device: str = "cpu"
    ignore: tuple[str, ...] = ()
    ignore_types: tuple[str, ...] = ()
    min_weight_size: int = 1024
    keep_first_last: bool = False
    # embedding tables (nn.Embedding, ONNX Gather of a constant) are opt-in: a gathered row is used
    # directly, so its error is not averaged away by a matmul; off: reported as skipped, kept dense
    compress_embeddings: bool = False
    recompute: bool = False
    quiet: bool = False
    executor: str = "local"  # "local" (in-process) or "ray"
    ray_address: str | None = None  # Ray cluster address; None: RAY_ADDRESS, else a new local cluster
    # torch threads of every fit job (Ray: CPUs per task); None: 1. Results depend on it, never on the executor
    threads: int | None = None
    workers: int | None = None  # local executor: jobs at once (None: available cores // threads)
    cache_dir: str | None = None  # fitted-layer cache (resumable runs); None disables it
    # data-free preprocessing (torch; ONNX: fold_batchnorm only), riem_compiler/passes/batchnorm.py and dfq.py:
    # fold BatchNorm into the preceding Conv/Linear where exact; DFQ's dead-channel handling, cross-layer
    # equalisation and bias correction from BatchNorm statistics (dead channels need folding; bias correction
    # corrects the layers fed by a folded BatchNorm, so a model without one, or fold_batchnorm=False, is left as
    # fitted). Bias correction is on by default: it changes no pick and no byte, and lowered the output error in
    # most cells of the CNN benchmarks (benchmarks/results/accuracy.md, imagenet.md: X against X-bc)
    fold_batchnorm: bool = True
    dead_channels: bool = False
    equalize: bool = False
    bias_correction: bool = True
    # AWQ-style stored input-channel scales (riem_compiler/passes/input_scales.py; torch input): s = (channel
    # rms / its geometric mean) ** a on synthetic inputs, a chosen per layer among 0, alpha / 2 and alpha (this
    # field) by a probe quantiser's output error; a scaled Linear / ungrouped Conv weight is compressed as
    # W diag(s) and its input multiplied by a stored float16 1/s (counted in its bytes). 0: off
    input_scales: float = 0.0
    refine: bool = False  # data-free refinement toward the original's outputs (torch, needs example_inputs)
    refine_steps: int = 200
    # method="auto": what a candidate costs. "output": its predicted share of the model's output error
    # (input second moments and a measured gain per layer on synthetic inputs; torch models with
    # example_inputs or an input_sampler), "weight": the size-weighted relative weight error
    sensitivity: str = "output"
    # synthetic inputs for the sensitivity: all make the moments, the first half run the per-layer probes, and a
    # quarter as many more are held out to measure plans for the report
    sensitivity_samples: int = 32
    # BatchNorm-inversion steps that make those inputs for a torch model with BatchNorm and float inputs
    # (most of auto's time on an ImageNet CNN: 25 take a quarter of the time of 100, for the same plans' quality
    # at 1/4 and mixed at 1/8 on MobileNetV2 and EfficientNet-Lite2, benchmarks/results/inversion_steps.md)
    sensitivity_inversion_steps: int = 25
    # method="auto": also offer RieM candidates (fitted at ratio/2 with the riem settings above). Off by
    # default: they cost seconds to minutes per layer, 10-15x auto's whole run on MiniLM where they did not help
    # (on the digits CNNs at 1/24-1/32 they did: docs/AUTO.md)
    auto_riem: bool = False
    # ONNX form of compressed weights: "auto" (per layer the best native form that maps: onnxruntime
    # MatMulNBits / GatherBlockQuantized, else blocked DequantizeLinear, else decoder functions; the
    # report says which and why), "functions" (decoder functions in domain riem_compiler, which
    # onnxruntime folds to dense float32 at session creation), "standard" (DequantizeLinear where the
    # method maps, else functions) or "ort" (as "auto"). "standard" and "ort" also make rtn choose
    # among the 8/4-bit settings those forms write; "auto" and "functions" leave it the lowest error
    onnx_format: str = "auto"
    # method="auto": plan for a deployment target. "onnx": only candidates that onnx_format "auto" writes in a
    # form onnxruntime keeps compressed (MatMulNBits, GatherBlockQuantized, DequantizeLinear); "tvm": only those
    # with a fused dequantise-matmul kernel (build_tvm mode "fused" runs them in their stored bytes). Kept-dense
    # float32 layers stay allowed; candidates cost their run-time weight bytes (methods/targets.py).
    # None: every candidate, at its stored bytes
    plan_for: str | None = None
    # per-method settings that are not fields above, e.g. {"svd": {"factor_bits": 8}, "rtn": {"group_size": 64}};
    # the fields each method takes are those of its Settings dataclass (riem_compiler.methods.<name>)
    method_options: dict = field(default_factory=dict)

    def __post_init__(self):
        self.ignore = tuple(self.ignore)
        self.ignore_types = tuple(self.ignore_types)
        self.validate()

    def validate(self) -> None:
        # nan compares false with everything, so a nan would slip past every range check below
        # (and silently disable the error ceiling): every float option must be a finite number
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if name in NONE_ALLOWED and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number; got {value!r}")
        if not isinstance(self.ratio, (int, float)) or not 0.0 < float(self.ratio) < 1.0:
            raise InputError(f"ratio must be a number in (0, 1), the stored fraction of fp32 bytes; got {self.ratio!r}")
        if self.method not in METHODS:
            raise InputError(f"method must be one of {METHODS}; got {self.method!r}")
        if self.state_bits not in riem.STATE_BITS and not (self.state_bits == "auto" and self.method == "riem"):
            raise InputError(f"state_bits must be one of {riem.STATE_BITS}, or 'auto' with method='riem' (chosen "
                             f"per layer among {riem.AUTO_STATE_BITS} by pilot fits); got {self.state_bits!r}")
        if self.metric_dtype not in riem.METRIC_DTYPES:
            raise InputError(f"metric_dtype must be one of {riem.METRIC_DTYPES}; got {self.metric_dtype!r}")
        if self.sensitivity not in SENSITIVITIES:
            raise InputError(f"sensitivity must be one of {SENSITIVITIES}; got {self.sensitivity!r}")
        for name in ("m", "k_branches", "steps", "refine_steps", "sensitivity_samples", "sensitivity_inversion_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer; got {value!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:  # finite: checked above
            raise InputError(f"time_budget_s must be a positive number of seconds, or None for no cap; "
                             f"got {self.time_budget_s!r}")
        if not 0.0 <= self.input_scales <= 1.0:
            raise InputError(f"input_scales must be an exponent in [0, 1] (0: off; AWQ uses about 0.25-0.5); "
                             f"got {self.input_scales!r}")
        if self.error_ceiling <= 0:
            raise InputError(f"error_ceiling must be positive; got {self.error_ceiling!r}")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise InputError(f"device must be 'cpu' or 'cuda'; got {self.device!r}")
        if self.onnx_format not in ONNX_FORMATS:
            raise InputError(f"onnx_format must be one of {ONNX_FORMATS}; got {self.onnx_format!r}")
        if self.plan_for is not None and self.plan_for not in PLAN_TARGETS:
            raise InputError(f"plan_for must be one of {PLAN_TARGETS} or None (plan over every candidate); "
                             f"got {self.plan_for!r}")
        if self.plan_for is not None and self.method != methods.PLANNER:
            raise InputError(f"plan_for={self.plan_for!r} plans method='auto'; got method={self.method!r}")
        if self.executor not in ("local", "ray"):
            raise InputError(f"executor must be 'local' or 'ray'; got {self.executor!r}")
        bad = [t for t in self.ignore_types if t not in LAYER_KINDS]
        if bad:
            raise InputError(f"ignore_types has unknown kinds {bad}; known: {LAYER_KINDS}")
        for name in ("threads", "workers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a positive integer or None; got {value!r}")
        self._validate_method_options()
        for name in ("compress_embeddings", "auto_riem", *PREPROCESS_FIELDS):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if self.dead_channels and not self.fold_batchnorm:
            raise InputError("dead_channels=True works from folded BatchNorm statistics; "
                             "set fold_batchnorm=True or drop it")
        if self.min_weight_size < 0:
            raise InputError(f"min_weight_size must be >= 0; got {self.min_weight_size!r}")

    def _validate_method_options(self) -> None:
        if not isinstance(self.method_options, dict):
            raise InputError(f"method_options must be a dict of method name -> settings; got {self.method_options!r}")
        for name, options in self.method_options.items():
            if name not in methods.MODULES:
                raise InputError(f"method_options names unknown method {name!r}; known: {sorted(methods.MODULES)}")
            known = {f.name for f in dataclasses.fields(methods.get(name).Settings)}
            unknown = sorted(set(options) - known) if isinstance(options, dict) else None
            if unknown is None or unknown:
                raise InputError(f"method_options[{name!r}] takes {sorted(known)}; got {options!r}")
            try:
                methods.get(name).settings(self)
            except (TypeError, ValueError) as exc:
                raise InputError(f"method_options[{name!r}]: {exc}") from None

    @classmethod
    def from_kwargs(cls, config: "Config | None", **kwargs) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InputError(f"unknown option(s) {unknown}; valid options: {sorted(names)}")
        if config is None:
            return cls(**kwargs)
        if not isinstance(config, cls):
            raise InputError(f"config must be a riem_compiler.Config, got {type(config).__name__}")
        return dataclasses.replace(config, **kwargs)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
