"""The data recipe's two global decisions over the documents that passed every filter: a
language quota (documents) and a domain mix (packed tokens). Pure numpy; recipe.py gathers
the columns on the driver and applies the drops.

Quota: documents in languages other than the primary one are capped at `share` of the kept
documents that have an identified language (code-domain documents carry none and are not
counted). The cap is split evenly across the languages present; a language with fewer
documents than its even part keeps all of them and its remainder goes to the others. Within a
language the documents with the smallest stable hash are kept; the rest are dropped as
`quota:over_share`. With fewer such documents than the share asks, all are kept and the
report says `short` (the quota never drops primary-language documents).

Mix: each domain's packed tokens are held at its target share (targets normalised over the
domains present). The domain with the least tokens per unit of target keeps everything; every
other domain keeps, in stable-hash order, every document that still fits under its token goal,
then the one document that lands nearest the goal if that is nearer; the rest are dropped as
`mix:over_share`. Documents in quota languages are first thinned per language by the domain's
fraction, so the quota's even split survives the mix. A domain without a target (or with target
0) is dropped as `mix:no_target`. Nothing is repeated: every kept document is packed once (one
epoch per domain).

The mix thins each domain by its own fraction, which moves the quota's document share; the
two are redone from scratch with the quota's share corrected until the share is back on target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flows.data.text import UNDETERMINED

QUOTA_REASON = "quota:over_share"
MIX_REASON = "mix:over_share"
NO_TARGET_REASON = "mix:no_target"


@dataclass(frozen=True)
class Candidates:
    """The documents that survived every filter, one entry each."""

    seq: np.ndarray  # int64
    key: np.ndarray  # uint64 stable hash: the order in which documents are kept
    lang: np.ndarray  # str
    domain: np.ndarray  # str
    tokens: np.ndarray  # int64 (0 when nothing is tokenized)


def even_split(total: int, available: dict[str, int]) -> dict[str, int]:
    """`total` units over the keys as evenly as possible, none above its availability
    (water-filling); left-over single units go to the keys in sorted order."""
    out = {k: 0 for k in available}
    left = {k: v for k, v in available.items() if v > 0}
    total = min(total, sum(left.values()))
    while total > 0 and left:
        share = total // len(left)
        if share == 0:
            for k in sorted(left)[:total]:
                out[k] += 1
            break
        for k in sorted(left):
            give = min(share, left[k])
            out[k] += give
            left[k] -= give
            total -= give
        left = {k: v for k, v in left.items() if v > 0}
    return out


def _first_by_key(idx: np.ndarray, key: np.ndarray, n: int) -> np.ndarray:
    """The n of these indices with the smallest keys."""
    return idx[np.argsort(key[idx], kind="stable")[:n]]


def quota_drops(c: Candidates, alive: np.ndarray, primary: str, share: float) -> tuple[np.ndarray, dict]:
    """Indices dropped by the quota, and its figures."""
    identified = alive & (c.lang != UNDETERMINED)
    n_primary = int((identified & (c.lang == primary)).sum())
    other = identified & (c.lang != primary)
    counts = {str(k): int(v) for k, v in zip(*np.unique(c.lang[other], return_counts=True))}
    goal = int(round(share * n_primary / (1 - share)))
    info = {"goal_documents": goal, "available_documents": sum(counts.values()), "short": sum(counts.values()) < goal}
    if sum(counts.values()) <= goal:
        return np.zeros(0, dtype=np.int64), info
    allot = even_split(goal, counts)
    drop = []
    for lang, n in allot.items():
        idx = np.flatnonzero(other & (c.lang == lang))
        keep = _first_by_key(idx, c.key, n)
        drop.append(np.setdiff1d(idx, keep))
    return np.concatenate(drop), info


def mix_drops(
    c: Candidates, alive: np.ndarray, targets: dict[str, float], strata: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(indices over their domain's share, indices of domains without a target).

    In a domain over its goal, the documents marked in `strata` are thinned per language by
    the domain's token fraction (so the quota's split across languages survives); the others
    fill the rest of the goal in stable-hash order."""
    present = sorted(set(c.domain[alive].tolist()))
    no_target = alive & np.isin(c.domain, [d for d in present if targets.get(d, 0) <= 0])
    weighted = [d for d in present if targets.get(d, 0) > 0]
    if not weighted:
        return np.zeros(0, dtype=np.int64), np.flatnonzero(no_target)
    total_w = sum(targets[d] for d in weighted)
    tokens = {d: int(c.tokens[alive & (c.domain == d)].sum()) for d in weighted}
    # The largest stream every domain can fill: limited by the scarcest per unit of target.
    scale = min(tokens[d] / (targets[d] / total_w) for d in weighted)
    drop = []
    for d in weighted:
        goal = scale * targets[d] / total_w
        if tokens[d] <= goal:
            continue
        idx = np.flatnonzero(alive & (c.domain == d))
        keep = [np.zeros(0, dtype=np.int64)]
        fill = idx
        if strata is not None:
            fraction = goal / tokens[d]
            marked = idx[strata[idx]]
            for lang in sorted(set(c.lang[marked].tolist())):
                li = marked[c.lang[marked] == lang]
                keep.append(_first_by_key(li, c.key, int(round(fraction * len(li)))))
            fill = idx[~strata[idx]]
        cum = int(sum(int(c.tokens[k].sum()) for k in keep))
        fill = fill[np.argsort(c.key[fill], kind="stable")]
        taken = np.zeros(len(fill), dtype=bool)
        for j, i in enumerate(fill):  # in hash order, every document that still fits
            t = int(c.tokens[i])
            if cum + t <= goal:
                taken[j] = True
                cum += t
        if (~taken).any():  # then the one document that lands nearest the goal, if any is nearer
            rest = np.flatnonzero(~taken)
            after = np.abs(goal - (cum + c.tokens[fill[rest]]))
            j = rest[int(np.argmin(after))]
            if after.min() < goal - cum:
                taken[j] = True
        drop.append(np.setdiff1d(idx, np.concatenate(keep + [fill[taken]])))
    return (np.concatenate(drop) if drop else np.zeros(0, dtype=np.int64)), np.flatnonzero(no_target)


def _other_share(c: Candidates, alive: np.ndarray, primary: str) -> float:
    identified = alive & (c.lang != UNDETERMINED)
    n = int(identified.sum())
    return float((identified & (c.lang != primary)).sum() / n) if n else 0.0


def _decide(
    c: Candidates, primary: str, share: float | None, targets: dict[str, float], strata: np.ndarray
) -> tuple[np.ndarray, dict]:
    """One pass from scratch: the quota at `share`, then the mix."""
    reasons = np.full(len(c.seq), "", dtype=object)
    alive = np.ones(len(c.seq), dtype=bool)
    info: dict = {}
    if share is not None:
        drop, info = quota_drops(c, alive, primary, share)
        reasons[drop], alive[drop] = QUOTA_REASON, False
    if targets:
        over, none = mix_drops(c, alive, targets, strata)
        reasons[none], alive[none] = NO_TARGET_REASON, False
        reasons[over], alive[over] = MIX_REASON, False
    return reasons, info


def balance(
    c: Candidates,
    primary: str,
    share: float | None,
    targets: dict[str, float],
    max_rounds: int = 30,
    tolerance: float = 0.001,
) -> tuple[np.ndarray, dict]:
    """The drop reason of each candidate ("" kept) and the report's quota, languages and mix.

    The mix thins domains by different fractions, which moves the quota's share; so the pass
    is redone from scratch with the quota's share corrected (target / achieved) until the
    achieved share is within `tolerance` of the target, cannot move, or the rounds run out."""
    strata = (c.lang != primary) & (c.lang != UNDETERMINED)
    effective, best = share, None
    for rounds in range(1, max_rounds + 1):  # noqa: B007 (the count is reported after the loop)
        reasons, info = _decide(c, primary, effective, targets, strata)
        if share is None or not targets:  # the quota alone is exact; the mix alone needs no rounds
            best = (reasons, info, effective, 0.0)
            break
        achieved = _other_share(c, reasons == "", primary)
        err = abs(achieved - share)
        if best is None or err < best[3]:
            best = (reasons, info, effective, err)
        if err <= tolerance or achieved == 0 or (achieved < share and info.get("short")):
            break
        effective = min(0.95, effective * share / achieved)
    reasons, info, effective, _ = best
    info = {**info, "effective_share": round(effective, 6) if effective is not None else None}
    return reasons, report(c, reasons, primary, share, targets, info, rounds)


def _share(part: float, whole: float) -> float:
    return round(float(part) / float(whole), 5) if whole else 0.0


def report(
    c: Candidates,
    reasons: np.ndarray,
    primary: str,
    share: float | None,
    targets: dict[str, float],
    quota_info: dict,
    rounds: int,
) -> dict:
    alive = reasons == ""
    languages = {}
    for lang in sorted(set(c.lang.tolist())):
        m = c.lang == lang
        languages[lang] = {
            "documents": int((m & alive).sum()),
            "tokens": int(c.tokens[m & alive].sum()),
            "dropped_quota": int((m & (reasons == QUOTA_REASON)).sum()),
            "dropped_mix": int((m & (reasons != QUOTA_REASON) & ~alive).sum()),
        }
    identified = alive & (c.lang != UNDETERMINED)
    other = identified & (c.lang != primary)
    quota = {
        "primary": primary,
        "target_share": share,
        "share_documents": _share(other.sum(), identified.sum()),
        "share_tokens": _share(c.tokens[other].sum(), c.tokens[identified].sum()),
        "other_documents": int(other.sum()),
        "other_tokens": int(c.tokens[other].sum()),
        "dropped": int((reasons == QUOTA_REASON).sum()),
        **quota_info,
    }
    total = int(c.tokens[alive].sum())
    present = sorted(set(c.domain.tolist()))
    weighted = [d for d in present if targets.get(d, 0) > 0 and (alive & (c.domain == d)).any()]
    total_w = sum(targets[d] for d in weighted)
    domains = {}
    for d in sorted(set(present) | set(targets)):
        m = c.domain == d
        domains[d] = {
            "target": targets.get(d),
            "target_present": _share(targets[d], total_w) if d in weighted else 0.0,
            "documents": int((m & alive).sum()),
            "tokens": int(c.tokens[m & alive].sum()),
            "share": _share(c.tokens[m & alive].sum(), total),
            "dropped": int((m & ~alive & (reasons != QUOTA_REASON)).sum()),
            "epochs": 1 if (m & alive).any() else 0,
        }
    return {
        "quota": quota,
        "languages": languages,
        "mix": {"targets": dict(targets), "rounds": rounds, "tokens": total, "domains": domains},
    }
