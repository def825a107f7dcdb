"""benchmarks/peers.py: the onnxruntime and torchao peers decode with their own code and are sized
with their scales and zero points, and say why when they cannot meet a budget."""
import numpy as np
import pytest
import torch

from benchmarks import peers

NAMES = ["0.weight", "2.weight"]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).eval()


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# ----------------------------------------------------------------------------- onnxruntime

def _ort_bytes_4bit_asym(out_f, in_f, block):
    k_blocks = -(-in_f // block)
    codes = out_f * k_blocks * block // 2
    scales = 4 * out_f * k_blocks  # float32
    zero_points = out_f * -(-k_blocks // 2)  # 4-bit, two per byte, per column
    return codes + scales + zero_points


def test_ort_peer_decodes_with_onnxruntime_and_counts_its_initializers(monkeypatch):
    pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    setting = ("default", 4, 32, False)
    monkeypatch.setattr(peers, "ORT_SETTINGS", [setting])
    model = _model()
    got = peers.run_ort(model, NAMES, 1 / 4)
    params = dict(got["model"].named_parameters())
    for name in NAMES:
        w = dict(model.named_parameters())[name].detach()
        decoded = params[name].detach()
        assert 0 < _rel(decoded, w) < 0.15
        assert torch.equal(decoded, peers.ort_quantise(w, setting)[0])
    assert got["stored_bytes"] == _ort_bytes_4bit_asym(128, 256, 32) + _ort_bytes_4bit_asym(64, 128, 32)
    assert got["fp32_bytes"] == 4 * (128 * 256 + 64 * 128)
    assert "default 4-bit b32" in got["setting"]


def test_ort_decode_is_the_dequantisation_of_its_matmulnbits_initializers():
    pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    from onnx import numpy_helper

    w = _model()[0].weight.detach()
    quantized = peers.ort_quantise_model(w, ("default", 4, 32, False))
    node = quantized.graph.node[0]
    assert node.op_type == "MatMulNBits"
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    packed, scales, zps = inits[node.input[1]], inits[node.input[2]], inits[node.input[3]]
    n, k_blocks, blob = packed.shape
    assert (n, k_blocks, blob) == (128, 8, 16)
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k_blocks, 32)  # low nibble first
    zp = np.stack([zps & 0x0F, zps >> 4], axis=-1).reshape(n, -1)[:, :k_blocks]
    reference = ((codes.astype(np.float32) - zp[:, :, None]) * scales.reshape(n, k_blocks)[:, :, None]).reshape(n, 256)
    decoded = peers.ort_decode(quantized, tuple(w.shape)).numpy()
    np.testing.assert_allclose(decoded, reference, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(decoded, w.numpy())
    assert peers.ort_stored_bytes(quantized) == packed.nbytes + scales.nbytes + zps.nbytes == _ort_bytes_4bit_asym(
        128, 256, 32)


def test_ort_peer_leaves_conv_weights_float_and_counts_them():
    pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 256)).eval()
    got = peers.run_ort(model, ["0.weight", "2.weight"], 1 / 2)
    conv = model[0].weight.detach()
    assert torch.equal(got["model"][0].weight.detach(), conv)
    linear = peers.ort_quantise(model[2].weight.detach(), _setting_of(got["setting"]))[1]
    assert got["stored_bytes"] == 4 * conv.numel() + linear
    assert "1 conv weight(s) left float32" in got["setting"]
    with pytest.raises(peers.PeerUnavailable, match="the 1 conv weight.s. it leaves float32 take 0.0"):
        peers.run_ort(model, ["0.weight", "2.weight"], 1 / 64)


def _setting_of(label):
    """("default", bits, block, sym) back from run_ort's label ("onnxruntime default 8-bit b32 sym; ...")."""
    words = label.split(";")[0].split()
    return words[1], int(words[2].split("-")[0]), int(words[3][1:]), words[4] == "sym" if len(words) > 4 else False


def test_ort_peer_says_why_when_no_setting_fits():
    pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    with pytest.raises(peers.PeerUnavailable, match="no onnxruntime setting stores <= 1.07 x the budget "
                       r"\(its narrowest codes, 2 bits, are over 0.54 bits per weight\)"):
        peers.run_ort(_model(), NAMES, 1 / 64)
    with pytest.raises(peers.PeerUnavailable, match=r"the smallest stores 0.0\d+ of fp32"):
        peers.run_ort(_model(), NAMES, 1 / 16)  # 2-bit codes fit, their scales do not


# ----------------------------------------------------------------------------- torchao

def _torchao_bytes_4bit_asym_g32(out_f, in_f):
    groups = out_f * in_f // 32
    return out_f * in_f // 2 + 4 * groups + groups  # packed codes, float32 scales, int8 zero points


def test_torchao_peer_runs_on_torchao_tensors_and_counts_codes_at_their_bit_width(monkeypatch):
    pytest.importorskip("torchao")
    setting = (4, 32, "asym", "float32")
    monkeypatch.setattr(peers, "TORCHAO_SETTINGS", [setting])
    model = _model()
    got = peers.run_torchao(model, NAMES, 1 / 4)
    qmodel = got["model"]
    decoded = {}
    for name in NAMES:
        w = dict(model.named_parameters())[name].detach()
        q = dict(qmodel.named_parameters())[name]
        assert hasattr(q, "qdata") and q.qdata.dtype == torch.int8  # torchao's tensor, one int8 per code
        assert int(q.qdata.min()) >= -8 and int(q.qdata.max()) <= 7  # 4-bit codes: packing them loses nothing
        decoded[name] = q.dequantize().float()
        assert 0 < _rel(decoded[name], w) < 0.15
        assert torch.equal(decoded[name], peers.torchao_quantise(w, setting)[0])
    assert got["stored_bytes"] == _torchao_bytes_4bit_asym_g32(128, 256) + _torchao_bytes_4bit_asym_g32(64, 128)
    x = torch.randn(5, 256)
    with torch.no_grad():
        expected = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, decoded["0.weight"], model[0].bias)),
                                              decoded["2.weight"], model[2].bias)
        torch.testing.assert_close(qmodel(x), expected, rtol=1e-4, atol=1e-5)
    assert "in memory: int8 codes" in got["setting"]


def test_torchao_symmetric_setting_stores_no_zero_points():
    pytest.importorskip("torchao")
    w = _model()[0].weight.detach()
    _, nbytes = peers.torchao_quantise(w, (4, 32, "sym", "float16"))
    assert nbytes == 128 * 256 // 2 + 2 * 128 * 256 // 32


def test_torchao_peer_says_why_when_no_setting_fits():
    pytest.importorskip("torchao")
    with pytest.raises(peers.PeerUnavailable, match="no torchao setting stores <= 1.07 x the budget"):
        peers.run_torchao(_model(), NAMES, 1 / 64)


# ----------------------------------------------------------------------------- the shared registry

def test_every_peer_is_a_method_of_the_accuracy_benchmark_and_hqq_still_says_why():
    from benchmarks import accuracy

    assert {"ort-peer", "torchao-peer", "hqq-peer", "nncf-peer"} <= set(accuracy.PEER_METHODS)
    pytest.importorskip("hqq")
    with pytest.raises(peers.PeerUnavailable, match="no hqq setting"):
        peers.run_hqq(_model(), NAMES, 1 / 64)
