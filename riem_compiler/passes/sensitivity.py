"""Data-free sensitivity for `auto`: what a layer's weight error costs at the MODEL's output.

Equal weight error can mean very different output error: it depends on what the layer's inputs
look like and on what the rest of the network does with the layer's output. Both are estimated
here on synthetic inputs (never real data):

- second moments: for a linear map y = W x, E||(W - W_hat) x||^2 = tr(E M E^T) with E = W - W_hat
  and M = E[x x^T], exactly. M is collected per layer from one pass of the original model over
  synthetic inputs (a convolution's input patches, per group; an embedding's row frequencies).
- gain: model output error per unit of that layer-output error, measured once per layer by
  swapping one candidate (the probe) into a copy of the model and comparing outputs with the
  original's. A layer whose output the network ignores measures a gain of 0.

A candidate's cost is then gain * tr(E M E^T): the predicted relative squared output error
||y - y_ref||^2 / ||y_ref||^2 it adds. A layer without usable moments (a weight used through a
functional call the hooks do not see) falls back to the probe's measured error scaled by the
candidates' squared relative weight errors. `plan_error` measures a whole plan end to end on a
held-out synthetic set (another seed), so the planner can compare its plan with single methods.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from riem_compiler import methods
from riem_compiler.compressed import CompressedWeight
from riem_compiler.errors import InputError
from riem_compiler.frontend.layers import LayerSpec
from riem_compiler.metrics import read_only_tensor, squared_error_terms, tail_sums

log = logging.getLogger("riem_compiler.sensitivity")
# conv patches are unfolded at most this many bytes at a time (conv_patches)
PATCH_CHUNK_BYTES = 64 << 20
# the probes' forward calls keep every module output within this (forward_chunk)
FORWARD_CHUNK_BYTES = 16 << 20

@dataclass
class SensitivitySettings:
    samples: int = 32  # synthetic inputs for moments and probes
    # separate synthetic inputs (other seed) that measure whole plans for the report only (the predicted
    # cost picks the plan): a quarter of `samples`, since with BatchNorm inversion they cost as much each
    holdout: int = 8
    max_vectors: int = 16384  # input vectors per layer and batch kept for the moments (evenly strided)
    inversion_steps: int = 25  # BatchNorm-inversion steps for float inputs of models with BatchNorm (Config's)
    seed: int = 0
    # the first this many of `samples` run the probes that measure the gains (None: all of them). The moments
    # use every sample. Optimize probes on half (api.sensitivity_settings): a probe is a whole forward pass per
    # layer, most of the sensitivity's time after the inversion on an ImageNet CNN, and the gains on half the
    # samples ranked the layers as on all (Spearman 0.997 on EfficientNet-Lite2, 0.999 on MiniLM)
    probe_samples: int | None = None

    def validate(self) -> None:
        for name in ("samples", "holdout", "max_vectors", "inversion_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"sensitivity {name} must be a positive integer; got {value!r}")
        p = self.probe_samples
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise InputError(f"sensitivity probe_samples must be a positive integer or None; got {p!r}")


@dataclass
class LayerSensitivity:
    """What was measured for one layer; `gain` None until a probe ran."""

    name: str
    moments: str  # "linear", "conv", "embedding" or "none" (fallback: weight error scaled by the probe)
    gain: float | None = None
    probe: str = ""  # label of the probe candidate
    probe_error: float | None = None  # its measured relative squared output error
    probe_weight_error: float | None = None  # its relative weight error (the fallback's scale)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"moments": self.moments, "gain": self.gain, "probe": self.probe, "probe_error": self.probe_error,
                "seconds": round(self.seconds, 4)}


def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def probe_inputs(model: nn.Module, example_inputs, n: int, seed: int, sampler=None,
                 inversion_steps: int = 25, progress: bool = False) -> tuple[tuple, str]:
    """n synthetic inputs and how they were made.

    sampler(n, generator) wins when given. Float inputs: BatchNorm inversion for models with
    BatchNorm, else standard Gaussian (see passes/synthetic_inputs.py). Integer inputs (token ids,
    masks): each tensor is drawn uniformly between the smallest and largest value of its example,
    except a 0/1 tensor (a mask), which is all ones; so the example's shape and value range are used,
    never its content."""
    from riem_compiler.passes.refine_settings import RefineSettings
    from riem_compiler.passes.synthetic_inputs import synthetic_inputs

    gen = torch.Generator().manual_seed(seed)
    if sampler is not None:
        return _as_tuple(sampler(n, gen)), "sampler"
    if example_inputs is None:
        raise InputError("sensitivity='output' needs example_inputs (or an input_sampler)")
    example_inputs = _as_tuple(example_inputs)
    if not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise InputError("sensitivity='output' needs tensor example_inputs; pass input_sampler=(n, generator) -> "
                         "inputs, or sensitivity='weight'")
    if all(t.is_floating_point() for t in example_inputs):
        settings = RefineSettings(inversion_steps=inversion_steps, seed=seed)
        return synthetic_inputs(model, example_inputs, n, settings, seed, progress)
    out = []
    for t in example_inputs:
        shape = (n,) + tuple(t.shape[1:])
        if t.is_floating_point():
            out.append(torch.randn(shape, generator=gen, dtype=t.dtype))
        elif t.dtype == torch.bool or (t.numel() and int(t.min()) >= 0 and int(t.max()) <= 1):
            out.append(torch.ones(shape, dtype=t.dtype))
        else:
            lo, hi = int(t.min()), int(t.max())
            out.append(torch.randint(lo, hi + 1, shape, generator=gen, dtype=t.dtype))
    return tuple(out), "uniform ids"


def _first_samples(inputs: tuple, samples: int, count: int | None) -> tuple | None:
    """The first `count` samples of every input tensor, or None to probe on all of them (count None or
    not fewer, or an input whose first axis is not the samples' and so cannot be cut)."""
    if count is None or count >= samples:
        return None
    if _samples(inputs) != samples:
        log.debug("sensitivity: inputs are not all (samples, ...) tensors; probes run on all %d samples", samples)
        return None
    return tuple(t[:count] for t in inputs)


def conv_patches(x: torch.Tensor, kernel, stride, dilation, pad: list[int], groups: int,
                 mode: str = "constant", step: int = 1) -> torch.Tensor:
    """(groups, n, d): the input patches a Conv1d/2d weight row multiplies, d = C/groups * prod(kernel).
    x: (N, C, L) or (N, C, H, W); pad in F.pad order (last axis first). step: only every step-th
    patch of the N * L (sample-major), which is conv_patches(...)[:, ::step]."""
    parts = list(iter_conv_patches(x, kernel, stride, dilation, pad, groups, mode, step))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def iter_conv_patches(x: torch.Tensor, kernel, stride, dilation, pad: list[int], groups: int,
                      mode: str = "constant", step: int = 1):
    """conv_patches in pieces along n, unfolded a few samples at a time, so a batch never holds
    all its patches (a depthwise 3x3 layer of an ImageNet CNN: 9x its input, 2.8 GB for 32
    images at 260x260)."""
    if x.dim() == 3:
        x, kernel, stride, dilation, pad = (x.unsqueeze(-2), (1, kernel[0]), (1, stride[0]), (1, dilation[0]),
                                            list(pad) + [0, 0])
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    per_sample = x[0].numel() * math.prod(kernel) * 4
    chunk = max(1, PATCH_CHUNK_BYTES // max(per_sample, 1))
    offset = 0
    for n0 in range(0, x.shape[0], chunk):
        cols = F.unfold(x[n0:n0 + chunk], tuple(kernel), dilation=tuple(dilation), stride=tuple(stride))  # (n, C*kk, L)
        d = cols.shape[1] // groups
        rows = cols.reshape(cols.shape[0], groups, d, -1).permute(1, 0, 3, 2).reshape(groups, -1, d)
        yield rows[:, (-offset) % step::step]
        offset += rows.shape[1]


def patch_count(x_shape, kernel, stride, dilation, pad: list[int]) -> int:
    """How many patches conv_patches finds in an input of this shape (N times the output positions)."""
    spatial = list(x_shape[2:])
    pads = [pad[2 * i] + pad[2 * i + 1] for i in range(len(spatial))][::-1]  # F.pad order: last axis first
    n = x_shape[0]
    for size, p, k, s, dl in zip(spatial, pads, kernel, stride, dilation):
        n *= max(0, (size + p - dl * (k - 1) - 1) // s + 1)
    return n


@dataclass(frozen=True)
class SecondMoment:
    """E[x x^T] per group of a layer's input vectors: `matrix` (groups, d, d); or, when fewer
    vectors than d were seen, `factor` (groups, n, d) with E[x x^T] = factor^T factor, which is
    smaller and makes tr(E M E^T) = ||E factor^T||^2 cost out*n*d instead of out*d^2 (a 5632-wide
    layer seen through 512 tokens: 11x less). For an embedding, `matrix` holds row frequencies."""

    matrix: torch.Tensor | None = None
    factor: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """The (groups, d, d) matrix (or an embedding's frequencies), whichever form is held."""
        if self.matrix is not None:
            return self.matrix
        f = self.factor.double()
        return torch.einsum("gnd,gne->gde", f, f).float()


class Moments:
    """Accumulates E[x x^T] per group of the vectors a layer's weight multiplies (or, for an
    embedding, the frequency of each looked-up row). While no more vectors than their length
    arrived, they are kept as they are (the factor form of `SecondMoment`)."""

    def __init__(self, max_vectors: int):
        self.max_vectors = max_vectors
        self.sum: torch.Tensor | None = None
        self.vectors: list[torch.Tensor] = []  # batches kept while count <= d
        self.count = 0

    def _accumulate(self, v: torch.Tensor) -> None:
        """Adds v's E[x x^T] terms in float64, a few rows at a time (a depthwise layer's 1152 groups of
        2592 vectors are 600 MB in float64)."""
        rows = max(1, PATCH_CHUNK_BYTES // (8 * v.shape[0] * v.shape[2]))
        for a in range(0, v.shape[1], rows):
            part = v[:, a:a + rows].double()
            acc = torch.einsum("gnd,gne->gde", part, part)
            self.sum = acc if self.sum is None else self.sum + acc

    def step(self, n: int) -> int:
        """The stride that keeps at most max_vectors of n vectors."""
        return max(1, -(-n // self.max_vectors))

    def add(self, v: torch.Tensor) -> None:
        """v: (groups, n, d); at most max_vectors of the n, evenly strided, are kept."""
        self._add_kept(v[:, ::self.step(v.shape[1])])

    def add_conv(self, x: torch.Tensor, kernel, stride, dilation, pad: list[int], groups: int,
                 mode: str = "constant") -> None:
        """A conv input's patches (conv_patches), only the kept ones ever unfolded."""
        step = self.step(patch_count(x.shape, kernel, stride, dilation, pad))
        for part in iter_conv_patches(x, kernel, stride, dilation, pad, groups, mode, step):
            self._add_kept(part)

    def _add_kept(self, v: torch.Tensor) -> None:
        self.count += v.shape[1]
        if self.sum is None and self.count <= v.shape[2]:
            self.vectors.append(v.double())
            return
        for kept in self.vectors:  # the sum, batch by batch in arrival order, as if summed all along
            self._accumulate(kept)
        self.vectors = []
        self._accumulate(v)

    def add_ids(self, ids: torch.Tensor, rows: int) -> None:
        counts = torch.bincount(ids.reshape(-1).long().clamp(0, rows - 1), minlength=rows).double()
        self.sum = counts if self.sum is None else self.sum + counts
        self.count += ids.numel()

    def result(self) -> SecondMoment | None:
        if not self.count:
            return None
        if self.vectors:
            return SecondMoment(factor=(torch.cat(self.vectors, dim=1) / math.sqrt(self.count)).float())
        return None if self.sum is None else SecondMoment(matrix=(self.sum / self.count).float())


class _ModuleHook:
    """Forward hook feeding a module's input vectors into its layer's Moments."""

    def __init__(self, moments: Moments):
        self.moments = moments

    def __call__(self, m, inputs, output):
        x = inputs[0].detach()
        if isinstance(m, nn.Embedding):
            self.moments.add_ids(x, m.num_embeddings)
        elif isinstance(m, nn.Linear):
            self.moments.add(x.float().reshape(-1, x.shape[-1])[None])
        else:  # Conv1d / Conv2d
            pad = list(m._reversed_padding_repeated_twice)
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            self.moments.add_conv(x.float(), m.kernel_size, m.stride, m.dilation, pad, m.groups, mode)


@dataclass(frozen=True)
class MomentError:
    """E||(W - W_hat) x||^2 = tr(E M E^T) of one layer from its input second moments M."""

    moment: SecondMoment
    embedding: bool  # moment holds row frequencies of a gathered table
    in_axis: int
    # per output row, the factor its squared error counts with (None: 1): a layer whose output channels
    # were divided by s (an input scale folded into it) counts them by s^2, in the units the next layer
    # and the model's output see, so its candidates rank as before the fold
    rows: np.ndarray | None = None

    def for_rows(self, rows: np.ndarray) -> "MomentError":
        """The same error for the weight cut to these output rows (auto's screening fits): the
        inputs are the layer's, and each kept row counts with its own factor. Not for a gathered
        table or a grouped layer, whose moments belong to rows or groups."""
        held = self.moment.matrix if self.moment.matrix is not None else self.moment.factor
        if self.embedding or held.shape[0] != 1:
            raise ValueError("a gathered table's or grouped layer's moments do not split by output rows")
        return MomentError(self.moment, False, self.in_axis, None if self.rows is None else self.rows[rows])

    def truncation_errors(self, weight, spectrum) -> np.ndarray:
        """errors[r] = E||(W - W_r) x||^2 of the rank-r truncated SVD W_r of the weight (r = 0 .. k), from
        its `metrics.Spectrum`: W - W_r = sum over i >= r of s_i a_i b_i^T, so the error is the sum over
        i >= r of s_i^2 b_i^T M b_i. auto's screening estimates svd's candidates with it. Not for a
        gathered table, a grouped layer, or rows counted unevenly (folded input scales), where the
        terms do not separate."""
        held = self.moment.matrix if self.moment.matrix is not None else self.moment.factor
        if self.embedding or held.shape[0] != 1 or self.rows is not None:
            raise ValueError("the truncation's error is not a sum per singular value with these moments")
        w = read_only_tensor(np.ascontiguousarray(weight, dtype=np.float32))
        w = w.reshape(w.shape[0], -1)
        if self.in_axis == 0:  # stored (in, out): the layer's view is the transpose
            w = w.T
        v = spectrum.vectors
        if self.moment.matrix is None:  # M = F^T F: b^T M b = ||F b||^2, and s_i F b_i = (W F^T)^T a_i
            f = self.moment.factor[0].float()
            z = f @ v if spectrum.side == "in" else (w @ f.T).T @ v
            terms = z.double().pow(2).sum(0)
        else:
            m = self.moment.matrix[0].float()
            c = v if spectrum.side == "in" else w.T @ v  # b_i, or s_i b_i = W^T a_i
            terms = (c * (m @ c)).double().sum(0)
        terms = terms.clamp(min=0.0).numpy()
        if spectrum.side == "in":
            terms = terms * spectrum.squares
        return tail_sums(terms)

    def __call__(self, error: np.ndarray) -> float:
        """error: W - W_hat in the layer's weight shape."""
        err = torch.from_numpy(np.ascontiguousarray(error, dtype=np.float32))
        if self.rows is not None and self.in_axis == 1:
            root = torch.from_numpy(np.sqrt(self.rows).astype(np.float32))
            err = err * root.reshape([-1] + [1] * (err.dim() - 1))
        if self.embedding:
            return float((self.moment.matrix.double() * err.double().pow(2).sum(1)).sum())
        if self.in_axis == 0:  # stored (in, out): rows of the transpose meet the inputs
            err = err.T
        held = self.moment.matrix if self.moment.matrix is not None else self.moment.factor
        groups = held.shape[0]
        err = err.contiguous()
        e = err.reshape(groups, err.shape[0] // groups, -1)
        if self.moment.matrix is None:  # ||E F^T||^2 per group
            return float(torch.bmm(e, self.moment.factor.transpose(1, 2)).double().pow(2).sum())  # squares in float64
        return float(torch.einsum("god,gde,goe->", e, self.moment.matrix, e).double())


class Sensitivity:
    """Per-layer gains and moments, and the costs auto plans with; subclasses run the model
    (`measure`) and fill `moments` / `kinds` / `layers` / `specs`."""

    settings: SensitivitySettings
    input_mode: str
    seconds: float

    def __init__(self, specs: list[LayerSpec], settings: SensitivitySettings | None):
        self.settings = settings or SensitivitySettings()
        self.settings.validate()
        self.specs = {spec.name: spec for spec in specs}
        self.layers: dict[str, LayerSensitivity] = {}
        self.moments: dict[str, SecondMoment] = {}
        self.kinds: dict[str, str] = {}
        self.probe_count = self.settings.samples  # how many samples the probes run on (subclasses may use fewer)
        self.row_weights: dict[str, np.ndarray] = {}  # weight name -> MomentError.rows (folded input scales)

    def measure(self, swaps: dict[str, np.ndarray], holdout: bool = False, probe: bool = False) -> float:
        """Relative squared output error ||y - y_ref||^2 / ||y_ref||^2 with these weights swapped in, on
        the samples, the held-out ones, or (probe) the samples the probes run (settings.probe_samples)."""
        raise NotImplementedError

    def _set_moments(self, found: dict[str, Moments]) -> None:
        for name, acc in found.items():
            moment = acc.result()
            if moment is None:  # registered but never fed (a layer this forward does not use)
                self.layers[name].moments = "none"
            else:
                self.moments[name] = moment
        self.kinds = {name: x.moments for name, x in self.layers.items()}

    def moment_error(self, spec: LayerSpec) -> "MomentError | None":
        """This layer's E||(W - W_hat) x||^2 as a plain callable of W - W_hat (None without moments),
        so that candidate jobs score it from the decode they already made."""
        moment = self.moments.get(spec.name)
        if moment is None:
            return None
        return MomentError(moment, self.layers[spec.name].moments == "embedding", spec.in_axis,
                           self.row_weights.get(spec.name))

    def layer_error(self, spec: LayerSpec, cw: CompressedWeight) -> float | None:
        """E over the synthetic inputs of ||(W - W_hat) x||^2 for this layer (None without moments)."""
        error_of = self.moment_error(spec)
        if error_of is None:
            return None
        return error_of(np.asarray(spec.weight, np.float32) - methods.decode(cw).reshape(spec.shape))

    def calibrate(self, spec: LayerSpec, probe: CompressedWeight, probe_label: str,
                  layer_error: float | None = None) -> LayerSensitivity:
        """Measure the layer's gain with one probe candidate swapped in (layer_error: the probe's
        `layer_error`, when already computed)."""
        t0 = time.perf_counter()
        info = self.layers[spec.name]
        info.moments = self.kinds[spec.name]  # calibrating again (another budget) starts afresh
        decoded = methods.decode(probe).reshape(spec.shape)
        info.probe, info.probe_error = probe_label, self.measure({spec.name: decoded}, probe=True)
        info.probe_weight_error = methods.relative_error(spec.weight, probe)
        layer_err = self.layer_error(spec, probe) if layer_error is None else layer_error
        if info.moments != "none" and layer_err is not None and layer_err > 0:
            info.gain = info.probe_error / layer_err
        elif info.moments != "none":  # an exact probe says nothing about the gain: fall back
            info.moments = "none"
        if info.moments == "none":
            w = info.probe_weight_error
            info.gain = info.probe_error / w ** 2 if w and w > 0 else 0.0
        info.seconds = time.perf_counter() - t0
        return info

    def cost(self, spec: LayerSpec, cw: CompressedWeight, rel_error: float, layer_error: float | None = None) -> float:
        """Predicted relative squared output error this candidate adds (calibrate first; layer_error:
        the candidate's `layer_error`, when already computed)."""
        info = self.layers[spec.name]
        if info.gain is None:
            raise RuntimeError(f"{spec.name}: calibrate() before cost()")
        if info.moments == "none":
            return info.gain * rel_error ** 2
        return info.gain * (self.layer_error(spec, cw) if layer_error is None else layer_error)

    def plan_error(self, weights: dict[str, CompressedWeight]) -> float:
        """Measured relative squared output error of a whole plan on the held-out inputs."""
        swaps = {name: methods.decode(cw).reshape(self.specs[name].shape) for name, cw in weights.items()}
        return self.measure(swaps, holdout=True)

    def summary(self) -> dict:
        return {"inputs": self.input_mode, "samples": self.settings.samples, "holdout": self.settings.holdout,
                "probe_samples": self.probe_count,
                **({"inversion_steps": self.settings.inversion_steps} if self.input_mode == "bn_inversion" else {}),
                "seconds": round(self.seconds + sum(x.seconds for x in self.layers.values()), 3),
                "layers": {name: x.to_dict() for name, x in self.layers.items()}}


class TorchSensitivity(Sensitivity):
    """Sensitivities of the layers of one torch model (see the module docstring)."""

    def __init__(self, model: nn.Module, specs: list[LayerSpec], example_inputs=None, sampler=None,
                 settings: SensitivitySettings | None = None, input_model: nn.Module | None = None,
                 progress: bool = False, output_fn=None, inputs: tuple | None = None, row_weights=None):
        """input_model: the model whose statistics shape the synthetic inputs when it is not `model`
        itself (the user's model, whose BatchNorms were folded away in `model`). progress: a bar
        for the BatchNorm inversion (minutes on an ImageNet CNN). output_fn(outputs, *inputs): what
        the deployment uses of the model's outputs (e.g. a text encoder's masked mean pooling); the
        gains and plan errors compare that instead of the raw outputs (None: the raw outputs). inputs:
        (samples, how they were made) already drawn as `probe_inputs` draws them for these settings (the
        input scales' pass made them), instead of drawing them again. row_weights: weight name -> the
        squared factor per output row of a layer an input scale was folded into (`MomentError.rows`)."""
        super().__init__(specs, settings)
        self.row_weights = dict(row_weights or {})
        self.output_fn = output_fn
        s = self.settings
        t0 = time.perf_counter()
        self.model = shared_weights_copy(model).eval()  # probes swap tensors into its modules, never into the user's
        source = self.model if input_model is None else input_model
        self.inputs, self.input_mode = inputs if inputs is not None else probe_inputs(
            source, example_inputs, s.samples, s.seed, sampler, s.inversion_steps, progress)
        self.holdout, _ = probe_inputs(source, example_inputs, s.holdout, s.seed + 7919, sampler,
                                       s.inversion_steps, progress)
        self.tensors = {**dict(self.model.named_parameters(remove_duplicate=False)),
                        **dict(self.model.named_buffers(remove_duplicate=False))}
        self.holders = tensor_holders(self.model)
        self.chunk = forward_chunk(self.model, self.inputs)  # before the moments' hooks go on
        modules = dict(self.model.named_modules())
        found, handles = {}, []
        for spec in specs:
            module = modules.get(spec.module) if spec.module else None
            kind = self._moment_kind(spec, module)
            self.layers[spec.name] = LayerSensitivity(spec.name, kind)
            if kind != "none":
                found[spec.name] = Moments(s.max_vectors)
                handles.append(module.register_forward_hook(_ModuleHook(found[spec.name])))
        try:
            with torch.no_grad():
                self.reference = self._run(self.inputs, whole=True)  # the hooks see the batch as one
        finally:
            for h in handles:
                h.remove()
        if self.chunk < (_samples(self.inputs) or 0):
            with torch.no_grad():  # the probes run in chunks: so does the reference they are compared with
                self.reference = self._run(self.inputs)
        with torch.no_grad():  # the held-out set judges plans only: it adds nothing to the moments
            self.reference_holdout = self._run(self.holdout)
        self.probe_inputs, self.probe_reference = self.inputs, self.reference
        first = _first_samples(self.inputs, s.samples, s.probe_samples)
        if first is not None:
            with torch.no_grad():
                self.probe_inputs, self.probe_reference = first, self._run(first)
            self.probe_count = s.probe_samples
        self._set_moments(found)
        self.seconds = time.perf_counter() - t0
        log.info("sensitivity: %d layers, inputs %s, moments for %d, %.2f s", len(specs), self.input_mode,
                 len(self.moments), self.seconds)

    def _run(self, inputs: tuple, whole: bool = False) -> list:
        """The model's outputs on inputs (through output_fn when one was given), one per chunk of
        self.chunk samples (whole: one call). measure() sums its error terms over the chunks."""
        n = _samples(inputs)
        step = n if whole or n is None else self.chunk
        outs = []
        for i in range(0, n or 1, step or 1):
            part = inputs if n is None or step >= n else tuple(t[i:i + step] for t in inputs)
            out = self.model(*part)
            outs.append(out if self.output_fn is None else self.output_fn(out, *part))
        return outs

    def _moment_kind(self, spec: LayerSpec, module) -> str:
        if spec.name not in self.tensors or module is None or getattr(module, "weight", None) is not self.tensors[spec.name]:
            return "none"
        if isinstance(module, nn.Linear) and spec.in_axis == 1:
            return "linear"
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and spec.in_axis == 1:
            return "conv"
        if isinstance(module, nn.Embedding):
            return "embedding"
        return "none"

    def measure(self, swaps: dict[str, np.ndarray], holdout: bool = False, probe: bool = False) -> float:
        """Relative squared output error ||y - y_ref||^2 / ||y_ref||^2 with these weights swapped in."""
        inputs, reference = ((self.holdout, self.reference_holdout) if holdout else
                             (self.probe_inputs, self.probe_reference) if probe else (self.inputs, self.reference))
        saved = []
        try:
            with torch.no_grad():
                for name, value in swaps.items():
                    self._put(name, _as_parameter_like(self.tensors[name], _swap_tensor(self.tensors[name], value)),
                              saved)
                out = self._run(inputs)
        finally:
            _restore(saved)
        return _relative_squared_error(reference, out)

    def plan_error(self, weights: dict[str, CompressedWeight]) -> float:
        """Measured relative squared output error of a whole plan on the held-out inputs: each pick
        decoded when a module that holds its weight runs and dropped when it returns (a whole plan's
        decodes were a model-sized copy at the end of auto). Between those calls the weight is an
        `_Absent` placeholder, so a read anywhere else raises, and the plan is measured with every pick
        decoded at once instead: the same value either way."""
        saved, hooks = [], []
        owner = {id(table): m for m in self.model.modules() for table in (m._parameters, m._buffers)}
        try:
            with torch.no_grad():
                for name, cw in weights.items():
                    t = self.tensors[name]
                    placeholder = torch.Tensor._make_subclass(_Absent, torch.empty_strided(
                        t.size(), t.stride(), dtype=t.dtype, device="meta"))
                    self._put(name, placeholder, saved)
                    by_module: dict[int, list] = {}
                    for table, key in self.holders[id(t)]:
                        by_module.setdefault(id(owner[id(table)]), []).append((table, key))
                    for entries in by_module.values():
                        module = owner[id(entries[0][0])]
                        swap = _DecodeDuringCall(entries, placeholder, t, cw, self.specs[name].shape)
                        hooks += [module.register_forward_pre_hook(swap.enter),
                                  module.register_forward_hook(swap.leave)]
                return _relative_squared_error(self.reference_holdout, self._run(self.holdout))
        except Exception as exc:  # noqa: BLE001 - e.g. read outside its modules' calls: measured the plain way
            log.debug("plan error with one pick decoded at a time raised %s: %s; decoding the plan at once",
                      type(exc).__name__, exc)
        finally:
            for hook in hooks:
                hook.remove()
            _restore(saved)
        return super().plan_error(weights)

    def _put(self, name: str, new: torch.Tensor, saved: list) -> None:
        """new in every module attribute that holds the weight `name` (tied weights), the old ones in saved."""
        for table, key in self.holders[id(self.tensors[name])]:
            saved.append((table, key, table[key]))
            table[key] = new


class _Absent(torch.Tensor):
    """Stands for a pick's weight outside the calls of the modules that hold it: any use raises
    (a meta tensor would not: F.linear of a CPU input and a meta weight returns garbage)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", func)
        raise LookupError(f"a plan's weight was read outside the modules that hold it ({name})")


class _DecodeDuringCall:
    """Forward hooks of one module holding a pick's weight (entries: its (table, key) pairs): the decode
    goes in when the module is called, the `_Absent` placeholder back when it returns."""

    def __init__(self, entries: list, placeholder: torch.Tensor, original: torch.Tensor, cw: CompressedWeight, shape):
        self.entries, self.placeholder, self.original, self.cw, self.shape = entries, placeholder, original, cw, shape

    def enter(self, module, args):
        decoded = methods.decode(self.cw).reshape(self.shape)
        new = _as_parameter_like(self.original, _swap_tensor(self.original, decoded))
        for table, key in self.entries:
            table[key] = new

    def leave(self, module, args, output):
        for table, key in self.entries:
            table[key] = self.placeholder


def _as_parameter_like(t: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new


def _restore(saved: list) -> None:
    for table, key, old in reversed(saved):
        table[key] = old


def _relative_squared_error(reference: list, out: list) -> float:
    num = den = 0.0
    for ref_part, out_part in zip(reference, out, strict=True):
        a, b = squared_error_terms(ref_part, out_part)
        num, den = num + a, den + b
    return num / den if den > 0 else num


def _swap_tensor(t: torch.Tensor, value) -> torch.Tensor:
    """A tensor of t's dtype, device and strides (the same kernels run) holding value: the value's
    own float32 memory where it already has that layout and torch's 64-byte alignment (a kernel's path
    may depend on the alignment; a whole plan's decodes are not held twice)."""
    array = np.asarray(value)
    if (array.dtype == np.float32 and t.dtype == torch.float32 and t.device.type == "cpu" and array.size == t.numel()
            and array.ctypes.data % methods.ALIGNMENT == 0):
        view = read_only_tensor(array).reshape(t.shape)  # the probes only read the swapped-in weights
        if view.stride() == t.stride():
            return view
    new = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    new.copy_(torch.from_numpy(np.asarray(value, np.float32)).reshape(t.shape))
    return new


def shared_weights_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the model's own tensors (not copies):
    the probes replace whole tensors in the copy's modules and never write into one, so the user's
    model is untouched while its weights are held once (a deep copy held the whole model again)."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, shared)


def tensor_holders(model: nn.Module) -> dict[int, list[tuple[dict, str]]]:
    """id(tensor) -> every (module._parameters or module._buffers, key) that holds it."""
    holders: dict[int, list[tuple[dict, str]]] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is not None:
                    holders.setdefault(id(t), []).append((table, key))
    return holders


def _samples(inputs: tuple) -> int | None:
    """The number of samples when every input is a (samples, ...) tensor, else None (not cut)."""
    sizes = {t.shape[0] if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in inputs}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def forward_chunk(model: nn.Module, inputs: tuple) -> int:
    """Samples per forward call of the probes: as many as keep every module's output within
    FORWARD_CHUNK_BYTES. A larger tensor is mapped and unmapped by the allocator on every call
    (glibc maps blocks above 32 MB afresh each time): 16 images through EfficientNet-Lite2 took
    0.8-1.1 s per forward that way, 0.41 s four at a time, 0.34 s two at a time."""
    from riem_compiler.passes.synthetic_inputs import leaf_output_bytes

    n = _samples(inputs)
    if n is None:
        return 1
    largest = max(leaf_output_bytes(model, inputs), default=0)
    return max(1, min(n, FORWARD_CHUNK_BYTES // max(largest, 1)))


class OnnxSensitivity(Sensitivity):
    """Sensitivities of the layers of an ONNX model, run by onnxruntime: the compressible
    initializers become overridable graph inputs (swapped by feeding them) and the layers' input
    activations extra graph outputs (for the moments). Float graph inputs get standard Gaussian
    samples; the batch axis is the first symbolic one (a fixed batch is run repeatedly)."""

    def __init__(self, model, specs: list[LayerSpec], settings: SensitivitySettings | None = None):
        import onnx
        import onnxruntime as ort
        from onnx import helper

        super().__init__(specs, settings)
        s = self.settings
        t0 = time.perf_counter()
        graph = model.graph
        initializers = {t.name: t for t in graph.initializer}
        outside = [spec.name for spec in specs if spec.name not in initializers]
        if outside:
            raise InputError(f"sensitivity='output' on ONNX needs every layer's weight as a main-graph initializer; "
                             f"{outside[:3]} are not")
        feeds = [i for i in graph.input if i.name not in initializers]
        self.inputs = self._gaussian(feeds, s.samples, s.seed)
        self.holdout = self._gaussian(feeds, s.holdout, s.seed + 7919)
        self.input_mode = "gaussian"
        self.dtypes = {name: helper.tensor_dtype_to_np_dtype(initializers[name].data_type) for name in self.specs}
        work = onnx.ModelProto()
        work.CopyFrom(model)
        for spec in specs:
            t = initializers[spec.name]
            work.graph.input.append(helper.make_tensor_value_info(spec.name, t.data_type, list(t.dims)))
        taps = {}  # layer name -> (activation tensor name, how to read it)
        producers = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        users: dict[str, list] = {}  # tensor name -> the nodes that read it
        for node in graph.node:
            for name in dict.fromkeys(node.input):
                users.setdefault(name, []).append(node)
        for spec in specs:
            tap = self._tap(spec, users.get(spec.name, []))
            kind = "none" if tap is None or tap[0] not in producers else tap[1]
            self.layers[spec.name] = LayerSensitivity(spec.name, kind if kind == "none" else kind.split(":")[0])
            if kind != "none":
                taps[spec.name] = tap
        n_out = len(graph.output)
        extra = sorted({tap[0] for tap in taps.values()} - {o.name for o in graph.output})
        for name in extra:
            work.graph.output.append(helper.make_empty_tensor_value_info(name))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(work.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in work.graph.output]
        self.n_out = n_out
        found = {name: Moments(s.max_vectors) for name in taps}
        self.reference = []
        for batch in self.inputs:
            out = dict(zip(self.output_names, self.session.run(None, batch)))
            self.reference.append([out[o.name] for o in graph.output])
            for name, (act, kind, spec_attrs) in taps.items():
                self._add(found[name], torch.from_numpy(np.asarray(out[act])), kind, spec_attrs)
        self.reference_holdout = [self.session.run(self.output_names[:n_out], batch) for batch in self.holdout]
        self._set_moments(found)
        self.seconds = time.perf_counter() - t0
        log.info("sensitivity (onnxruntime): %d layers, moments for %d, %.2f s", len(specs), len(self.moments),
                 self.seconds)

    @staticmethod
    def _gaussian(feeds, n: int, seed: int) -> list[dict]:
        """Batches of standard Gaussian inputs, n samples in all."""
        from onnx import helper

        gen = torch.Generator().manual_seed(seed)
        shapes, batch_axis = {}, {}
        for i in feeds:
            dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            if not np.issubdtype(dtype, np.floating):
                raise InputError(f"sensitivity='output' on ONNX draws float inputs only; input {i.name!r} is "
                                 f"{dtype}: use sensitivity='weight' or a torch model with an input_sampler")
            dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
            symbolic = [k for k, d in enumerate(dims) if d is None]
            if len(symbolic) > 1:
                raise InputError(f"sensitivity='output' on ONNX needs input shapes with at most one symbolic "
                                 f"(batch) axis; {i.name!r} has {dims}")
            shapes[i.name], batch_axis[i.name] = (dims, dtype), (symbolic[0] if symbolic else None)
        # a fixed-size input (no symbolic axis) fixes how many samples one run holds: its first axis
        fixed = [dims[0] for name, (dims, _) in shapes.items() if batch_axis[name] is None and dims and dims[0]]
        per_batch = min(fixed[0], n) if fixed else n
        batches, done = [], 0
        while done < n:
            batch = {}
            for name, (dims, dtype) in shapes.items():
                axis = batch_axis[name]
                shape = [per_batch if k == axis else d for k, d in enumerate(dims)]
                batch[name] = torch.randn(shape, generator=gen).numpy().astype(dtype)
            batches.append(batch)
            done += per_batch
        return batches

    @staticmethod
    def _tap(spec: LayerSpec, users: list):
        """(activation name, how to read it, attrs) for a layer whose one node (of `users`, the
        nodes that read the weight) reads it directly."""
        if len(users) != 1 or spec.attrs.get("chain"):
            return None
        node = users[0]
        attrs = {a.name: onnx_attr(a) for a in node.attribute}
        operand = list(node.input).index(spec.name)
        if node.op_type == "Gather" and operand == 0:
            return node.input[1], "embedding", {"rows": spec.shape[0]}
        if node.op_type == "MatMul":
            return node.input[1 - operand], f"linear:{'rows' if operand == 1 else 'cols'}", {}
        if node.op_type == "Gemm" and operand == 1 and not attrs.get("transA", 0):
            return node.input[0], "linear:rows", {}
        if node.op_type == "Conv" and operand == 1 and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"):
            k = len(spec.shape) - 2
            pads = list(attrs.get("pads", [0] * 2 * k))
            torch_pad = [p for axis in reversed(range(k)) for p in (pads[axis], pads[axis + k])]
            return node.input[0], "conv", {"kernel": spec.shape[2:], "stride": attrs.get("strides", [1] * k),
                                           "dilation": attrs.get("dilations", [1] * k), "pad": torch_pad,
                                           "groups": attrs.get("group", 1)}
        return None

    @staticmethod
    def _add(acc: Moments, x: torch.Tensor, kind: str, a: dict) -> None:
        if kind == "embedding":
            acc.add_ids(x, a["rows"])
        elif kind == "linear:rows":
            acc.add(x.float().reshape(-1, x.shape[-1])[None])
        elif kind == "linear:cols":
            acc.add(x.float().transpose(-1, -2).reshape(-1, x.shape[-2])[None])
        else:
            acc.add_conv(x.float(), a["kernel"], a["stride"], a["dilation"], a["pad"], a["groups"])

    def measure(self, swaps: dict[str, np.ndarray], holdout: bool = False, probe: bool = False) -> float:
        # probes run on every sample: the batches are fixed-size, and onnxruntime's passes are cheap
        weights = {name: np.asarray(value).reshape(self.specs[name].shape).astype(self.dtypes[name])
                   for name, value in swaps.items()}
        num = den = 0.0
        for batch, ref in zip(self.holdout if holdout else self.inputs,
                              self.reference_holdout if holdout else self.reference):
            out = self.session.run(self.output_names[:self.n_out], {**batch, **weights})
            terms = squared_error_terms([torch.from_numpy(np.asarray(r)) for r in ref],
                                        [torch.from_numpy(np.asarray(o)) for o in out])
            num, den = num + terms[0], den + terms[1]
        return num / den if den > 0 else num


def onnx_attr(a):
    from onnx import helper

    value = helper.get_attribute_value(a)
    return value.decode() if isinstance(value, bytes) else value
