"""Registry integrity: the sha256 of every file of a registered model version, recorded when it is
registered and checked on every load, and downloads that only become visible once verified.

Each file's digest is a model-version tag `sha256:<path>` (path relative to the version's artifact
folder), so it lives in the registry's database beside the aliases, not in the artifact store that
holds the files it vouches for.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from flows.digest import sha256_file
from model.errors import HerdError

TAG = "sha256:"


def file_digests(root: str | Path) -> dict[str, str]:
    """sha256 of every file below `root`, by POSIX path relative to it."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def digest_tags(digests: dict[str, str]) -> dict[str, str]:
    return {TAG + path: digest for path, digest in digests.items()}


def recorded_digests(mv) -> dict[str, str]:
    """The digests a ModelVersion's tags record; {} for a version registered without them."""
    return {k[len(TAG) :]: v for k, v in (mv.tags or {}).items() if k.startswith(TAG)}


def verify(root: str | Path, expected: dict[str, str], what: str) -> None:
    """Raise HerdError unless the files below `root` are exactly `expected`, byte for byte."""
    if not expected:
        raise HerdError(
            f"{what}: no sha256 recorded for its files (registered before herd recorded them); "
            "register it again (herd run --force register) to serve or evaluate it"
        )
    have = file_digests(root)
    problems = [
        f"{path}: sha256 {have[path]} does not match the registered {want}"
        for path, want in expected.items()
        if path in have and have[path] != want
    ]
    problems += [f"{path}: missing" for path in expected if path not in have]
    problems += [f"{path}: not a registered file" for path in have if path not in expected]
    if problems:
        raise HerdError(f"{what}: sha256 check failed, refusing to load it ({root}): " + "; ".join(problems))


def download_verified(download, target: Path, expected: dict[str, str] | None, what: str) -> Path:
    """`target` holding exactly the `expected` files (None: whatever `download` fetches, for runs:/
    URIs, which have no registry record). A copy already there is used only if it still verifies
    (else it is replaced); otherwise `download(folder)` fills a temporary folder beside `target`,
    which is renamed to `target` only once verified. A download killed halfway leaves only a
    temporary folder, which nothing reads; the next call downloads again."""

    def check(folder: Path) -> None:
        if expected is not None:
            verify(folder, expected, what)

    if target.is_dir():
        try:
            check(target)
            return target
        except HerdError:
            if not expected:
                raise
            shutil.rmtree(target)  # a damaged cached copy: fetch it again and check that
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        got = Path(download(tmp))
        check(got)
        try:
            os.replace(got, target)
        except OSError:  # another process put a complete copy there first
            if not target.is_dir():
                raise
            check(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
