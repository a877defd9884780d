"""The lifecycle machinery on small stages of our own: real Ray, real MLflow (sqlite in tmp).

Keys, wiring and --force closure are pure; the integration tests run one ray.dag per lifecycle
run on one Ray instance (started once: Ray takes long to start on a busy 2-core machine).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import pytest

from flows.console import TAIL_LINES, Console
from flows.lifecycle.config import config_hash, deep_merge, load_config
from flows.lifecycle.lineage import tag_model_version
from flows.lifecycle.plan import (
    Stage,
    StepContext,
    code_version,
    downstream,
    output_files,
    step_key,
    still_valid,
    wiring,
)
from flows.lifecycle.run import ray_runtime_env, run_lifecycle
from flows.ray_runtime import init_ray
from model.errors import HerdError
from tests.tiny import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


# --- toy stages (imported by the Ray workers from this module) ------------------------------------


def toy_data(ctx: StepContext) -> dict:
    text = "\n".join(
        f"doc {i} seed {ctx.seed} {ctx.config.get('words', 'x')}" for i in range(ctx.config.get("docs", 3))
    )
    raw = hashlib.sha256(text.encode()).hexdigest()
    (ctx.out_dir / "data.txt").write_text(text)
    manifest = hashlib.sha256((ctx.out_dir / "data.txt").read_bytes() + b"manifest").hexdigest()
    return {
        "outputs": {"data_dir": str(ctx.out_dir)},
        "digest": manifest,  # like data prep's: the same text gives the same digest, whatever the key
        "metrics": {"docs": ctx.config.get("docs", 3)},
        "lineage": {"data.input_sha256": raw, "data.manifest_digest": manifest},
    }


def toy_train(ctx: StepContext) -> dict:
    marker = ctx.params.get("fail_if_exists")
    if marker and Path(marker).exists():
        raise RuntimeError("injected failure")
    # resumable: a previous attempt's partial progress is visible here
    (ctx.out_dir / "attempts").open("a").write("x")
    data = Path(ctx.input("data")["outputs"]["data_dir"]) / "data.txt"
    (ctx.out_dir / "model.txt").write_text(
        f"trained on {hashlib.sha256(data.read_bytes()).hexdigest()} lr={ctx.config['lr']}"
    )
    return {"outputs": {"model_dir": str(ctx.out_dir)}, "metrics": {"loss": 1.0 / ctx.config["lr"]}}


def toy_eval(ctx: StepContext) -> dict:
    model = Path(ctx.model_dir()) / "model.txt"
    score = int(hashlib.sha256(model.read_bytes()).hexdigest()[:4], 16) / 65535
    return {"outputs": {}, "metrics": {"score": score}}


def toy_register(ctx: StepContext) -> dict:
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(ctx.lifecycle.tracking_uri, ctx.lifecycle.tracking_uri)
    mlflow.log_artifacts(ctx.model_dir(), "model")
    name = ctx.config["name"]
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name)
    run_id = mlflow.active_run().info.run_id
    mv = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias(name, "champion", mv.version)
    tag_model_version(ctx, name, mv.version)
    return {"outputs": {"version": str(mv.version)}, "digest": f"{name}/{mv.version}"}


def toy_stages() -> dict[str, Stage]:
    code = ["tests/test_lifecycle.py"]
    return {
        "data": Stage("data", toy_data, code=code),
        "pretrain": Stage("pretrain", toy_train, {"data": ["data"]}, code=code, resumable=True),
        "eval": Stage("eval", toy_eval, {"model": ["pretrain"]}, code=code),
        "register": Stage(
            "register", toy_register, {"model": ["pretrain"], "eval": ["eval"], "data": ["data"]}, code=code
        ),
    }


def toy_config(tmp: Path, **stage_over) -> dict:
    stages = {
        "data": {"config": "", "overrides": {"docs": 4}, "resources": {"num_cpus": 0}},
        "pretrain": {
            "overrides": {"lr": 0.5},
            "resources": {"num_cpus": 1},
            "params": {"fail_if_exists": str(tmp / "fail")},
        },
        "eval": {"resources": {"num_cpus": 0}},
        "register": {"overrides": {"name": "toy"}, "resources": {"num_cpus": 0}},
    }
    for k, v in stage_over.items():
        stages[k] = deep_merge(stages[k], v)
    return {"name": "toy", "seed": 7, "workdir": str(tmp / "runs"), "mlflow": {"experiment": "toy"}, "stages": stages}


# --- pure -----------------------------------------------------------------------------------------


def test_step_key_covers_config_inputs_code_and_seed():
    base = dict(stage="pretrain", config={"lr": 1}, params={}, inputs={"data": {"digest": "a"}}, code="c", seed=0)
    k = step_key(**base)
    assert k == step_key(**base)
    for change in (
        {"config": {"lr": 2}},
        {"inputs": {"data": {"digest": "b"}}},
        {"code": "d"},
        {"seed": 1},
        {"inputs": {"data": None}},
        {"stage": "sft"},
    ):
        assert step_key(**{**base, **change}) != k, change
    # key order in the config does not matter
    assert step_key(**{**base, "config": {"a": 1, "b": 2}}) == step_key(**{**base, "config": {"b": 2, "a": 1}})


def test_code_version_follows_the_stage_sources(tmp_path):
    v = code_version(["flows/lifecycle"])
    assert v == code_version(["flows/lifecycle"]) and len(v) == 64
    assert v != code_version(["flows/tracking.py"])


def test_a_cached_step_checks_its_outputs_digests(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\x00" * 64)
    (tmp_path / "report.json").write_text("{}")
    outputs = {"model_dir": str(model), "report": str(tmp_path / "report.json"), "name": "not a path"}
    result = {"stage": "pretrain", "outputs": outputs, "files": output_files(outputs)}
    assert set(result["files"]) == {"model_dir", "report"}
    stage = toy_stages()["pretrain"]
    assert still_valid(stage, result)
    (model / "weights.bin").write_bytes(b"\x00" * 63 + b"\x01")  # same name and size, one byte changed
    assert not still_valid(stage, result)
    assert "cached output model_dir" in capsys.readouterr().out
    (model / "weights.bin").write_bytes(b"\x00" * 64)
    assert still_valid(stage, result)
    (model / "extra.bin").write_bytes(b"")  # a file added to the folder changes its digest too
    assert not still_valid(stage, result)
    (model / "extra.bin").unlink()
    (tmp_path / "report.json").unlink()
    assert not still_valid(stage, result)
    assert "is gone" in capsys.readouterr().out


def test_wiring_takes_the_first_enabled_candidate_and_force_closes_downstream(tmp_path):
    stages = toy_stages()
    cfg = load_config(toy_config(tmp_path))
    wires = wiring(cfg, stages)
    assert wires["register"] == {"model": "pretrain", "eval": "eval", "data": "data"}
    assert downstream(wires, {"pretrain"}) == {"pretrain", "eval", "register"}
    assert downstream(wires, {"eval"}) == {"eval", "register"}
    off = load_config(toy_config(tmp_path, pretrain={"enabled": False}))
    wires = wiring(off, stages)
    assert "pretrain" not in wires and wires["eval"] == {"model": None}


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(HerdError, match="unknown key.*bogus"):
        load_config({**toy_config(tmp_path), "bogus": 1})
    with pytest.raises(HerdError, match=r"stages.eval: unknown key.*cpus"):
        load_config(toy_config(tmp_path, eval={"cpus": 1}))
    cfg = toy_config(tmp_path)
    cfg["stages"]["nope"] = {}
    with pytest.raises(HerdError, match="unknown stage.*nope"):
        run_lifecycle(cfg, stages=toy_stages(), tracking_uri=f"sqlite:///{tmp_path}/m.db")


def test_default_config_resolves():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert list(cfg["stages"])[:2] == ["data", "pretrain"]
    assert cfg["stages"]["data"]["config"]["name"] == "default"  # configs/data/default.yaml read in
    assert len(config_hash(cfg)) == 64


# --- integration: real Ray, real MLflow -----------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    import ray

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=True, runtime_env=ray_runtime_env())
    yield ray
    ray.shutdown()


def _children(uri: str, parent: str):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_run(parent).info.experiment_id
    return {r.data.tags["herd.stage"]: r for r in c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")}


@pytest.mark.integration
def test_run_cache_force_resume_and_lineage(ray_local, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    stages = toy_stages()
    cfg = toy_config(tmp_path)

    first = run_lifecycle(cfg, stages=stages, tracking_uri=uri)
    assert [r["status"] for r in first.steps.values()] == ["ran"] * 4
    from mlflow import MlflowClient

    # artifacts beside the database, not in the working directory (a job's is a temporary copy)
    assert MlflowClient(uri).get_experiment_by_name("toy").artifact_location == str(tmp_path / "mlruns" / "toy")
    kids = _children(uri, first.parent_run_id)
    assert set(kids) == {"data", "pretrain", "eval", "register"}
    assert all(r.info.status == "FINISHED" for r in kids.values())
    assert kids["pretrain"].data.tags["herd.step.key"] == first.steps["pretrain"]["key"]
    inputs = json.loads(kids["pretrain"].data.tags["herd.step.inputs"])
    assert inputs["data"]["digest"] == first.steps["data"]["digest"]
    assert json.loads(kids["pretrain"].data.tags["herd.step.outputs"])["model_dir"].endswith(
        first.steps["pretrain"]["key"][:16]
    )
    assert kids["eval"].data.metrics["score"] == first.steps["eval"]["metrics"]["score"]

    # same config: every step cached, answered from MLflow without Ray, still one child run each
    t = time.perf_counter()
    again = run_lifecycle(cfg, stages=stages, tracking_uri=uri)
    took = time.perf_counter() - t
    assert [r["status"] for r in again.steps.values()] == ["cached"] * 4
    assert not again.used_ray and took < 30
    kids = _children(uri, again.parent_run_id)
    assert {k: r.data.tags["herd.step.status"] for k, r in kids.items()} == dict.fromkeys(kids, "cached")
    assert kids["pretrain"].data.tags["herd.step.cached_from"] == first.steps["pretrain"]["run_id"]
    assert again.steps["eval"]["metrics"] == first.steps["eval"]["metrics"]

    # data reruns (a param it ignores changes its key) and comes out with the same digest: the steps
    # after it could not be planned on the driver, so their Ray tasks find them cached
    same = run_lifecycle(toy_config(tmp_path, data={"params": {"unused": 1}}), stages=stages, tracking_uri=uri)
    assert {n: r["status"] for n, r in same.steps.items()} == {
        "data": "ran",
        "pretrain": "cached",
        "eval": "cached",
        "register": "cached",
    }
    assert same.steps["pretrain"]["run_id"] == first.steps["pretrain"]["run_id"]  # the run that made it
    assert same.steps["register"]["lineage"]["parent_run_id"] == same.parent_run_id
    kids = _children(uri, same.parent_run_id)
    assert kids["eval"].data.tags["herd.step.status"] == "cached" and kids["eval"].info.status == "FINISHED"

    # --force pretrain: pretrain and what reads it rerun, data stays cached
    forced = run_lifecycle(cfg, stages=stages, tracking_uri=uri, force=["pretrain"])
    assert {n: r["status"] for n, r in forced.steps.items()} == {
        "data": "cached",
        "pretrain": "ran",
        "eval": "ran",
        "register": "ran",
    }
    assert forced.steps["eval"]["metrics"] == first.steps["eval"]["metrics"]  # same inputs, same result

    # a config change in pretrain fails there; the rerun resumes at pretrain
    changed = toy_config(tmp_path, pretrain={"overrides": {"lr": 0.25}})
    (tmp_path / "fail").write_text("")
    shown = io.StringIO()
    with pytest.raises(HerdError, match="stage pretrain failed.*injected failure") as failed:
        with Console(shown, tty=False) as console:  # what `herd run` shows
            run_lifecycle(changed, stages=stages, tracking_uri=uri, log=console, events=console.event)
    log = Path(str(failed.value).split("its log: ")[1].split(";")[0])
    assert log.name == "pretrain.log" and log.parent.parent.name == "logs"
    lines = log.read_text().splitlines()
    assert lines[-1] == "RuntimeError: injected failure"  # the traceback ends the stage's log
    text = shown.getvalue()
    assert f"the last {min(TAIL_LINES, len(lines))} lines of {log}" in text
    assert "\n".join(f"  | {line}" for line in lines[-TAIL_LINES:]) in text
    (tmp_path / "fail").unlink()
    resumed = run_lifecycle(changed, stages=stages, tracking_uri=uri)
    assert {n: r["status"] for n, r in resumed.steps.items()} == {
        "data": "cached",
        "pretrain": "ran",
        "eval": "ran",
        "register": "ran",
    }
    out = Path(resumed.steps["pretrain"]["outputs"]["model_dir"])
    assert (out / "attempts").read_text() == "x"  # the failed attempt failed before its work; the folder is kept

    # lineage: the registered version carries the data digest; `herd lineage` prints it
    from flows.cli import main

    capsys.readouterr()
    assert main(["lineage", "models:/toy@champion", "--tracking-uri", uri]) == 0
    text = capsys.readouterr().out
    raw = resumed.steps["data"]["lineage"]["data.input_sha256"]
    assert raw in text and resumed.parent_run_id in text
    assert "pretrain step (ran)" in text and "data step (cached)" in text
    from mlflow import MlflowClient

    mv = MlflowClient(uri, uri).get_model_version_by_alias("toy", "champion")
    assert mv.tags["herd.lineage.data.input_sha256"] == raw
    assert mv.tags["herd.lineage.parent_run_id"] == resumed.parent_run_id
    assert mv.tags["herd.lineage.config_hash"] == resumed.config_hash
    assert len(mv.tags["herd.lineage.git_sha"]) >= 7


# --- the real finetune adapters on a tiny random model ---------------------------------------------

# Tiny post-training configs (tests/test_finetune_stages.py's sizes): mechanics, not quality.
TINY_FT = {
    "model": {"max_seq_len": 96},
    "data": {"tasks": 12, "heldout": 3},
    "train": {"steps": 2, "micro_batch": 2, "lr": 1.0e-3, "warmup_steps": 0},
    "sampling": {"n": 2, "max_tokens": 3},
    "eval_max_tokens": 3,
    "rejection": {"prompts": 4, "workers": 0},
    "reward": {"threshold": 0.0},
    "dpo": {"pairs": 6},
    "ppo": {"iterations": 1, "prompts_per_iter": 2, "group_size": 2, "minibatch": 4, "epochs": 1},
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", max_seq_len=256))


def test_finetune_config_takes_the_lifecycle_seed_and_store():
    from flows.lifecycle import stages as ls

    fc = ls.finetune_config("dpo", {**TINY_FT, "seed": 3, "sampling": {"seed": 5}}, 11, "sqlite:////x/m.db", "e")
    assert (fc.stage, fc.seed, fc.sampling.seed) == ("dpo", 11, 11)
    assert (fc.mlflow.enabled, fc.mlflow.tracking_uri, fc.mlflow.experiment) == (True, "sqlite:////x/m.db", "e")
    assert fc.train.steps == TINY_FT["train"]["steps"]


def test_a_bad_stage_config_fails_before_anything_runs(tmp_path):
    """Each stage's own typed loader runs at planning: the error names the stage and the field, and
    no MLflow run (nor Ray) is started."""
    from mlflow import MlflowClient

    from flows.lifecycle.stages import STAGES

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = {"name": "bad", "workdir": str(tmp_path / "runs"), "mlflow": {"experiment": "bad"}}
    cases = [
        ({"sft": {"config": "configs/finetune/dpo.yaml"}}, r"stages.sft: config: stage is 'dpo', expected 'sft'"),
        (
            {"dpo": {"config": "configs/finetune/dpo.yaml", "overrides": {"train": {"steps": 0}}}},
            r"stages.dpo: finetune config: train.steps must be >= 1",
        ),
        (
            {"sft": {"config": "configs/finetune/sft.yaml", "overrides": {"train": {"stepz": 2}}}},
            r"stages.sft: .*train.stepz",
        ),
        (
            {
                "pretrain": {"overrides": {"training": {"micro_batch": "two"}}},
                "data": {"config": "configs/data/default.yaml"},
            },
            r"stages.pretrain: .*training.micro_batch",
        ),
    ]
    for stages, msg in cases:
        with pytest.raises(HerdError, match=msg):
            run_lifecycle({**base, "stages": stages}, stages=STAGES, tracking_uri=uri)
    assert MlflowClient(uri).search_experiments(filter_string="name = 'bad'") == []


@pytest.mark.integration
def test_sft_rs_dpo_ppo_chain_through_the_finetune_entry_points(ray_local, tiny_model, tmp_path):
    """Each finetune stage starts from the previous one's checkpoint, logs a finetune run nested
    under its step run in the lifecycle's store, and a rerun is fully cached."""
    from mlflow import MlflowClient

    from flows.lifecycle.stages import STAGES

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    stages = {k: STAGES[k] for k in ("sft", "rs", "dpo", "ppo")}
    ft = {"config": "", "overrides": TINY_FT, "resources": {"num_cpus": 1}}
    cfg = {
        "name": "ft",
        "seed": 5,
        "workdir": str(tmp_path / "runs"),
        "base_model": tiny_model,
        "mlflow": {"experiment": "ft"},
        "stages": {k: ft for k in stages},
    }
    res = run_lifecycle(cfg, stages=stages, tracking_uri=uri)
    assert [r["status"] for r in res.steps.values()] == ["ran"] * 4
    c = MlflowClient(uri)
    prev = tiny_model
    for name in ("sft", "rs", "dpo", "ppo"):
        step = res.steps[name]
        got = json.loads(c.get_run(step["run_id"]).data.tags["herd.step.inputs"])["model"]
        upstream = {"sft": None, "rs": "sft", "dpo": "rs", "ppo": "dpo"}[name]
        assert (got and got["stage"]) == upstream  # sft starts from base_model, the rest from the one before
        ft_run = c.get_run(step["outputs"]["finetune_run_id"])
        assert ft_run.data.tags["mlflow.parentRunId"] == step["run_id"]  # nested under the step run
        assert ft_run.data.tags["herd.stage"] == f"finetune/{name}"
        assert ft_run.data.params["seed"] == "5"
        assert all(isinstance(v, float) for v in step["metrics"].values()) and step["metrics"]
        assert c.get_run(step["run_id"]).data.metrics.keys() == step["metrics"].keys()
        model_dir = Path(step["outputs"]["model_dir"])
        assert (model_dir / "model.safetensors").is_file() and str(model_dir).startswith(str(tmp_path / "runs"))
        assert step["outputs"]["model_dir"] != prev
        prev = step["outputs"]["model_dir"]
    assert "train_loss_last" in res.steps["sft"]["metrics"] and "heldout_margin_after" in res.steps["dpo"]["metrics"]

    again = run_lifecycle(cfg, stages=stages, tracking_uri=uri)
    assert [r["status"] for r in again.steps.values()] == ["cached"] * 4 and not again.used_ray
    assert again.steps["dpo"]["outputs"] == res.steps["dpo"]["outputs"]
