"""ONNX frontend: which weights are found (per pattern), what is skipped and why, load errors.

The small graph builders here are reused by test_onnx_export.py.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from riem_compiler.config import Config
from riem_compiler.errors import InputError
from riem_compiler.frontend.onnx_frontend import find_onnx_layers, load_onnx

F = TensorProto.FLOAT
ALL = Config(min_weight_size=0, quiet=True)


def rand(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes, inputs, outputs, inits=(), opset=17, **kw):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in dict(inits).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)
    onnx.checker.check_model(model)
    return model


# ----------------------------------------------------------------------------- pattern builders
# each returns (model, feeds) with a compressible weight named "W"

def gemm_model(trans_a=0, trans_b=0, alpha=1.0, beta=1.0, bias=True, n_in=32, n_out=24, batch=4):
    w_shape = (n_out, n_in) if trans_b else (n_in, n_out)
    x_shape = (n_in, batch) if trans_a else (batch, n_in)
    inits = {"W": rand(w_shape, 1)}
    inputs = ["x", "W"]
    if bias:
        inits["C"] = rand((n_out,), 2)
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    model = make_model([node], [vi("x", x_shape)], [vi("y", (batch, n_out))], inits)
    return model, {"x": rand(x_shape, 3)}


def matmul_right_model(n_in=32, n_out=24):
    """x (2, 5, n_in) @ W (n_in, n_out): batched activations."""
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = make_model([node], [vi("x", (2, 5, n_in))], [vi("y", (2, 5, n_out))], {"W": rand((n_in, n_out), 1)})
    return model, {"x": rand((2, 5, n_in), 3)}


def matmul_left_model(n_in=32, n_out=24):
    """W (n_out, n_in) @ x (2, n_in, 7): the weight on the left."""
    node = helper.make_node("MatMul", ["W", "x"], ["y"], name="mm_left")
    model = make_model([node], [vi("x", (2, n_in, 7))], [vi("y", (2, n_out, 7))], {"W": rand((n_out, n_in), 1)})
    return model, {"x": rand((2, n_in, 7), 3)}


def conv_model(c_in=4, c_out=8, k=3, group=1, dims=2, bias=True, size=9, **attrs):
    w_shape = (c_out, c_in // group) + (k,) * dims
    x_shape = (2, c_in) + (size,) * dims
    inits = {"W": rand(w_shape, 1)}
    inputs = ["x", "W"]
    if bias:
        inits["B"] = rand((c_out,), 2)
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=group, **attrs)
    model = make_model([node], [vi("x", x_shape)], [vi("y", [None] * (dims + 2))], inits)
    return model, {"x": rand(x_shape, 3)}


def chain_model():
    """float16 Constant node -> Cast -> Transpose -> Identity -> MatMul (what exporters emit)."""
    w = rand((24, 32), 1, np.float16)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W")),
        helper.make_node("Cast", ["W"], ["Wf"], to=F),
        helper.make_node("Transpose", ["Wf"], ["Wt"], perm=[1, 0]),
        helper.make_node("Identity", ["Wt"], ["Wi"]),
        helper.make_node("MatMul", ["x", "Wi"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [vi("x", (3, 32))], [vi("y", (3, 24))])
    return model, {"x": rand((3, 32), 3)}


def control_flow_model():
    """An If whose branches hold a Gemm (outer weight "W") and a MatMul (inner weight "W_else"),
    a Loop whose body multiplies by outer weight "W_loop", and an LSTM the pass must not touch (it lists its weights as kept)."""
    then_g = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["t_out"], transB=1, name="then_gemm")],
                               "then", [], [vi("t_out", (3, 24))])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "W_else"], ["e_out"], name="else_mm")],
                               "else", [], [vi("e_out", (3, 24))],
                               [numpy_helper.from_array(rand((32, 24), 5), "W_else")])
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W_loop"], ["h_mm"], name="loop_mm"),
         helper.make_node("Tanh", ["h_mm"], ["h_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("iter", (), TensorProto.INT64), vi("cond_in", (), TensorProto.BOOL), vi("h_in", (3, 24))],
        [vi("cond_out", (), TensorProto.BOOL), vi("h_out", (3, 24))])
    nodes = [
        helper.make_node("If", ["flag"], ["branch"], then_branch=then_g, else_branch=else_g, name="if"),
        helper.make_node("Loop", ["trips", "", "branch"], ["looped"], body=body, name="loop"),
        helper.make_node("Reshape", ["looped", "seq_shape"], ["seq"]),
        helper.make_node("LSTM", ["seq", "lstm_W", "lstm_R"], ["", "lstm_h"], hidden_size=6, name="lstm"),
    ]
    inits = {"W": rand((24, 32), 1), "W_loop": rand((24, 24), 2) * 0.2, "trips": np.array(2, np.int64),
             "seq_shape": np.array([3, 1, 24], np.int64), "lstm_W": rand((1, 24, 24), 6) * 0.1,
             "lstm_R": rand((1, 24, 6), 7) * 0.1}
    model = make_model(nodes, [vi("x", (3, 32)), vi("flag", (), TensorProto.BOOL)],
                       [vi("looped", (3, 24)), vi("lstm_h", [None] * 3)], inits)
    return model, {"x": rand((3, 32), 3), "flag": np.array(True)}


# ----------------------------------------------------------------------------- detection

def only(specs):
    assert len(specs) == 1, specs
    return specs[0]


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,bias", [
    (0, 0, 1.0, 1.0, True), (0, 1, 0.5, 2.0, True), (1, 1, 1.0, 1.0, False), (1, 0, 2.0, 0.0, True)])
def test_gemm_variants_found(trans_a, trans_b, alpha, beta, bias):
    model, _ = gemm_model(trans_a, trans_b, alpha, beta, bias)
    spec = only(find_onnx_layers(model, ALL)[0])
    assert spec.name == "W" and spec.kind == "linear" and spec.module == "gemm"
    assert (spec.attrs["transA"], spec.attrs["transB"]) == (trans_a, trans_b)
    assert spec.attrs["alpha"] == pytest.approx(alpha) and spec.attrs["beta"] == pytest.approx(beta)
    np.testing.assert_array_equal(spec.weight, numpy_helper.to_array(model.graph.initializer[0]))
    assert (spec.bias is not None) == bias


@pytest.mark.parametrize("builder,operand", [(matmul_right_model, 1), (matmul_left_model, 0)])
def test_matmul_weight_either_side(builder, operand):
    spec = only(find_onnx_layers(builder()[0], ALL)[0])
    assert spec.kind == "matmul" and spec.attrs["operand"] == operand and spec.name == "W"


@pytest.mark.parametrize("kwargs,kind", [
    ({}, "conv2d"), ({"group": 2}, "conv2d"), ({"c_in": 8, "group": 8}, "conv2d"),
    ({"dilations": [2, 2], "pads": [2, 2, 2, 2]}, "conv2d"), ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, "conv2d"),
    ({"dims": 1, "pads": [1, 1]}, "conv1d")])
def test_conv_variants_found(kwargs, kind):
    model, _ = conv_model(**kwargs)
    spec = only(find_onnx_layers(model, ALL)[0])
    spatial = 1 if kind == "conv1d" else 2
    assert spec.kind == kind and spec.groups == kwargs.get("group", 1) and "group" not in spec.attrs
    assert spec.stride == tuple(kwargs.get("strides", (1,) * spatial))
    assert spec.dilation == tuple(kwargs.get("dilations", (1,) * spatial))
    for key in ("pads", "auto_pad"):
        if key in kwargs:
            assert spec.attrs[key] == kwargs[key]
    assert spec.bias is not None and spec.bias.shape == (8,)


def test_conv3d_and_both_constant_matmul_are_reported_skipped():
    model, _ = conv_model(dims=3, size=4)
    specs, skipped = find_onnx_layers(model, ALL)
    assert specs == [] and skipped[0][0] == "W" and "3-D" in skipped[0][1]
    node = helper.make_node("MatMul", ["A", "B"], ["y"], name="folded")
    model = make_model([node], [], [vi("y", (4, 4))], {"A": rand((4, 4)), "B": rand((4, 4), 1)})
    specs, skipped = find_onnx_layers(model, ALL)
    assert specs == [] and skipped == [("folded", "MatMul with two constant operands (fold it instead)")]


def test_constant_node_behind_cast_transpose_identity():
    model, _ = chain_model()
    spec = only(find_onnx_layers(model, ALL)[0])
    assert spec.name == "W" and spec.attrs["source"] == "constant"
    assert spec.attrs["chain"] == ["Cast", "Transpose", "Identity"]
    assert spec.attrs["dtype"] == TensorProto.FLOAT16 and spec.weight.dtype == np.float32
    assert spec.weight.shape == (24, 32)


def test_control_flow_bodies_are_searched():
    model, _ = control_flow_model()
    specs, skipped = find_onnx_layers(model, ALL)
    by_name = {s.name: s for s in specs}
    assert set(by_name) == {"W", "W_else", "W_loop"}
    assert by_name["W"].attrs["graph"] == "" and by_name["W"].module == "then_gemm"
    assert by_name["W_else"].attrs["graph"].endswith(":else_branch")
    assert by_name["W_loop"].kind == "matmul"
    assert "lstm_W" not in by_name  # the LSTM's weights are seen and listed as kept, not compressed
    assert sorted(name for name, _ in skipped) == ["lstm_R", "lstm_W"]
    assert all(why.startswith("LSTM weight") and "kept float" in why for _, why in skipped)


def test_shared_weight_is_one_spec_with_all_consumers():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="second")]
    model = make_model(nodes, [vi("x", (2, 16))], [vi("y", (2, 16))], {"W": rand((16, 16))})
    spec = only(find_onnx_layers(model, ALL)[0])
    assert spec.attrs["consumers"] == ["first", "second"]


def test_config_filters():
    model, _ = gemm_model()
    assert find_onnx_layers(model, Config(ignore=("gem*",), min_weight_size=0))[0] == []
    skipped = find_onnx_layers(model, Config(ignore=("W",), min_weight_size=0))[1]
    # scope-filtered layers come back with their spec, so the report can show shape and bytes
    assert [(spec.name, spec.shape, why) for spec, why in skipped] == [("W", (32, 24), "matches ignore pattern 'W'")]
    assert find_onnx_layers(model, Config(ignore_types=("linear",), min_weight_size=0))[0] == []
    specs, skipped = find_onnx_layers(model, Config(min_weight_size=32 * 24 + 1))
    assert specs == [] and "min_weight_size" in skipped[0][1]
    assert len(find_onnx_layers(model, Config(min_weight_size=32 * 24))[0]) == 1


def test_initializer_that_is_also_an_input_is_skipped():
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    model = make_model([node], [vi("x", (2, 16)), vi("W", (16, 16))], [vi("y", (2, 16))], {"W": rand((16, 16))})
    specs, skipped = find_onnx_layers(model, ALL)
    assert specs == [] and "graph input" in skipped[0][1]


def test_integer_weight_is_skipped():
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    model = make_model([node], [vi("x", (2, 16), TensorProto.INT32)], [vi("y", (2, 16), TensorProto.INT32)],
                       {"W": np.ones((16, 16), np.int32)})
    specs, skipped = find_onnx_layers(model, ALL)
    assert specs == [] and "not floating point" in skipped[0][1]


# ----------------------------------------------------------------------------- loading and bad files

def _one_line_error(path_or_model, *needles):
    with pytest.raises(InputError) as info:
        load_onnx(path_or_model)
    text = str(info.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text
    return text


def test_load_with_external_data(tmp_path):
    model, _ = gemm_model()
    weight = numpy_helper.to_array(model.graph.initializer[0])
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size >= 32 * 24 * 4
    loaded = load_onnx(path)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weight)
    assert only(find_onnx_layers(loaded, ALL)[0]).name == "W"


def test_missing_external_data_file(tmp_path):
    model, _ = gemm_model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    _one_line_error(path, str(path), "weights.bin", "not found")


def test_truncated_protobuf(tmp_path):
    model, _ = gemm_model()
    data = model.SerializeToString()
    for cut in (len(data) // 2, 7):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        _one_line_error(path, str(path))


def test_not_onnx_and_missing_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\xff\xfe this is not a protobuf \x00\x01")
    _one_line_error(path, str(path))
    _one_line_error(tmp_path / "absent.onnx", "absent.onnx", "no such file")


def test_unsupported_opset(tmp_path):
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    model = make_model([node], [vi("x", (2, 16))], [vi("y", (2, 16))], {"W": rand((16, 16))}, opset=10)
    path = tmp_path / "old.onnx"
    onnx.save_model(model, str(path))
    _one_line_error(path, str(path), "opset 10")
    _one_line_error(model, "opset 10")


def _branch(tag, weight_name, init=None):
    inits = [] if init is None else [numpy_helper.from_array(init, weight_name)]
    return helper.make_graph([helper.make_node("MatMul", ["x", weight_name], [f"{tag}_y"], name=f"{tag}_mm")],
                             tag, [], [vi(f"{tag}_y", (3, 16))], inits)


def test_names_defined_in_several_scopes_are_skipped():
    """Sibling bodies with their own "W", and a Loop body input named like an outer weight: each
    name stands for several tensors, so none is taken (and no tensor's data is mixed up)."""
    node = helper.make_node("If", ["flag"], ["y"], then_branch=_branch("then", "W", rand((32, 16), 1)),
                            else_branch=_branch("else", "W", rand((32, 16), 2)), name="if")
    model = make_model([node], [vi("x", (3, 32)), vi("flag", (), TensorProto.BOOL)], [vi("y", (3, 16))])
    specs, skipped = find_onnx_layers(model, ALL)
    assert specs == [] and skipped == [("W", "name 'W' is defined 2 times in the model (a subgraph shadows it or "
                                              "is shadowed by it); left as is")]
    body = helper.make_graph(
        [helper.make_node("MatMul", ["V", "U"], ["h_mm"], name="loop_mm"),  # V: the body's own input
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("iter", (), TensorProto.INT64), vi("cond_in", (), TensorProto.BOOL), vi("V", (16, 16))],
        [vi("cond_out", (), TensorProto.BOOL), vi("h_mm", (16, 16))])
    nodes = [helper.make_node("MatMul", ["x", "V"], ["h"], name="outer_mm"),
             helper.make_node("Loop", ["trips", "", "h"], ["looped"], body=body, name="loop")]
    model = make_model(nodes, [vi("x", (16, 16))], [vi("looped", (16, 16))],
                       {"V": rand((16, 16), 3), "U": rand((16, 16), 4), "trips": np.array(2, np.int64)})
    specs, skipped = find_onnx_layers(model, ALL)
    assert [s.name for s in specs] == ["U"]  # the body's MatMul weight from the outer scope
    assert dict(skipped)["V"].startswith("name 'V' is defined 2 times")


def test_weight_of_convs_with_different_groups_is_skipped():
    w = rand((8, 2, 1, 1))
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], group=4, name="grouped"),
             helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["x2"]),
             helper.make_node("Conv", ["x2", "W"], ["b"], name="plain"),
             helper.make_node("Add", ["a", "b"], ["y"])]
    model = make_model(nodes, [vi("x", (1, 8, 4, 4))], [vi("y", (1, 8, 4, 4))],
                       {"W": w, "starts": np.array([0], np.int64), "ends": np.array([2], np.int64),
                        "axes": np.array([1], np.int64)})
    specs, skipped = find_onnx_layers(model, ALL)
    assert specs == [] and skipped == [("W", "used by convolutions with different groups [1, 4]")]

