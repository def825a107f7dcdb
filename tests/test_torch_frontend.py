"""PyTorch frontend: which weights are found, with which attributes, and what is skipped."""
import numpy as np
import pytest
import torch

from riem_compiler.config import Config
from riem_compiler.frontend.torch_frontend import as_module, find_torch_layers
from zoo import CNN, MLP, Block, Functional


def names(det):
    return {s.name: s for s in det.layers}


def test_mlp_linear_layers():
    det = find_torch_layers(MLP(), Config(min_weight_size=0))
    found = names(det)
    assert set(found) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert found["fc1.weight"].kind == "linear" and found["fc1.weight"].shape == (64, 32)
    assert found["fc1.weight"].bias.shape == (64,)
    assert det.graph_module is None


def test_cnn_grouped_depthwise_dilated_and_conv1d():
    found = names(find_torch_layers(CNN(), Config(min_weight_size=0)))
    assert found["grouped.weight"].groups == 4 and "groups" not in found["grouped.weight"].attrs
    assert found["depthwise.weight"].groups == 32
    assert found["depthwise.weight"].attrs["padding_mode"] == "reflect"
    assert found["dilated.weight"].dilation == (2, 2) and found["dilated.weight"].stride == (2, 2)
    assert found["seq.weight"].kind == "conv1d" and found["seq.weight"].attrs["padding"] == "same"
    assert found["seq.weight"].stride == (1,) and found["conv1.weight"].groups == 1
    assert found["head.weight"].groups == 1 and found["head.weight"].stride == ()
    assert found["conv1.weight"].kind == "conv2d" and found["head.weight"].kind == "linear"


def test_transformer_block_finds_modules_and_functional_matmul():
    det = find_torch_layers(Block(), Config(min_weight_size=0))
    found = names(det)
    assert {"qkv.weight", "proj.weight", "ff1.weight", "ff2.weight", "readout"} <= set(found)
    assert found["readout"].kind == "matmul" and found["readout"].module == ""
    assert det.graph_module is not None  # functional weight needs the traced graph
    assert not any(n.startswith("norm") for n in found)  # 1-D LayerNorm weights are not matrices


def test_functional_weights_in_plain_module():
    det = find_torch_layers(Functional(), Config(min_weight_size=0))
    kinds = {s.name: s.kind for s in det.layers}
    assert kinds == {"w_conv": "conv2d", "w_lin": "linear", "w_mm": "matmul"}


def test_exported_program_uses_aten_ops():
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(Functional().eval(), (x,))
    det = find_torch_layers(as_module(ep), Config(min_weight_size=0))
    assert {s.name: s.kind for s in det.layers} == {"w_conv": "conv2d", "w_lin": "linear", "w_mm": "matmul"}
    ep2 = torch.export.export(CNN().eval(), (torch.randn(2, 3, 8, 8),))
    det2 = find_torch_layers(as_module(ep2), Config(min_weight_size=0))
    found2 = names(det2)
    assert {"grouped.weight", "depthwise.weight", "head.weight", "seq.weight"} <= set(found2)
    # the same conv attributes from aten calls as from the modules
    for name, spec in names(find_torch_layers(CNN(), Config(min_weight_size=0))).items():
        got = found2[name]
        assert (got.groups, got.stride, got.dilation) == (spec.groups, spec.stride, spec.dilation), name


def test_graph_module_from_symbolic_trace():
    gm = torch.fx.symbolic_trace(MLP())
    det = find_torch_layers(gm, Config(min_weight_size=0))
    assert {s.name for s in det.layers} == {"fc1.weight", "fc2.weight", "fc3.weight"}


def test_scope_options():
    cfg = Config(min_weight_size=0, ignore=("fc2*",))
    det = find_torch_layers(MLP(), cfg)
    assert {s.name for s in det.layers} == {"fc1.weight", "fc3.weight"}
    assert [(spec.name, why) for spec, why in det.skipped] == [("fc2.weight", "matches ignore pattern 'fc2*'")]
    det = find_torch_layers(CNN(), Config(min_weight_size=0, ignore_types=("conv2d",)))
    assert {s.kind for s in det.layers} == {"linear", "conv1d"}
    det = find_torch_layers(MLP(), Config(min_weight_size=1000))
    assert {s.name for s in det.layers} == {"fc1.weight", "fc2.weight"}  # fc3 has 640 weights
    det = find_torch_layers(MLP(), Config(min_weight_size=0, keep_first_last=True))
    assert {s.name for s in det.layers} == {"fc2.weight"}


def test_weight_shared_with_unsupported_op_is_skipped():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w) + self.w.sum()

    det = find_torch_layers(Tied(), Config(min_weight_size=0))
    assert not det.layers
    assert det.skipped and "does not compress" in det.skipped[0][1]


class _FunctionalGrouped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 2, 3, 3))
        self.w1 = torch.nn.Parameter(torch.randn(8, 8, 3))
        self.w_mixed = torch.nn.Parameter(torch.randn(8, 2, 1, 1))

    def forward(self, x):
        y = torch.nn.functional.conv2d(x, self.w, None, 2, 1, (1, 2), 4)
        z = torch.nn.functional.conv1d(y.flatten(2)[:, :8], self.w1, stride=[2], groups=1)
        m = torch.nn.functional.conv2d(x, self.w_mixed, groups=4) + torch.nn.functional.conv2d(x[:, :2], self.w_mixed)
        return z.sum() + m.sum()


def test_functional_conv_groups_stride_dilation():
    det = find_torch_layers(_FunctionalGrouped(), Config(min_weight_size=0))
    found = names(det)
    assert (found["w"].groups, found["w"].stride, found["w"].dilation) == (4, (2, 2), (1, 2))
    assert (found["w1"].groups, found["w1"].stride, found["w1"].dilation) == (1, (2,), (1,))
    # one weight in a grouped and an ungrouped convolution: skipped, never a guess
    assert "w_mixed" not in found
    assert [why for n, why in det.skipped if n == "w_mixed"] == ["used by convolutions with different groups [1, 4]"]
    _FunctionalGrouped()(torch.randn(2, 8, 6, 6))  # the module itself is valid


def test_float32_weights_are_read_only_views_not_copies():
    """A spec holds the model's own float32 weight (a copy held the model once more for the whole
    run) and cannot write into it; other dtypes are converted into arrays of their own."""
    model = MLP()
    found = names(find_torch_layers(model, Config(min_weight_size=0)))
    w = found["fc1.weight"].weight
    assert w.dtype == np.float32 and not w.flags.writeable
    assert np.shares_memory(w, model.fc1.weight.detach().numpy())
    with pytest.raises(ValueError):
        w[0, 0] = 1.0
    half = MLP().half()
    converted = names(find_torch_layers(half, Config(min_weight_size=0)))["fc1.weight"].weight
    assert converted.dtype == np.float32 and converted.flags.writeable
    np.testing.assert_array_equal(converted, half.fc1.weight.detach().float().numpy())
