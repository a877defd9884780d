"""Acceptance on SmolLM2-135M-Instruct, each run printing its figures and wall time. The chain follows
Llama 3's post-training order: SFT -> rejection sampling + SFT, and DPO / GRPO from the base model,
each judged on the same held-out embedded tasks (greedy). The configs run torch on one thread: on a
shared 2-core CPU two OpenMP threads mostly wait on each other."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flows.finetune.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _cfg(name, tmp_path, **over):
    fc = load_config(CONFIGS / f"{name}.yaml")
    return fc.replace(mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}, **over)


def _timed(label, fn, *args):
    t0 = time.time()
    res = fn(*args)
    print(f"\n{label}: {time.time() - t0:.0f} s wall")
    return res


@pytest.fixture(scope="module")
def sft_result(smollm2_dir, tmp_path_factory):
    from flows.finetune import run_sft

    tmp = tmp_path_factory.mktemp("sft")
    return _timed("SFT run", run_sft, _cfg("sft-accept", tmp), smollm2_dir, tmp / "out")


def test_sft_raises_exact_match(sft_result):
    m = sft_result.metrics
    print(
        "SFT exact match",
        m["exact_match_before"],
        "->",
        m["exact_match_after"],
        "reward",
        m["reward_before"],
        "->",
        m["reward_after"],
    )
    assert m["exact_match_after"] > m["exact_match_before"]


def test_rejection_sampling_then_sft_at_least_as_good(sft_result, tmp_path):
    from flows.finetune import run_rejection_sampling

    res = _timed(
        "RS + SFT run", run_rejection_sampling, _cfg("rs-accept", tmp_path), sft_result.checkpoint, tmp_path / "rs"
    )
    m = res.metrics
    print("RS kept", m["kept"], "of", m["prompts"], "EM", m["sft_exact_match_before"], "->", m["sft_exact_match_after"])
    assert m["kept"] > 0
    # the same held-out prompts: RS starts where SFT ended, and must end at least as well
    assert m["sft_exact_match_before"] == sft_result.metrics["exact_match_after"]
    assert m["sft_exact_match_after"] >= sft_result.metrics["exact_match_after"]


def test_dpo_widens_margin_and_raises_reward(smollm2_dir, tmp_path):
    from flows.finetune import run_dpo

    m = _timed("DPO run", run_dpo, _cfg("dpo-accept", tmp_path), smollm2_dir, tmp_path / "dpo").metrics
    print(
        "DPO margin",
        m["heldout_margin_before"],
        "->",
        m["heldout_margin_after"],
        "reward",
        m["reward_before"],
        "->",
        m["reward_after"],
    )
    assert m["heldout_margin_after"] > m["heldout_margin_before"]
    assert m["reward_after"] > m["reward_before"]


def test_grpo_raises_reward_with_bounded_kl(smollm2_dir, tmp_path):
    from flows.finetune import run_ppo

    m = _timed("GRPO run", run_ppo, _cfg("grpo-accept", tmp_path), smollm2_dir, tmp_path / "grpo").metrics
    print(
        "GRPO reward",
        m["reward_before"],
        "->",
        m["reward_after"],
        "held-out KL",
        m["heldout_kl"],
        "rollout reward",
        m["rollout_reward_first"],
        "->",
        m["rollout_reward_last"],
    )
    assert m["reward_after"] > m["reward_before"]
    assert m["heldout_kl"] < 50.0  # nats per completion (a few tokens): bounded, not collapsed
