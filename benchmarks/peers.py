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
- onnxruntime (`onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`, data-free:
  its default blockwise RTN, its HQQ and its k-quant configs): each 2-D weight W becomes a one-node
  ONNX model Y = X @ W^T, which the quantizer rewrites to a MatMulNBits node; the stored bytes are
  every initializer of the quantized model (packed codes, float32 scales, zero points), and the
  decoded weight is what onnxruntime computes for X = identity. It quantises MatMul only: conv
  weights stay float32 and count fully.
- torchao (`torchao.quantization.quantize_` with `IntxWeightOnlyConfig`, 1- to 8-bit, grouped or
  per channel, affine or HQQ scale-only qparams): nn.Linear weights only (other weights stay
  float32 and count fully). torchao holds the codes one per int8 in memory; the stored bytes count
  them at their bit width (bits * numel / 8, as its packed layouts store them) plus its scales and
  zero points in the dtypes it holds them (zero points only where not all zero: symmetric and
  scale-only mappings store none in the packed layouts).

A peer's setting for a budget: the candidates whose stored bytes over our compressible layers
are within `OVER` of the budget, and among them the lowest size-weighted relative weight error
(the peer is given its best setting near the budget, the row says if it is over). Peers that
are not installed, or fail, give a row with the reason and the run goes on. The onnxruntime and
torchao peers keep each setting's size and error per weight across the budgets of a run, so their
first budget's fit time includes sizing every setting and the later ones only the chosen one.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import warnings

import numpy as np
import torch

log = logging.getLogger("riem_compiler.benchmarks.peers")

OVER = 1.07  # a peer setting may store up to 7% more than the budget (flagged "over budget")
HQQ_SETTINGS = [(bits, group, axis) for bits in (8, 4, 3, 2, 1) for group in (32, 64, 128, 256) for axis in (1, 0)]
NNCF_SETTINGS = [("INT8_ASYM", None), ("INT4_ASYM", 32), ("INT4_ASYM", 64), ("INT4_ASYM", 128),
                 ("INT4_ASYM", -1), ("INT4_SYM", 64), ("INT4_SYM", 128), ("INT4_SYM", -1)]
# onnxruntime 1.32: (algorithm, bits, block, symmetric). Its HQQ at 8 bits writes float zero points,
# which MatMulNBits on CPU rejects; its k-quant writes MatMulNBits only at 4 and 8 bits.
ORT_BLOCKS = (16, 32, 64, 128, 256)
ORT_SETTINGS = ([("default", bits, block, sym) for bits in (8, 4, 2) for block in ORT_BLOCKS for sym in (False, True)]
                + [("hqq", bits, block, False) for bits in (4, 2) for block in ORT_BLOCKS]
                + [("k_quant", bits, block, False) for bits in (8, 4) for block in ORT_BLOCKS])
# torchao 0.18: (bits, group or None for per channel, qparams: "asym", "sym" or "hqq", scale dtype)
TORCHAO_SETTINGS = [(bits, group, qparams, scale) for bits in (8, 7, 6, 5, 4, 3, 2, 1)
                    for group in (32, 64, 128, 256, None) for qparams in ("asym", "sym", "hqq")
                    for scale in ("float32", "float16")]
PEERS = ("hqq", "nncf", "ort", "torchao")


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


# ----------------------------------------------------------------------------- settings search shared by ort and torchao

class _Rejected(RuntimeError):
    """The peer's code refuses a setting for one weight (the setting is then skipped for the model)."""


_STATS: dict[tuple, tuple[int, float]] = {}  # (peer, weight digest, setting) -> (stored bytes, relative error)


def _dense_note(count: int, nbytes: int, fp32: int, kind: str) -> str:
    return "" if not count else (f"; the {count} {kind} weight(s) it leaves float32 take {nbytes / fp32:.4f} "
                                 "of fp32 (sizes above: of the rest)")


def _digest(weight: torch.Tensor) -> str:
    w = weight.detach().float().contiguous().numpy()
    return hashlib.sha1(w.tobytes() + str(w.shape).encode()).hexdigest()


def _relative_error(decoded: torch.Tensor, weight: torch.Tensor) -> float:
    return float(torch.linalg.norm(decoded - weight.detach()) / max(float(torch.linalg.norm(weight.detach())), 1e-30))


def _best_setting(peer: str, weights: dict, settings: list, budget: float, fp32: int, quantise, min_bits,
                  note: str = ""):
    """(size-weighted relative error, setting, stored bytes) of the setting with the lowest error among
    those within OVER x the budget, or PeerUnavailable. `quantise(weight, setting)` returns (decoded
    weight, stored bytes) or raises _Rejected; `note` ends the PeerUnavailable message. Sizes and errors
    do not depend on the budget: they are kept across the budgets of a run (the decoded weights are
    not, they are made again for the winner)."""
    digests = {name: _digest(w) for name, w in weights.items()}
    best, rejected, smallest = None, {}, None
    for setting in settings:
        if min_bits(setting) / 32 > OVER * budget:  # the codes alone are over, whatever the meta
            continue
        stats = []
        for name, w in weights.items():
            key = (peer, digests[name], setting)
            if key not in _STATS:
                try:
                    decoded, nbytes = quantise(w, setting)
                except _Rejected as exc:
                    _STATS[key] = (None, str(exc))
                else:
                    _STATS[key] = (nbytes, _relative_error(decoded, w))
            stats.append(_STATS[key])
        refusals = [why for nbytes, why in stats if nbytes is None]
        if refusals:
            rejected[setting] = refusals[0]
            continue
        size = sum(nbytes for nbytes, _ in stats)
        smallest = size if smallest is None else min(smallest, size)
        if size > OVER * budget * fp32:
            continue
        err = float(np.average([e for _, e in stats], weights=[w.numel() for w in weights.values()]))
        if best is None or err < best[0]:
            best = (err, setting, size)
    if best is None:
        narrowest = min(min_bits(setting) for setting in settings)
        least = (f" (the smallest stores {smallest / fp32:.4f} of fp32)" if smallest is not None else
                 f" (its narrowest codes, {narrowest} bits, are over {32 * OVER * budget:.2f} bits per weight)"
                 if narrowest / 32 > OVER * budget else "")
        why = "" if not rejected else f"; {len(rejected)} settings refused, e.g. {next(iter(rejected.values()))[:80]}"
        raise PeerUnavailable(f"no {peer} setting stores <= {OVER:g} x the budget{least}{why}{note}")
    return best



def _best_partial_setting(peer: str, weights: dict, matrices: dict, settings: list, budget: float, quantise,
                          min_bits, kind: str) -> tuple[tuple, int]:
    """(setting, stored bytes of `matrices`) for a peer that quantises only `matrices` and leaves the
    rest of `weights` (`kind`, e.g. conv) float32, counted fully: the search runs over the matrices
    with the part of the budget the float32 weights leave."""
    fp32 = sum(4 * w.numel() for w in weights.values())
    dense_bytes = fp32 - sum(4 * w.numel() for w in matrices.values())
    others = len(weights) - len(matrices)
    if dense_bytes >= OVER * budget * fp32:
        raise PeerUnavailable(f"the {others} {kind} weight(s) {peer} leaves float32 store "
                              f"{dense_bytes / fp32:.4f} of fp32, over the budget alone")
    m_fp32 = fp32 - dense_bytes
    _, setting, size = _best_setting(peer, matrices, settings, (OVER * budget * fp32 - dense_bytes) / (OVER * m_fp32),
                                     m_fp32, quantise, min_bits, _dense_note(others, dense_bytes, fp32, kind))
    return setting, size


def _partial_result(peer: str, model, out, weights: dict, matrices: dict, setting: tuple, size: int, label: str,
                    kind: str) -> dict:
    """run_hqq's fields for `out`, the peer's model: `size` bytes for `matrices` at `setting`, the rest of
    `weights` float32 (error 0)."""
    fp32 = sum(4 * w.numel() for w in weights.values())
    stored = size + fp32 - sum(4 * w.numel() for w in matrices.values())
    errs = [_STATS[(peer, _digest(w), setting)][1] if n in matrices else 0.0 for n, w in weights.items()]
    err = float(np.average(errs, weights=[w.numel() for w in weights.values()]))
    others = len(weights) - len(matrices)
    label += f"; {others} {kind} weight(s) left float32" if others else ""
    return {"model": out, "stored_bytes": stored, "fp32_bytes": fp32, "layer_error": err, "setting": label,
            "whole_bytes": model_bytes(model) - fp32 + stored}

# ----------------------------------------------------------------------------- onnxruntime MatMulNBits

def _ort_matmul_model(weight: np.ndarray):
    """Y = X @ W^T with W^T a float32 initializer: the MatMul form MatMulNBitsQuantizer rewrites."""
    from onnx import TensorProto, helper, numpy_helper

    out_features, in_features = weight.shape
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, in_features])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, out_features])
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")
    graph = helper.make_graph([node], "peer", [x], [y], [numpy_helper.from_array(np.ascontiguousarray(weight.T), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def ort_quantise_model(weight: torch.Tensor, setting: tuple):
    """The one-node model of `weight` (out x in) as onnxruntime's MatMulNBitsQuantizer leaves it at
    `setting` = (algorithm, bits, block, symmetric). Raises _Rejected unless the node became MatMulNBits."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    algo, bits, block, sym = setting
    model = _ort_matmul_model(weight.detach().float().reshape(weight.shape[0], -1).numpy())
    if algo == "default":
        config = mq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym, bits=bits)
    elif algo == "hqq":
        config = mq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    else:  # k_quant takes bits and block per node
        config = mq.KQuantWeightOnlyQuantConfig(customized_weight_config={"mm": {"bits": bits, "group_size": block}})
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # k_quant prints progress
            warnings.simplefilter("ignore")
            quantizer = mq.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=sym, algo_config=config)
            quantizer.process()
    except Exception as exc:  # noqa: BLE001 - the quantizer refuses this shape/setting
        raise _Rejected(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    out = quantizer.model.model
    ops = [n.op_type for n in out.graph.node]
    if ops != ["MatMulNBits"]:
        raise _Rejected(f"{algo} {bits}-bit b{block} left {ops}, not MatMulNBits")
    return out


def ort_stored_bytes(quantized) -> int:
    """Bytes of every initializer of a quantized model (packed codes, scales, zero points)."""
    from onnx import numpy_helper

    return int(sum(numpy_helper.to_array(t).nbytes for t in quantized.graph.initializer))


def ort_decode(quantized, shape) -> torch.Tensor:
    """The weight onnxruntime computes with: its MatMulNBits output for X = identity, transposed."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(quantized.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    in_features = int(np.prod(shape[1:]))
    try:
        y = sess.run(None, {"X": np.eye(in_features, dtype=np.float32)})[0]
    except Exception as exc:  # noqa: BLE001 - e.g. a MatMulNBits form its CPU kernel does not run
        raise _Rejected(f"onnxruntime cannot run it: {str(exc).splitlines()[0][:80]}") from exc
    return torch.from_numpy(np.ascontiguousarray(y.T)).reshape(shape)


def ort_quantise(weight: torch.Tensor, setting: tuple) -> tuple[torch.Tensor, int]:
    """(onnxruntime's decoded weight, stored bytes) for one weight at one setting."""
    try:
        quantized = ort_quantise_model(weight, setting)
        return ort_decode(quantized, tuple(weight.shape)), ort_stored_bytes(quantized)
    except _Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime refuses the quantized model (e.g. at session creation)
        raise _Rejected(f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}") from exc


def _ort_label(setting: tuple) -> str:
    algo, bits, block, sym = setting
    return f"onnxruntime {algo} {bits}-bit b{block}" + (" sym" if sym else (" asym" if algo == "default" else ""))


def run_ort(model: torch.nn.Module, names: list[str], budget: float) -> dict:
    """onnxruntime's MatMulNBitsQuantizer at its best setting near `budget` (same fields as run_hqq).
    Only 2-D weights go through it (it quantises MatMul); conv weights stay float32 and count fully."""
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401
    except ImportError as exc:
        raise PeerUnavailable(f"onnxruntime's matmul_nbits_quantizer is not importable ({exc})") from exc
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # an INFO line per node otherwise
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    weights = _named_weights(model, names)
    matrices = {n: w for n, w in weights.items() if w.dim() == 2}
    if not matrices:
        raise PeerUnavailable("onnxruntime's MatMulNBits quantizer has no 2-D (Linear) weight to quantise here")
    setting, size = _best_partial_setting("onnxruntime", weights, matrices, ORT_SETTINGS, budget, ort_quantise,
                                          lambda s: s[1], "conv")
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, w in matrices.items():
            params[name].copy_(ort_quantise(w, setting)[0])
    return _partial_result("onnxruntime", model, out, weights, matrices, setting, size, _ort_label(setting), "conv")

# ----------------------------------------------------------------------------- torchao

def torchao_config(setting: tuple):
    """torchao's IntxWeightOnlyConfig for `setting` = (bits, group or None for per channel,
    qparams "asym" / "sym" / "hqq" (its HQQ scale-only qparams), scale dtype name)."""
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    bits, group, qparams, scale = setting
    return IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"), granularity=PerAxis(0) if group is None else PerGroup(group),
        mapping_type=MappingType.ASYMMETRIC if qparams == "asym" else MappingType.SYMMETRIC,
        intx_choose_qparams_algorithm=(IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if qparams == "hqq"
                                       else IntxChooseQParamsAlgorithm.AFFINE),
        scale_dtype=getattr(torch, scale))


def torchao_stored_bytes(qweight, bits: int) -> int:
    """Bytes of a torchao IntxUnpackedToInt8Tensor as packed: its codes at `bits` each (in memory
    they are one int8 each), its scales in their dtype, its zero points in theirs unless all zero."""
    codes = (bits * qweight.qdata.numel() + 7) // 8
    scales = qweight.scale.numel() * qweight.scale.element_size()
    zp = qweight.zero_point
    zeros = 0 if not bool(torch.any(zp != 0)) else zp.numel() * zp.element_size()
    return int(codes + scales + zeros)


def torchao_quantise(weight: torch.Tensor, setting: tuple) -> tuple[torch.Tensor, int]:
    """(torchao's dequantize() of the weight, stored bytes) for one Linear weight, by quantize_ on a
    Linear holding a copy of it (the transform quantize_ applies to each Linear of a model)."""
    from torchao.quantization import quantize_

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight.detach().float())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(linear, torchao_config(setting))
    except Exception as exc:  # noqa: BLE001 - torchao refuses this shape/setting (e.g. group does not divide)
        raise _Rejected(f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}") from exc
    qweight = linear.weight
    if not hasattr(qweight, "qdata"):
        raise _Rejected(f"torchao left {type(qweight).__name__}, not a quantized tensor")
    bits = setting[0]
    if int(qweight.qdata.min()) < -(1 << (bits - 1)) or int(qweight.qdata.max()) >= 1 << (bits - 1):
        raise _Rejected(f"torchao's codes exceed {bits} bits, so they cannot be sized packed at {bits} bits")
    return qweight.dequantize().detach().float(), torchao_stored_bytes(qweight, bits)


def _torchao_label(setting: tuple) -> str:
    bits, group, qparams, scale = setting
    return (f"torchao int{bits} " + ("per channel" if group is None else f"g{group}")
            + f" {qparams} {scale} scales; in memory: int8 codes, sized packed")


def run_torchao(model: torch.nn.Module, names: list[str], budget: float) -> dict:
    """torchao's IntxWeightOnlyConfig at its best setting near `budget` (same fields as run_hqq), applied
    by quantize_ to the Linear modules that own the weights in `names` of a copy of the model, which
    then runs on torchao's tensors. Other weights stay float32 and count fully."""
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise PeerUnavailable(f"torchao is not installed ({exc}); pip install torchao==0.18.0") from exc
    weights = _named_weights(model, names)
    linear = {f"{mod_name}.weight" if mod_name else "weight" for mod_name, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear)}
    matrices = {n: w for n, w in weights.items() if n in linear}
    if not matrices:
        raise PeerUnavailable("torchao's IntxWeightOnlyConfig quantises nn.Linear weights; none here")
    setting, size = _best_partial_setting("torchao", weights, matrices, TORCHAO_SETTINGS, budget, torchao_quantise,
                                          lambda s: s[0], "non-Linear")
    out = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(out, torchao_config(setting),
                  filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear)
                  and (f"{fqn}.weight" if fqn else "weight") in matrices)
    params = dict(out.named_parameters())
    stored = sum(torchao_stored_bytes(params[n], setting[0]) for n in matrices)
    assert stored == size, (stored, size)  # quantize_ on the model stores what the search sized
    return _partial_result("torchao", model, out, weights, matrices, setting, size, _torchao_label(setting),
                           "non-Linear")

def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of a model as it is held (a peer's whole stored model:
    packed weights, scales, zero points, and everything it leaves in float)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
