"""Benchmark tasks for MiniLM sentence embeddings: the evaluation sets and their metrics, all offline.

* Word similarity: Spearman correlation of embedding cosines with human scores on WordSim353 and
  SimLex-999 (`wordsim_spearman`).
* Zero-shot sentiment: accuracy on pang_lee_polarity against prompt prototypes (`polarity_accuracy`).

The sets come from gensim's bundled test data; embeddings from `benchmarks.models.encode`. The digits
top-1 accuracy (`benchmarks.models.digits_accuracy`) stays next to the digits training that reports it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from benchmarks.models import encode


def _gensim_data(name: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the word-similarity and polarity sets come from gensim's test data: pip install gensim") from e
    return Path(datapath(name))


def _read_word_pairs(which: str) -> tuple[list[str], list[str], np.ndarray]:
    files = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}
    if which not in files:
        raise ValueError(f"unknown word-similarity set {which!r}; choose one of {sorted(files)}")
    w1, w2, score = [], [], []
    for line in _gensim_data(files[which]).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, s = line.split("\t")[:3]
        w1.append(a)
        w2.append(b)
        score.append(float(s))
    return w1, w2, np.asarray(score)


def wordsim_spearman(model: nn.Module, tokenizer, which: str = "wordsim353") -> float:
    """Spearman correlation between cosine similarity of the two words' embeddings and the human score.

    Each word is embedded on its own as a one-word sentence. Original MiniLM: 0.729 (WS353), 0.446 (SimLex).
    """
    from scipy.stats import spearmanr

    w1, w2, human = _read_word_pairs(which)
    vocab = sorted(set(w1) | set(w2))
    emb = dict(zip(vocab, encode(model, tokenizer, vocab)))
    cos = np.array([float(emb[a] @ emb[b]) for a, b in zip(w1, w2)])
    return float(spearmanr(cos, human).statistic)


def read_polarity() -> tuple[list[str], np.ndarray]:
    """gensim's pang_lee_polarity.cor: 200 lines '__label__pos|neg <tokenised lower-case sentence>'; 1 = pos."""
    sentences, labels = [], []
    # The file is cp1252 (em dashes and accented letters), not UTF-8.
    for line in _gensim_data("pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        if not line.strip():
            continue
        label, text = line.split(" ", 1)
        if label not in ("__label__pos", "__label__neg"):
            raise ValueError(f"pang_lee_polarity.cor: unexpected label {label!r}")
        sentences.append(text.strip())
        labels.append(1 if label == "__label__pos" else 0)
    return sentences, np.asarray(labels)


# Zero-shot prompt scheme: 4 templates x 5 adjectives per class, embeddings averaged per class.
# Chosen on the original MiniLM only (accuracy 0.730; one pair "This movie is great/terrible." gives 0.660,
# "This film is <5 adjectives>." 0.715): the ensemble is less sensitive to any single prompt.
_POLARITY_TEMPLATES = ("This movie is {}.", "This film is {}.", "The movie was {}.", "The film was {}.")
_POLARITY_ADJECTIVES = {
    0: ("terrible", "bad", "awful", "boring", "horrible"),
    1: ("great", "good", "excellent", "wonderful", "amazing"),
}
POLARITY_PROMPTS = {
    cls: [t.format(a) for t in _POLARITY_TEMPLATES for a in adjs] for cls, adjs in _POLARITY_ADJECTIVES.items()
}


def polarity_accuracy(model: nn.Module, tokenizer) -> float:
    """Zero-shot sentiment accuracy on pang_lee_polarity.cor.

    A sentence is called positive when its embedding is closer (cosine) to the mean of the
    positive prompt embeddings than to the mean of the negative ones (POLARITY_PROMPTS).
    """
    sentences, labels = read_polarity()
    emb = encode(model, tokenizer, sentences)
    protos = []
    for cls in (0, 1):
        p = encode(model, tokenizer, POLARITY_PROMPTS[cls]).mean(0)
        protos.append(p / np.linalg.norm(p))
    pred = (emb @ protos[1] > emb @ protos[0]).astype(int)
    return float((pred == labels).mean())

