"""Typed configs from YAML: one loader for every stage's dataclasses.

Unknown keys and wrong types are errors that name the key path (`training.lr must be a
number`), so a typo in a YAML file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

from model.errors import HerdError


def _is_optional(hint) -> tuple[bool, object]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return True, args[0]
    return False, hint


def coerce(value, hint, where: str, kind: str):
    """Check `value` against the type hint `hint`; build nested dataclasses."""
    optional, hint = _is_optional(hint)
    if value is None and optional:
        return None
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise HerdError(f"{kind} config: {where} must be a mapping")
        return build(hint, value, kind, where)
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise HerdError(f"{kind} config: {where} must be a list")
        (item,) = typing.get_args(hint) or (object,)
        return [coerce(v, item, f"{where}[{i}]", kind) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise HerdError(f"{kind} config: {where} must be a mapping")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise HerdError(f"{kind} config: {where} must be true or false, not {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HerdError(f"{kind} config: {where} must be an integer, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HerdError(f"{kind} config: {where} must be a number, not {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise HerdError(f"{kind} config: {where} must be a string, not {value!r}")
        return value
    return value


def build(cls, data: dict, kind: str, where: str = ""):
    """`cls(**data)`, checked: unknown keys and wrong types name their key path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise HerdError(f"{kind} config: unknown key '{key}'")
    return cls(**{k: coerce(v, hints[k], f"{where}.{k}" if where else k, kind) for k, v in data.items()})


def read_yaml_mapping(path: str | Path, kind: str) -> dict:
    """The top-level mapping of a YAML file ({} for an empty file)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise HerdError(f"{kind} config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise HerdError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HerdError(f"{path}: the top level must be a mapping")
    return data


def load_yaml(cls, path: str | Path, kind: str):
    """Read `path` into the dataclass `cls`; errors name the file and the key path."""
    data = read_yaml_mapping(path, kind)
    try:
        return build(cls, data, kind)
    except HerdError as e:
        raise HerdError(f"{path}: {e}") from None


@dataclasses.dataclass
class MlflowSection:
    """Where a stage logs its MLflow run; "" keeps the ambient tracking URI or experiment."""

    enabled: bool = True
    tracking_uri: str = ""
    experiment: str = ""


class StageConfig:
    """What every stage's top-level config dataclass shares; a subclass names its KIND."""

    KIND: typing.ClassVar[str]
    PARAM_CHARS: typing.ClassVar[int] = 500  # an MLflow param value past this is noise on the run page

    @classmethod
    def from_dict(cls, data: dict | None):
        return build(cls, data or {}, cls.KIND)

    def check(self, checks: list[tuple[bool, str]]) -> None:
        """Raise for the first (ok, message) pair that failed."""
        for ok, message in checks:
            if not ok:
                raise HerdError(f"{self.KIND} config: {message}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, str]:
        """section.key -> value, the shape MLflow params want."""
        out = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": str(v)[: self.PARAM_CHARS] for k, v in values.items()})
            else:
                out[section] = str(values)[: self.PARAM_CHARS]
        return out

    def replace(self, **sections):
        """A copy with some fields changed: replace(training={"steps": 5}, seed=1) merges sections."""
        d = self.to_dict()
        for key, value in sections.items():
            d[key] = {**d[key], **value} if isinstance(value, dict) and isinstance(d.get(key), dict) else value
        return type(self).from_dict(d)
