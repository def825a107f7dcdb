"""`rc.load` refuses a tampered record whose decoded weights are not finite (issue 23, item 7): a NaN
zero point or scale in an artifact's manifest / safetensors, or in an ONNX file's record, is one
InputError naming the layer, instead of a model that silently outputs NaN."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.numpy import load_file, save_file

import riem_compiler as rc
from riem_compiler.codegen.onnx_export import META_KEY
from riem_compiler.errors import InputError
from test_onnx_default import OPTS, mixed_model


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8)).eval()


@pytest.fixture
def torch_artifact(tmp_path):
    net, x = _net(), torch.randn(2, 64)
    res = rc.optimize(net, (x,), method="rtn", ratio=0.15, min_weight_size=0, quiet=True, cache_dir=None)
    return res.save(tmp_path / "art"), x


def _refused(call, layer: str):
    with pytest.raises(InputError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and repr(layer) in text and "NaN or infinite" in text and "again" in text, text


def test_torch_artifact_loads_when_intact(torch_artifact):
    path, x = torch_artifact
    with torch.no_grad():
        assert torch.isfinite(rc.load(path, model=_net())(x)).all()


def test_nan_zero_point_in_the_manifest_is_refused(torch_artifact):
    path, _ = torch_artifact
    manifest = json.loads((path / "manifest.json").read_text())
    layer = manifest["layers"][0]
    layer["meta"]["offset"] = float("nan")  # rtn's zero point (json writes NaN)
    (path / "manifest.json").write_text(json.dumps(manifest))
    _refused(lambda: rc.load(path, model=_net()), layer["name"])


def test_nan_scale_in_the_safetensors_is_refused(torch_artifact):
    path, _ = torch_artifact
    tensors = load_file(str(path / "compressed.safetensors"))
    key = sorted(k for k in tensors if k.endswith("::scale"))[-1]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.inf
    save_file(tensors, str(path / "compressed.safetensors"))
    _refused(lambda: rc.load(path, model=_net()), key.split("::")[0])


def _tamper_onnx(path, name: str, edit) -> None:
    model = onnx.load(str(path))
    entries = json.loads(next(p.value for p in model.metadata_props if p.key == META_KEY))
    edit(model, entries[name])
    for p in model.metadata_props:
        if p.key == META_KEY:
            p.value = json.dumps(entries)
    onnx.save(model, str(path))


def _nan_array(key: str):
    def edit(model, entry):
        for t in model.graph.initializer:
            if t.name == entry["arrays"][key]:
                arr = numpy_helper.to_array(t).copy()
                arr.flat[0] = np.nan
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return edit


@pytest.mark.parametrize("fast_start", [True, False])
def test_onnx_artifact_with_nan_native_scales_is_refused(tmp_path, fast_start):
    """The default form: MatMulNBits / GatherBlockQuantized / DequantizeLinear scales."""
    model, feeds = mixed_model()
    path = rc.optimize(model, **OPTS).save(tmp_path / "art")
    assert all(np.isfinite(o).all() for o in rc.load(path, fast_start=fast_start)(**feeds))
    _tamper_onnx(path / "model.onnx", "W_fc", _nan_array("scales"))
    _refused(lambda: rc.load(path, fast_start=fast_start), "W_fc")


@pytest.mark.parametrize("fast_start", [True, False])
def test_onnx_file_with_nan_zero_point_is_refused(tmp_path, fast_start):
    """The function form: a NaN offset in the file's record."""
    model, _ = mixed_model()
    path = rc.optimize(model, **{**OPTS, "onnx_format": "functions"}).export_onnx(tmp_path / "m.onnx")

    def edit(_, entry):
        entry["meta"]["offset"] = float("nan")
    _tamper_onnx(path, "W_conv", edit)
    _refused(lambda: rc.load(path, fast_start=fast_start), "W_conv")
