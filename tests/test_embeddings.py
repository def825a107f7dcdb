"""Embedding tables (opt-in `compress_embeddings`): found by both frontends, compressed like any
matrix, kept dense and reported at their real size by default, and written to ONNX as decoder
functions, a row-major DequantizeLinear ("standard") or GatherBlockQuantized ("ort")."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper

import riem_compiler as rc
from riem_compiler.codegen.onnx_export import materialize_onnx, onnx_forms, read_compressed_onnx
from riem_compiler.config import Config
from riem_compiler.errors import InputError
from riem_compiler.frontend.layers import EMBEDDING_SKIP
from riem_compiler.frontend.onnx_frontend import find_onnx_layers
from riem_compiler.frontend.torch_frontend import MAX_NORM_SKIP, find_torch_layers
from riem_compiler.methods import decode
from riem_compiler.passes.rewrite_torch import RieMEmbedding, materialize
from test_onnx_export import run
from test_onnx_frontend import make_model, rand, vi

V, D = 1000, 128
RATIO = 0.15  # rtn: 4-bit codes, float16 scales per group of 128 (one group per row here)


class EmbedLinear(nn.Module):
    def __init__(self, max_norm=None):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0, max_norm=max_norm)
        self.fc = nn.Linear(D, 64)

    def forward(self, ids):
        return self.fc(self.emb(ids))


class FunctionalEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, D))
        self.fc = nn.Linear(D, 64)

    def forward(self, ids):
        return self.fc(F.embedding(ids, self.table))


def ids_input():
    return torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))


def record(report, name):
    return next(r for r in report.layers if r.name == name)


def same_arrays(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- torch

def test_torch_embedding_compressed_when_asked():
    torch.manual_seed(0)
    model, ids = EmbedLinear().eval(), ids_input()
    res = rc.optimize(model, example_inputs=(ids,), method="rtn", ratio=RATIO, quiet=True, compress_embeddings=True)
    assert isinstance(res.model.emb, RieMEmbedding) and res.model.emb.padding_idx == 0
    cw = res.compressed["emb.weight"]
    assert cw.shape == (V, D) and cw.meta["bits"] == 4
    rec = record(res.report, "emb.weight")
    assert (rec.kind, rec.status, rec.bytes_before, rec.bytes_after) == ("embedding", "compressed", V * D * 4, cw.nbytes)
    table, weight = torch.from_numpy(decode(cw)), torch.from_numpy(decode(res.compressed["fc.weight"]))
    with torch.no_grad():
        ref = F.linear(F.embedding(ids, table), weight, model.fc.bias)
        torch.testing.assert_close(res.model(ids), ref, rtol=0, atol=0)
    plain = materialize(res.model)
    assert type(plain.emb) is nn.Embedding and plain.emb.padding_idx == 0
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), ref, rtol=0, atol=0)


def test_torch_embedding_dense_by_default():
    torch.manual_seed(0)
    model, ids = EmbedLinear().eval(), ids_input()
    res = rc.optimize(model, example_inputs=(ids,), method="rtn", ratio=RATIO, quiet=True)
    assert type(res.model.emb) is nn.Embedding and "emb.weight" not in res.compressed
    rec = record(res.report, "emb.weight")
    assert (rec.kind, rec.status, rec.reason) == ("embedding", "skipped", EMBEDDING_SKIP)
    assert rec.bytes_before == rec.bytes_after == V * D * 4


def test_max_norm_embedding_left_alone():
    det = find_torch_layers(EmbedLinear(max_norm=1.0), Config(compress_embeddings=True, quiet=True))
    assert [s.name for s in det.layers] == ["fc.weight"]
    assert ("emb.weight", MAX_NORM_SKIP) in det.skipped


def test_functional_embedding():
    torch.manual_seed(0)
    model, ids = FunctionalEmbed().eval(), ids_input()
    det = find_torch_layers(model, Config(compress_embeddings=True, quiet=True))
    assert {s.name: s.kind for s in det.layers} == {"table": "embedding", "fc.weight": "linear"}
    res = rc.optimize(model, example_inputs=(ids,), method="rtn", ratio=RATIO, quiet=True, compress_embeddings=True)
    table = torch.from_numpy(decode(res.compressed["table"]))
    weight = torch.from_numpy(decode(res.compressed["fc.weight"]))
    with torch.no_grad():
        torch.testing.assert_close(res.model(ids), F.linear(F.embedding(ids, table), weight, model.fc.bias),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("onnx_format", ["functions", "ort"])
def test_torch_result_exports_compressed_embedding(tmp_path, onnx_format):
    torch.manual_seed(0)
    model, ids = EmbedLinear().eval(), ids_input()
    res = rc.optimize(model, example_inputs=(ids,), method="rtn", ratio=RATIO, quiet=True, compress_embeddings=True)
    path = res.export_onnx(tmp_path / "m.onnx", onnx_format=onnx_format)
    exported = onnx.load(str(path))
    back = read_compressed_onnx(exported)
    assert set(back) == {"emb.weight", "fc.weight"}
    same_arrays(back["emb.weight"].arrays, res.compressed["emb.weight"].arrays)
    ops = {n.op_type for n in exported.graph.node}
    if onnx_format == "ort":
        assert "GatherBlockQuantized" in ops and "Gather" not in ops
        assert onnx_forms(exported)["emb.weight"] == {"onnx_form": "ort"}
    with torch.no_grad():
        ref = res.model(ids).numpy()
    name = exported.graph.input[0].name
    out = run(exported, {name: ids.numpy()})[0]
    # ort: MatMulNBits multiplies int8-quantised activations; the table itself is exact
    np.testing.assert_allclose(out, ref, atol=1e-5 if onnx_format == "functions" else 3e-2, rtol=1e-4)


# ----------------------------------------------------------------------------- ONNX

def gather_model(dtype=np.float32):
    """Two Gathers of one table (2-D and 1-D ids) as outputs, and a MatMul after the first."""
    table = rand((V, D), 3).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("Gather", ["table", "ids1"], ["e1"], name="embed1"),
             helper.make_node("Cast", ["e"], ["ef"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["ef", "W"], ["y"], name="proj")]
    model = make_model(nodes, [vi("ids", [2, 9], TensorProto.INT64), vi("ids1", [3], TensorProto.INT64)],
                       [vi("e", [2, 9, D], elem), vi("e1", [3, D], elem), vi("y", [2, 9, 64])],
                       {"table": table, "W": rand((D, 64), 4) / 10})
    feeds = {"ids": np.random.default_rng(5).integers(0, V, (2, 9)), "ids1": np.array([0, V - 1, 7])}
    return model, feeds


def test_onnx_frontend_finds_gather_tables():
    model, _ = gather_model()
    specs, skipped = find_onnx_layers(model, Config(min_weight_size=0, quiet=True, compress_embeddings=True))
    spec = next(s for s in specs if s.name == "table")
    assert (spec.kind, spec.in_axis, spec.attrs["consumers"]) == ("embedding", 1, ["embed", "embed1"])
    specs, skipped = find_onnx_layers(model, Config(min_weight_size=0, quiet=True))
    assert [s.name for s in specs] == ["W"]
    assert [(s.name, why) for s, why in skipped] == [("table", EMBEDDING_SKIP)]


def test_onnx_frontend_gather_edge_cases():
    table, ints = rand((50, 40)), np.arange(12, dtype=np.int64).reshape(3, 4)
    nodes = [helper.make_node("Gather", ["table", "i"], ["a"], axis=1, name="cols"),
             helper.make_node("Gather", ["ints", "i"], ["b"], name="shape_math")]
    model = make_model(nodes, [vi("i", [2], TensorProto.INT64)], [vi("a", [50, 2]), vi("b", [2, 4], TensorProto.INT64)],
                       {"table": table, "ints": ints})
    specs, skipped = find_onnx_layers(model, Config(min_weight_size=0, quiet=True, compress_embeddings=True))
    assert specs == [] and [name for name, _ in skipped] == ["table"] and "axis 1" in skipped[0][1]
    # a column Gather before a MatMul use of the same weight: the MatMul makes it a layer
    nodes = [helper.make_node("Gather", ["table", "i"], ["a"], axis=1), helper.make_node("MatMul", ["x", "table"], ["y"])]
    model = make_model(nodes, [vi("i", [2], TensorProto.INT64), vi("x", [1, 50])], [vi("a", [50, 2]), vi("y", [1, 40])],
                       {"table": table})
    specs, skipped = find_onnx_layers(model, Config(min_weight_size=0, quiet=True, compress_embeddings=True))
    assert [(s.name, s.kind, s.in_axis) for s in specs] == [("table", "matmul", 0)] and skipped == []
    # a table also summed along axis 0 by a MatMul (x @ T), in either node order: the MatMul decides
    # the layout (a matmul spec, groups along axis 0, compressed even without compress_embeddings)
    # and the Gather reads rows of the decoded weight
    gather, matmul = helper.make_node("Gather", ["table", "i"], ["a"]), helper.make_node("MatMul", ["x", "table"], ["y"])
    for nodes in ([gather, matmul], [matmul, gather]):
        model = make_model(nodes, [vi("i", [2], TensorProto.INT64), vi("x", [1, 50])],
                           [vi("a", [2, 40]), vi("y", [1, 40])], {"table": table})
        for embeddings in (True, False):
            specs, skipped = find_onnx_layers(model, Config(min_weight_size=0, quiet=True,
                                                            compress_embeddings=embeddings))
            assert [(s.name, s.kind, s.in_axis) for s in specs] == [("table", "matmul", 0)] and skipped == []
            assert sorted(specs[0].attrs["consumers"]) == sorted(n.name or f"{n.op_type}({', '.join(n.input)})"
                                                                 for n in nodes)
    # tied with a Gemm(transB=1) output head (rows = vocabulary): one embedding spec
    nodes = [helper.make_node("Gather", ["table", "i"], ["a"]),
             helper.make_node("Gemm", ["x", "table"], ["y"], transB=1)]
    model = make_model(nodes, [vi("i", [2], TensorProto.INT64), vi("x", [1, 40])], [vi("a", [2, 40]), vi("y", [1, 50])],
                       {"table": table})
    specs, _ = find_onnx_layers(model, Config(min_weight_size=0, quiet=True, compress_embeddings=True))
    assert [(s.name, s.kind, s.in_axis) for s in specs] == [("table", "embedding", 1)]


@pytest.mark.parametrize("ratio", [RATIO, 0.3])  # 4-bit g128, 8-bit per row
def test_onnx_forms_of_a_table(ratio):
    model, feeds = gather_model()
    results = {fmt: rc.optimize(model, method="rtn", ratio=ratio, quiet=True, compress_embeddings=True,
                                onnx_format=fmt) for fmt in ("functions", "standard", "ort")}
    cw = results["functions"].compressed["table"]
    assert cw.meta["bits"] == (4 if ratio == RATIO else 8)
    table = decode(cw)
    outs = {}
    for fmt, res in results.items():
        onnx.checker.check_model(res.model, full_check=True)
        ops = [n.op_type for n in res.model.graph.node]
        if fmt == "ort":
            assert ops.count("GatherBlockQuantized") == 2 and "Gather" not in ops
            assert [n.name for n in res.model.graph.node if n.op_type == "GatherBlockQuantized"] == ["embed", "embed1"]
        if fmt != "functions":
            assert onnx_forms(res.model)["table"] == {"onnx_form": fmt}
            assert record(res.report, "table").settings["onnx_form"] == fmt
        if fmt == "standard":  # row-major: no Transpose of the table
            assert "Transpose" not in ops and "DequantizeLinear" in ops
        outs[fmt] = run(res.model, feeds)
        # the gathered rows are the decoded table's rows, exactly (no activation quantisation)
        np.testing.assert_array_equal(outs[fmt][0], table[feeds["ids"]])
        np.testing.assert_array_equal(outs[fmt][1], table[feeds["ids1"]])
        back = read_compressed_onnx(res.model)
        for name in res.compressed:
            same_arrays(back[name].arrays, res.compressed[name].arrays)
        plain = materialize_onnx(res.model)
        assert [n.op_type for n in plain.graph.node] == ["Gather", "Gather", "Cast", "MatMul"]
        assert not any(o.domain == "com.microsoft" for o in plain.opset_import)
        np.testing.assert_array_equal(run(plain, feeds)[1], outs[fmt][1])
    np.testing.assert_allclose(outs["standard"][2], outs["functions"][2], atol=1e-5, rtol=1e-4)


def test_float16_table_reported_at_real_size_and_ort_falls_back():
    model, feeds = gather_model(np.float16)
    res = rc.optimize(model, method="rtn", ratio=RATIO, quiet=True, min_weight_size=0)
    rec = record(res.report, "table")
    assert rec.status == "skipped" and rec.bytes_before == rec.bytes_after == V * D * 2
    res = rc.optimize(model, method="rtn", ratio=RATIO, quiet=True, compress_embeddings=True, onnx_format="ort")
    form = onnx_forms(res.model)["table"]
    assert form["onnx_form"] == "standard" and "not float32" in form["onnx_note"]
    out = run(res.model, feeds)[0]
    np.testing.assert_array_equal(out, decode(res.compressed["table"]).astype(np.float16)[feeds["ids"]])


# ----------------------------------------------------------------------------- options

def test_option_is_a_bool_and_a_flag():
    from riem_compiler.cli.arguments import _config_from_args, build_parser

    with pytest.raises(InputError, match="compress_embeddings must be True or False"):
        Config(compress_embeddings="yes")
    assert _config_from_args(build_parser().parse_args(["m.onnx", "--no-cache", "--compress-embeddings"])).compress_embeddings
    assert not _config_from_args(build_parser().parse_args(["m.onnx", "--no-cache"])).compress_embeddings
    Config(ignore_types=("embedding",))


def test_other_weight_matrices_are_listed_as_kept_with_their_size():
    """MultiheadAttention, LSTM/GRU and ConvTranspose weights are seen and kept, each with a reason
    and its real bytes, so the report's rows add up to the whole model."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 64)
            self.mha = nn.MultiheadAttention(64, 4, batch_first=True)
            self.lstm = nn.LSTM(64, 64, batch_first=True)
            self.gru = nn.GRU(64, 64, batch_first=True)
            self.ct = nn.ConvTranspose1d(64, 64, 3)
            self.lin = nn.Linear(64, 64)

        def forward(self, ids):
            x = self.emb(ids)
            x, _ = self.mha(x, x, x)
            x, _ = self.lstm(x)
            x, _ = self.gru(x)
            return self.lin(self.ct(x.transpose(1, 2)).transpose(1, 2))

    model = Mixed().eval()
    res = rc.optimize(model, example_inputs=(torch.randint(0, 100, (2, 8)),), ratio=0.25, method="rtn", quiet=True)
    rows = {r.name: r for r in res.report.layers}
    assert rows["lin.weight"].status == "compressed"
    expect = {"mha.in_proj_weight": "MultiheadAttention", "mha.out_proj.weight": "MultiheadAttention",
              "lstm.weight_ih_l0": "LSTM", "lstm.weight_hh_l0": "LSTM", "gru.weight_hh_l0": "GRU",
              "ct.weight": "ConvTranspose1d", "emb.weight": "compress_embeddings=False"}
    params = dict(model.named_parameters())
    for name, word in expect.items():
        assert rows[name].status == "skipped" and word in rows[name].reason
        assert rows[name].bytes_before == rows[name].bytes_after == params[name].numel() * 4
    matrices = {n for n, p in params.items() if p.dim() >= 2}
    assert matrices <= set(rows)  # every weight matrix has a row


def test_onnx_recurrent_and_transposed_conv_weights_are_listed_as_kept(tmp_path):
    class Rec(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(16, 32, batch_first=True)
            self.ct = nn.ConvTranspose1d(32, 8, 3)

        def forward(self, x):
            y, _ = self.gru(x)
            return self.ct(y.transpose(1, 2))

    model = Rec().eval()
    path = tmp_path / "rec.onnx"
    torch.onnx.export(model, (torch.randn(1, 5, 16),), str(path), dynamo=False)
    proto = onnx.load(str(path))
    specs, skipped = find_onnx_layers(proto, rc.Config(min_weight_size=0, quiet=True))
    reasons = dict((n if isinstance(n, str) else n.name, why) for n, why in skipped)
    ops = {n.op_type for n in proto.graph.node}
    assert {"GRU", "ConvTranspose"} <= ops
    kinds = [why.split(" ")[0] for why in reasons.values()]
    assert kinds.count("GRU") == 2 and kinds.count("ConvTranspose") == 1 and specs == []
