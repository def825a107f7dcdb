"""The hardening corpus: small model files, good and bad, generated on demand into a folder.

Generated rather than checked in, so the repository stays small and each file says in code
exactly what is wrong with it. `write_corpus(dir)` writes them all; each builder writes one.
Used by tests/test_hardening.py and tests/test_cli.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
N_IN, N_HID, N_OUT = 32, 64, 16


def mlp_weights(seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {"W1": (g.standard_normal((N_IN, N_HID)) / N_IN ** 0.5).astype(np.float32),
            "b1": (0.1 * g.standard_normal(N_HID)).astype(np.float32),
            "W2": (g.standard_normal((N_HID, N_OUT)) / N_HID ** 0.5).astype(np.float32)}


def mlp_model(weights: dict[str, np.ndarray] | None = None, batch="batch", opset: int = OPSET) -> onnx.ModelProto:
    """X (batch, 32) -> MatMul W1 -> Add b1 -> Relu -> MatMul W2 -> Y (batch, 16).

    `batch` is a dim_param name (dynamic) or an int (static)."""
    w = weights or mlp_weights()
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "W2"], ["Y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, w["W1"].shape[0]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, w["W2"].shape[1]])],
        [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def good_mlp(d: Path) -> Path:
    return save(mlp_model(batch=2), d / "mlp.onnx")


def dynamic_batch(d: Path) -> Path:
    return save(mlp_model(batch="batch"), d / "dynamic.onnx")


def truncated(d: Path) -> Path:
    data = mlp_model().SerializeToString()
    path = d / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupt(d: Path) -> Path:
    path = d / "corrupt.onnx"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def empty_file(d: Path) -> Path:
    path = d / "empty.onnx"
    path.write_bytes(b"")
    return path


def unknown_opset(d: Path) -> Path:
    model = mlp_model()
    model.opset_import[0].version = 99
    return save(model, d / "opset99.onnx")


def nan_weights(d: Path) -> Path:
    w = mlp_weights()
    w["W1"][3, 5] = np.nan
    return save(mlp_model(w, batch=2), d / "nan.onnx")


def inf_weights(d: Path) -> Path:
    w = mlp_weights()
    w["W2"][0, 0] = np.inf
    return save(mlp_model(w, batch=2), d / "inf.onnx")


def zero_weights(d: Path) -> Path:
    w = mlp_weights()
    w["W1"][:] = 0.0
    return save(mlp_model(w, batch=2), d / "zeros.onnx")


def one_by_one(d: Path) -> Path:
    """A Gemm with a 1x1 weight: nothing worth compressing."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["X", "W", "B"], ["Y"], name="tiny", transB=1)], "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 1])],
        [numpy_helper.from_array(np.array([[1.5]], np.float32), "W"),
         numpy_helper.from_array(np.array([0.25], np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return save(model, d / "one_by_one.onnx")


def missing_external_data(d: Path) -> Path:
    """A valid model saved with external data, whose data file is then deleted."""
    sub = d / "external"
    sub.mkdir(exist_ok=True)
    path = sub / "model.onnx"
    onnx.save_model(mlp_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    (sub / "model.onnx.data").unlink()
    return path


def conv3d_only(d: Path) -> Path:
    """A 3-D convolution (5-D weight): a layer type the pass does not handle."""
    w = np.random.default_rng(2).standard_normal((8, 4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W"], ["Y"], name="conv3d", pads=[1] * 6)], "conv3d",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 4, 4, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8, 4, 4, 4])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return save(model, d / "conv3d.onnx")


def no_weights(d: Path) -> Path:
    """Only element-wise ops: nothing to compress."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["Y"], name="relu")], "relu",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return save(model, d / "relu.onnx")


def not_a_model(d: Path) -> Path:
    path = d / "notes.txt"
    path.write_text("not a model\n")
    return path


BUILDERS = {f.__name__: f for f in (good_mlp, dynamic_batch, truncated, corrupt, empty_file, unknown_opset,
                                    nan_weights, inf_weights, zero_weights, one_by_one, missing_external_data,
                                    conv3d_only, no_weights, not_a_model)}


def write_corpus(d: Path) -> dict[str, Path]:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    return {name: build(d) for name, build in BUILDERS.items()}
