"""The TVM codegen's entry point: `build_tvm` compiles an `optimize` Result to an artifact directory.

It runs the steps, each in its own module: import through torch.export (tvm_import.py),
decode-once or fused assembly with each method's decode kernel (tvm_assembly.py), legalization, schedules,
tuning and compile (tvm_pipeline.py), and the artifact's files and manifest (tvm_artifact.py,
shared with tvm_runtime.py). `TvmBuildOptions`, `make_target` and `compile_cuda_source` are
re-exported here (`__all__`).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from riem_compiler import methods
from riem_compiler.compressed import CompressedWeight
from riem_compiler.codegen import tvm_schedules as ts
from riem_compiler.codegen.tvm_artifact import (CUDA_SOURCE_NAME, FORMAT, FORMAT_VERSION, LIB_NAME, PARAMS_NAME,
                                                TUNING_DIR, _target_dict, _versions, compact_key, source_hash,
                                                write_manifest)
from riem_compiler.codegen.tvm_assembly import (_add_decode_function, _make_fused_main, decode_kernel_schedules,
                                                kernel_module)
from riem_compiler.codegen.tvm_import import _import_torch
from riem_compiler.methods.tvm_gemv_int8 import int8_activations
from riem_compiler.codegen.tvm_pipeline import (LIFTED_NAME, BuildInfo, TvmBuildOptions, _apply_database,
                                                _default_schedules, _entry_functions, _legalize_and_fuse,
                                                _lower_and_compile, _schedule_decode_calls, _tune, compile_cuda_source,
                                                cuda_sources, dense_constants, make_target)

__all__ = ["TvmBuildOptions", "build_tvm", "compile_cuda_source", "make_target"]

log = logging.getLogger("riem_compiler.tvm_build")


def build_tvm(result, out_dir, target: str = "llvm", tune_trials: int = 0, mode: str = "auto",
              arch: str = "sm_80", **options) -> Path:
    """Compile `result` (an `optimize` Result from a torch model) to a TVM artifact directory:
    model.so (export_library), params.safetensors, manifest.json, and tuning/ (the MetaSchedule
    database when tuned).

    Every compressed weight whose method has a TVM kernel (riem, rtn, svd, tucker2, affine, vq, rotq; any mix,
    as `auto` makes) is stored as exactly its CompressedWeight arrays and decoded by that
    kernel; a weight without one (method "dense", kept dense by choice) is stored as its float32
    parameter. The manifest's "layers" lists per weight: compact or dense (and why), where it
    is decoded (fused into the matmul, once at load, per call) and why, and its bytes.

    mode="auto" (default) picks per layer and batch regime: a 2-D weight consumed by a matmul
    whose method offers a fused dequantise-matmul kernel that pays for it (`Method.tvm_fused`: rtn
    and affine with 1-8-bit codes in byte-aligned rows and groups, rotq likewise (the rotation
    applied to x), vq, svd as two thin matmuls; at any batch: GEMV forms up to 4 activation rows per
    call on CPU, the tiled form (a tile of the weight decoded once per call) from 5; on an AVX-512 VNNI
    CPU, rtn / affine / rotq / vq up to 32 rows multiply int8 activations instead, unless
    int8_activations=False: methods/tvm_gemv_int8.py) runs that kernel,
    so the weight stays in its stored bytes at run time; every other compact weight is decoded once
    at load, with the method's reason in the manifest (riem: its decode costs far more than the
    matmul; rows or groups that do not start on a byte boundary: the CPU kernel reads a code per weight through a
    generic bit reader; tucker2 and conv weights: no fused kernel).
    mode="decode-once" decodes every compact weight once at load; mode="fused" keeps every one
    compact: fused kernels where a method has one (riem's included), the others decoded per
    call into a transient buffer, a full reconstruction per call for svd / tucker2 / riem conv,
    so fused only pays where memory is the limit."""
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

    kernel_weights: dict[str, CompressedWeight] = {}  # the weights a TVM kernel decodes
    stored_dense: dict[str, str] = {}  # weight -> why the artifact holds it dense (its method says)
    for name in imp.param_names:
        cw = result.compressed.get(name)
        if cw is None:
            continue
        method = methods.get(cw.method)
        if method.tvm_kernel() is None:
            stored_dense[name] = method.tvm_dense_reason
            log.info("%s: method %r: %s", name, cw.method, method.tvm_dense_reason)
            continue
        if tuple(cw.shape) != tuple(imp.param_values[name].shape):
            raise ValueError(f"{name}: compressed shape {cw.shape} != model parameter shape "
                             f"{imp.param_values[name].shape}")
        kernel_module(cw).array_names(cw)  # a weight its kernel cannot decode fails here, by name
        kernel_weights[name] = cw
    missing = sorted(n for n, c in result.compressed.items()
                     if methods.get(c.method).tvm_kernel() is not None and n not in kernel_weights)
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
        mod = _add_decode_function(mod, kernel_weights, schedule_cpu=False)
        fused, why, int8_layers = [], {name: "mode 'decode-once'" for name in kernel_weights}, []
    else:
        # the kernels ask the current target for its CPU features (tvm_gemv_int8.target_supports)
        with tgt, int8_activations(opts.int8_activations):
            mod, fused, why, int8_layers = _make_fused_main(imp, kernel_weights, "cuda" if tgt.kind.name == "cuda" else "llvm",
                                               for_memory=opts.mode == "fused")
        if opts.mode == "auto":  # decodes of the weights not fused, and weight transposes, run once at load
            from tvm import relax

            mod = relax.transform.LiftTransformParams()(mod)
            lifted = LIFTED_NAME if LIFTED_NAME in _entry_functions(mod) else None
    mod = _legalize_and_fuse(mod, tgt)
    decode_schedules = decode_kernel_schedules(kernel_weights)  # kernel name -> its method's CPU schedule
    baked = dense_constants(mod, [cw.shape for cw in kernel_weights.values()])
    if baked:
        raise RuntimeError(f"dense weights of shapes {baked} were folded into the module")
    if opts.tune_trials > 0:
        if tgt.kind.name == "cuda":
            log.warning("MetaSchedule for cuda needs a GPU to measure; tune on the GPU machine")
        _tune(mod, tgt, db_dir, opts.tune_trials, opts.max_trials_per_task, info, opts.tune_tasks,
              decode_kernels=set(decode_schedules))
    if use_ms:
        mod = _apply_database(mod, tgt, db_dir)
    if tgt.kind.name == "llvm":  # kernels without a tuning record: hand schedules
        mod = _schedule_decode_calls(mod, decode_schedules)
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
        if name in kernel_weights:
            params_manifest.append({"name": name, "source": "decoded",
                                    "index": list(kernel_weights).index(name)})
        else:
            arrays[f"param::{name}"] = np.ascontiguousarray(imp.param_values[name])
            params_manifest.append({"name": name, "source": "stored"})
    compressed_manifest = []
    for name, cw in kernel_weights.items():
        names = kernel_module(cw).array_names(cw)
        for n in names:
            arrays[compact_key(name, n)] = np.ascontiguousarray(cw.arrays[n])
        compressed_manifest.append({"name": name, "method": cw.method, "shape": list(cw.shape), "meta": cw.meta,
                                    "arrays": names})
    save_file(arrays, str(out / PARAMS_NAME))
    layers = _layer_storage(result, imp, kernel_weights, stored_dense, opts.mode, fused, why, int8_layers)
    for row in layers:
        log.info("%s (%s): %s%s", row["name"], row["label"], row["decode"] or "stored dense",
                 f" ({row['why']})" if row["why"] else "")

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
        "stored_dense": stored_dense,
        "layers": layers,
        "files": {"library": LIB_NAME, "params": PARAMS_NAME, "cuda_source": cuda_file,
                  "tuning": TUNING_DIR if (db_dir / "database_tuning_record.json").is_file() else None},
        "bytes": {"params_file": (out / PARAMS_NAME).stat().st_size, "library": lib_path.stat().st_size,
                  "dense_weights_replaced": int(sum(4 * int(np.prod(c.shape)) for c in kernel_weights.values())),
                  "compact_arrays": int(sum(c.nbytes for c in kernel_weights.values())),
                  "stored_dense_weights": int(sum(imp.param_values[n].nbytes for n in stored_dense))},
        "build": asdict(info),
        "versions": _versions(),
        "source_hash": source_hash(result),
    }
    write_manifest(out, manifest)
    log.info("TVM artifact %s: %s, %s, %d weights compact, %d dense, %.1fs", out, tgt.kind.name, opts.mode,
             len(kernel_weights), len(stored_dense), info.seconds_total)
    return out


def _layer_storage(result, imp, kernel_weights: dict, stored_dense: dict, mode: str, fused, why: dict,
                   int8_layers=()) -> list[dict]:
    """Per compressed weight (in parameter order): how the artifact stores it and why, where it
    is decoded and why there (`why`: a fused kernel's absence, from the method), its bytes:
    stored (the CompressedWeight), in the artifact, dense float32, and resident at run time (the
    stored bytes when fused, the decoded float32 weight when decoded once); "activations": int8
    where the fused kernel multiplies the codes by an int8 copy of x (tvm_gemv_int8.py), else float32."""
    rows = []
    for name in imp.param_names:
        cw = result.compressed.get(name)
        if cw is None:
            continue
        compact = name in kernel_weights
        if not compact:
            decode = None
        elif name in fused:
            decode = "fused into the matmul"
        else:
            decode = "per call" if mode == "fused" else "once at load"
        rows.append({
            "name": name, "method": cw.method, "label": methods.get(cw.method).label(cw),
            "storage": "compact" if compact else "dense", "reason": stored_dense.get(name), "decode": decode,
            "why": None if not compact or name in fused else why.get(name),
            "activations": "int8" if name in int8_layers else "float32",
            "stored_bytes": cw.nbytes,
            "artifact_bytes": cw.nbytes if compact else int(imp.param_values[name].nbytes),
            "dense_bytes": 4 * int(np.prod(cw.shape)),
            "resident_bytes": cw.nbytes if name in fused or decode == "per call" else 4 * int(np.prod(cw.shape)),
        })
    return rows
