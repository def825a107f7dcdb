"""Rewrite pass for PyTorch: put compressed-weight modules where the dense weights were.

- `RieMWeight` holds exactly the stored arrays as buffers (so `state_dict` is the compact form)
  and returns the decoded weight. By default it decodes once and caches, so inference costs what
  the original layer cost; `recompute=True` decodes on every call (memory-bound deployments).
  Under torch.export / torch.compile it always decodes from the buffers, so exported programs
  carry the compact parameters, not a baked dense weight.
- `RieMLinear` / `RieMConv` / `RieMEmbedding` replace nn.Linear / nn.Conv1d / nn.Conv2d /
  nn.Embedding.
- Functional uses (a get_attr feeding F.linear, aten.mm, ...) become a call of a `RieMWeight`
  submodule named `<param>_riem` in the GraphModule.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from riem_compiler.bitpack import eager_numpy
from riem_compiler.compressed import CompressedWeight
from riem_compiler.methods import decode_torch
from riem_compiler.passes import input_scales
from riem_compiler.passes.sensitivity import tensor_holders

log = logging.getLogger("riem_compiler.rewrite")

RIEM_SUFFIX = "_riem"


_NO_CACHE = contextvars.ContextVar("riem_no_cache", default=False)


@contextlib.contextmanager
def decoding_per_call():
    """Within this block, rewritten layers decode their weight for each call and keep nothing: optimize's
    own check of the output (a model-sized cache of decoded weights in the result, before the user ever
    runs it). The values are those of the cached decode."""
    token = _NO_CACHE.set(True)
    try:
        yield
    finally:
        _NO_CACHE.reset(token)


class RieMWeight(nn.Module):
    def __init__(self, cw: CompressedWeight, param_name: str = "", recompute: bool = False):
        super().__init__()
        self.method = cw.method
        self.shape = tuple(cw.shape)
        self.meta = dict(cw.meta)
        self.param_name = param_name
        self.recompute = recompute
        self._array_names = list(cw.arrays)
        for name, arr in cw.arrays.items():
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(arr)).clone())
        self._cache: torch.Tensor | None = None

    def compressed(self) -> CompressedWeight:
        arrays = {n: getattr(self, n).detach().cpu().numpy() for n in self._array_names}
        return CompressedWeight(self.method, self.shape, dict(self.meta), arrays)

    def decode(self) -> torch.Tensor:
        cw = CompressedWeight(self.method, self.shape, self.meta, {})
        return decode_torch(cw, {n: getattr(self, n) for n in self._array_names})

    def forward(self) -> torch.Tensor:
        if self.recompute or torch.compiler.is_compiling():
            return self.decode()
        anchor = getattr(self, self._array_names[0])
        if self._cache is None or self._cache.device != anchor.device:
            with torch.no_grad(), eager_numpy():  # an eager decode: CPU codes unpack in chunks, in place
                weight = self.decode()
            if _NO_CACHE.get():
                return weight
            self._cache = weight
        return self._cache

    def _apply(self, fn, recurse=True):
        self._cache = None  # device/dtype moves invalidate the decoded weight
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"method={self.method}, shape={self.shape}, meta={self.meta}, recompute={self.recompute}"


def _keep_input_scale(new: nn.Module, old: nn.Module) -> None:
    """The layer's stored input scale (passes/input_scales.py), when it has one, as a buffer."""
    scale = getattr(old, input_scales.SCALE, None)
    if scale is None:
        new.input_scale = None
    else:
        new.register_buffer(input_scales.SCALE, scale.detach().clone())


class RieMLinear(nn.Module):
    def __init__(self, linear: nn.Linear, cw: CompressedWeight, name: str = "weight", recompute: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.riem = RieMWeight(cw, name, recompute)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        _keep_input_scale(self, linear)

    @property
    def weight(self) -> torch.Tensor:
        return self.riem()

    def forward(self, x):
        return F.linear(input_scales.scaled(x, self.input_scale, -1), self.riem(), self.bias)


class RieMConv(nn.Module):
    """Conv1d/Conv2d with a compressed weight; same padding modes as the nn modules."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, cw: CompressedWeight, name: str = "weight",
                 recompute: bool = False):
        super().__init__()
        self.dims = 1 if isinstance(conv, nn.Conv1d) else 2
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        self.riem = RieMWeight(cw, name, recompute)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        _keep_input_scale(self, conv)

    @property
    def weight(self) -> torch.Tensor:
        return self.riem()

    def forward(self, x):
        conv = F.conv1d if self.dims == 1 else F.conv2d
        x = input_scales.scaled(x, self.input_scale, 1)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return conv(x, self.riem(), self.bias, self.stride, padding, self.dilation, self.groups)

    def to_conv(self, weight: torch.Tensor) -> nn.Module:
        cls = nn.Conv1d if self.dims == 1 else nn.Conv2d
        conv = cls(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                   self.dilation, self.groups, self.bias is not None, self.padding_mode)
        conv.weight = nn.Parameter(weight)
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.detach().clone())
        return conv


class RieMEmbedding(nn.Module):
    """nn.Embedding (without max_norm, which the frontend leaves alone) with a compressed table.

    padding_idx, scale_grad_by_freq and sparse only shape gradients; they are kept so that
    `materialize` gives back the same nn.Embedding."""

    def __init__(self, emb: nn.Embedding, cw: CompressedWeight, name: str = "weight", recompute: bool = False):
        super().__init__()
        if emb.max_norm is not None:
            raise ValueError("an nn.Embedding with max_norm renormalises its weight in place; it is not compressed")
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx, self.scale_grad_by_freq, self.sparse = emb.padding_idx, emb.scale_grad_by_freq, emb.sparse
        self.riem = RieMWeight(cw, name, recompute)

    @property
    def weight(self) -> torch.Tensor:
        return self.riem()

    def forward(self, ids):
        return F.embedding(ids, self.riem(), self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)

    def to_embedding(self, weight: torch.Tensor) -> nn.Embedding:
        return nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                            scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse, _weight=weight)


def _split(qualified: str) -> tuple[str, str]:
    parent, _, attr = qualified.rpartition(".")
    return parent, attr


def apply_compressed(model: nn.Module, specs, compressed: dict[str, CompressedWeight],
                     graph_module: torch.fx.GraphModule | None = None, recompute: bool = False) -> nn.Module:
    """Return a rewritten copy of `model` (or of `graph_module` when functional weights are
    compressed) with every weight in `compressed` replaced. The input is not modified."""
    base = graph_module if graph_module is not None and any(
        not s.module for s in specs if s.name in compressed) else model
    out, shared = _copy_keeping(base, compressed)
    for spec in specs:
        cw = compressed.get(spec.name)
        if cw is None:
            continue
        if spec.module:
            old = out.get_submodule(spec.module)
            cls = RieMLinear if isinstance(old, nn.Linear) else RieMEmbedding if isinstance(old, nn.Embedding) else RieMConv
            new = cls(old, cw, spec.name, recompute)
            parent, attr = _split(spec.module)
            setattr(out.get_submodule(parent) if parent else out, attr, new)
        else:
            _rewrite_functional(out, spec.name, cw, recompute)
    _unshare(out, shared)
    if isinstance(out, torch.fx.GraphModule):
        out.graph.lint()
        out.recompile()
    return out


def _copy_keeping(base: nn.Module, names) -> tuple[nn.Module, dict[int, torch.Tensor]]:
    """A deep copy of base that shares, instead of copying, the tensors named (the weights the rewrite
    replaces): a model-sized copy of weights about to be dropped was the end of a run's memory peak.
    Returns the copy and id -> shared tensor, for `_unshare`."""
    tensors = {**dict(base.named_parameters(remove_duplicate=False)),
               **dict(base.named_buffers(remove_duplicate=False))}
    shared = {id(tensors[n]): tensors[n] for n in names if n in tensors}
    return copy.deepcopy(base, dict(shared)), shared


def _unshare(out: nn.Module, shared: dict[int, torch.Tensor]) -> None:
    """Copy into `out` the shared tensors it still holds after the rewrite (a weight tied to a layer
    that was not replaced), once per tensor, so that the rewritten model never aliases the input's."""
    holders = tensor_holders(out)
    for key, t in shared.items():
        if key not in holders:
            continue
        data = t.detach().clone()
        copied = nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data
        for table, name in holders[key]:
            table[name] = copied


def _rewrite_functional(gm: torch.fx.GraphModule, param_name: str, cw: CompressedWeight, recompute: bool):
    parent, attr = _split(param_name)
    owner = gm.get_submodule(parent) if parent else gm
    delattr(owner, attr)
    owner.add_module(attr + RIEM_SUFFIX, RieMWeight(cw, param_name, recompute))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == param_name:
            node.op = "call_module"
            node.target = param_name + RIEM_SUFFIX


def compressed_weights(model: nn.Module) -> dict[str, CompressedWeight]:
    """Weight name -> CompressedWeight for every RieM module in a rewritten model."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, RieMWeight):
            out[mod.param_name] = mod.compressed()
    return out


def materialize(model: nn.Module) -> nn.Module:
    """A copy with plain nn.Linear/Conv/Embedding (and plain parameters) holding the decoded weights.

    Parameter names equal the original model's (e.g. "fc1.weight"), so exporters see the
    same names the frontend reported."""
    out = copy.deepcopy(model)
    for mod_name, mod in list(out.named_modules()):
        if isinstance(mod, (RieMLinear, RieMConv, RieMEmbedding)):
            weight = mod.riem.decode().detach().clone()
            if isinstance(mod, RieMEmbedding):
                new = mod.to_embedding(weight)
            elif isinstance(mod, RieMLinear):
                new = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None)
                new.weight = nn.Parameter(weight)
                if mod.bias is not None:
                    new.bias = nn.Parameter(mod.bias.detach().clone())
            else:
                new = mod.to_conv(weight)
            if getattr(mod, "input_scale", None) is not None:  # exporters trace it as a Mul before the layer
                input_scales.attach(new, mod.input_scale)
            parent, attr = _split(mod_name)
            setattr(out.get_submodule(parent) if parent else out, attr, new)
    if isinstance(out, torch.fx.GraphModule):
        for node in list(out.graph.nodes):
            if node.op != "call_module":
                continue
            mod = out.get_submodule(node.target)
            if not isinstance(mod, RieMWeight):
                continue
            parent, attr = _split(mod.param_name)
            owner = out.get_submodule(parent) if parent else out
            weight = mod.decode().detach().clone()
            delattr(owner, attr + RIEM_SUFFIX)
            owner.register_parameter(attr, nn.Parameter(weight))
            node.op = "get_attr"
            node.target = mod.param_name
        out.graph.lint()
        out.recompile()
    return out
