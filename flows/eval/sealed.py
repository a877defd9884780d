"""The sealed prompt set on disk: Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`) over
gzipped JSON lines, opened only in memory by the eval stage.

The key comes from $HERD_EVAL_KEY (the Fernet key itself), else the file named by
$HERD_EVAL_KEY_FILE, else a Kubernetes Secret mounted at /var/run/secrets/herd-eval/key
(infra: a Secret `herd-eval-key` with key `key`). Nothing here writes plaintext to disk or logs.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from model.errors import HerdError

KEY_ENV = "HERD_EVAL_KEY"
KEY_FILE_ENV = "HERD_EVAL_KEY_FILE"
SECRET_PATH = Path("/var/run/secrets/herd-eval/key")


def new_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode("ascii")


def load_key() -> bytes:
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].strip().encode("ascii")
    path = Path(os.environ[KEY_FILE_ENV]) if os.environ.get(KEY_FILE_ENV) else SECRET_PATH
    if path.is_file():
        return path.read_text(encoding="ascii").strip().encode("ascii")
    raise HerdError(
        f"sealed prompt set: no key (set {KEY_ENV}, or {KEY_FILE_ENV} to a key file, "
        f"or mount the herd-eval-key Secret at {SECRET_PATH})"
    )


def _fernet(key: bytes | None):
    from cryptography.fernet import Fernet

    try:
        return Fernet(key if key is not None else load_key())
    except ValueError:
        raise HerdError(
            "sealed prompt set: the key is not a Fernet key (32 url-safe base64 bytes; `herd evalset keygen` makes one)"
        ) from None


def seal(records: list[dict], path: str | Path, key: bytes | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"), mtime=0)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(_fernet(key).encrypt(plain))
    tmp.replace(path)
    return path


def unseal(path: str | Path, key: bytes | None = None) -> list[dict]:
    """The records, in memory only."""
    from cryptography.fernet import InvalidToken

    path = Path(path)
    if not path.is_file():
        raise HerdError(f"{path}: sealed prompt set not found (herd evalset build writes it)")
    f = _fernet(key)
    try:
        plain = f.decrypt(path.read_bytes())
    except InvalidToken:
        raise HerdError(
            f"{path}: cannot open the sealed prompt set with this key (wrong key or a damaged file)"
        ) from None
    return [json.loads(line) for line in gzip.decompress(plain).decode("utf-8").splitlines() if line.strip()]
