"""The real peers, installed from PyPI and run by their own code, for the accuracy benchmark.

- hqq (`hqq.core.quantize.Quantizer`, its half-quadratic optimiser): every weight our frontend
  finds compressible is quantised by hqq and replaced by hqq's own dequantisation. Stored bytes:
  hqq's packed codes as it packs them (3-bit: 10 codes per int32) plus a float16 scale and zero
  per group (HQQLinear keeps its meta in the float16 compute dtype; we round them to float16
  before dequantising, so the numbers are those of the stored model).
- NNCF (`nncf.compress_weights`, data-free: no dataset beyond the example input it traces
  with): INT8/INT4 asymmetric or symmetric, per channel or grouped, all layers at that mode
  (ratio=1). The compressed model runs as NNCF leaves it (decompression hooks); stored bytes are
  its packed weight plus its decompressors' scale and zero-point buffers.

A peer's setting for a budget: the candidates whose stored bytes over our compressible layers
are within `OVER` of the budget, and among them the lowest size-weighted relative weight error
(the peer is given its best setting near the budget, the row says if it is over). Peers that
are not installed, or fail, give a row with the reason and the run goes on.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch

log = logging.getLogger("riem_compiler.benchmarks.peers")

OVER = 1.07  # a peer setting may store up to 7% more than the budget (flagged "over budget")
HQQ_SETTINGS = [(bits, group, axis) for bits in (8, 4, 3, 2, 1) for group in (32, 64, 128, 256) for axis in (1, 0)]
NNCF_SETTINGS = [("INT8_ASYM", None), ("INT4_ASYM", 32), ("INT4_ASYM", 64), ("INT4_ASYM", 128),
                 ("INT4_ASYM", -1), ("INT4_SYM", 64), ("INT4_SYM", 128), ("INT4_SYM", -1)]
PEERS = ("hqq", "nncf")


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (not installed, or no setting near the budget)."""


def _named_weights(model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in names if n in params}


# ----------------------------------------------------------------------------- hqq

def hqq_quantise(weight: torch.Tensor, bits: int, group: int, axis: int,
                 optimize: bool = True) -> tuple[torch.Tensor, int]:
    """(hqq's dequantised weight with float16 meta, stored bytes) for one weight. The bytes do not
    depend on `optimize` (same packing), so the setting search sizes settings without it."""
    from hqq.core.quantize import Quantizer

    W = weight.detach().float().reshape(weight.shape[0], -1)
    codes, meta = Quantizer.quantize(W, nbits=bits, group_size=group, axis=axis, device="cpu",
                                     compute_dtype=torch.float16, optimize=optimize)
    meta = dict(meta)
    meta["scale"] = meta["scale"].to(torch.float16).float()
    meta["zero"] = meta["zero"].to(torch.float16).float()
    decoded = Quantizer.dequantize(codes, meta).float().reshape(weight.shape)
    nbytes = codes.numel() * codes.element_size() + 2 * (meta["scale"].numel() + meta["zero"].numel())
    return decoded, int(nbytes)


def run_hqq(model: torch.nn.Module, names: list[str], budget: float) -> dict:
    """hqq at its best setting near `budget`: {"model", "stored_bytes", "fp32_bytes", "setting", "layer_error"}."""
    try:
        import hqq  # noqa: F401
    except ImportError as exc:
        raise PeerUnavailable(f"hqq is not installed ({exc}); pip install hqq") from exc
    weights = _named_weights(model, names)
    fp32 = sum(4 * w.numel() for w in weights.values())
    best, rejected, smallest = None, set(), None
    for bits, group, axis in HQQ_SETTINGS:
        if any(w.numel() % group for w in weights.values()):
            continue
        try:  # hqq's packers need the group count divisible by the codes per byte (odd counts fail)
            size = sum(hqq_quantise(w, bits, group, axis, optimize=False)[1] for w in weights.values())
        except RuntimeError as exc:
            rejected.add(f"{bits}-bit g{group} axis {axis}: {str(exc).splitlines()[0][:80]}")
            continue
        smallest = size if smallest is None else min(smallest, size)
        if size > OVER * budget * fp32:
            continue
        decoded, stored, errs, sizes = {}, 0, [], []
        for name, w in weights.items():
            d, nbytes = hqq_quantise(w, bits, group, axis)
            decoded[name], stored = d, stored + nbytes
            errs.append(float(torch.linalg.norm(d - w.detach()) / max(float(torch.linalg.norm(w.detach())), 1e-30)))
            sizes.append(w.numel())
        err = float(np.average(errs, weights=sizes))
        if best is None or err < best[0]:
            best = (err, (bits, group, axis), decoded, stored)
    if best is None:
        least = "" if smallest is None else f" (the smallest stores {smallest / fp32:.4f} of fp32)"
        raise PeerUnavailable(f"no hqq setting that its packer accepts for these layers stores <= {OVER:g} x "
                              f"the budget{least}; {len(rejected)} settings rejected by hqq's packing")
    err, (bits, group, axis), decoded, stored = best
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, d in decoded.items():
            params[name].copy_(d)
    # the model holds hqq's dequantised weights in float: as stored, those layers take `stored` bytes
    whole = model_bytes(model) - fp32 + stored
    return {"model": out, "stored_bytes": stored, "fp32_bytes": fp32, "layer_error": err,
            "setting": f"hqq {bits}-bit g{group} axis {axis}", "whole_bytes": whole}


# ----------------------------------------------------------------------------- NNCF

def _nncf_compress(model, mode: str, group, example_inputs):
    import nncf

    kwargs = {"mode": getattr(nncf.CompressWeightsMode, mode), "dataset": nncf.Dataset([example_inputs])}
    if mode.startswith("INT4"):
        kwargs.update(ratio=1.0, group_size=group, all_layers=True)
    return nncf.compress_weights(copy.deepcopy(model), **kwargs)


def _decompressor(compressed: torch.nn.Module, name: str):
    """NNCF's decompressor module of weight `name` (it names it after the weight, dots as colons), or None."""
    key = f".{':'.join(name.split('.'))}__"
    return next((mod for mod_name, mod in compressed.named_modules()
                 if "Decompressor" in type(mod).__name__ and key in mod_name), None)


def _packed(compressed: torch.nn.Module, name: str):
    """The weight tensor NNCF left under `name` (a packed integer parameter or buffer)."""
    params = dict(compressed.named_parameters())
    return params[name] if name in params else dict(compressed.named_buffers())[name]


def _nncf_bytes(compressed: torch.nn.Module, names: list[str]) -> dict[str, int]:
    """name -> stored bytes (packed weight + its decompressor's buffers) for the weights in `names`."""
    out = {}
    for name in names:
        w, mod = _packed(compressed, name), _decompressor(compressed, name)
        out[name] = w.numel() * w.element_size() + (0 if mod is None else sum(b.numel() * b.element_size()
                                                                              for b in mod.buffers()))
    return out


def run_nncf(model: torch.nn.Module, names: list[str], budget: float, example_inputs) -> dict:
    """NNCF's data-free compress_weights at its best setting near `budget` (same fields as run_hqq)."""
    try:
        import nncf  # noqa: F401
    except ImportError as exc:
        raise PeerUnavailable(f"nncf is not installed ({exc}); pip install nncf") from exc
    weights = _named_weights(model, names)
    fp32 = sum(4 * w.numel() for w in weights.values())
    best, smallest = None, None
    for mode, group in NNCF_SETTINGS:
        bits = 8 if mode.startswith("INT8") else 4
        if bits / 32 > OVER * budget:  # cannot fit whatever the grouping
            continue
        try:
            compressed = _nncf_compress(model, mode, group, example_inputs)
        except Exception as exc:  # noqa: BLE001 - a setting NNCF rejects for this model is skipped
            log.warning("nncf %s g%s failed: %s", mode, group, exc)
            continue
        sizes = _nncf_bytes(compressed, list(weights))
        stored = sum(sizes.values())
        smallest = stored if smallest is None else min(smallest, stored)
        if stored > OVER * budget * fp32:
            continue
        errs, counts = [], []
        for name, w in weights.items():
            d = _nncf_decoded(compressed, name, w)
            errs.append(float(torch.linalg.norm(d - w.detach()) / max(float(torch.linalg.norm(w.detach())), 1e-30)))
            counts.append(w.numel())
        err = float(np.average(errs, weights=counts))
        if best is None or err < best[0]:
            best = (err, f"nncf {mode.lower()}" + ("" if group is None else f" g{group}"), compressed, stored)
    if best is None:
        least = "" if smallest is None else f"; the smallest stores {smallest / fp32:.4f} of fp32"
        raise PeerUnavailable(f"no NNCF weight-compression mode stores <= {OVER:g} x the budget (its data-free "
                              f"modes are 8- and 4-bit, and it leaves some layers float{least})")
    err, setting, compressed, stored = best
    return {"model": compressed, "stored_bytes": stored, "fp32_bytes": fp32, "layer_error": err, "setting": setting,
            "whole_bytes": model_bytes(compressed)}


def _nncf_decoded(compressed: torch.nn.Module, name: str, original: torch.Tensor) -> torch.Tensor:
    """The weight NNCF's model computes with: its decompressor applied to the packed weight."""
    packed, mod = _packed(compressed, name), _decompressor(compressed, name)
    with torch.no_grad():
        return (packed if mod is None else mod(packed)).detach().float().reshape(original.shape)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of a model as it is held (a peer's whole stored model:
    packed weights, scales, zero points, and everything it leaves in float)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
