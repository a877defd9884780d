"""Readers: JSONL, Parquet and plain text (files or directories; .gz and .zst too).

A read task covers one file, or one byte range of a large uncompressed line file. It
yields rows: a document {seq, id, text, source, reason=""} or a malformed record with
reason "read:<why>" and the raw bytes (truncated) as text, so that nothing crashes the run
and every input record is accounted for. A compressed file cut short (.gz/.zst without its end)
yields the records before the cut, then one row "read:truncated_file" for the unreadable rest.
`seq` orders documents globally: (task << 32) | i.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flows.data.config import InputConfig
from flows.digest import update_from_file
from model.errors import HerdError

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
    ".text": "text",
}
RAW_SAMPLE_BYTES = 300


@dataclass(frozen=True)
class ReadTask:
    index: int
    path: str  # "" for the embedded corpus
    format: str  # jsonl | parquet | text | embedded
    start: int = 0  # byte range for split line files; end -1: to the end
    end: int = -1


def _strip_compression(name: str) -> tuple[str, str]:
    for ext in (".gz", ".zst"):
        if name.endswith(ext):
            return name[: -len(ext)], ext
    return name, ""


def detect_format(path: Path, configured: str) -> str:
    if configured != "auto":
        return configured
    base, _ = _strip_compression(path.name)
    fmt = _SUFFIXES.get(Path(base).suffix.lower())
    if fmt is None:
        raise HerdError(f"{path}: cannot tell the format from the name; set input.format (jsonl, parquet or text)")
    return fmt


def list_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise HerdError(f"{path}: directory has no input files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise HerdError(f"{path}: no such input file or directory")
    return files


def plan_tasks(cfg: InputConfig, embedded=None) -> list[ReadTask]:
    """Split the input into read tasks; large uncompressed line files are cut at newlines.
    No input paths: the embedded corpus, one task per part (its part number in `start`)."""
    if not cfg.paths:
        parts = embedded.parts if embedded else 1
        return [ReadTask(i, "", "embedded", i) for i in range(parts)]
    tasks: list[ReadTask] = []
    for path in list_files(cfg.paths):
        fmt = detect_format(path, cfg.format)
        splittable = fmt == "jsonl" and _strip_compression(path.name)[1] == ""
        size = path.stat().st_size
        if not splittable or size <= cfg.chunk_bytes:
            tasks.append(ReadTask(len(tasks), str(path), fmt))
            continue
        for start in range(0, size, cfg.chunk_bytes):
            tasks.append(ReadTask(len(tasks), str(path), fmt, start, min(size, start + cfg.chunk_bytes)))
    return tasks


def _open_binary(path: Path):
    _, comp = _strip_compression(path.name)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".zst":
        return io.BufferedReader(_ZstdRaw(path))
    return open(path, "rb")


class _ZstdRaw(io.RawIOBase):
    """A .zst file's bytes, frame after frame. Unlike zstandard's stream_reader, which ends
    quietly where the file does, it raises EOFError when the file ends inside a frame."""

    def __init__(self, path: Path):
        import zstandard

        self._file = open(path, "rb")
        self._zstd = zstandard.ZstdDecompressor()
        self._frame = self._zstd.decompressobj()
        self._pending = b""
        self._inside = False  # bytes of an unfinished frame have been read

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._pending:
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._inside:
                    raise EOFError("zstd file ended inside a frame (truncated)")
                return 0
            out = b""
            while chunk:
                if self._frame.eof:
                    self._frame = self._zstd.decompressobj()
                out += self._frame.decompress(chunk)
                chunk = self._frame.unused_data if self._frame.eof else b""
            self._inside = not self._frame.eof
            self._pending = out
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _truncation_errors() -> tuple[type[BaseException], ...]:
    """What a cut-short .gz or .zst raises while being read."""
    errors: tuple[type[BaseException], ...] = (EOFError, gzip.BadGzipFile, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _file_lines(path: Path, cut: list[str]) -> Iterator[tuple[int, bytes]]:
    """Lines of a whole (maybe compressed) file. A truncated stream ends the lines and appends
    the error to `cut`: the caller turns it into one reject row."""
    try:
        with _open_binary(path) as f:
            for line in f:
                yield 0, line
    except _truncation_errors() as e:
        cut.append(f"{type(e).__name__}: {e}")


def _byte_range_lines(path: Path, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """Lines whose first byte lies in [start, end): each line belongs to exactly one task."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # finish the line that began in the previous range
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                break
            yield pos, line
            pos += len(line)


def _row(task: ReadTask, i: int, doc_id: str, text: str, reason: str = "") -> dict:
    return {"seq": (task.index << 32) | i, "id": doc_id, "text": text, "source": task.path, "reason": reason}


def _reject(task: ReadTask, i: int, where: str, why: str, raw: bytes | str) -> dict:
    if isinstance(raw, bytes):
        raw = raw[:RAW_SAMPLE_BYTES].decode("utf-8", errors="replace")
    return _row(task, i, where, raw[:RAW_SAMPLE_BYTES], f"read:{why}")


def _jsonl_rows(task: ReadTask, cfg: InputConfig) -> Iterator[dict]:
    path = Path(task.path)
    name = path.name
    cut: list[str] = []
    lines = _byte_range_lines(path, task.start, task.end) if task.end >= 0 else _file_lines(path, cut)
    i = 0
    for offset, raw in lines:
        if not raw.strip():
            continue
        where = f"{name}@{offset}" if task.end >= 0 else f"{name}:{i + 1}"
        i += 1
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield _reject(task, i, where, "undecodable_bytes", raw)
            continue
        except json.JSONDecodeError:
            yield _reject(task, i, where, "bad_json", raw)
            continue
        if not isinstance(record, dict):
            yield _reject(task, i, where, "not_an_object", raw)
            continue
        text = record.get(cfg.text_field)
        if not isinstance(text, str):
            yield _reject(task, i, where, "missing_text_field" if text is None else "text_not_a_string", raw)
            continue
        doc_id = record.get(cfg.id_field)
        yield _row(task, i, str(doc_id) if doc_id is not None else where, text)
    if cut:
        yield _reject(task, i + 1, f"{name}:{i + 1}", "truncated_file", f"ends after {i} records ({cut[0]})")


def _parquet_rows(task: ReadTask, cfg: InputConfig) -> Iterator[dict]:
    import pyarrow.parquet as pq

    path = Path(task.path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        yield _reject(task, 0, path.name, "bad_parquet", str(e))
        return
    if cfg.text_field not in pf.schema_arrow.names:
        raise HerdError(f"{path}: no column '{cfg.text_field}' (input.text_field)")
    columns = [cfg.text_field] + ([cfg.id_field] if cfg.id_field in pf.schema_arrow.names else [])
    i = 0
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, doc_id in zip(texts, ids):
            i += 1
            where = f"{path.name}:{i}"
            if not isinstance(text, str):
                yield _reject(task, i, where, "missing_text_field", repr(text))
            else:
                yield _row(task, i, str(doc_id) if doc_id is not None else where, text)


def _text_rows(task: ReadTask, cfg: InputConfig) -> Iterator[dict]:
    path = Path(task.path)
    try:
        with _open_binary(path) as f:
            raw = f.read()
    except _truncation_errors() as e:
        yield _reject(task, 1, path.name, "truncated_file", f"{type(e).__name__}: {e}")
        return
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        yield _reject(task, 1, path.name, "undecodable_bytes", raw)
        return
    if cfg.text_unit == "file":
        yield _row(task, 1, path.name, text)
        return
    text = text.replace("\r\n", "\n")
    i = 0
    for para in text.split("\n\n"):
        if para.strip():
            i += 1
            yield _row(task, i, f"{path.name}#{i}", para)


def read_task(task: ReadTask, cfg: InputConfig, embedded=None) -> Iterator[dict]:
    if task.format == "jsonl":
        yield from _jsonl_rows(task, cfg)
    elif task.format == "parquet":
        yield from _parquet_rows(task, cfg)
    elif task.format == "text":
        yield from _text_rows(task, cfg)
    elif task.format == "embedded":
        from flows.data.embedded import embedded_documents

        parts = embedded.parts if embedded else 1
        for i, (doc_id, text) in enumerate(embedded_documents(task.start, parts, embedded), 1):
            yield _row(task, i, doc_id, text)
    else:
        raise HerdError(f"unknown input format {task.format!r}")


def input_digest(tasks: list[ReadTask], embedded=None) -> str:
    """sha256 over the input files' names and bytes (or the embedded corpus' text)."""
    if tasks and tasks[0].format == "embedded":
        from flows.data.embedded import embedded_digest

        return embedded_digest()
    h = hashlib.sha256()
    for path in sorted({t.path for t in tasks}):
        h.update(os.path.basename(path).encode() + b"\0")
        update_from_file(h, path)
    return h.hexdigest()


def read_all(cfg: InputConfig, embedded=None) -> Iterator[dict]:
    """Every row of every task, in order (tests and small inputs; the flow reads on Ray)."""
    for task in plan_tasks(cfg, embedded):
        yield from read_task(task, cfg, embedded)
