"""Acceptance measurements for the sealed set's win rate and the scored red team, with SmolLM2.

    HERD_ACCEPT_PER_USE_CASE=5 HERD_ACCEPT_REDTEAM_PER_CATEGORY=20 \
        .venv/bin/python -m pytest -q -s -m acceptance tests/test_eval_ratings_acceptance.py

Each run builds the sealed set from ../shared/data under a fresh key, so nothing needs a stored key.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]
PER_USE_CASE = int(os.environ.get("HERD_ACCEPT_PER_USE_CASE", "5"))
MAX_TOKENS = int(os.environ.get("HERD_ACCEPT_MAX_TOKENS", "48"))
REDTEAM_PER_CATEGORY = int(os.environ.get("HERD_ACCEPT_REDTEAM_PER_CATEGORY", "20"))  # 20: all 240 prompts


@pytest.fixture(scope="module")
def sealed_set(shared_data, tmp_path_factory):
    from flows.eval import promptset as P
    from flows.eval.sealed import KEY_ENV, new_key, seal

    key = new_key()
    os.environ[KEY_ENV] = key
    path = seal(
        P.to_records(P.build(shared_data).prompts), tmp_path_factory.mktemp("sealed") / "he.sealed", key.encode()
    )
    yield path
    os.environ.pop(KEY_ENV, None)


def _rate(model_dir, reference, sealed, tmp_path):
    from flows.eval.stage import run_eval

    spec = {
        "name": "humaneval",
        "type": "rated",
        "data": {"test": str(sealed)},
        "max_tokens": MAX_TOKENS,
        "until": [],
        "judge": {"kind": "likelihood", "model": "smollm2"},
    }
    cfg = {
        "name": "accept",
        "tasks": [{"task": spec, "limit": PER_USE_CASE}],
        "batch_size": 16,
        "mlflow": {"enabled": False},
    }
    return run_eval(cfg, str(model_dir), reference=str(reference), log_mlflow=False).metrics


def _print(title, m):
    print(
        f"\n{title}: win rate {m['humaneval/win_rate']:.3f} [{m['humaneval/win_rate_lo']:.3f}, "
        f"{m['humaneval/win_rate_hi']:.3f}] over {m['humaneval/n']:.0f} prompts "
        f"(wins {m['humaneval/wins']:.0f}, ties {m['humaneval/ties']:.0f}, losses {m['humaneval/losses']:.0f})"
    )
    for k in sorted(k for k in m if k.endswith("/win_rate") and k.count("/") == 2):
        print(f"  {k}: {m[k]:.3f} [{m[k + '_lo']:.3f}, {m[k + '_hi']:.3f}]")


def test_smollm2_against_itself_is_even(smollm2_dir, sealed_set, tmp_path):
    m = _rate(smollm2_dir, smollm2_dir, sealed_set, tmp_path)
    _print("SmolLM2 vs itself", m)
    assert m["humaneval/win_rate_lo"] <= 0.5 <= m["humaneval/win_rate_hi"]


def test_smollm2_beats_a_broken_copy_in_every_use_case(smollm2_dir, sealed_set, tmp_path):
    from model.checkpoint import load_model, save_checkpoint
    from model.tokenizer import load_tokenizer

    broken, _ = load_model(smollm2_dir)
    with torch.no_grad():
        for i in (0, 1, 2):  # three layers' weights zeroed
            for p in broken.layers[i].parameters():
                p.zero_()
    broken_dir = save_checkpoint(broken, tmp_path / "broken", load_tokenizer(smollm2_dir))
    m = _rate(smollm2_dir, broken_dir, sealed_set, tmp_path)
    _print("SmolLM2 vs SmolLM2 with layers 0-2 zeroed", m)
    rates = {k: v for k, v in m.items() if k.endswith("/win_rate") and k.count("/") == 2}
    assert len(rates) == 12 and min(rates.values()) > 0.9


def test_red_team_attack_success_per_category(smollm2_dir, shared_data):
    from flows.eval.stage import run_eval

    cfg = {
        "name": "accept-redteam",
        "tasks": [{"task": "redteam", "limit": REDTEAM_PER_CATEGORY}],
        "batch_size": 16,
        "mlflow": {"enabled": False},
    }
    m = run_eval(cfg, str(smollm2_dir), data_dir=str(shared_data), log_mlflow=False).metrics
    print(
        f"\nred team: {m['redteam/n']:.0f} prompts, {m['redteam/categories']:.0f} categories, attack success "
        f"{m['redteam/attack_success_rate']:.3f} [{m['redteam/attack_success_rate_lo']:.3f}, "
        f"{m['redteam/attack_success_rate_hi']:.3f}]"
    )
    for k in sorted(k for k in m if k.endswith("/attack_success_rate") and k.count("/") == 2):
        print(
            f"  {k}: {m[k]:.3f} [{m[k + '_lo']:.3f}, {m[k + '_hi']:.3f}] "
            f"n={m[k[: -len('attack_success_rate')] + 'n']:.0f}"
        )
    print(
        f"scorer on held-out HH pairs {m['redteam/scorer_pair_accuracy']:.3f} vs keyword rubric "
        f"{m['redteam/rubric_pair_accuracy']:.3f}; scorer on hand-labelled replies "
        f"{m['redteam/scorer_labelled_accuracy']:.3f}"
    )
    assert m["redteam/n"] >= 12 * min(REDTEAM_PER_CATEGORY, 20) and m["redteam/categories"] >= 12
    assert m["redteam/scorer_pair_accuracy"] > m["redteam/rubric_pair_accuracy"]
