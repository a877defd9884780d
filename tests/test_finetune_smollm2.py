"""Acceptance on SmolLM2-135M-Instruct (slow: minutes each on an idle 2-core CPU, much longer on a
shared one). The chain follows Llama 3's post-training order: SFT -> rejection sampling + SFT, and
DPO / GRPO from the base model, each judged on held-out embedded tasks."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.finetune.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _cfg(name, tmp_path, **over):
    fc = load_config(CONFIGS / f"{name}.yaml")
    return fc.replace(mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}, **over)


@pytest.fixture(scope="module")
def sft_result(smollm2_dir, tmp_path_factory):
    from flows.finetune import run_sft

    tmp = tmp_path_factory.mktemp("sft")
    return run_sft(_cfg("sft-accept", tmp), smollm2_dir, tmp / "out")


def test_sft_raises_exact_match(sft_result):
    m = sft_result.metrics
    print("SFT exact match", m["exact_match_before"], "->", m["exact_match_after"], "reward", m["reward_before"],
          "->", m["reward_after"])
    assert m["exact_match_after"] > m["exact_match_before"]


def test_rejection_sampling_then_sft_at_least_as_good(sft_result, tmp_path):
    from flows.finetune import run_rejection_sampling

    res = run_rejection_sampling(_cfg("rs", tmp_path, rejection={"prompts": 64, "workers": 2}, train={"steps": 10}),
                                 sft_result.checkpoint, tmp_path / "rs")
    m = res.metrics
    print("RS kept", m["kept"], "of", m["prompts"], "EM", m["sft_exact_match_before"], "->", m["sft_exact_match_after"])
    assert m["kept"] > 0
    assert m["sft_exact_match_after"] >= sft_result.metrics["exact_match_after"]


def test_dpo_widens_margin_and_raises_reward(smollm2_dir, tmp_path):
    from flows.finetune import run_dpo

    m = run_dpo(_cfg("dpo-accept", tmp_path), smollm2_dir, tmp_path / "dpo").metrics
    print("DPO margin", m["heldout_margin_before"], "->", m["heldout_margin_after"], "reward", m["reward_before"], "->",
          m["reward_after"])
    assert m["heldout_margin_after"] > m["heldout_margin_before"]
    assert m["reward_after"] > m["reward_before"]


def test_grpo_raises_reward_with_bounded_kl(smollm2_dir, tmp_path):
    from flows.finetune import run_ppo

    m = run_ppo(_cfg("grpo-accept", tmp_path), smollm2_dir, tmp_path / "grpo").metrics
    print("GRPO reward", m["reward_before"], "->", m["reward_after"], "held-out KL", m["heldout_kl"])
    assert m["reward_after"] > m["reward_before"]
    assert m["heldout_kl"] < 50.0  # nats per completion (a few tokens): bounded, not collapsed


def test_sft_and_dpo_run_on_shared_samples(smollm2_dir, tmp_path):
    if not SHARED.is_dir():
        print(f"skip: shared data not found at {SHARED}")
        pytest.skip(f"shared data not found at {SHARED}")
    from flows.finetune import run_dpo, run_sft

    sft = run_sft(_cfg("sft-shared", tmp_path, data={"paths": [str(SHARED / "sft" / "alpaca_en_demo.json")], "limit": 40},
                       train={"steps": 2}), smollm2_dir, tmp_path / "sft")
    assert sft.metrics["data"]["kept"] > 0 and Path(sft.checkpoint, "model.safetensors").is_file()
    dpo = run_dpo(_cfg("dpo-shared", tmp_path, data={"paths": [str(SHARED / "preference" / "dpo_en_demo.json")],
                                                      "limit": 24}, train={"steps": 2}), smollm2_dir, tmp_path / "dpo")
    assert dpo.metrics["train_pairs"] > 0 and abs(dpo.metrics["train_loss_first"] - 0.6931) < 1e-3
