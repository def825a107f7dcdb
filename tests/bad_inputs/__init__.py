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


def if_shadowed_weight(d: Path) -> Path:
    """An If whose then/else branches each hold their own initializer named "W" (a MatMul
    weight), shadowing the main graph's initializer "W" (also a MatMul weight); three different
    64x64 tensors under one name. After the If, a MatMul with "V" (unshadowed, compressible).
    Inputs X (2, 64) float and cond () bool; Y (2, 64) depends on the branch taken."""
    g = np.random.default_rng(11)

    def weight():
        return (g.standard_normal((64, 64)) / 8).astype(np.float32)

    def branch(tag):
        return helper.make_graph(
            [helper.make_node("MatMul", ["h", "W"], [f"{tag}_out"], name=f"{tag}_mm"),
             helper.make_node("Relu", [f"{tag}_out"], [f"{tag}_y"])],
            tag, [], [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, [2, 64])],
            [numpy_helper.from_array(weight(), "W")])

    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"], name="main_mm"),
             helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=branch("then"),
                              else_branch=branch("else")),
             helper.make_node("MatMul", ["branch", "V"], ["Y"], name="out_mm")]
    graph = helper.make_graph(
        nodes, "if_shadowed",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(weight(), "W"), numpy_helper.from_array(weight(), "V")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return save(model, d / "if_shadowed.onnx")


def _square(g, n=64, scale=8.0):
    return (g.standard_normal((n, n)) / scale).astype(np.float32)


def _model(nodes, name, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def _fx(name="X", n=64):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, n])


def shared_weight_mixed_uses(d: Path) -> Path:
    """One initializer W used by two MatMuls, a Gather (rows picked by the int64 input "ids")
    and an Add: every consumer must see the same decoded tensor."""
    w = _square(np.random.default_rng(12))
    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["m2"], name="mm2"),
             helper.make_node("Gather", ["W", "ids"], ["rows"], axis=0, name="gather"),
             helper.make_node("Add", ["m2", "rows"], ["Y"], name="add_rows"),
             helper.make_node("Add", ["W", "W"], ["W2x"], name="add_self"),
             helper.make_node("ReduceSum", ["W2x"], ["Z"], keepdims=0, name="sum")]
    model = _model(nodes, "shared_mixed", [_fx(), helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                   [_fx("Y"), helper.make_tensor_value_info("Z", TensorProto.FLOAT, [])], {"W": w})
    return save(model, d / "shared_mixed.onnx")


def initializer_is_input(d: Path) -> Path:
    """W is an initializer and a graph input (a default the caller may override); V is plain."""
    g = np.random.default_rng(13)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"], name="mm_w"),
             helper.make_node("MatMul", ["h", "V"], ["Y"], name="mm_v")]
    model = _model(nodes, "overridable", [_fx(), helper.make_tensor_value_info("W", TensorProto.FLOAT, [64, 64])],
                   [_fx("Y")], {"W": _square(g), "V": _square(g)})
    return save(model, d / "overridable.onnx")


def weight_is_output(d: Path) -> Path:
    """W is a MatMul weight and also a graph output (returned as it is)."""
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")]
    model = _model(nodes, "weight_out", [_fx()],
                   [_fx("Y"), helper.make_tensor_value_info("W", TensorProto.FLOAT, [64, 64])],
                   {"W": _square(np.random.default_rng(14))})
    return save(model, d / "weight_out.onnx")


def loop_constant_left_operand(d: Path) -> Path:
    """A Loop body whose weight is a float16 Constant node reached through Cast and Transpose
    (what exporters emit), a main-graph MatMul with its weight on the left, and node names
    used twice across scopes ("mm" in the main graph and in the body; onnxruntime refuses
    duplicates within one graph, so those are not a model to keep working)."""
    g = np.random.default_rng(15)
    body_w = _square(g).astype(np.float16)
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["Wb"], value=numpy_helper.from_array(body_w, "Wb"), name="loop"),
         helper.make_node("Cast", ["Wb"], ["Wb32"], to=TensorProto.FLOAT, name="if"),
         helper.make_node("Transpose", ["Wb32"], ["WbT"], perm=[1, 0]),
         helper.make_node("MatMul", ["h_in", "WbT"], ["h_mm"], name="mm"),
         helper.make_node("Tanh", ["h_mm"], ["h_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _fx("h_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _fx("h_out")])
    nodes = [helper.make_node("MatMul", ["X", "A"], ["h"], name="mm"),
             helper.make_node("Loop", ["trips", "", "h"], ["looped"], body=body, name="loop"),
             helper.make_node("Transpose", ["looped"], ["lt"], perm=[1, 0]),
             helper.make_node("MatMul", ["L", "lt"], ["left"], name="mm_left"),  # (64, 64) @ (64, 2)
             helper.make_node("Transpose", ["left"], ["Y"], perm=[1, 0])]
    model = _model(nodes, "loop_left", [_fx()], [_fx("Y")],
                   {"A": _square(g), "L": _square(g), "trips": np.array(3, np.int64)})
    return save(model, d / "loop_left.onnx")


def not_a_model(d: Path) -> Path:
    path = d / "notes.txt"
    path.write_text("not a model\n")
    return path


BUILDERS = {f.__name__: f for f in (good_mlp, dynamic_batch, truncated, corrupt, empty_file, unknown_opset,
                                    nan_weights, inf_weights, zero_weights, one_by_one, missing_external_data,
                                    conv3d_only, no_weights, if_shadowed_weight, shared_weight_mixed_uses,
                                    initializer_is_input, weight_is_output, loop_constant_left_operand,
                                    not_a_model)}


def write_corpus(d: Path) -> dict[str, Path]:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    return {name: build(d) for name, build in BUILDERS.items()}


# ----------------------------------------------------------------------------- hostile .pt2 archives
# Real torch.export archives (written with torch's own archive writer), each carrying a payload
# that plain torch.export.load / ExportedProgram.module() / one forward call would run: it
# creates the file `marker`. Not in BUILDERS (they need torch and take a second each to export).

class RunsCode:
    """Unpickling this runs code: exec() creates `marker`. Only builtins are named in the
    pickle, so any process can unpickle it (and run it)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _torch_bytes(obj) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def pt2_program(d: Path, name: str = "prog", dynamic: bool = False) -> Path:
    """A normal program: Linear(32, 16) + a constant (non-persistent buffer); batch 2, or a
    dynamic batch in [2, 64] (stored shape expressions and range guards)."""
    import torch

    class WithConstant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = torch.nn.Linear(32, 16)
            self.register_buffer("offset", torch.linspace(-1, 1, 16), persistent=False)

        def forward(self, x):
            return self.fc(x) + self.offset

    shapes = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=2, max=64)},)} if dynamic else {}
    program = torch.export.export(WithConstant().eval(), (torch.randn(4 if dynamic else 2, 32),), **shapes)
    path = Path(d) / f"{name}.pt2"
    torch.export.save(program, str(path))
    return path


def _rewrite_pt2(src: Path, dst: Path, edit=None, add=None) -> Path:
    """Copy archive `src` to `dst` record by record; edit(name, bytes) -> bytes may change a record."""
    import torch

    reader, writer = torch._C.PyTorchFileReader(str(src)), torch._C.PyTorchFileWriter(str(dst))
    writer.set_min_version(6)
    for name in reader.get_all_records():
        if name.startswith(".data/"):
            continue  # the writer adds its own
        data = reader.get_record(name)
        data = edit(name, data) if edit else data
        writer.write_record(name, data, len(data))
    for name, data in (add or {}).items():
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    return dst


def _edit_json(record: str, change):
    import json

    def edit(name, data):
        if name != record:
            return data
        doc = json.loads(data)
        change(doc)
        return json.dumps(doc).encode()

    return edit


def _pt2_pickled_record(d: Path, marker: Path, stem: str, config: str, flag, record: str) -> Path:
    """A program whose `record` is flagged use_pickle (by `flag` on the JSON `config`) and holds
    a torch.save'd RunsCode, which torch.load(weights_only=False) would run."""
    d = Path(d)
    base = pt2_program(d, f"base_{stem}")
    json_edit = _edit_json(config, flag)
    payload = _torch_bytes(RunsCode(marker))
    return _rewrite_pt2(base, d / f"{stem}.pt2", lambda name, data: payload if name == record else json_edit(name, data))


def pt2_pickled_constant(d: Path, marker: Path) -> Path:
    """The constant is flagged use_pickle; its record is a torch.save'd RunsCode."""
    return _pt2_pickled_record(d, marker, "pickled_constant", "data/constants/model_constants_config.json",
                               lambda doc: doc["config"]["offset"].update(use_pickle=True), "data/constants/tensor_0")


def pt2_pickled_weight(d: Path, marker: Path) -> Path:
    """A weight flagged use_pickle whose record is a torch.save'd RunsCode."""
    return _pt2_pickled_record(d, marker, "pickled_weight", "data/weights/model_weights_config.json",
                               lambda doc: doc["config"]["fc.weight"].update(use_pickle=True, path_name="weight_0"),
                               "data/weights/weight_0")


def pt2_opaque_constant(d: Path, marker: Path) -> Path:
    """The constant is an "opaque object": torch.export.load reads it with pickle.loads."""
    d = Path(d)
    base = pt2_program(d, "base_oc")
    meta = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    edit = _edit_json("data/constants/model_constants_config.json", lambda doc: doc["config"].update(offset=meta))
    return _rewrite_pt2(base, d / "opaque_constant.pt2", edit,
                        add={"data/constants/opaque_obj_0": pickle_dumps(RunsCode(marker))})


def pickle_dumps(obj) -> bytes:
    import pickle

    return pickle.dumps(obj)


def pt2_pickled_example_inputs(d: Path, marker: Path) -> Path:
    """Example inputs that torch.load(weights_only=True) refuses; torch then retries with weights_only=False."""
    import torch

    d = Path(d)
    base = pt2_program(d, "base_ei")
    payload = _torch_bytes(((torch.randn(2, 32), RunsCode(marker)), {}))
    return _rewrite_pt2(base, d / "pickled_inputs.pt2",
                        lambda name, data: payload if name == "data/sample_inputs/model.pt" else data)


def pt2_guard_code(d: Path, marker: Path) -> Path:
    """A stored guard (Python source) that .module() exec's into the forward: calling it creates marker."""
    d = Path(d)
    base = pt2_program(d, "base_gc")
    guard = f"__import__('builtins').open({str(marker)!r}, 'w') is not None"
    return _rewrite_pt2(base, d / "guard_code.pt2",
                        _edit_json("models/model.json", lambda doc: doc.update(guards_code=[guard])))


def pt2_shape_expression(d: Path, marker: Path) -> Path:
    """A stored shape expression (sympy text; sympy.sympify eval's it) that creates marker."""
    d = Path(d)
    base = pt2_program(d, "base_se", dynamic=True)
    symbol = "Symbol('s77', positive=True, integer=True)"

    def edit(name, data):
        if name != "models/model.json":
            return data
        text = data.decode()
        assert symbol in text, "torch names the batch symbol differently now; update the builder"
        return text.replace(symbol, f"{symbol} + 0*len(open({str(marker)!r}, 'w').name)", 1).encode()

    return _rewrite_pt2(base, d / "shape_expression.pt2", edit)


def pt2_graph_attribute_name(d: Path, marker: Path) -> Path:
    """A torch.cond branch graph whose attribute name breaks out of the getattr(self, "...") that
    FX writes for it into the generated forward: calling the module creates marker."""
    import torch

    class Branches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = torch.nn.Linear(32, 16)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda x: self.fc(x), lambda x: self.fc(x) * 2, (x,))

    d = Path(d)
    base = d / "base_ga.pt2"
    torch.export.save(torch.export.export(Branches().eval(), (torch.randn(2, 32),)), str(base))
    name = f'training"); open({str(marker)!r}, "w"); ("'  # `training` exists, so getattr succeeds

    def edit(record, data):
        if record != "models/model.json":
            return data
        text = data.decode()
        assert text.count('"true_graph_0"') == 1, "torch names cond branches differently now; update the builder"
        return text.replace('"true_graph_0"', json_string(name)).encode()

    return _rewrite_pt2(base, d / "graph_attribute.pt2", edit)


def json_string(text: str) -> str:
    import json

    return json.dumps(text)


def pt2_aoti_library(d: Path) -> Path:
    """An archive with an AOTInductor section: torch.export.load would load its shared library."""
    d = Path(d)
    return _rewrite_pt2(pt2_program(d, "base_ao"), d / "aoti.pt2",
                        add={"data/aotinductor/model/model.so": b"\x7fELF not really a library"})


def pt2_traversal_entry(d: Path) -> Path:
    """An archive entry whose name climbs out of the archive (../../...)."""
    d = Path(d)
    return _rewrite_pt2(pt2_program(d, "base_tr"), d / "traversal.pt2",
                        add={"data/extra/../../../../../../tmp/riem_pt2_escape": b"x"})


HOSTILE_PT2 = {f.__name__: f for f in (pt2_pickled_constant, pt2_pickled_weight, pt2_opaque_constant,
                                       pt2_pickled_example_inputs, pt2_guard_code, pt2_shape_expression,
                                       pt2_graph_attribute_name)}


# ----------------------------------------------------------------------------- external data and raw bytes
# Each builder writes into its own subfolder of d. external_data_model is valid (data in a
# subfolder, `weights/w.bin`); the others are broken on purpose. Not in BUILDERS (used by the
# tests that need them).

def external_data_model(d: Path, name: str = "ext") -> Path:
    """A valid MLP whose tensors all live in `weights/w.bin` beside the model."""
    sub = d / name
    (sub / "weights").mkdir(parents=True, exist_ok=True)
    path = sub / "model.onnx"
    onnx.save_model(mlp_model(batch=2), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    (sub / "w.bin").rename(sub / "weights" / "w.bin")
    return _edit_external(path, lambda t, info: info.update(location="weights/w.bin"))


def _edit_external(path: Path, change) -> Path:
    """Rewrite the external-data entries of every tensor: change(tensor, info dict) edits the dict."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        change(t, info)
        del t.external_data[:]
        for key, value in info.items():
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
    onnx.save_model(model, str(path))  # no raw_data in memory: only the model file is written
    return path


def _drop(info, *keys):
    for k in keys:
        info.pop(k, None)


def external_self_location(d: Path) -> Path:
    """Every tensor's location is the model file itself (no offset/length: "read it all")."""
    path = external_data_model(d, "self_location")
    return _edit_external(path, lambda t, info: (info.update(location="model.onnx"), _drop(info, "offset", "length")))


def external_escape(d: Path) -> Path:
    """The data file lies one folder above the model and the location says `../w.bin`."""
    path = external_data_model(d, "escape")
    (path.parent / "weights" / "w.bin").rename(d / "w.bin")
    return _edit_external(path, lambda t, info: info.update(location="../w.bin"))


def external_absolute(d: Path) -> Path:
    """The location is an absolute path (to a file that exists)."""
    path = external_data_model(d, "absolute")
    absolute = str((path.parent / "weights" / "w.bin").resolve())
    return _edit_external(path, lambda t, info: info.update(location=absolute))


def external_short_data(d: Path) -> Path:
    """The data file was cut to half its size."""
    path = external_data_model(d, "short_data")
    data = path.parent / "weights" / "w.bin"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return path


def external_long_data(d: Path) -> Path:
    """W1 (at offset 0) has no length, so it reads to the end of the shared data file: more bytes
    than 32x64 float32, which the checker does not catch (numpy's reshape failed: exit 1)."""
    path = external_data_model(d, "long_data")
    path = _edit_external(path, lambda t, info: _drop(info, "offset", "length") if t.name == "W1" else None)
    data = path.parent / "weights" / "w.bin"
    data.write_bytes(data.read_bytes() + b"\0" * 12)
    return path


def raw_data_too_long(d: Path) -> Path:
    """W1's inline raw_data holds 100 bytes more than 32x64 float32 (the checker only catches too few)."""
    model = mlp_model(batch=2)
    model.graph.initializer[0].raw_data += b"\0" * 100
    return save(model, d / "raw_data_too_long.onnx")


def negative_dim(d: Path) -> Path:
    model = mlp_model(batch=2)
    model.graph.initializer[0].dims[0] = -32
    return save(model, d / "negative_dim.onnx")


def huge_dim(d: Path) -> Path:
    """W1 claims 2**40 rows (4 PiB) but stores 8 KiB."""
    model = mlp_model(batch=2)
    model.graph.initializer[0].dims[0] = 2 ** 40
    return save(model, d / "huge_dim.onnx")


DAMAGED_ONNX = {f.__name__: f for f in (external_self_location, external_escape, external_absolute,
                                        external_short_data, external_long_data, raw_data_too_long,
                                        negative_dim, huge_dim)}
