"""The data recipe on Ray: tokenize the documents that passed every filter, decide the language
quota and the domain mix over all of them on the driver (flows/data/mixing.py), and mark the
dropped rows. Only a few small columns (seq, id, lang, domain, token count) reach the driver."""

from __future__ import annotations

import numpy as np

from flows.data.config import DataConfig
from flows.data.stages import TokenizeStage, apply_drops

EMPTY = {"quota": {}, "languages": {}, "mix": {}}


def _gather(ds, names: list[str]) -> tuple[dict[str, list], list[str]]:
    """The named columns of the alive rows, and the language of every row."""
    cols: dict[str, list] = {n: [] for n in names}
    every_lang: list[str] = []
    for batch in ds.select_columns(sorted(set(names) | {"reason", "lang"})).iter_batches(
        batch_format="numpy", batch_size=4096
    ):
        every_lang += [str(v) for v in batch["lang"]]
        alive = np.array([not r for r in batch["reason"]], dtype=bool)
        for n in names:
            cols[n] += list(np.asarray(batch[n])[alive])
    return cols, every_lang


def tokenize_and_balance(ds, cfg: DataConfig):
    """(dataset with tokens and the recipe's drops applied, the report's quota / languages / mix
    sections, documents balanced)."""
    import ray

    from flows.data.dedup import exact_hash
    from flows.data.mixing import Candidates, balance

    share = cfg.langid.quota_share if cfg.langid.enabled else None
    if not (cfg.pack.enabled or cfg.langid.enabled or cfg.mix.targets):
        return ds, dict(EMPTY), 0  # nothing to count or balance
    if cfg.pack.enabled:
        ds = ds.map_batches(
            TokenizeStage,
            fn_constructor_args=(cfg,),
            batch_size=cfg.ray.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        )
    ds = ds.materialize()
    names = ["seq", "id", "lang", "domain"] + (["n_tokens"] if cfg.pack.enabled else [])
    cols, every_lang = _gather(ds, names)
    n = len(cols["seq"])
    seed = cfg.mix.seed
    c = Candidates(
        seq=np.asarray(cols["seq"], dtype=np.int64),
        key=np.array([exact_hash(f"{seed}:{i}") for i in cols["id"]], dtype=np.uint64),
        lang=np.array([str(v) for v in cols["lang"]], dtype=object),
        domain=np.array([str(v) for v in cols["domain"]], dtype=object),
        tokens=np.asarray(cols["n_tokens"] if cfg.pack.enabled else np.zeros(n), dtype=np.int64),
    )
    reasons, recipe = balance(c, cfg.langid.primary, share, {k: float(v) for k, v in cfg.mix.targets.items()})
    # Every language as language ID saw it, whatever later stages did with the document.
    langs, counts = np.unique(np.array(every_lang, dtype=object), return_counts=True) if every_lang else ([], [])
    for lang, count in zip(langs, counts):
        row = recipe["languages"].setdefault(
            str(lang), {"documents": 0, "tokens": 0, "dropped_quota": 0, "dropped_mix": 0}
        )
        row["identified"] = int(count)
    recipe["languages"] = dict(sorted(recipe["languages"].items()))
    hit = reasons != ""
    if not hit.any():
        return ds, recipe, n
    order = np.argsort(c.seq[hit])
    drop_seq, drop_reason = c.seq[hit][order], reasons[hit][order]
    ref_seq, ref_reason = ray.put(drop_seq), ray.put(drop_reason)
    sample_chars = cfg.output.sample_chars

    def mark(batch):
        return apply_drops(batch, ray.get(ref_seq), ray.get(ref_reason), sample_chars)

    return ds.map_batches(mark, batch_size=cfg.ray.batch_size).materialize(), recipe, n
