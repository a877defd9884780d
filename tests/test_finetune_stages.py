"""Each post-training stage end to end on a tiny random model (mechanics, not quality): the pretraining
loop runs it, a native checkpoint comes out, MLflow child runs carry the curves."""

from __future__ import annotations

import pytest
import torch

from flows.finetune.config import config_from_dict
from tests.tiny import tiny_checkpoint

BASE = {
    "data": {"tasks": 12, "heldout": 3},
    "model": {"max_seq_len": 96},
    "train": {"steps": 2, "micro_batch": 2, "lr": 1e-3, "warmup_steps": 0},
    "sampling": {"n": 2, "max_tokens": 3},
    "eval_max_tokens": 3,
    "mlflow": {"enabled": False},
    "rejection": {"prompts": 4, "workers": 0},
    "reward": {"threshold": 0.0},
    "dpo": {"pairs": 6},
    "ppo": {"iterations": 2, "prompts_per_iter": 2, "group_size": 2, "minibatch": 4, "epochs": 1},
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", max_seq_len=256)


def cfg(tiny_dir, stage, **over):
    d = {**BASE, "stage": stage, "model": {**BASE["model"], "base": str(tiny_dir)}}
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(d)


def _loads(path):
    from model.checkpoint import load_model

    model, _ = load_model(path)
    return model


def test_sft_full_and_lora_export_plain_checkpoints(tiny_dir, tmp_path):
    from flows.finetune import run_sft

    full = run_sft(cfg(tiny_dir, "sft"), None, tmp_path / "full")
    lora = run_sft(
        cfg(tiny_dir, "sft", lora={"enabled": True, "rank": 2, "alpha": 4.0, "target_modules": ["wq", "w2"]}),
        None,
        tmp_path / "lora",
    )
    base = _loads(tiny_dir)
    for res in (full, lora):
        m = _loads(res.checkpoint)
        assert set(m.state_dict()) == set(base.state_dict())
        assert res.metrics["train_loss_last"] < res.metrics["train_loss_first"] + 1e-3
        assert "exact_match_before" in res.metrics and res.metrics["data"]["kept"] > 0
    assert lora.metrics["lora_params"] == 2 * (
        2 * (64 + 64) + 2 * (192 + 64)
    )  # 2 layers x (wq 64->64, w2 192->64), rank 2
    # LoRA moved only the targeted matrices
    m = _loads(lora.checkpoint)
    sd, bd = m.state_dict(), base.state_dict()
    changed = {k for k in sd if not torch.equal(sd[k], bd[k])}
    assert changed and all(k.endswith(("attention.wq.weight", "feed_forward.w2.weight")) for k in changed)


def test_dpo_reference_cache_and_ppo_grpo_and_rs(tiny_dir, tmp_path):
    from flows.finetune import run_dpo, run_ppo, run_rejection_sampling

    c = cfg(tiny_dir, "dpo", dpo={"cache_dir": str(tmp_path / "cache")})
    first = run_dpo(c, None, tmp_path / "dpo1")
    assert abs(first.metrics["train_loss_first"] - 0.693147) < 1e-4  # policy == reference at step 1
    assert not first.metrics["ref_cache_hit"]
    again = run_dpo(c, None, tmp_path / "dpo2")
    assert again.metrics["ref_cache_hit"]  # computed once, then read from the cache
    for algo in ("ppo", "grpo"):
        r = run_ppo(cfg(tiny_dir, "ppo", ppo={"algorithm": algo}), None, tmp_path / algo)
        assert r.metrics["iterations"] == 2 and r.metrics["steps"] == 2
        assert "heldout_kl" in r.metrics and _loads(r.checkpoint) is not None
    rs = run_rejection_sampling(cfg(tiny_dir, "rs"), None, tmp_path / "rs")
    assert rs.metrics["samples"] == 8 and rs.metrics["kept"] == 4  # threshold 0: every prompt keeps its best
    assert (tmp_path / "rs" / "kept.jsonl").read_text().count("\n") == 4


def test_mlflow_child_runs_and_curves(tiny_dir, tmp_path):
    import mlflow

    from flows.finetune import run_dpo

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("herd-test")
    with mlflow.start_run(run_name="lifecycle") as parent:
        res = run_dpo(
            cfg(tiny_dir, "dpo", mlflow={"enabled": True, "tracking_uri": uri, "experiment": "herd-test"}),
            None,
            tmp_path / "dpo",
        )
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(res.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    for key in ("margin", "reward_margin", "reward_accuracy", "loss", "heldout_margin_after", "win_rate"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(res.run_id, "margin")) == 2  # a curve: one point per step


def test_bad_records_are_counted_through_the_stages(tiny_dir, tmp_path):
    """Missing roles, an empty assistant turn and over-long conversations reach the stages' data
    reports as counts; the stages train on what is left, and say why when nothing is."""
    import json

    from flows.finetune import run_dpo, run_sft
    from model.errors import HerdError

    convs = [
        [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}] for w in ("one", "two", "three")
    ]
    convs += [
        [{"content": "no role"}, {"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
        [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "ok"}],
        "not a conversation",
    ]
    res = run_sft(cfg(tiny_dir, "sft"), None, tmp_path / "sft", conversations=convs)
    d = res.metrics["data"]
    assert d["read"] == 7 and d["kept"] == 3 and res.metrics["train_loss_last"] > 0
    assert d["dropped"] == {
        "format:missing_role": 1,
        "format:empty_assistant": 1,
        "length:over_context": 1,
        "format:unknown": 1,
    }
    with pytest.raises(HerdError, match="no usable training conversations.*empty_assistant"):
        run_sft(cfg(tiny_dir, "sft"), None, tmp_path / "none", conversations=convs[4:6])

    pairs = tmp_path / "pairs.jsonl"
    recs = [{"prompt": f"Pick {i}.", "chosen": "yes", "rejected": "no"} for i in range(5)] + [
        {"prompt": [{"content": "no role"}], "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": " ", "rejected": "b"},
        {"prompt": "long " * 200, "chosen": "a", "rejected": "b"},
    ]
    pairs.write_text("\n".join(json.dumps(r) for r in recs) + "\n{broken\n")
    dpo = run_dpo(cfg(tiny_dir, "dpo", data={"paths": [str(pairs)]}), None, tmp_path / "dpo")
    d = dpo.metrics["data"]
    assert d["read"] == 9 and d["kept"] == 5 and d["kept"] + d["dropped_total"] == d["read"]
    assert d["dropped"] == {
        "format:missing_role": 1,
        "format:empty_assistant": 1,
        "length:over_context": 1,
        "read:bad_json": 1,
    }
    assert dpo.metrics["train_pairs"] + dpo.metrics["heldout_pairs"] == 5


def test_grpo_dynamic_sampling_keeps_only_informative_groups(tiny_dir):
    """DAPO-style filtering: groups whose samples all score the same carry no advantage and are
    replaced by more sampled prompts, up to ppo.max_rounds rounds; the step count does not change."""
    import copy
    import zlib

    from flows.finetune.common import load_policy, train_tasks
    from flows.finetune.ppo import PolicyValue, RolloutData, steps_per_iteration

    fc = cfg(
        tiny_dir,
        "ppo",
        ppo={
            "algorithm": "grpo",
            "filter_groups": True,
            "max_rounds": 4,
            "prompts_per_iter": 2,
            "group_size": 2,
            "minibatch": 2,
        },
        sampling={"n": 2, "max_tokens": 3, "temperature": 1.0},
    )
    policy, tok = load_policy(tiny_dir)
    pv = PolicyValue(policy, value_head=False)
    ref = copy.deepcopy(policy).eval()

    def parity(_task, text):  # a reward that a random model's samples get about half the time
        return float(zlib.crc32(text.encode()) % 2)

    data = RolloutData(pv, ref, tok, train_tasks(fc), fc, parity)
    data.rollout()
    st = data.history[-1]
    assert st["informative_groups"] == 2 and 2 <= st["sampled_prompts"] <= 8
    assert len(data.buffer) == steps_per_iteration(fc) == 2
    for b in data.buffer:
        assert (b.advantages.abs().sum(-1) > 0).all()  # no zero-advantage sample left in the update

    flat = RolloutData(pv, ref, tok, train_tasks(fc), fc, lambda _t, _x: 0.0)
    flat.rollout()
    st = flat.history[-1]
    assert st["informative_groups"] == 0 and st["sampling_rounds"] == 4 and st["sampled_prompts"] == 8
    assert len(flat.buffer) == 2 and all((b.advantages == 0).all() for b in flat.buffer)
