"""Public entry points: `optimize` (frontend -> pass -> rewritten model + report) and `load`."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from riem_compiler import __version__
from riem_compiler.compressed import CompressedWeight
from riem_compiler.config import Config
from riem_compiler.errors import InputError
from riem_compiler.files import atomic_write
from riem_compiler.heap import release_freed_heap
from riem_compiler.metrics import output_error
from riem_compiler.frontend.layers import LayerSpec
from riem_compiler.passes.compress import compress_specs
from riem_compiler.report import LayerRecord, Report

log = logging.getLogger("riem_compiler")

ARTIFACT_FORMAT = "riem-artifact"
ARTIFACT_VERSION = 1


@dataclass
class Result:
    """What `optimize` returns. `model` is the same kind as the input (nn.Module or onnx.ModelProto)."""

    model: object
    report: Report
    compressed: dict[str, CompressedWeight]
    specs: list[LayerSpec]
    config: Config
    source: str  # "torch" | "onnx"
    example_inputs: tuple | None = None
    original: object = field(default=None, repr=False)
    # the float model that was compressed: `original` after BatchNorm folding / equalisation (the same
    # outputs, the structure of `model`); refinement compares layer outputs against it
    prepared: object = field(default=None, repr=False)

    def save(self, directory) -> Path:
        """Compact artifact: compressed.safetensors (+ rest.safetensors for torch, model.onnx for
        ONNX) and manifest.json; no pickle."""
        return save_artifact(self, directory)

    def export_onnx(self, path, materialize: bool = False, onnx_format: str | None = None) -> Path:
        """onnx_format: None takes config.onnx_format; the report's layer settings then say which
        form each layer got ("onnx_form", and "onnx_note" for one that kept the function form)."""
        from riem_compiler.codegen.onnx_export import export_result_onnx

        return Path(export_result_onnx(self, path, materialize=materialize, onnx_format=onnx_format))

    def build_tvm(self, directory, target: str = "llvm", tune_trials: int = 0, **kwargs) -> Path:
        from riem_compiler.codegen.tvm_build import build_tvm

        return Path(build_tvm(self, directory, target=target, tune_trials=tune_trials, **kwargs))


def _is_onnx_input(graph) -> bool:
    if isinstance(graph, (str, os.PathLike)):
        return True
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        return False
    return isinstance(graph, onnx.ModelProto)


def optimize(graph, example_inputs=None, config: Config | None = None, input_sampler=None, output_fn=None,
             **options) -> Result:
    """Compress the linear/conv weights of `graph` without data.

    graph: nn.Module | torch.fx.GraphModule | torch.export.ExportedProgram | onnx.ModelProto | path to .onnx.
    Options are the fields of `Config` (ratio, method, state_bits, ...), or pass `config=`.
    input_sampler: (n, torch.Generator) -> tuple of n synthetic model inputs; used instead of inputs
    drawn from example_inputs' shapes by auto's sensitivity and by refinement (e.g. token ids).
    output_fn: (outputs, *inputs) -> what the deployment uses of the model's outputs (torch models,
    e.g. a sentence encoder's masked mean pooling); auto's output sensitivity compares that instead of
    the raw outputs, so padding positions and unused outputs cost nothing.
    """
    cfg = Config.from_kwargs(config, **options)
    if output_fn is not None and not callable(output_fn):
        raise InputError(f"output_fn must be a callable (outputs, *inputs) -> tensors; got {type(output_fn).__name__}")
    try:
        if _is_onnx_input(graph):
            if output_fn is not None:
                raise InputError("output_fn works on PyTorch models; for ONNX input drop it (the sensitivity "
                                 "compares the graph's outputs)")
            return _optimize_onnx(graph, cfg)
        return _optimize_torch(graph, example_inputs, cfg, input_sampler, output_fn)
    finally:
        # the fits', decodes' and checks' freed temporaries stay resident in glibc's heap otherwise: measured
        # after optimize returned, auto on 1b-decoder x1 +282 -> +140 MB, on MiniLM +261 -> +135 MB, on the
        # 7b-decoder x1 block +496 -> +256 MB (benchmarks/compress_time.py's ladder models)
        release_freed_heap()


def _skipped_records(skipped: list[tuple[LayerSpec | str, str]],
                     tensors: dict[str, tuple[tuple, int]]) -> list[LayerRecord]:
    """Records for what the frontend saw but will not compress (a spec, or just a name); a name
    gets its real shape and bytes from `tensors` (name -> (shape, nbytes)) so totals stay honest."""
    records = []
    for item, reason in skipped:
        if isinstance(item, LayerSpec):  # its real bytes where known (an ONNX float16 table holds half)
            nbytes = tensors.get(item.name, ((), item.fp32_bytes))[1]
            records.append(LayerRecord(item.name, item.kind, item.shape, "-", "skipped", nbytes, nbytes,
                                       reason=reason))
        else:
            shape, nbytes = tensors.get(item, ((), 0))
            records.append(LayerRecord(item, "-", tuple(shape), "-", "skipped", nbytes, nbytes, reason=reason))
    return records


def torch_tensors(model: torch.nn.Module) -> dict[str, tuple[tuple, int]]:
    """name -> (shape, bytes) of every parameter and buffer (tied tensors under each name)."""
    return {n: (tuple(t.shape), t.numel() * t.element_size())
            for n, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}


def torch_model_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied weights are one tensor)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if isinstance(t, torch.Tensor) and t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def sensitivity_settings(cfg: Config):
    """The SensitivitySettings that cfg's sensitivity_* options and seed give (benchmarks that build
    a sensitivity themselves use it, so that their auto rows run the defaults)."""
    from riem_compiler.passes.sensitivity import SensitivitySettings

    return SensitivitySettings(samples=cfg.sensitivity_samples, holdout=max(1, cfg.sensitivity_samples // 4),
                               seed=cfg.seed, inversion_steps=cfg.sensitivity_inversion_steps,
                               probe_samples=max(1, cfg.sensitivity_samples // 2))


def _sensitivity(cfg: Config, make):
    """auto's output sensitivity, make(SensitivitySettings), or None when the config does not ask
    for it or it cannot be made (then with a warning: auto plans on weight error)."""
    if cfg.method != "auto" or cfg.sensitivity != "output":
        return None
    try:
        return make(sensitivity_settings(cfg))
    except InputError as exc:
        log.warning("auto: no output sensitivity (%s); planning on weight error instead", exc)
        return None


def _torch_sensitivity(model, specs, example_inputs, input_sampler, cfg: Config, input_model=None, output_fn=None,
                       inputs=None, row_weights=None):
    """`_sensitivity` of a torch model; synthetic inputs come from input_model (the user's model,
    before BatchNorm folding), or are `inputs` (made the same way by the input scales' pass);
    output_fn: see `optimize`."""
    def make(settings):
        from riem_compiler.passes.sensitivity import TorchSensitivity

        if example_inputs is None and input_sampler is None:
            raise InputError("sensitivity='output' needs example_inputs or an input_sampler")
        return TorchSensitivity(model, specs, example_inputs, input_sampler, settings, input_model,
                                progress=not cfg.quiet, output_fn=output_fn, inputs=inputs, row_weights=row_weights)

    return _sensitivity(cfg, make)


def _onnx_sensitivity(model, specs, cfg: Config):
    """`_sensitivity` of an ONNX model, run by onnxruntime on Gaussian inputs."""
    def make(settings):
        from riem_compiler.passes.sensitivity import OnnxSensitivity

        return OnnxSensitivity(model, specs, settings)

    return _sensitivity(cfg, make)


def _reference_outputs(model: torch.nn.Module, example_inputs: tuple):
    """The model's outputs on the example inputs (the output check's reference), run before any work:
    inputs the model cannot take fail here with a one-line error, not after every fit in torch."""
    try:
        with torch.no_grad():
            return model(*example_inputs)
    except Exception as exc:  # noqa: BLE001 - whatever the model's forward raises on these inputs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"example_inputs do not run through the model ({type(exc).__name__}: {first}); pass a "
                         f"tuple of the inputs its forward takes") from None


def _optimize_torch(graph, example_inputs, cfg: Config, input_sampler=None, output_fn=None) -> Result:
    from riem_compiler.frontend.torch_frontend import as_module, find_torch_layers
    from riem_compiler.passes import input_scales
    from riem_compiler.passes.preprocess import correct_biases, prepare_torch
    from riem_compiler.passes.rewrite_torch import apply_compressed, decoding_per_call

    model = as_module(graph)
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    reference = None if example_inputs is None else _reference_outputs(model, example_inputs)
    prepared = prepare_torch(model, example_inputs, cfg, input_sampler)
    det = find_torch_layers(prepared.model, cfg)
    tensors, total = torch_tensors(model), torch_model_bytes(model)
    if not det.layers:
        log.warning("nothing to compress in %s: no Linear/Conv/MatMul weight passed the filters; "
                    "the model is returned unchanged", type(model).__name__)
        return Result(model, Report(_skipped_records(det.skipped, tensors), model_bytes_before=total), {}, [], cfg,
                      "torch", example_inputs, model)
    plan: dict = {}
    sensitivity = _torch_sensitivity(prepared.model, det.layers, example_inputs, input_sampler, cfg, model, output_fn,
                                     prepared.synthetic, prepared.row_weights)
    compressed, records = compress_specs(det.layers, input_scales.within_budget(cfg, prepared.model, det.layers),
                                         sensitivity=sensitivity, plan=plan)
    new_model = (apply_compressed(prepared.model, det.layers, compressed, det.graph_module, cfg.recompute)
                 if compressed else model)
    if "input_scales" in prepared.record:
        input_scales.settle(prepared.record["input_scales"], new_model if compressed else None, det.layers, compressed,
                            records)
    report = Report(records + _skipped_records(det.skipped, tensors), model_bytes_before=total,
                    preprocess=prepared.record or None, auto=plan or None)
    corrected = correct_biases(prepared, new_model, det.layers, compressed) if cfg.bias_correction and compressed else None
    if corrected is not None:
        report.preprocess = {**(report.preprocess or {}), "bias_correction": corrected}
    if example_inputs is not None and compressed:
        with decoding_per_call(), torch.no_grad():  # the result stays compact until it is run
            report.output_error = output_error(reference, new_model(*example_inputs))
    if not compressed:
        log.warning("no layer was compressed; the model is returned unchanged (see the report)")
    result = Result(new_model, report, compressed, det.layers, cfg, "torch", example_inputs, model,
                    prepared.model)
    if cfg.refine and compressed:
        if example_inputs is None:
            raise InputError("refine=True needs example_inputs (their shapes seed the synthetic inputs)")
        from riem_compiler.passes.refine import RefineSettings, refine_result

        _, outcome = refine_result(result, RefineSettings(steps=cfg.refine_steps, seed=cfg.seed,
                                                          input_sampler=input_sampler))
        result.report.refine = outcome.to_dict()
    return result


def _optimize_onnx(graph, cfg: Config) -> Result:
    from riem_compiler.codegen.onnx_rewrite import rewrite_onnx
    from riem_compiler.frontend.onnx_frontend import find_onnx_layers, load_onnx, tensor_sizes

    model = original = load_onnx(graph)
    tensors = tensor_sizes(model)
    total = sum(nbytes for _, nbytes in tensors.values())
    preprocess = None
    if cfg.input_scales:
        raise InputError("input_scales works on PyTorch models (the scale becomes part of the layer's module); for "
                         "ONNX input set input_scales=0")
    if cfg.equalize or cfg.dead_channels:
        raise InputError("equalize and dead_channels work on PyTorch models; for ONNX input only fold_batchnorm "
                         "(and no bias correction) is available (drop those options)")
    if cfg.fold_batchnorm:
        from riem_compiler.passes.batchnorm_onnx import fold_batchnorm_onnx

        model, fold = fold_batchnorm_onnx(model)
        preprocess = {"batchnorm": fold} if fold["folded"] or fold["kept"] else None
        if fold["folded"] and cfg.bias_correction:  # the default; dfq's statistics walk a torch graph
            preprocess["bias_correction"] = {"corrected": [], "skipped": [
                ["*", "ONNX input: bias correction runs on PyTorch models only (compress the torch model for it)"]]}
    specs, skipped = find_onnx_layers(model, cfg)
    if not specs:
        log.warning("nothing to compress in the ONNX model; it is returned unchanged")
        return Result(original, Report(_skipped_records(skipped, tensors), model_bytes_before=total), {}, [], cfg,
                      "onnx", None, original)
    plan: dict = {}
    compressed, records = compress_specs(specs, cfg, sensitivity=_onnx_sensitivity(model, specs, cfg), plan=plan)
    new_model = rewrite_onnx(model, specs, compressed, cfg.onnx_format) if compressed else model
    report = Report(records + _skipped_records(skipped, tensors), model_bytes_before=total, preprocess=preprocess,
                    auto=plan or None)
    if compressed and cfg.onnx_format != "functions":
        from riem_compiler.codegen.onnx_export import record_onnx_forms

        record_onnx_forms(report, new_model)
    return Result(new_model, report, compressed, specs, cfg, "onnx", None, original, model)


# ----------------------------------------------------------------------------- artifacts

def save_artifact(res: Result, directory) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {f"{name}::{key}": np.ascontiguousarray(arr)
              for name, cw in res.compressed.items() for key, arr in cw.arrays.items()}
    atomic_write(out / "compressed.safetensors", lambda p: save_file(arrays, str(p)))
    manifest = {
        "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "riem_compiler": __version__,
        "source": res.source, "config": res.config.to_dict(),
        "layers": [{"name": s.name, "module": s.module, "kind": s.kind, "attrs": s.attrs,
                    "method": res.compressed[s.name].method, "shape": list(res.compressed[s.name].shape),
                    "meta": res.compressed[s.name].meta, "arrays": sorted(res.compressed[s.name].arrays)}
                   for s in res.specs if s.name in res.compressed],
        "report": res.report.to_dict(),
    }
    if res.source == "torch":
        from riem_compiler.passes.rewrite_torch import RieMWeight

        riem_buffers = {f"{n}.{b}" if n else b for n, mod in res.model.named_modules()
                        if isinstance(mod, RieMWeight) for b, _ in mod.named_buffers(recurse=False)}
        rest = {k: v.detach().cpu().contiguous().numpy() for k, v in res.model.state_dict().items()
                if k not in riem_buffers}
        atomic_write(out / "rest.safetensors", lambda p: save_file(rest, str(p)))
    else:
        import onnx

        atomic_write(out / "model.onnx", lambda p: onnx.save_model(res.model, str(p)))
    atomic_write(out / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    log.info("saved artifact to %s (%d compressed layers)", out, len(res.compressed))
    return out


def read_artifact(directory) -> tuple[dict, dict[str, CompressedWeight]]:
    d = Path(directory)
    manifest_path = d / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{d}: no manifest.json; expected a directory written by Result.save or build_tvm")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise InputError(f"{manifest_path}: format {manifest.get('format')!r} is not {ARTIFACT_FORMAT!r}")
    tensors = load_file(str(d / "compressed.safetensors"))
    compressed = {
        layer["name"]: CompressedWeight(layer["method"], tuple(layer["shape"]), layer["meta"],
                                        {k: tensors[f"{layer['name']}::{k}"] for k in layer["arrays"]})
        for layer in manifest["layers"]
    }
    return manifest, compressed


def load(path, device: str = "cpu", model=None, fast_start: bool = True):
    """Load an artifact as a callable model.

    - a directory from `Result.save` of a torch model: pass `model=` a fresh instance of the
      original architecture (the artifact holds weights, not code); returns the compressed nn.Module.
    - a directory from `Result.save` of an ONNX model, or a .onnx file: an onnxruntime callable.
      fast_start (default): weights stored as decoder functions are decoded here and given to
      onnxruntime as plain initializers, which opens much faster and in far less memory than
      letting onnxruntime fold the decoders; fast_start=False runs the file's own decoders.
    - a directory from `Result.build_tvm`: the TVM module (decoded once at load).
    A compressed weight that decodes to NaN or inf (a damaged or edited record: safetensors,
    manifest, or the ONNX file's record) is refused with an InputError naming the layer.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".onnx":
        return _load_onnx_file(p, device, fast_start)
    manifest_path = p / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{p}: not a riem_compiler artifact (no manifest.json) and not a .onnx file")
    fmt = json.loads(manifest_path.read_text()).get("format")
    if fmt == "riem-tvm":
        from riem_compiler.codegen.tvm_runtime import load_tvm

        return load_tvm(p, device=device)
    manifest, compressed = read_artifact(p)
    if manifest["source"] == "onnx":
        return _load_onnx_file(p / "model.onnx", device, fast_start)
    if model is None:
        raise InputError(f"{p} holds the weights of a PyTorch model, not its code: call "
                         "riem_compiler.load(path, model=<fresh instance of the original model>)")
    return _rebuild_torch(p, manifest, compressed, model, device)


def _load_onnx_file(path: Path, device: str, fast_start: bool):
    """onnxruntime callable of a .onnx file whose compressed weights all decode to finite values
    (fast start checks the ones it decodes; the others are decoded here once to check)."""
    from riem_compiler.codegen.onnx_fast_load import check_record_finite
    from riem_compiler.codegen.ort_runner import OnnxRuntimeModel

    check_record_finite(path, skip_function_form=fast_start)
    return OnnxRuntimeModel(path, device=device, fast_start=fast_start)


def _check_decoded(path: Path, module) -> None:
    """Decode every compressed weight of a rebuilt torch model once (kept as its cache unless it
    recomputes), and refuse one that is not finite: a damaged or edited artifact record (a NaN scale
    or zero point) would otherwise load and make the model output NaN."""
    from riem_compiler.passes.rewrite_torch import RieMWeight

    for mod in module.modules():
        if not isinstance(mod, RieMWeight):
            continue
        with torch.no_grad():
            try:
                weight = mod.decode()
            except Exception as exc:
                text = str(exc).strip().splitlines()
                raise InputError(f"{path}: layer {mod.param_name!r} cannot be decoded from the artifact "
                                 f"({type(exc).__name__}: {text[0] if text else ''}); compress the original "
                                 "model again or restore the artifact") from None
        if not bool(torch.isfinite(weight).all()):
            raise InputError(f"{path}: layer {mod.param_name!r} decodes to NaN or infinite weights (its arrays in "
                             "compressed.safetensors or its meta in manifest.json are damaged or were edited); "
                             "compress the original model again or restore the artifact")
        if not mod.recompute:
            mod._cache = weight


def _rebuild_torch(path: Path, manifest: dict, compressed: dict[str, CompressedWeight], model, device):
    from riem_compiler.frontend.torch_frontend import as_module, find_torch_layers
    from riem_compiler.passes.preprocess import replay_structure
    from riem_compiler.passes.rewrite_torch import apply_compressed

    cfg = Config(**{**manifest["config"], "quiet": True})
    module = replay_structure(as_module(model), manifest.get("report", {}).get("preprocess"))
    det = find_torch_layers(module, Config(min_weight_size=0, quiet=True, compress_embeddings=True))
    specs = [s for s in det.layers if s.name in compressed]
    missing = sorted(set(compressed) - {s.name for s in specs})
    if missing:
        raise InputError(f"{path}: the model given to load() has no layers named {missing[:5]}; "
                         "pass an instance of the same architecture that was compressed")
    for s in specs:
        if tuple(s.shape) != tuple(compressed[s.name].shape):
            raise InputError(f"{path}: layer {s.name} has shape {s.shape} in the given model but "
                             f"{compressed[s.name].shape} in the artifact")
    rebuilt = apply_compressed(module, specs, compressed, det.graph_module, cfg.recompute)
    rest = {k: torch.from_numpy(v) for k, v in load_file(str(path / "rest.safetensors")).items()}
    _, unexpected = rebuilt.load_state_dict(rest, strict=False)  # RieM buffers came with apply_compressed
    if unexpected:
        raise InputError(f"{path}: artifact has weights {unexpected[:5]} the given model does not have")
    rebuilt = rebuilt.to(device).eval()
    _check_decoded(path, rebuilt)
    return rebuilt
