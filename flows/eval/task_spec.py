"""Evaluation task specs: parsing and checking the YAML/JSON file that defines a task.

A task is a small YAML or JSON file (configs/eval/tasks/*.yaml are the built-in ones), so a
new benchmark needs no code. Fields, with lm-evaluation-harness's names in brackets:

  name:          task name (default: the file's stem)
  type:          multiple_choice | generate | perplexity | redteam | transcripts
  data:          {test: PATH, fewshot: PATH}; PATH is relative to the spec's folder when the
                 file is there, else to --data-dir. A `*` in `test` makes one subset per
                 matching file (MMLU's subjects); `{subset}` in `fewshot` names its file.
  format:        csv | jsonl | json | text (default: from the suffix)
  fields:        required fields; a row without one is skipped and counted, naming the row
  description:   text before the few-shot examples [description]        (jinja)
  prompt:        the question [doc_to_text]                              (jinja)
  choices:       a list of strings, or a jinja expression giving a list [doc_to_choice]
  target:        jinja expression: a choice index, a choice string or a digit string [doc_to_target]
  target_delimiter: " " ; fewshot_delimiter: "\\n\\n"
  num_fewshot:   k (first k rows of the fewshot file, as lm-eval's `first_n` sampler)
  scoring:       acc | acc_norm (log-likelihood divided by the choice's length in characters)
  until / max_tokens / normalize: for generate tasks (exact match after normalisation)
  judge:         rated tasks (data.test: a sealed prompt set): the pairwise judge (flows/eval/ratings.py)
  safety:        data.test: HH-RLHF harmless pairs; attack prompts + learned scorer (flows/eval/safety.py)

Templates are jinja, rendered in a sandbox with StrictUndefined: `{{ question.strip() }}`;
a template that is exactly a field name returns that field (as lm-eval does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.errors import HerdError

TASK_TYPES = ("multiple_choice", "generate", "perplexity", "redteam", "transcripts", "rated", "safety")
SCORINGS = ("acc", "acc_norm")
BUILTIN_TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval" / "tasks"

# Shared with tasks.py, which renders the templates this module checks.
TEMPLATES = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@dataclass
class TaskSpec:
    name: str
    type: str = "multiple_choice"
    data: dict[str, str] = field(default_factory=dict)
    format: str | None = None
    fields: list[str] = field(default_factory=list)
    description: str = ""
    prompt: str = ""
    choices: Any = None
    target: str | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    scoring: str = "acc"
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    max_tokens: int = 32
    normalize: list[str] = field(default_factory=lambda: ["strip"])
    chat: bool = False
    rubric: dict[str, Any] = field(default_factory=dict)
    judge: dict[str, Any] = field(
        default_factory=dict
    )  # rated: {kind: llm, model: smollm2} | {kind: reward_model, path}
    window: int | None = None
    source: Path | None = None  # the spec file

    @property
    def base_dir(self) -> Path | None:
        return self.source.parent if self.source is not None else None


def load_spec(ref: str | Path | dict, overrides: dict | None = None) -> TaskSpec:
    """A spec from a built-in name (configs/eval/tasks/NAME.yaml), a file path, or a dict."""
    source = None
    if isinstance(ref, dict):
        raw = dict(ref)
    else:
        path = Path(ref)
        if not path.suffix and not path.exists():
            path = BUILTIN_TASKS_DIR / f"{ref}.yaml"
            if not path.is_file():
                known = ", ".join(sorted(p.stem for p in BUILTIN_TASKS_DIR.glob("*.yaml")))
                raise HerdError(f"unknown task {ref!r}: not a spec file, and no built-in task of that name ({known})")
        if not path.is_file():
            raise HerdError(f"{path}: task spec not found")
        raw = _read_spec_file(path)
        source = path.resolve()
        raw.setdefault("name", path.stem)
    raw.update(overrides or {})
    known_fields = set(TaskSpec.__dataclass_fields__) - {"source"}
    unknown = sorted(set(raw) - known_fields)
    where = source or raw.get("name", "task spec")
    if unknown:
        raise HerdError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known_fields))}")
    if "name" not in raw:
        raise HerdError(f"{where}: needs a name")
    spec = TaskSpec(**raw, source=source)
    _validate(spec, where)
    return spec


def _read_spec_file(path: Path) -> dict:
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise HerdError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})") from None
    if not isinstance(raw, dict):
        raise HerdError(f"{path}: a task spec must be a mapping")
    return raw


def _validate(spec: TaskSpec, where) -> None:
    if spec.type not in TASK_TYPES:
        raise HerdError(f"{where}: type {spec.type!r} is not one of {', '.join(TASK_TYPES)}")
    if spec.type != "transcripts" and "test" not in spec.data:
        raise HerdError(f"{where}: data.test is required")
    if spec.type == "multiple_choice":
        if spec.scoring not in SCORINGS:
            raise HerdError(f"{where}: scoring {spec.scoring!r} is not one of {', '.join(SCORINGS)}")
        for key in ("prompt", "choices", "target"):
            if getattr(spec, key) in (None, "", []):  # target 0 (the first choice) is a target
                raise HerdError(f"{where}: a multiple_choice task needs {key!r}")
    if spec.type == "generate" and not (spec.prompt and spec.target):
        raise HerdError(f"{where}: a generate task needs 'prompt' and 'target'")
    if spec.num_fewshot < 0:
        raise HerdError(f"{where}: num_fewshot must be >= 0")
    if spec.num_fewshot and "fewshot" not in spec.data:
        raise HerdError(f"{where}: num_fewshot {spec.num_fewshot} needs data.fewshot")
    for key in ("description", "prompt", "target"):
        value = getattr(spec, key)
        if isinstance(value, str):
            try:
                TEMPLATES.from_string(value)
            except jinja2.TemplateSyntaxError as e:
                raise HerdError(f"{where}: {key}: bad template ({e})") from None
