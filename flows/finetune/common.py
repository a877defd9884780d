"""Shared pieces of the post-training stages: policy loading, log-probs, generation-based evaluation
and MLflow runs (the bridge to the pretraining loop is flows/finetune/trainer.py)."""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flows.finetune.config import FinetuneConfig
from model.errors import HerdError
from model.sources import resolve_model


@dataclass
class StageResult:
    checkpoint: str  # native herd model directory (model.checkpoint.save_checkpoint)
    metrics: dict = field(default_factory=dict)
    run_id: str | None = None


class EpochSampler:
    """The loop's resumable batch source: a permutation of `items` per epoch from the seed, the
    cursor as the state. A step takes dp_size x grad_accum x micro_batch consecutive items; rank r's
    micro-step m gets the micro_batch items at (m x dp_size + r) x micro_batch (as flows/train/data.py)."""

    def __init__(
        self,
        items: list,
        micro_batch: int,
        grad_accum: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        self.items, self.micro_batch, self.grad_accum = items, micro_batch, grad_accum
        self.seed, self.shuffle, self.cursor = seed, shuffle, 0
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._epoch_order: tuple[int, list[int]] = (-1, [])

    def _item(self, g: int):
        epoch, i = divmod(g, len(self.items))
        if self._epoch_order[0] != epoch:
            order = list(range(len(self.items)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch_order = (epoch, order)
        return self.items[self._epoch_order[1][i]]

    def take_step(self) -> tuple[list, list[list]]:
        """The whole step's items (every rank's: step-level loss weights count them) and this rank's
        micro-batches."""
        per, dp = self.micro_batch, self.dp_size
        items = [self._item(self.cursor + k) for k in range(per * self.grad_accum * dp)]
        self.cursor += len(items)
        starts = [(m * dp + self.dp_rank) * per for m in range(self.grad_accum)]
        return items, [items[s : s + per] for s in starts]

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, s):
        self.cursor = int(s["cursor"])


# --- models ------------------------------------------------------------------------------------


def load_policy(spec: str | Path):
    """(model fp32 on CPU in train mode, tokenizer)."""
    from model.checkpoint import load_model
    from model.tokenizer import load_tokenizer

    path = resolve_model(spec)
    model, _ = load_model(path, dtype=torch.float32, device="cpu")
    return model.train(), load_tokenizer(path)


def set_threads(fc: FinetuneConfig) -> None:
    if fc.train.threads:
        torch.set_num_threads(fc.train.threads)


# --- log-probs ---------------------------------------------------------------------------------


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under logits: (B, T, V), (B, T) -> (B, T); negative targets give 0."""
    logits = logits.float()
    safe = targets.clamp(min=0)
    lp = logits.gather(-1, safe[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return lp * (targets >= 0)


def sequence_logps(model, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over the tokens where loss_mask (B, T) is set (the response), per row.
    Rows are right-padded, so plain causal attention is exact for the real tokens."""
    logits = model(tokens[:, :-1])
    targets = tokens[:, 1:].masked_fill(~loss_mask[:, 1:], -1)
    return token_logps(logits, targets).sum(-1)


def pad_rows(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    L = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (L - len(r)) for r in rows], dtype=torch.long)


def pad_masks(masks: list[list[bool]]) -> torch.Tensor:
    L = max(len(m) for m in masks)
    return torch.tensor([m + [False] * (L - len(m)) for m in masks], dtype=torch.bool)


def pad_id_of(tokenizer) -> int:
    for i in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None)):
        if i is not None:
            return int(i)
    return 0


# --- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_tasks(
    model, tokenizer, tasks: list[dict], system: str, max_tokens: int = 16, batch: int = 32, reward_fn=None
) -> dict:
    """Greedy completions on held-out tasks: exact match and mean reward (the verifiable checker,
    or `reward_fn(task, text)`)."""
    from flows.finetune import tasks as T
    from model.generate import SamplingParams, generate

    was_training = model.training
    model.eval()
    texts, ids = [], []
    for s in range(0, len(tasks), batch):
        chunk = tasks[s : s + batch]
        prompts = [tokenizer.encode_chat(T.messages(t, system)) for t in chunk]
        gens = generate(model, prompts, SamplingParams(max_tokens=max_tokens), tokenizer)
        texts += [g.text for g in gens]
        ids += [g.token_ids for g in gens]
    model.train(was_training)
    score = reward_fn or T.check
    rewards = [float(score(t, x)) for t, x in zip(tasks, texts)]
    em = [T.exact_match(t, x) for t, x in zip(tasks, texts)]
    return {
        "exact_match": sum(em) / max(1, len(em)),
        "reward": sum(rewards) / max(1, len(rewards)),
        "rewards": rewards,
        "completions": texts,
        "token_ids": ids,
    }


def win_rate(after: list[float], before: list[float]) -> float:
    """Share of prompts where the new policy's reward beats the old one's (ties count half)."""
    if not after:
        return 0.0
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(after, before)) / len(after)


# --- MLflow ----------------------------------------------------------------------------------------


class RunLog:
    """Metrics for one stage's MLflow run (a no-op when MLflow is off)."""

    def __init__(self, mlflow_mod=None, run_id: str | None = None, tracking_uri: str | None = None):
        self.mlflow, self.run_id, self.tracking_uri = mlflow_mod, run_id, tracking_uri
        self.loop_logger = None
        if run_id:
            from flows.train.metrics import MlflowLogger

            self.loop_logger = MlflowLogger(tracking_uri, run_id)

    @classmethod
    def for_logger(cls, logger) -> RunLog:
        """A RunLog over a loop's MlflowLogger (in a Ray Train worker: rank 0's, None elsewhere)."""
        log = cls()
        if logger is not None and logger.run_id:
            log.run_id, log.loop_logger = logger.run_id, logger
        return log

    def metrics(self, values: dict, step: int | None = None) -> None:
        if self.loop_logger is not None:
            vals = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
            self.loop_logger.metrics(vals, step or 0)

    def artifact_json(self, obj, name: str) -> None:
        if self.mlflow is not None and self.run_id:
            self.mlflow.log_dict(obj, name, run_id=self.run_id)

    def tag(self, key: str, value: str) -> None:
        if self.loop_logger is not None:
            self.loop_logger.tag(key, value)


@contextlib.contextmanager
def stage_run(fc: FinetuneConfig, run_name: str, tags: dict | None = None):
    """An MLflow run for a stage: nested (a child run) under the active run, if any."""
    if not fc.mlflow.enabled:
        yield RunLog()
        return
    from flows.tracking import git_sha, setup_mlflow, tracking_uri

    uri = tracking_uri(fc.mlflow.tracking_uri or None)
    mlflow = setup_mlflow(uri, fc.mlflow.experiment or None)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        mlflow.set_tags({"herd.stage": f"finetune/{fc.stage}", "herd.git_sha": git_sha(), **(tags or {})})
        mlflow.log_params(fc.flat())
        yield RunLog(mlflow, run.info.run_id, uri)


def export(model, tokenizer, out_dir: Path) -> str:
    from flows.finetune.lora import merge_lora
    from model.checkpoint import save_checkpoint

    model = merge_lora(model)
    path = save_checkpoint(model, Path(out_dir) / "model", tokenizer)
    return str(path)


def heldout_comparison(log: RunLog, heldout: list[dict], before: dict, after: dict) -> dict:
    """Before/after metrics on the held-out tasks; both sets of completions go to the run."""
    log.artifact_json(
        {"tasks": heldout, "before": before["completions"], "after": after["completions"]}, "heldout_completions.json"
    )
    return {
        "reward_before": before["reward"],
        "reward_after": after["reward"],
        "exact_match_before": before["exact_match"],
        "exact_match_after": after["exact_match"],
        "win_rate": win_rate(after["rewards"], before["rewards"]),
    }


def finish_stage(
    log: RunLog, model, tokenizer, out_dir: Path, metrics: dict, t0: float, step: int, **report
) -> StageResult:
    """Export the model, then log the stage's numbers and metrics.json (`report` adds to the file only)."""
    checkpoint = export(model, tokenizer, out_dir)
    metrics["seconds"] = time.time() - t0
    log.metrics(metrics, step)
    log.artifact_json({**metrics, **report}, "metrics.json")
    return StageResult(checkpoint, metrics, log.run_id)


def default_out_dir(fc: FinetuneConfig) -> Path:
    root = Path(os.environ.get("HERD_OUTPUT", "outputs"))
    return root / "finetune" / f"{fc.name}-{fc.stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def heldout_tasks(fc: FinetuneConfig) -> list[dict]:
    from flows.finetune import tasks as T

    kinds = fc.data.kinds or list(T.KINDS)
    bad = set(kinds) - set(T.KINDS)
    if bad:
        raise HerdError(f"finetune config: data.kinds: unknown {sorted(bad)} (choose from {list(T.KINDS)})")
    return T.generate_tasks(fc.data.heldout, fc.seed, kinds, "heldout")


def train_tasks(fc: FinetuneConfig, n: int | None = None, split: str = "train") -> list[dict]:
    from flows.finetune import tasks as T

    return T.generate_tasks(n or fc.data.tasks, fc.seed, fc.data.kinds or list(T.KINDS), split)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0
