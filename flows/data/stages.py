"""Batch-level stage cores: plain Python over column dicts, no Ray (pipeline.py wraps them).

A batch is a dict of equal-length columns: seq, id, text, source, reason (and what stages
add). A row with a non-empty reason was dropped earlier; every stage passes it through
untouched. A dropped row keeps only a prefix of its text, as a sample for the report.
"""

from __future__ import annotations

import numpy as np

from flows.data.config import DataConfig
from flows.data.text import UNDETERMINED, Doc, normalize


class FilterStage:
    """Tag each document's domain and language, normalise, run the document filters that apply
    to it, then hash the survivors for deduplication.

    A code-domain document skips the prose filters; a document identified as a language other
    than langid.primary skips langid.primary_only (thresholds fitted on English). `filters`: the
    filter classes in pipeline order (flows.data.filters.DEFAULT, as the driver read it)."""

    def __init__(self, cfg: DataConfig, filters: list | None = None):
        from flows.data.dedup import MinHasher
        from flows.data.domains import DomainResolver
        from flows.data.filters import default_filters

        self.cfg = cfg
        self.filters = default_filters(cfg, filters)
        self.minhasher = MinHasher(cfg.minhash) if cfg.minhash.enabled else None
        self.domain_of = DomainResolver(cfg.input, cfg.mix)
        self.code_domains = frozenset(cfg.mix.code_domains)
        self.primary_only = frozenset(cfg.langid.primary_only)

    def _run_filters(self, doc: Doc, domain: str) -> tuple[str, object]:
        """(stage, True or the reason)"""
        for f in self.filters:
            if f.prose_only and domain in self.code_domains:
                continue
            if f.name in self.primary_only and doc.lang not in (self.cfg.langid.primary, UNDETERMINED):
                continue
            result = f.filter(doc)
            if result is not True:
                return f.name, result
        return "", True

    def __call__(self, batch: dict) -> dict:
        from flows.data.dedup import exact_hash

        texts, reasons, sample = list(batch["text"]), list(batch["reason"]), self.cfg.output.sample_chars
        langs, domains = [UNDETERMINED] * len(texts), [""] * len(texts)
        for i, (doc_id, text, reason) in enumerate(zip(batch["id"], texts, reasons)):
            if reason:
                continue
            doc = Doc(doc_id, normalize(text))
            domains[i] = self.domain_of(str(batch["source"][i]), str(doc_id), doc.text)
            if doc.text:
                stage, result = self._run_filters(doc, domains[i])
                langs[i] = doc.lang
            else:
                stage, result = "normalize", "empty"
            if result is True:
                texts[i] = doc.text
            else:
                reasons[i] = f"{stage}:{result}"
                texts[i] = doc.text[:sample] or text[:sample]
        alive = [i for i, r in enumerate(reasons) if not r]
        exact = np.zeros(len(texts), dtype=np.uint64)
        exact[alive] = [exact_hash(texts[i]) for i in alive]
        sig_bytes = [b""] * len(texts)
        if self.minhasher is not None and alive:
            sig, has = self.minhasher.signatures([texts[i] for i in alive])
            for j, i in enumerate(alive):
                if has[j]:
                    sig_bytes[i] = sig[j].tobytes()
        return {
            **batch,
            "text": texts,
            "reason": reasons,
            "lang": langs,
            "domain": domains,
            "exact": exact,
            "sig": sig_bytes,
        }


def apply_drops(batch: dict, drop_seq: np.ndarray, drop_reason: np.ndarray, sample_chars: int) -> dict:
    """Mark rows whose seq is in the sorted array drop_seq with the matching reason."""
    if not len(drop_seq):
        return batch
    seq = np.asarray(batch["seq"], dtype=np.int64)
    pos = np.minimum(np.searchsorted(drop_seq, seq), len(drop_seq) - 1)
    hit = (drop_seq[pos] == seq) & np.array([not r for r in batch["reason"]], dtype=bool)
    if not hit.any():
        return batch
    reasons, texts = list(batch["reason"]), list(batch["text"])
    for i in np.flatnonzero(hit):
        reasons[i] = str(drop_reason[pos[i]])
        texts[i] = texts[i][:sample_chars]
    return {**batch, "reason": reasons, "text": texts}


def validation_mask(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Split by document: a stable hash of (seed, id) decides, whatever the order or batch."""
    from flows.data.dedup import exact_hash

    if fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    limit = int(fraction * (1 << 64))
    return np.array([exact_hash(f"{seed}:{i}") < limit for i in ids], dtype=bool)


class TokenizeStage:
    """Tokenize kept documents (EOS appended), count their tokens and assign each to train or
    validation."""

    def __init__(self, cfg: DataConfig):
        from model.tokenizer import load_tokenizer

        self.cfg = cfg
        self.tok = load_tokenizer(cfg.pack.tokenizer)

    def __call__(self, batch: dict) -> dict:
        reasons = batch["reason"]
        alive = [i for i, r in enumerate(reasons) if not r]
        tokens = [b""] * len(reasons)
        n_tokens = np.zeros(len(reasons), dtype=np.int64)
        if alive:
            ids = self.tok.encode_batch([batch["text"][i] for i in alive], eos=True)
            for i, t in zip(alive, ids):
                tokens[i] = np.asarray(t, dtype=np.uint32).tobytes()
                n_tokens[i] = len(t)
        val = validation_mask(list(batch["id"]), self.cfg.pack.validation_fraction, self.cfg.pack.seed)
        split = np.where(val, "validation", "train").astype(object)
        return {**batch, "tokens": tokens, "n_tokens": n_tokens, "split": split}
