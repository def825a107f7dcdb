"""Load a TVM artifact written by `build_tvm` as a callable model.

Decode-once artifacts run their `decode` function once here, at load, then the lifted
`main_transform_params` (weight transposes for the matmul kernels) when the manifest names it,
and keep the resulting dense weights on the device; each call then runs only `main`. Fused artifacts keep the compact
arrays and reconstruct inside `main`. Inputs may be numpy arrays or torch tensors; outputs come
back as the same kind (torch in -> torch out), a single output unwrapped. The manifest is read
through tvm_artifact.py, the format shared with the builder.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from riem_compiler.codegen.tvm_artifact import compact_key, read_manifest

log = logging.getLogger("riem_compiler.tvm_runtime")


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (sysfs topology; else every one)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def use_all_cores() -> int:
    """Size TVM's CPU thread pool to the physical cores, as onnxruntime sizes its own; returns the
    count. Without TVM_NUM_THREADS, TVM takes half the logical CPUs on x86 (it assumes two
    hyper-threads a core): one thread on a 2-core machine without SMT, where onnxruntime runs two.
    A TVM_NUM_THREADS the user set is kept; the pool reads it when it first starts, so this runs
    before any TVM kernel does (TvmModel calls it)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))
    return int(os.environ["TVM_NUM_THREADS"])


class TvmModel:
    """Callable over a loaded artifact. `decode_seconds` is the time the load-time decode took."""

    def __init__(self, directory, device: str = "cpu"):
        use_all_cores()
        import tvm
        from safetensors.numpy import load_file
        from tvm import relax

        d = Path(directory)
        self.manifest = read_manifest(d)
        built_for = self.manifest["device"]
        if device != built_for:
            raise ValueError(f"{d} was built for {built_for!r}; load it with device={built_for!r} "
                             f"or rebuild with target={'cuda' if device == 'cuda' else 'llvm'}")
        self.device = device
        self.dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        lib = tvm.runtime.load_module(str(d / self.manifest["files"]["library"]))
        self.vm = relax.VirtualMachine(lib, self.dev)
        tensors = load_file(str(d / self.manifest["files"]["params"]))

        def put(arr):
            return tvm.runtime.tensor(np.ascontiguousarray(arr), device=self.dev)

        compact = []
        version = self.manifest.get("format_version", 1)
        for entry in self.manifest["compressed"]:
            compact.extend(put(tensors[compact_key(entry["name"], n, version)]) for n in entry["arrays"])
        self.decode_seconds = 0.0
        self.transform_seconds = 0.0
        decoded = []
        if self.manifest["mode"] == "decode-once" and self.manifest["compressed"]:
            t0 = time.perf_counter()
            result = self.vm["decode"](*compact)
            self.dev.sync()
            self.decode_seconds = time.perf_counter() - t0
            decoded = [result[i] for i in range(len(self.manifest["compressed"]))]
        params = []
        for entry in self.manifest["params"]:
            if entry["source"] == "stored":
                params.append(put(tensors[f"param::{entry['name']}"]))
            elif self.manifest["mode"] == "decode-once":
                params.append(decoded[entry["index"]])
        if self.manifest["mode"] != "decode-once":  # fused, auto: main takes the compact arrays
            params.extend(compact)
        lifted = self.manifest.get("transform_params")
        if lifted:  # weight layout changes (e.g. transposes for matmul), once, at load
            t0 = time.perf_counter()
            params = list(self.vm[lifted](params))
            self.dev.sync()
            self.transform_seconds = time.perf_counter() - t0
        self.params = params
        self.inputs = self.manifest["inputs"]
        log.info("loaded %s (%s, %s); decode %.1f ms", d, device, self.manifest["mode"], 1e3 * self.decode_seconds)

    def _to_device(self, args):
        import tvm

        if len(args) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs {[i['name'] for i in self.inputs]}, got {len(args)}")
        out, as_torch = [], False
        for arg, spec in zip(args, self.inputs):
            if hasattr(arg, "detach"):  # torch tensor
                as_torch = True
                arg = arg.detach().cpu().numpy()
            arr = np.ascontiguousarray(arg)
            if list(arr.shape) != list(spec["shape"]) or str(arr.dtype) != spec["dtype"]:
                raise ValueError(f"input {spec['name']}: expected shape {spec['shape']} dtype {spec['dtype']}, "
                                 f"got {list(arr.shape)} {arr.dtype} (the artifact is compiled for fixed shapes)")
            out.append(tvm.runtime.tensor(arr, device=self.dev))
        return out, as_torch

    def run_device(self, device_inputs):
        """Run main on inputs already on the device; returns TVM tensors (for timing)."""
        return self.vm["main"](*device_inputs, *self.params)

    def __call__(self, *args):
        dev_inputs, as_torch = self._to_device(args)
        res = self.run_device(dev_inputs)
        outs = _flatten(res)
        arrays = [o.numpy() for o in outs]
        if as_torch:
            import torch

            arrays = [torch.from_numpy(a) for a in arrays]
        return arrays[0] if len(arrays) == 1 else tuple(arrays)

    def time_main(self, *args, number: int = 10, repeat: int = 3) -> float:
        """Median seconds of one `main` call (VM time_evaluator, inputs on the device)."""
        dev_inputs, _ = self._to_device(args)
        self.vm.set_input("main", *dev_inputs, *self.params)
        timer = self.vm.time_evaluator("invoke_stateful", self.dev, number=number, repeat=repeat)
        return float(np.median(timer("main").results))


def _flatten(res) -> list:
    import tvm

    if isinstance(res, tvm.runtime.Tensor):
        return [res]
    return [t for item in res for t in _flatten(item)]


def load_tvm(directory, device: str = "cpu") -> TvmModel:
    """Load a `build_tvm` artifact; decode-once artifacts decode their weights here, once."""
    return TvmModel(directory, device)
