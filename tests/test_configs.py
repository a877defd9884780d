"""The shared typed-YAML loader: nested sections, optional fields, errors naming the key path."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from flows.configs import build, load_yaml
from model.errors import HerdError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Demo:
    name: str = "x"
    steps: int = 10
    resume: bool = False
    init_from: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_nested_sections_and_int_to_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run\nsteps: 3\noptim:\n  lr: 1\n  betas: [0.8, 0.9]\ninit_from: null\n")
    cfg = load_yaml(Demo, p, "demo")
    assert cfg == Demo(name="run", steps=3, optim=Optim(lr=1.0, betas=[0.8, 0.9]))
    assert isinstance(cfg.optim.lr, float)


def test_empty_file_gives_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("")
    assert load_yaml(Demo, p, "demo") == Demo()


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"optim": {"lrr": 1}}, "unknown key 'optim.lrr'"),
        ({"steps": "ten"}, "steps must be an integer"),
        ({"steps": True}, "steps must be an integer"),
        ({"resume": "yes"}, "resume must be true or false"),
        ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1] must be a number"),
        ({"optim": 3}, "optim must be a mapping"),
    ],
)
def test_errors_name_the_key(data, needle):
    with pytest.raises(HerdError) as e:
        build(Demo, data, "demo")
    assert needle in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(HerdError, match="not found"):
        load_yaml(Demo, tmp_path / "missing.yaml", "demo")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(HerdError, match="bad.yaml: not valid YAML"):
        load_yaml(Demo, bad, "demo")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(HerdError, match="top level must be a mapping"):
        load_yaml(Demo, listy, "demo")
    typo = tmp_path / "typo.yaml"
    typo.write_text("stepz: 1\n")
    with pytest.raises(HerdError, match="typo.yaml: demo config: unknown key 'stepz'"):
        load_yaml(Demo, typo, "demo")
