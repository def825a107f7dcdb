"""The TVM artifact on disk: file names, the manifest (writing and reading) and the source hash.

A `build_tvm` artifact is a directory: model.so, params.safetensors, manifest.json and, when
tuned, tuning/. The builder (tvm_build.py) writes it and the runtime (tvm_runtime.py) reads it,
so both take the format from here. Importing this module needs neither TVM nor torch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "riem-tvm"
# 2: compact arrays of every method with a TVM kernel, keyed compact::<weight>::<array>, and a
# per-layer "layers" list; 1 (RieM only) keyed them riem::<weight>::<array>
FORMAT_VERSION = 2
LIB_NAME = "model.so"
PARAMS_NAME = "params.safetensors"
MANIFEST_NAME = "manifest.json"
TUNING_DIR = "tuning"
CUDA_SOURCE_NAME = "cuda_source.cu"


def write_manifest(out, manifest: dict) -> Path:
    """Write `manifest` as the artifact's manifest.json (what `read_manifest` reads back)."""
    path = Path(out) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(directory) -> dict:
    """The manifest of a `build_tvm` artifact directory; refuses a directory without one, or of another format."""
    d = Path(directory)
    manifest_path = d / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{d}: no {MANIFEST_NAME}; expected a directory written by build_tvm")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def compact_key(weight: str, array: str, format_version: int = FORMAT_VERSION) -> str:
    """params.safetensors key of one compact array of a decoded weight."""
    prefix = "riem" if int(format_version) < 2 else "compact"
    return f"{prefix}::{weight}::{array}"


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
