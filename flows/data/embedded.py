"""The corpus herd uses when the user gives none: text every Python installation carries,
plus a small committed multilingual sample.

Documents, by id prefix (flows/data/domains.py maps each to its domain):
  pydoc:   the standard library's reference topics (pydoc_data.topics)
  stdlib:  module, class and function docstrings read with `ast` from the stdlib sources
           (never imported: importing runs code)
  code:    whole stdlib modules as source code, `code_files` of them picked by a stable hash
  lang:    non-English documents from samples/multilingual.jsonl (see samples/README.md)
Same Python version and sample, same corpus. The sources are cut into parts so that several
read tasks parse them at once; the multilingual sample is read by the last part.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from flows.data.config import EmbeddedConfig

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__"}


def _root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(_root()):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files)


def _topics() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


def _docstrings(files: list[Path]) -> Iterator[tuple[str, str]]:
    root = _root()
    for path in files:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        rel = path.relative_to(root).as_posix()
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc:
                yield f"stdlib:{rel}:{getattr(node, 'name', '<module>')}", doc


SAMPLE = Path(__file__).parent / "samples" / "multilingual.jsonl"
_MIN_CODE_BYTES = 1000  # smaller modules are mostly re-exports


def code_files(cfg: EmbeddedConfig) -> list[Path]:
    """The stdlib modules taken whole as code: the `code_files` smallest by a hash of their path
    among those of 1000 to `code_max_bytes` bytes, in path order."""
    root = _root()
    sized = [f for f in stdlib_files() if _MIN_CODE_BYTES <= f.stat().st_size <= cfg.code_max_bytes]
    key = lambda f: hashlib.sha256(f.relative_to(root).as_posix().encode()).digest()  # noqa: E731
    return sorted(sorted(sized, key=key)[: cfg.code_files])


def _code(files: list[Path]) -> Iterator[tuple[str, str]]:
    root = _root()
    for path in files:
        try:
            yield f"code:{path.relative_to(root).as_posix()}", path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue


def multilingual_documents() -> Iterator[tuple[str, str]]:
    import json

    with open(SAMPLE, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            yield record["id"], record["text"]


def embedded_documents(part: int = 0, parts: int = 1, cfg: EmbeddedConfig | None = None) -> Iterator[tuple[str, str]]:
    """Documents of one part: part 0 has the topics; every part has a contiguous slice of the
    docstring files and of the code files; the last part has the multilingual sample."""
    cfg = cfg or EmbeddedConfig()
    files = stdlib_files()
    step = -(-len(files) // parts)
    source = _docstrings(files[part * step : (part + 1) * step])
    if part == 0:
        yield from (d for d in _topics() if len(d[1]) >= cfg.min_chars)
    yield from (d for d in source if len(d[1]) >= cfg.min_chars)
    if cfg.code_files:
        code = code_files(cfg)
        step = -(-len(code) // parts)
        yield from _code(code[part * step : (part + 1) * step])
    if cfg.multilingual and part == parts - 1:
        yield from multilingual_documents()


def embedded_digest() -> str:
    """sha256 of what the corpus is built from: Python's version, the topics, the sources."""
    from pydoc_data.topics import topics

    h = hashlib.sha256(sys.version.encode())
    for name in sorted(topics):
        h.update(name.encode() + b"\0" + topics[name].encode() + b"\0")
    root = _root()
    for path in stdlib_files():
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    h.update(b"samples/multilingual.jsonl\0" + SAMPLE.read_bytes())
    return h.hexdigest()
