"""The TVM pipeline: build options and targets, legalization, schedules, MetaSchedule tuning, compile.

Targets are JSON dicts (TVM 0.27). CPU: LLVM; before legalization gelu/exp/softmax become their
polynomial forms; in decode-once mode `LiftTransformParams` moves weight transposes into
`main_transform_params`, which the runtime runs once at load (so matmuls read W^T in the NN
layout); then default schedules that are good without tuning (tvm_schedules: register-tiled
matmul and conv with fused epilogues, vectorised elementwise kernels; each method's decode schedule;
dlight CPU rules for the rest). MetaSchedule when tune_trials > 0, optionally on the
`tune_tasks` heaviest per-call tasks only (database kept under tuning/ and reused); its records
take precedence over the default schedules. CUDA: dlight default GPU schedules;
the library embeds CUDA source and compiles on the GPU machine at load.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from riem_compiler.codegen import tvm_schedules as ts

log = logging.getLogger("riem_compiler.tvm_build")  # the TVM build's logger, as before the split

MODES = ("auto", "decode-once", "fused")
TARGETS = ("llvm", "cuda")
LIFTED_NAME = "main_transform_params"  # what relax.transform.LiftTransformParams names it


# ----------------------------------------------------------------------------- options

@dataclass
class TvmBuildOptions:
    """Options of `build_tvm` (validated at the boundary)."""

    target: str = "llvm"
    tune_trials: int = 0
    mode: str = "auto"
    arch: str = "sm_80"
    mcpu: str | None = None  # llvm: None = this machine's CPU
    num_cores: int | None = None  # llvm: None = os.cpu_count()
    tuning_db: str | None = None  # existing MetaSchedule database dir to reuse
    max_trials_per_task: int | None = None
    tune_tasks: int | None = None  # tune only the N heaviest tasks (by FLOPs); None = all
    cpu_schedules: bool = True  # llvm: hand schedules for matmul/elementwise kernels (tvm_schedules)
    # decode-once: weight layout changes (transposes) run once at load; mode "auto" always lifts
    # (its decode-once weights are decoded by the lifted function)
    lift_params: bool = True
    # llvm on a CPU with AVX-512 VNNI: rtn / affine / rotq / vq layers at 1-32 activation rows per call multiply
    # their codes by an int8 copy of x (methods/tvm_gemv_int8.py, as MatMulNBits at accuracy_level
    # 4); False keeps float32 activations in every kernel
    int8_activations: bool = True

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
          top_tasks: int | None = None, decode_kernels=()):
    """MetaSchedule over the module's tasks; with `top_tasks`, only the N heaviest ones by
    estimated FLOPs x call count (each task costs worker start-up plus measurement here, ~40 s,
    so a whole transformer is out of reach; the rest keep the default schedules). That ranking
    leaves out `decode_kernels` (the weight decode kernels' names: they run once at load)."""
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

    # the decode kernels run once at load (decode-once): per-call latency comes from the rest
    skip = set(decode_kernels)
    per_call = [t for t in tasks if t.task_name not in skip] if top_tasks else tasks
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


def _guarded(rule):
    """A dlight rule that declines (None) where its analysis raises instead of answering no
    (dlight's GEMV analysis asserts on a decode that reads a two-byte window of packed codes),
    so the next rule gets the function."""
    from tvm.s_tir import dlight as dl

    class Guarded(dl.ScheduleRule):
        def apply(self, func, target, tunable):
            try:
                return rule.apply(func, target, tunable)
            except Exception as err:  # noqa: BLE001 - the rule does not apply
                log.debug("%s declined: %s", type(rule).__name__, err)
                return None

        def apply_config(self, func, config):
            return rule.apply_config(func, config)

    return Guarded()


def _default_schedules(mod, target):
    """Whatever is still unscheduled: dlight GPU rules on CUDA (the fused dequantise-matmul
    kernels go to GEMV / LowBatchGEMV / Matmul), dlight CPU rules where they apply on LLVM."""
    from tvm.s_tir import dlight as dl

    with target:
        if target.kind.name == "cuda":
            rules = [_guarded(r) for r in (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
                                           dl.gpu.GeneralReduction())] + [dl.gpu.Fallback()]
        else:
            rules = [_guarded(dl.cpu.GEMV()), _guarded(dl.cpu.Reduction())]
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


def _schedule_decode_calls(mod, schedules: dict):
    """CPU without tuning records: each weight decode kernel (name -> its method's
    schedule_decode_cpu in `schedules`) gets its method's schedule, at load or per call."""
    import tvm

    for gv, func in list(mod.functions.items()):
        schedule = schedules.get(gv.name_hint)
        if isinstance(func, tvm.tirx.PrimFunc) and schedule is not None \
                and not func.attrs.get("tir.is_scheduled", False):
            try:
                mod[gv] = schedule(func)
            except Exception as err:  # fused by FuseTIR into another shape: leave it to defaults
                log.debug("no hand schedule for %s: %s", gv.name_hint, err)
    return mod


# ----------------------------------------------------------------------------- CUDA source

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
