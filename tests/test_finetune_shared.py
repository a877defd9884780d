"""SFT and DPO on SmolLM2-135M-Instruct with the shared samples (../shared/data/sft and
../shared/data/preference): a few steps each, the CI tier's check that real files train end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.finetune.config import load_config

pytestmark = [pytest.mark.slow]
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


def _cfg(name, tmp_path, data):
    # one torch thread: on a shared 2-core CPU two OpenMP threads mostly wait on each other
    return load_config(CONFIGS / f"{name}.yaml").replace(
        data=data, train={"steps": 2, "threads": 1}, mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    )


def test_sft_and_dpo_run_on_shared_samples(smollm2_dir, shared_data, tmp_path):
    from flows.finetune import run_dpo, run_sft
    from model.checkpoint import load_model

    sft = run_sft(
        _cfg("sft-shared", tmp_path, {"paths": [str(shared_data / "sft" / "alpaca_en_demo.json")], "limit": 40}),
        smollm2_dir,
        tmp_path / "sft",
    )
    d = sft.metrics["data"]
    assert d["kept"] > 0 and d["kept"] + d["dropped_total"] == d["read"]
    # finite, not diverging: the held-out loss (the same rows before and after; two training steps see two
    # different batches, whose losses differ by more than the update changes them)
    assert sft.metrics["heldout_loss_after"] < sft.metrics["heldout_loss_before"] + 0.1
    load_model(sft.checkpoint)

    # most of the sample's pairs are longer than 256 tokens: counted as over context, not an error
    dpo = run_dpo(
        _cfg("dpo-shared", tmp_path, {"paths": [str(shared_data / "preference" / "dpo_en_demo.json")], "limit": 48}),
        smollm2_dir,
        tmp_path / "dpo",
    )
    d = dpo.metrics["data"]
    # `limit` counts the pairs that pass the format and sealed-eval-set checks, so more are read than 48
    before_length = d["read"] - sum(n for r, n in d["dropped"].items() if r.startswith(("format:", "heldout:")))
    assert before_length == 48 and d["dropped"]["length:over_context"] > 0
    assert d["kept"] + d["dropped_total"] == d["read"]
    assert dpo.metrics["train_pairs"] > 0 and dpo.metrics["heldout_pairs"] > 0
    assert abs(dpo.metrics["train_loss_first"] - 0.6931) < 1e-3  # policy == reference at step 1
    assert dpo.metrics["heldout_margin_after"] != dpo.metrics["heldout_margin_before"]  # the update reached the policy
