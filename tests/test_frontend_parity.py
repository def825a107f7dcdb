"""The same layer is the same layer from either frontend: a torch model and its ONNX export get
identical per-layer decisions (grouped and depthwise convs included)."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

import riem_compiler as rc
from riem_compiler.config import Config
from riem_compiler.frontend.onnx_frontend import find_onnx_layers
from riem_compiler.frontend.torch_frontend import find_torch_layers


class ConvMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.conv = nn.Conv2d(32, 32, 3, stride=2, padding=1, dilation=1)
        self.dilated = nn.Conv2d(32, 16, 3, padding=2, dilation=2)
        self.fc = nn.Linear(16 * 4 * 4, 64)

    def forward(self, x):
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.depthwise(x))
        x = torch.relu(self.conv(x))
        x = torch.relu(self.dilated(x))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = ConvMix().eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        proto = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False).model_proto
    return model, x, proto


def onnx_to_torch_names(model: nn.Module, proto: onnx.ModelProto) -> dict[str, str]:
    """ONNX initializer name -> torch parameter name, matched by identical values (not by name)."""
    params = {n: p.detach().numpy() for n, p in model.named_parameters() if p.dim() >= 2}
    out = {}
    for t in proto.graph.initializer:
        a = numpy_helper.to_array(t)
        hits = [n for n, p in params.items() if p.shape == a.shape and np.array_equal(p, a)]
        if len(hits) == 1:
            out[t.name] = hits[0]
    return out


def test_frontends_write_the_same_conv_attributes(models):
    model, _, proto = models
    cfg = Config(min_weight_size=0, quiet=True)
    torch_specs = {s.name: s for s in find_torch_layers(model, cfg).layers}
    onnx_specs = find_onnx_layers(proto, cfg)[0]
    names = onnx_to_torch_names(model, proto)
    assert len(onnx_specs) == len(torch_specs) == 5
    for spec in onnx_specs:
        t = torch_specs[names[spec.name]]
        assert (spec.kind, spec.shape) == (t.kind, t.shape), spec.name
        assert (spec.groups, spec.stride, spec.dilation) == (t.groups, t.stride, t.dilation), spec.name
    assert torch_specs["grouped.weight"].groups == 4 and torch_specs["depthwise.weight"].groups == 32


@pytest.mark.parametrize("method", ["tucker2", "rtn", "svd"])
def test_torch_and_onnx_decide_every_layer_the_same(models, method):
    model, x, proto = models
    options = dict(method=method, ratio=0.25, min_weight_size=0, quiet=True, cache_dir=None)
    from_torch = {r.name: r for r in rc.optimize(model, (x,), **options).report}
    from_onnx = {r.name: r for r in rc.optimize(proto, **options).report}
    names = onnx_to_torch_names(model, proto)
    assert set(names) == set(from_onnx) and set(names.values()) == set(from_torch)
    for onnx_name, o in from_onnx.items():
        t = from_torch[names[onnx_name]]
        assert (o.kind, tuple(o.shape)) == (t.kind, tuple(t.shape)), onnx_name
        # the ONNX result is written at once and says which ONNX form each layer got (onnx_format "auto");
        # the torch result says so only when exported
        o_settings = {k: v for k, v in o.settings.items() if k not in ("onnx_form", "onnx_note")}
        assert (o.status, o.method, o_settings, o.bytes_after) == (t.status, t.method, t.settings, t.bytes_after), \
            f"{onnx_name}: onnx {o} vs torch {t}"
        if o.rel_error is not None or t.rel_error is not None:
            assert o.rel_error == pytest.approx(t.rel_error, rel=1e-6, abs=1e-9), onnx_name
    if method == "tucker2":  # grouped convs are refused by Tucker-2 from both sides, the plain convs taken
        assert from_torch["grouped.weight"].status == from_torch["depthwise.weight"].status == "skipped"
        assert from_torch["conv.weight"].status == "compressed"
