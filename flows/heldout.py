"""The held-out split of the shared prompt data: the records the sealed evaluation set draws on,
which every training stage drops.

A salted sha256 of a record's first user turn (whitespace collapsed, lower-cased) decides which
records of the shared sources are held out (`is_heldout`). The builder (flows/eval/promptset.py)
writes the digests of every held-out record to HELDOUT_DIGESTS, a public list (digests reveal no
text), and the training loaders drop any record whose digest is listed (`excluded`): a training
stage excludes the set without its key or a copy of it, and other data is not thinned.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

SALT = "herd/heldout/v1"
FRACTION = 0.30  # of the shared alpaca/sharegpt/HH-RLHF records: sources for 1,800 prompts in 12 use cases
HELDOUT_DIGESTS = Path(__file__).resolve().parents[1] / "configs" / "eval" / "heldout_sources.sha256"


def prompt_key(text: str) -> str:
    return " ".join(text.split()).lower()


def digest(text: str) -> str:
    return hashlib.sha256(f"{SALT}\n{prompt_key(text)}".encode()).hexdigest()


def is_heldout(text: str | None, fraction: float = FRACTION) -> bool:
    """Whether a shared record (by its first user turn) belongs to the held-out split."""
    return bool(text) and int(digest(text)[:16], 16) / 2**64 < fraction


@functools.lru_cache(maxsize=4)
def _listed(path: Path) -> frozenset[str]:
    if not path.is_file():
        return frozenset()
    return frozenset(
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    )


def excluded(text: str | None, path: Path = HELDOUT_DIGESTS) -> bool:
    """Whether a training record (by its first user turn) is a source of the sealed evaluation set."""
    return bool(text) and digest(text) in _listed(path)


def first_user(messages: list[dict]) -> str | None:
    return next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
