"""sha256 of files, read in 1 MiB blocks so that a large shard or checkpoint never sits in memory."""

from __future__ import annotations

import hashlib
from pathlib import Path


def update_from_file(h, path: str | Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    update_from_file(h, path)
    return h.hexdigest()
