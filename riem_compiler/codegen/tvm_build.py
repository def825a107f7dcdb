"""Build a TVM artifact from an `optimize` Result: Relax module, RieM kernels, tuning, export.

Route: the materialised model (plain Linear/Conv, parameter names unchanged) goes through
`torch.export` and `relax.frontend.torch.from_exported_program(keep_params_as_input=True)`,
so every weight is a parameter of `main` and nothing is folded into the library. Then:

- decode-once (default): a Relax function `decode` maps the compact arrays of every RieM
  weight to its dense weight through one `call_tir` kernel each (tvm_kernels); the runtime
  calls it once at load and feeds the results to `main` as ordinary parameters, so inference
  runs plain dense/conv kernels. Reconstruction costs K*m sigmoids per weight element (~100x a
  multiply-add), so recomputing it per call only pays where memory is the constraint.
- fused: `main` takes the compact arrays; each linear layer's matmul becomes one kernel that
  reconstructs W a tile of rows at a time; other compressed weights (conv) are reconstructed
  per call inside `main` into a transient buffer.

Targets are JSON dicts (TVM 0.27). CPU: LLVM; before legalization gelu/exp/softmax become their
polynomial forms; in decode-once mode `LiftTransformParams` moves weight transposes into
`main_transform_params`, which the runtime runs once at load (so matmuls read W^T in the NN
layout); then default schedules that are good without tuning (tvm_schedules: register-tiled
matmul and conv with fused epilogues, vectorised elementwise kernels; the RieM hand schedule;
dlight CPU rules for the rest). MetaSchedule when tune_trials > 0, optionally on the
`tune_tasks` heaviest per-call tasks only (database kept under tuning/ and reused); its records
take precedence over the default schedules. CUDA: dlight default GPU schedules;
the library embeds CUDA source and compiles on the GPU machine at load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from riem_compiler.compressed import CompressedWeight
from riem_compiler.codegen import tvm_kernels as tk
from riem_compiler.codegen import tvm_schedules as ts

log = logging.getLogger("riem_compiler.tvm_build")

FORMAT = "riem-tvm"
FORMAT_VERSION = 1
MODES = ("decode-once", "fused")
TARGETS = ("llvm", "cuda")
LIB_NAME = "model.so"
PARAMS_NAME = "params.safetensors"
MANIFEST_NAME = "manifest.json"
TUNING_DIR = "tuning"
CUDA_SOURCE_NAME = "cuda_source.cu"
LIFTED_NAME = "main_transform_params"  # what relax.transform.LiftTransformParams names it


@dataclass
class TvmBuildOptions:
    """Options of `build_tvm` (validated at the boundary)."""

    target: str = "llvm"
    tune_trials: int = 0
    mode: str = "decode-once"
    arch: str = "sm_80"
    mcpu: str | None = None  # llvm: None = this machine's CPU
    num_cores: int | None = None  # llvm: None = os.cpu_count()
    tuning_db: str | None = None  # existing MetaSchedule database dir to reuse
    max_trials_per_task: int | None = None
    tune_tasks: int | None = None  # tune only the N heaviest tasks (by FLOPs); None = all
    cpu_schedules: bool = True  # llvm: hand schedules for matmul/elementwise kernels (tvm_schedules)
    lift_params: bool = True  # decode-once: weight layout changes (transposes) run once at load

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if int(self.tune_trials) < 0:
            raise ValueError(f"tune_trials must be >= 0, got {self.tune_trials}")
        if self.target == "cuda" and not self.arch.startswith("sm_"):
            raise ValueError(f"arch must look like 'sm_80', got {self.arch!r}")


@dataclass
class BuildInfo:
    """What a build measured (written to the manifest)."""

    seconds_total: float = 0.0
    seconds_tuning: float = 0.0
    tuned_tasks: int = 0
    tuned_task_names: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- targets

def make_target(opts: TvmBuildOptions):
    import tvm

    if opts.target == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": opts.arch}, host=_llvm_dict(opts))
    return tvm.target.Target(_llvm_dict(opts))


def _llvm_dict(opts: TvmBuildOptions) -> dict:
    from tvm.target import codegen

    mcpu = opts.mcpu or codegen.llvm_get_system_cpu()
    return {"kind": "llvm", "mcpu": mcpu, "num-cores": int(opts.num_cores or os.cpu_count() or 1)}


# ----------------------------------------------------------------------------- frontend

@dataclass
class _Imported:
    mod: object  # IRModule with "main"
    num_input: int
    param_names: list[str]  # torch names of main's params after the inputs, in order
    param_values: dict[str, np.ndarray]
    input_info: list[dict]
    output_info: list[dict]


def _import_torch(result) -> _Imported:
    """Materialised model -> torch.export -> Relax main(inputs..., params...)."""
    import torch
    from torch.export.graph_signature import InputKind
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from riem_compiler.passes.rewrite_torch import materialize

    if result.example_inputs is None:
        raise ValueError("build_tvm needs example inputs: call optimize(model, example_inputs=(x,), ...)")
    inputs = tuple(result.example_inputs)
    model = materialize(result.model).eval()
    with torch.no_grad():
        ep = torch.export.export(model, inputs)
        outputs = model(*inputs)
    mod = from_exported_program(ep, keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    values = [t.numpy() for t in params.get("main", [])]
    # Relax params are named after the export placeholders; unused ones (e.g. BatchNorm's
    # num_batches_tracked) are dropped by the importer, so map by name, not by position
    target_of = {s.arg.name: str(s.target) for s in ep.graph_signature.input_specs
                 if s.kind != InputKind.USER_INPUT}
    num_input = int(mod["main"].attrs["num_input"])
    fparams = mod["main"].params[num_input:]
    unknown = [v.name for v in fparams if v.name not in target_of]
    if unknown or len(values) != len(fparams):
        raise RuntimeError(f"parameter bookkeeping mismatch: Relax params {unknown[:5]} have no export "
                           f"placeholder, or {len(values)} values for {len(fparams)} params")
    names = [target_of[v.name] for v in fparams]
    for name, var, val in zip(names, fparams, values):
        shape = tuple(int(s) for s in var.ty.shape)
        if shape != tuple(val.shape):
            raise RuntimeError(f"parameter {name}: Relax shape {shape} != value shape {val.shape}")
    user = [t for t in inputs if isinstance(t, torch.Tensor)]
    in_specs = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    input_info = [{"name": s.arg.name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                  for s, t in zip(in_specs, user)]
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    output_info = [{"shape": list(o.shape), "dtype": str(o.dtype).replace("torch.", "")} for o in outs]
    return _Imported(mod, num_input, names, dict(zip(names, values)), input_info, output_info)


# ----------------------------------------------------------------------------- module assembly

def _kernel_name(index: int, prefix: str) -> str:
    return f"{prefix}_{index}"


def _tensor_sinfo(shape, dtype):
    from tvm import relax

    return relax.TensorType([int(s) for s in shape], str(dtype))


def _compact_vars(cw: CompressedWeight, tag: str):
    from tvm import relax

    return [relax.Var(f"{tag}__{n}", _tensor_sinfo(cw.arrays[n].shape, cw.arrays[n].dtype))
            for n in tk.riem_array_names(cw)]


def _add_decode_function(mod, riem_weights: dict[str, CompressedWeight], schedule_cpu: bool):
    """decode(compact arrays of every RieM weight, in manifest order) -> tuple of dense weights."""
    from tvm import relax

    bb = relax.BlockBuilder(mod)
    all_vars, gvars = [], []
    for idx, (name, cw) in enumerate(riem_weights.items()):
        func = tk.decode_primfunc(cw, _kernel_name(idx, "riem_decode"))
        if schedule_cpu:
            func = tk.schedule_decode_cpu(func)
        gvars.append(bb.add_func(func, _kernel_name(idx, "riem_decode")))
        all_vars.append(_compact_vars(cw, f"w{idx}"))
    with bb.function("decode", params=[v for vs in all_vars for v in vs]):
        with bb.dataflow():
            outs = []
            for gv, vs, cw in zip(gvars, all_vars, riem_weights.values()):
                outs.append(bb.emit(relax.call_tir(gv, vs, _tensor_sinfo(cw.shape, "float32"))))
            gv_out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(gv_out)
    return bb.get()


def _make_fused_main(imp: _Imported, riem_weights: dict[str, CompressedWeight], target_kind: str):
    """main(inputs, dense params that stay, compact arrays): RieM weights rebuilt inside main;
    linear layers through the fused reconstruct-and-multiply kernel."""
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    import tvm

    old = imp.mod["main"]
    # the old main becomes a private function, called from (then inlined into) the new main
    rest = tvm.IRModule({gv: f for gv, f in imp.mod.functions.items() if gv.name_hint != "main"})
    bb = relax.BlockBuilder(rest)
    gv_inner = bb.add_func(old.without_attr("global_symbol").without_attr("num_input"), "riem_inner_main")
    inputs = [relax.Var(p.name, p.ty)
              for i, p in enumerate(old.params[: imp.num_input])]
    kept, compact, decode_gvs = [], {}, {}
    for name, p in zip(imp.param_names, old.params[imp.num_input:]):
        if name not in riem_weights:
            kept.append(relax.Var(_safe(name), p.ty))
    for idx, (name, cw) in enumerate(riem_weights.items()):
        compact[name] = _compact_vars(cw, f"w{idx}")
        decode_gvs[name] = bb.add_func(tk.decode_primfunc(cw, _kernel_name(idx, "riem_decode")),
                                       _kernel_name(idx, "riem_decode"))
    with bb.function("main", params=inputs + kept + [v for vs in compact.values() for v in vs]):
        with bb.dataflow():
            args = list(inputs)
            kept_iter = iter(kept)
            for name in imp.param_names:
                if name in riem_weights:
                    cw = riem_weights[name]
                    args.append(bb.emit(relax.call_tir(decode_gvs[name], compact[name],
                                                       _tensor_sinfo(cw.shape, "float32"))))
                else:
                    args.append(next(kept_iter))
            out = bb.emit(relax.Call(gv_inner, args))
            gv_out = bb.emit_output(out)
        bb.emit_func_output(gv_out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("num_input", imp.num_input)
    mod = relax.transform.InlinePrivateFunctions()(mod)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    mod = relax.transform.Normalize()(mod)
    # matmul(x, permute_dims(decode(...))) -> fused kernel, for 2-D RieM weights
    by_gv = {decode_gvs[n].name_hint: (idx, n) for idx, n in enumerate(riem_weights)}
    w_pat = wildcard()
    mm_pat = is_op("relax.matmul")(wildcard(), is_op("relax.permute_dims")(w_pat))
    x_pat = mm_pat.args[0] if hasattr(mm_pat, "args") else None

    bb2 = relax.BlockBuilder(mod)
    fused_cache: dict[tuple, object] = {}

    def rewriter(expr, matches):
        call = matches[mm_pat]
        w = matches[w_pat]
        x = call.args[0]
        if not (isinstance(w, relax.Call) and w.op.name == "relax.call_tir"):
            return expr
        gv = w.args[0]
        if gv.name_hint not in by_gv:
            return expr
        idx, name = by_gv[gv.name_hint]
        cw = riem_weights[name]
        if len(cw.shape) != 2:
            return expr
        xshape = [int(s) for s in x.ty.shape]
        rows = int(np.prod(xshape[:-1]))
        key = (name, rows)
        if key not in fused_cache:
            fname = f"riem_fused_linear_{idx}_{rows}"
            fused_cache[key] = bb2.add_func(
                tk.fused_linear_primfunc(cw, rows, fname, target_kind=target_kind), fname)
        x2 = relax.op.reshape(x, [rows, xshape[-1]])
        y = relax.call_tir(fused_cache[key], [x2] + list(w.args[1].fields), _tensor_sinfo([rows, cw.shape[0]], "float32"))
        return relax.op.reshape(y, xshape[:-1] + [cw.shape[0]])

    del x_pat
    from tvm.relax.dpl import rewrite_call

    new_main = rewrite_call(mm_pat, rewriter, mod["main"])
    mod = bb2.get()
    mod["main"] = new_main
    mod = relax.transform.Normalize()(mod)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    return mod


def _safe(name: str) -> str:
    return "p_" + name.replace(".", "_")


# ----------------------------------------------------------------------------- compile

def _legalize_and_fuse(mod, target):
    """LegalizeOps + fusion, without FoldConstant (it would bake reconstructed weights in).
    On CPU, gelu/exp/erf/softmax first become their polynomial (vectorisable) forms."""
    import tvm
    from tvm import relax

    cpu_math = [ts.fast_gelu, relax.transform.FastMathTransform()] if target.kind.name == "llvm" else []
    with target:
        seq = tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            *cpu_math,
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(_entry_functions(mod)),
        ])
        return seq(mod)


def _entry_functions(mod) -> list[str]:
    return [n for n in ("main", "decode", LIFTED_NAME) if any(gv.name_hint == n for gv in mod.get_global_vars())]


def _builder_fn():
    """MetaSchedule build function that skips `import tvm.s_tir.tensor_intrin` (15-18 s per
    worker here, which made the default builder time out on every candidate). A closure so
    cloudpickle sends it by value to the worker processes."""

    def build(mod, target, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)

    return build


def _tune(mod, target, db_dir: Path, trials: int, max_per_task: int | None, info: BuildInfo,
          top_tasks: int | None = None):
    """MetaSchedule over the module's tasks; with `top_tasks`, only the N heaviest ones by
    estimated FLOPs x call count (each task costs worker start-up plus measurement here, ~40 s,
    so a whole transformer is out of reach; the rest keep the default schedules)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    db_dir.mkdir(parents=True, exist_ok=True)
    builder = ms.builder.LocalBuilder(f_build=_builder_fn(), timeout_sec=120.0,
                                      max_workers=max(1, (os.cpu_count() or 2) // 2))
    t0 = time.perf_counter()
    tasks = ms.relax_integration.extract_tasks(mod, target)

    def cost(task) -> float:
        try:
            return float(estimate_tir_flops(task.dispatched[0])) * int(task.weight)
        except Exception:  # noqa: BLE001 - no estimate: rank last
            return 0.0

    # the RieM decode kernels run once at load (decode-once): per-call latency comes from the rest
    per_call = [t for t in tasks if not t.task_name.startswith("riem_decode")] if top_tasks else tasks
    ranked = sorted(per_call, key=cost, reverse=True)
    chosen = ranked[:top_tasks] if top_tasks else ranked
    info.tuned_tasks = len(chosen)
    info.tuned_task_names = [t.task_name for t in chosen]
    per_task = max_per_task or max(1, trials // max(1, len(chosen)))
    log.info("MetaSchedule: %d of %d tasks %s, %d trials total, %d per task", len(chosen), len(tasks),
             info.tuned_task_names, trials, per_task)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted_tasks=chosen, work_dir=str(db_dir), seed=0)
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(db_dir), max_trials_global=trials,
        max_trials_per_task=per_task, num_trials_per_iter=min(64, per_task), builder=builder,
        runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1)),
    )
    info.seconds_tuning = time.perf_counter() - t0


def _apply_database(mod, target, db_dir: Path):
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    if not (db_dir / "database_tuning_record.json").is_file():
        return mod
    db = ms.database.JSONDatabase(work_dir=str(db_dir))
    with target, db:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def _default_schedules(mod, target):
    """Whatever is still unscheduled: dlight GPU rules on CUDA, dlight CPU rules where they apply on LLVM."""
    from tvm.s_tir import dlight as dl

    with target:
        if target.kind.name == "cuda":
            rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
        else:
            rules = [dl.cpu.GEMV(), dl.cpu.Reduction()]
        return dl.ApplyDefaultSchedule(*rules)(mod)


def _lower_and_compile(mod, target):
    import tvm
    from tvm import relax
    import importlib

    kind = "cuda" if target.kind.name == "cuda" else "cpu_generic"
    be = importlib.import_module(f"tvm.relax.backend.{kind}.pipeline")
    passes = be.dataflow_lower_passes(target) + be.finalize_passes(target)

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(m, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(m)

    del relax
    return tvm.compile(mod, target=target, relax_pipeline=pipeline)


def dense_constants(mod, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Shapes of Relax constants in `mod` that look like a dense compressed weight (FoldConstant
    check: a compressed artifact must carry no such constant)."""
    from tvm import relax
    from tvm.ir.expr import Constant
    from tvm.relax.analysis import post_order_visit

    found = []
    wanted = {tuple(s) for s in shapes}
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue

        def visit(e):
            if isinstance(e, Constant) and hasattr(e.value, "shape"):
                shape = tuple(int(s) for s in e.value.shape)
                if shape in wanted:
                    found.append(shape)

        post_order_visit(func, visit)
    return found


# ----------------------------------------------------------------------------- entry point

def build_tvm(result, out_dir, target: str = "llvm", tune_trials: int = 0, mode: str = "decode-once",
              arch: str = "sm_80", **options) -> Path:
    """Compile `result` (an `optimize` Result from a torch model) to a TVM artifact directory:
    model.so (export_library), params.safetensors (compact RieM arrays + other parameters),
    manifest.json, and tuning/ (the MetaSchedule database when tuned)."""
    import tvm
    from safetensors.numpy import save_file

    opts = TvmBuildOptions(target=target, tune_trials=int(tune_trials), mode=mode, arch=arch, **options)
    opts.validate()
    if getattr(result, "source", "torch") != "torch":
        raise NotImplementedError("build_tvm handles Results of torch models; for ONNX input, optimize the "
                                  "torch model or export the materialised ONNX and import it yourself")
    t_start = time.perf_counter()
    info = BuildInfo()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tgt = make_target(opts)
    imp = _import_torch(result)

    riem_weights: dict[str, CompressedWeight] = {}
    for name in imp.param_names:
        cw = result.compressed.get(name)
        if cw is None:
            continue
        if cw.method != "riem":
            log.warning("%s: method %r has no TVM kernel; stored dense in the TVM artifact", name, cw.method)
            continue
        if tuple(cw.shape) != tuple(imp.param_values[name].shape):
            raise ValueError(f"{name}: compressed shape {cw.shape} != model parameter shape "
                             f"{imp.param_values[name].shape}")
        riem_weights[name] = cw
    missing = sorted(set(n for n, c in result.compressed.items() if c.method == "riem") - set(riem_weights))
    if missing:
        raise ValueError(f"compressed weights {missing[:5]} are not parameters of the exported model")

    db_dir = out / TUNING_DIR
    if opts.tuning_db and Path(opts.tuning_db).resolve() != db_dir.resolve():
        if db_dir.exists():
            shutil.rmtree(db_dir)
        shutil.copytree(opts.tuning_db, db_dir)
    use_ms = opts.tune_trials > 0 or (db_dir / "database_tuning_record.json").is_file()

    lifted = None
    if opts.mode == "decode-once":
        mod = imp.mod
        if opts.lift_params:  # matmul(x, permute_dims(W)): the transpose moves to load time
            from tvm import relax

            mod = relax.transform.LiftTransformParams()(mod)
            lifted = LIFTED_NAME if LIFTED_NAME in _entry_functions(mod) else None
        mod = _add_decode_function(mod, riem_weights, schedule_cpu=False)
    else:
        mod = _make_fused_main(imp, riem_weights, "cuda" if tgt.kind.name == "cuda" else "llvm")
    mod = _legalize_and_fuse(mod, tgt)
    baked = dense_constants(mod, [cw.shape for cw in riem_weights.values()])
    if baked:
        raise RuntimeError(f"dense weights of shapes {baked} were folded into the module")
    if opts.tune_trials > 0:
        if tgt.kind.name == "cuda":
            log.warning("MetaSchedule for cuda needs a GPU to measure; tune on the GPU machine")
        _tune(mod, tgt, db_dir, opts.tune_trials, opts.max_trials_per_task, info, opts.tune_tasks)
    if use_ms:
        mod = _apply_database(mod, tgt, db_dir)
    if tgt.kind.name == "llvm":  # kernels without a tuning record: hand schedules
        mod = _schedule_decode_calls(mod)
        if opts.cpu_schedules:
            mod = ts.default_cpu_schedules(mod)
    mod = _default_schedules(mod, tgt)
    info.kernels = sorted(gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
    ex = _lower_and_compile(mod, tgt)
    lib_path = out / LIB_NAME
    ex.export_library(str(lib_path))
    cuda_file = None
    if tgt.kind.name == "cuda":
        # the library embeds this source and compiles it on the GPU machine at load (NVRTC or
        # nvcc); a copy beside it lets a machine without a GPU check that it compiles
        cuda_file = CUDA_SOURCE_NAME
        (out / cuda_file).write_text("\n".join(cuda_sources(ex)))

    arrays: dict[str, np.ndarray] = {}
    params_manifest = []
    for name in imp.param_names:
        if name in riem_weights:
            params_manifest.append({"name": name, "source": "decoded",
                                    "index": list(riem_weights).index(name)})
        else:
            arrays[f"param::{name}"] = np.ascontiguousarray(imp.param_values[name])
            params_manifest.append({"name": name, "source": "stored"})
    compressed_manifest = []
    for name, cw in riem_weights.items():
        names = tk.riem_array_names(cw)
        for n in names:
            arrays[f"riem::{name}::{n}"] = np.ascontiguousarray(cw.arrays[n])
        compressed_manifest.append({"name": name, "shape": list(cw.shape), "meta": cw.meta, "arrays": names})
    save_file(arrays, str(out / PARAMS_NAME))

    info.seconds_total = time.perf_counter() - t_start
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "mode": opts.mode,
        "transform_params": lifted,
        "target": json.loads(json.dumps(_target_dict(tgt))),
        "device": "cuda" if tgt.kind.name == "cuda" else "cpu",
        "options": asdict(opts),
        "inputs": imp.input_info, "outputs": imp.output_info,
        "params": params_manifest,
        "compressed": compressed_manifest,
        "files": {"library": LIB_NAME, "params": PARAMS_NAME, "cuda_source": cuda_file,
                  "tuning": TUNING_DIR if (db_dir / "database_tuning_record.json").is_file() else None},
        "bytes": {"params_file": (out / PARAMS_NAME).stat().st_size, "library": lib_path.stat().st_size,
                  "dense_weights_replaced": int(sum(4 * int(np.prod(c.shape)) for c in riem_weights.values())),
                  "compact_arrays": int(sum(c.nbytes for c in riem_weights.values()))},
        "build": asdict(info),
        "versions": _versions(),
        "source_hash": source_hash(result),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("TVM artifact %s: %s, %s, %d RieM weights, %.1fs", out, tgt.kind.name, opts.mode,
             len(riem_weights), info.seconds_total)
    return out


def _schedule_decode_calls(mod):
    """Fused mode on CPU without tuning: hand schedule for the per-call RieM decode kernels."""
    import tvm

    for gv, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.startswith("riem_decode") \
                and not func.attrs.get("tir.is_scheduled", False):
            try:
                mod[gv] = tk.schedule_decode_cpu(func)
            except Exception as err:  # fused by FuseTIR into another shape: leave it to defaults
                log.debug("no hand schedule for %s: %s", gv.name_hint, err)
    return mod


def _target_dict(tgt) -> dict:
    d = {"kind": tgt.kind.name}
    for key in ("mcpu", "num-cores", "arch"):
        if key in tgt.attrs:
            val = tgt.attrs[key]
            d[key] = int(val) if key == "num-cores" else str(val)
    if tgt.host is not None and tgt.kind.name != "llvm":
        d["host"] = _target_dict(tgt.host)
    return d


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("riem-compiler", "apache-tvm", "apache-tvm-ffi", "torch", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if out["riem-compiler"] is None:
        from riem_compiler import __version__

        out["riem-compiler"] = __version__
    return out


def source_hash(result) -> str:
    """sha256 over the source model's tensors (names, dtypes, shapes, bytes) in sorted order."""
    import torch

    src = getattr(result, "original", None) or result.model
    h = hashlib.sha256()
    if isinstance(src, torch.nn.Module):
        for name, t in sorted(src.state_dict().items()):
            arr = t.detach().cpu().contiguous()
            h.update(f"{name}|{arr.dtype}|{tuple(arr.shape)}".encode())
            h.update(arr.view(-1).view(torch.uint8).numpy().tobytes() if arr.numel() else b"")
    else:
        h.update(src.SerializeToString())
    return "sha256:" + h.hexdigest()


def cuda_sources(lib_or_ex) -> list[str]:
    """CUDA C sources embedded in a compiled TVM module (for checks without a GPU)."""
    mod = getattr(lib_or_ex, "mod", lib_or_ex)
    out, seen = [], set()
    stack = [mod]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.kind == "cuda":
            out.append(m.inspect_source())
        stack.extend(m.imports)
    return out


def compile_cuda_source(path, arch: str = "sm_80") -> bytes:
    """nvcc the CUDA source of a cuda artifact to a cubin (proves it compiles without a GPU)."""
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH; install the CUDA toolkit to check CUDA sources")
    with tempfile.TemporaryDirectory(prefix="riem_nvcc_") as tmp:
        cubin = Path(tmp) / "out.cubin"
        cmd = [nvcc, "--cubin", "-O3", f"-arch={arch}", "-o", str(cubin), str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {path}:\n{proc.stderr[-4000:]}")
        return cubin.read_bytes()
