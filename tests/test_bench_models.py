"""Benchmark models and data: MiniLM numerics/metrics/export, digits data and cached CNNs."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from benchmarks import models as bm
from benchmarks import tasks as bt


@pytest.fixture(scope="module")
def minilm():
    return bm.load_minilm()


def test_minilm_parameter_names_equal_checkpoint_keys(minilm):
    model, _ = minilm
    with safe_open(str(bm.minilm_path() / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expected = {k for k in keys if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    assert set(model.state_dict()) == expected
    assert set(dict(model.named_parameters())) == expected
    q = model.get_submodule("encoder.layer.0.attention.self.query")
    assert isinstance(q, torch.nn.Linear) and q.weight.shape == (384, 384)
    assert not model.training


def test_minilm_output_shape_and_padding_invariance(minilm):
    model, tok = minilm
    ids, mask = bm.minilm_example_inputs(tok, batch=2, seq_len=32)
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == torch.int64
    with torch.no_grad():
        out = model(ids, mask)
        n = int(mask[0].sum())
        short = model(ids[:1, :n], mask[:1, :n])
    assert out.shape == (2, 32, 384)
    # Extra padding must not change the real tokens' states.
    torch.testing.assert_close(out[0, :n], short[0], atol=1e-5, rtol=1e-4)


def test_encode_paraphrase_sanity(minilm):
    model, tok = minilm
    sents = ["A man is playing guitar.", "A person plays a guitar.", "The stock market fell sharply today."]
    emb = bm.encode(model, tok, sents)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.7
    assert sim[0, 2] < 0.2 and sim[1, 2] < 0.2
    # Length-sorted batching returns rows in input order.
    np.testing.assert_allclose(bm.encode(model, tok, sents[::-1], batch_size=2), emb[::-1], atol=1e-5)


def test_minilm_metrics_match_original_model(minilm):
    # Reference values of the original all-MiniLM-L6-v2 (WS353 0.729, SimLex 0.446 measured independently).
    model, tok = minilm
    assert bt.wordsim_spearman(model, tok, "wordsim353") == pytest.approx(0.729, abs=0.003)
    assert bt.wordsim_spearman(model, tok, "simlex999") == pytest.approx(0.446, abs=0.003)
    assert bt.polarity_accuracy(model, tok) == pytest.approx(0.73, abs=0.011)
    with pytest.raises(ValueError, match="unknown word-similarity set"):
        bt.wordsim_spearman(model, tok, "men")


def test_polarity_file_format():
    sents, labels = bt.read_polarity()
    assert len(sents) == 200 and labels.sum() == 100
    assert all(s and not s.startswith("__label__") for s in sents)


def test_minilm_torch_export_matches_eager(minilm):
    model, tok = minilm
    ids, mask = bm.minilm_example_inputs(tok, batch=2, seq_len=16)
    ep = torch.export.export(model, (ids, mask))
    assert "encoder.layer.5.output.dense.weight" in ep.state_dict
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids, mask), model(ids, mask))


def test_minilm_onnx_export_runs_in_onnxruntime(minilm, tmp_path):
    import onnx
    import onnxruntime as ort

    model, tok = minilm
    path = bm.export_minilm_onnx(tmp_path / "minilm.onnx", model, tok, batch=2, seq_len=16)
    names = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert "encoder.layer.0.attention.self.query.weight" in names
    ids, mask = bm.minilm_example_inputs(tok, batch=2, seq_len=16)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_digits_data_split():
    x_tr, y_tr, x_te, y_te = bm.digits_data()
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0
    assert set(y_te.tolist()) == set(range(10))
    torch.testing.assert_close(bm.digits_data()[2], x_te)  # fixed split
    assert not torch.equal(bm.digits_data(seed=1)[2], x_te)


@pytest.mark.parametrize("name", bm.DIGITS_MODELS)
def test_cached_digits_models(name):
    path = bm.WEIGHTS_DIR / f"{name}.safetensors"
    assert path.exists(), f"{path} should be committed"
    assert path.stat().st_size < 2_000_000
    model = getattr(bm, name)()
    assert not model.training
    assert bm.digits_accuracy(model) > 0.95
    untrained = getattr(bm, name)(pretrained=False)
    assert bm.digits_accuracy(untrained) < 0.5
    (x,) = bm.digits_example_inputs(4)
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x))


def test_digits_cnn_has_grouped_and_depthwise_conv():
    convs = [m for m in bm.digits_cnn(pretrained=False).modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(c.groups == c.in_channels == c.out_channels > 1 for c in convs)  # depthwise
    assert any(1 < c.groups < c.in_channels for c in convs)  # grouped


def test_unknown_digits_model_name():
    with pytest.raises(ValueError, match="unknown digits model"):
        bm.train_digits_model("lenet")


@pytest.mark.slow
def test_train_digits_cnn_reaches_accuracy():
    model, info = bm.train_digits_model("digits_cnn", epochs=10)
    assert not model.training
    assert info["test_accuracy"] == bm.digits_accuracy(model) > 0.97
