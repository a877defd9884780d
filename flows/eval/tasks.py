"""Evaluation tasks: reading a spec's data, rendering its prompts, counting bad rows.

The spec format is documented in task_spec.py.
"""

from __future__ import annotations

import csv
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from flows.eval.task_spec import TEMPLATES, TaskSpec
from model.errors import HerdError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# --- data ----------------------------------------------------------------------------------------


@dataclass
class Row:
    doc: dict
    where: str  # file:line, for messages


@dataclass
class Skip:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def resolve_data(spec: TaskSpec, rel: str, data_dir: str | Path | None) -> list[Path]:
    """Files for a data entry (a glob gives several); a clear error when none exists."""
    candidates = []
    if Path(rel).is_absolute():
        candidates.append(Path(rel))
    else:
        if spec.base_dir is not None:
            candidates.append(spec.base_dir / rel)
        if data_dir is not None:
            candidates.append(Path(data_dir) / rel)
    for c in candidates:
        hits = sorted(Path(p) for p in glob.glob(str(c))) if glob.has_magic(str(c)) else ([c] if c.is_file() else [])
        if hits:
            return hits
    tried = ", ".join(str(c) for c in candidates) or rel
    hint = "" if data_dir is not None else " (pass --data-dir)"
    raise HerdError(f"task {spec.name}: data file not found: {tried}{hint}")


def read_rows(path: Path, fmt: str | None = None) -> list[Row]:
    fmt = fmt or {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".txt": "text"}.get(path.suffix)
    if fmt is None:
        raise HerdError(f"{path}: cannot tell the format from the suffix; set 'format' in the task spec")
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            # DictReader's line_num is the physical line after the row (quoted fields span lines)
            rows = []
            for rec in reader:
                rows.append(Row(rec, f"{path}:{reader.line_num}"))
            return rows
    if fmt == "jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    rec = _BadRow(f"not JSON ({e.msg})")
                rows.append(Row(rec, f"{path}:{i}"))
        return rows
    if fmt == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise HerdError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list):
            raise HerdError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        return [Row(rec, f"{path}[{i}]") for i, rec in enumerate(data)]
    if fmt == "text":
        return [Row({"text": path.read_text(encoding="utf-8")}, str(path))]
    raise HerdError(f"{path}: unknown format {fmt!r} (csv, jsonl, json, text)")


class _BadRow(dict):
    """A row that could not be parsed; rendering it is a counted skip."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason


# --- rendering -----------------------------------------------------------------------------------


def render(template: str, doc: dict, **extra) -> str:
    if template in doc and not extra:
        return str(doc[template])
    return TEMPLATES.from_string(template).render(**doc, **extra)


def evaluate(expression: Any, doc: dict, **extra) -> Any:
    """A list/int literal as is; a field name gives the field; else a jinja expression or template."""
    if not isinstance(expression, str):
        return expression
    if expression in doc:
        return doc[expression]
    inner = expression.strip()
    if inner.startswith("{{") and inner.endswith("}}") and inner.count("{{") == 1:
        return TEMPLATES.compile_expression(inner[2:-2].strip(), undefined_to_none=False)(**doc, **extra)
    return TEMPLATES.from_string(expression).render(**doc, **extra)


@dataclass
class MCExample:
    """One multiple-choice question, rendered."""

    where: str
    subset: str
    query: str  # the test question's own text (doc_to_text)
    choices: list[str]
    gold: int
    doc: dict


def _check_fields(spec: TaskSpec, row: Row) -> str | None:
    if isinstance(row.doc, _BadRow):
        return row.doc.reason
    if not isinstance(row.doc, dict):
        return f"expected a record, got {type(row.doc).__name__}"
    missing = [f for f in spec.fields if row.doc.get(f) in (None, "")]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    return None


def gold_index(target: Any, choices: list[str]) -> int:
    """Index of the target: an int index, a choice string, a digit string, or a letter label."""
    if isinstance(target, bool):
        raise ValueError(f"target {target!r} is not a choice")
    if isinstance(target, int):
        idx = target
    elif isinstance(target, str):
        t = target.strip()
        if t in choices:
            return choices.index(t)
        if re.fullmatch(r"-?\d+", t):
            idx = int(t)
        elif len(t) == 1 and t in LETTERS[: len(choices)]:
            idx = LETTERS.index(t)
        else:
            raise ValueError(f"target {target!r} is not a choice, index or letter")
    else:
        raise ValueError(f"target {target!r} is not a choice, index or letter")
    if not 0 <= idx < len(choices):
        raise ValueError(f"answer index {idx} is outside 0..{len(choices) - 1}")
    return idx


def render_mc(spec: TaskSpec, row: Row, subset: str) -> MCExample:
    """Raises ValueError (a skip) for a malformed row."""
    problem = _check_fields(spec, row)
    if problem:
        raise ValueError(problem)
    doc = row.doc
    try:
        query = render(spec.prompt, doc, subset=subset) if "subset" in spec.prompt else render(spec.prompt, doc)
        choices = evaluate(spec.choices, doc, subset=subset)
        if isinstance(choices, str):
            raise ValueError(f"choices rendered to a string, not a list: {choices[:60]!r}")
        choices = [str(c) for c in choices]
        if len(choices) < 2 or any(c == "" for c in choices):
            raise ValueError(f"needs at least 2 non-empty choices, got {choices!r}")
        gold = gold_index(evaluate(spec.target, doc, subset=subset), choices)
    except jinja2.UndefinedError as e:
        raise ValueError(f"template needs a field the row lacks ({e.message})") from None
    except jinja2.TemplateError as e:
        raise ValueError(f"template error ({e})") from None
    return MCExample(row.where, subset, query, choices, gold, doc)


@dataclass
class MCSubset:
    name: str
    description: str
    fewshot_text: str  # description + the k few-shot examples with answers, delimiters included
    examples: list[MCExample]

    def context(self, ex: MCExample) -> str:
        return self.fewshot_text + ex.query


@dataclass
class LoadedMC:
    spec: TaskSpec
    subsets: list[MCSubset]
    skipped: list[Skip]

    @property
    def n(self) -> int:
        return sum(len(s.examples) for s in self.subsets)


def _subset_name(pattern: str, path: Path) -> str:
    """The text the `*` of the pattern matched in this file's name, or the file's stem."""
    name_pattern = Path(pattern).name
    if "*" not in name_pattern:
        return path.stem
    pre, post = name_pattern.split("*", 1)
    m = re.match("^" + re.escape(pre) + "(.*)" + re.escape(post).replace(r"\*", ".*") + "$", path.name)
    return m.group(1) if m else path.stem


def load_multiple_choice(
    spec: TaskSpec, data_dir=None, limit: int | None = None, num_fewshot: int | None = None
) -> LoadedMC:
    """Render every question of the task. `limit` caps questions per subset."""
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    subsets, skipped = [], []
    pattern = spec.data["test"]
    for path in resolve_data(spec, pattern, data_dir):
        subset = _subset_name(pattern, path) if glob.has_magic(pattern) else spec.name
        description = render(spec.description, {}, subset=subset) if spec.description else ""
        shots = ""
        if k:
            fs_rel = spec.data["fewshot"].replace("{subset}", subset)
            fs_rows = read_rows(resolve_data(spec, fs_rel, data_dir)[0], spec.format)
            good = []
            for row in fs_rows:
                try:
                    good.append(render_mc(spec, row, subset))
                except ValueError as e:
                    skipped.append(Skip(row.where, f"few-shot row skipped: {e}"))
                if len(good) == k:
                    break
            if len(good) < k:
                raise HerdError(f"task {spec.name}: {fs_rel} has {len(good)} usable few-shot rows, {k} needed")
            shots = "".join(
                f"{ex.query}{spec.target_delimiter}{ex.choices[ex.gold]}{spec.fewshot_delimiter}" for ex in good
            )
        examples = []
        for row in read_rows(path, spec.format):
            if limit is not None and len(examples) >= limit:
                break
            try:
                examples.append(render_mc(spec, row, subset))
            except ValueError as e:
                skipped.append(Skip(row.where, str(e)))
        subsets.append(MCSubset(subset, description, description + shots, examples))
    return LoadedMC(spec, subsets, skipped)


# --- generate / perplexity / prompts ------------------------------------------------------------


@dataclass
class GenExample:
    where: str
    prompt: str
    target: str
    doc: dict


def load_generate(spec: TaskSpec, data_dir=None, limit: int | None = None) -> tuple[list[GenExample], list[Skip]]:
    examples, skipped = [], []
    for path in resolve_data(spec, spec.data["test"], data_dir):
        for row in read_rows(path, spec.format):
            if limit is not None and len(examples) >= limit:
                break
            problem = _check_fields(spec, row)
            if problem:
                skipped.append(Skip(row.where, problem))
                continue
            try:
                prompt = render(spec.prompt, row.doc)
                target = str(evaluate(spec.target, row.doc))
            except jinja2.TemplateError as e:
                skipped.append(Skip(row.where, f"template error ({e})"))
                continue
            examples.append(GenExample(row.where, prompt, target, row.doc))
    return examples, skipped


def load_texts(spec: TaskSpec, data_dir=None) -> list[tuple[str, str]]:
    """(where, text) per file for perplexity tasks."""
    out = []
    for path in resolve_data(spec, spec.data["test"], data_dir):
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise HerdError(f"{path}: empty text file")
        out.append((str(path), text))
    return out


def normalize(text: str, steps: list[str]) -> str:
    for step in steps:
        if step == "strip":
            text = text.strip()
        elif step == "lower":
            text = text.lower()
        elif step == "squash_spaces":
            text = " ".join(text.split())
        elif step == "strip_punct":
            text = text.strip(" .,!?;:'\"")
        elif step.startswith("regex:"):
            m = re.search(step[len("regex:") :], text)
            text = (m.group(1) if m and m.groups() else m.group(0)) if m else ""
        else:
            raise HerdError(f"unknown normalisation {step!r} (strip, lower, squash_spaces, strip_punct, regex:PATTERN)")
    return text
