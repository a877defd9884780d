"""Post-training: SFT (full / LoRA), rejection sampling, DPO, PPO/GRPO and a Bradley-Terry reward model.

Each stage is a function returning a `StageResult(checkpoint, metrics, run_id)`:
`run_sft`, `run_rejection_sampling`, `run_dpo`, `run_ppo`, `run_reward_model`.
"""

from __future__ import annotations


def run_sft(*args, **kwargs):
    from flows.finetune.sft import run_sft as f

    return f(*args, **kwargs)


def run_rejection_sampling(*args, **kwargs):
    from flows.finetune.rejection import run_rejection_sampling as f

    return f(*args, **kwargs)


def run_dpo(*args, **kwargs):
    from flows.finetune.dpo import run_dpo as f

    return f(*args, **kwargs)


def run_ppo(*args, **kwargs):
    from flows.finetune.ppo import run_ppo as f

    return f(*args, **kwargs)


def run_reward_model(*args, **kwargs):
    from flows.finetune.rewards import run_reward_model as f

    return f(*args, **kwargs)


STAGES = {"sft": run_sft, "rs": run_rejection_sampling, "dpo": run_dpo, "ppo": run_ppo, "rm": run_reward_model}
