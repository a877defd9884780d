"""Supervised fine-tuning (full or LoRA) on chat data, through the pretraining loop.

Data: files (messages / alpaca / sharegpt / pairs' chosen replies) or, with no files, the embedded
verifiable tasks with their exact answers. Loss on assistant tokens only; conversations packed
into rows with document masking. Evaluation: exact match and reward on held-out embedded tasks
(greedy), before and after, and the held-out SFT loss.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from flows.finetune import chat
from flows.finetune import tasks as T
from flows.finetune.common import (
    EpochSampler,
    StageResult,
    default_out_dir,
    evaluate_tasks,
    finish_stage,
    heldout_comparison,
    heldout_tasks,
    load_policy,
    pad_id_of,
    resolve_model,
    set_threads,
    stage_run,
    train_tasks,
)
from flows.finetune.config import FinetuneConfig, load_config
from flows.finetune.trainer import TrainSpec, prepare_module, run_loop
from flows.train.loop import Task
from flows.train.losses import causal_lm_loss
from model.errors import HerdError


class PackedChatData(EpochSampler):
    """Packed chat rows for the loop; each micro-batch weighs 1 / (assistant targets of the whole step,
    all ranks)."""

    def __init__(
        self,
        rows,
        micro_batch: int,
        grad_accum: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if not rows:
            raise HerdError("SFT: no usable training conversations (see the drop counts)")
        super().__init__(rows, micro_batch, grad_accum, seed, shuffle, dp_rank, dp_size)
        self.seq_len = len(rows[0][0])

    def next_step(self):
        rows, micro = self.take_step()
        valid = sum(sum(1 for j in range(1, len(r[2])) if r[2][j] and r[1][j] > 0) for r in rows)
        return [chat.rows_to_batch(m, 1.0 / max(1, valid)) for m in micro]

    def eval_batches(self, n: int):
        per, dp = self.micro_batch, self.dp_size
        for m in range(self.dp_rank, min(n, (len(self.items) + per - 1) // per), dp):
            yield chat.rows_to_batch(self.items[m * per : (m + 1) * per], 1.0)


def task_conversations(tasks: list[dict], system: str) -> list[list[dict]]:
    return [T.messages(t, system) + [{"role": "assistant", "content": t["answer"]}] for t in tasks]


def build_sft_data(fc: FinetuneConfig, tokenizer, conversations=None):
    """(train rows, held-out rows, counts). Bad records are counted, never raised."""
    counts = chat.Counts()
    if conversations is not None:
        convs = []
        for c in conversations:
            counts.read += 1
            reason = chat.validate_messages(c) if isinstance(c, list) else "unknown"
            if reason:
                counts.drop(f"format:{reason}")
            else:
                convs.append(c)
    elif fc.data.paths:
        convs, counts = chat.load_conversations(fc.data.paths, counts, fc.data.limit)
    else:
        convs = task_conversations(train_tasks(fc), fc.data.system)
        counts.read = len(convs)
    examples = chat.tokenize_conversations(tokenizer, convs, fc.model.max_seq_len, counts)
    n_val = int(len(examples) * fc.data.heldout_fraction) if len(examples) >= 10 else 0
    rng = random.Random(fc.seed)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    val = [examples[i] for i in sorted(idx[:n_val])]
    train = [examples[i] for i in sorted(idx[n_val:])]
    pad = pad_id_of(tokenizer)
    seq_len = fc.model.max_seq_len
    return chat.pack(train, seq_len, pad), chat.pack(val, seq_len, pad) if val else [], counts


@torch.no_grad()
def heldout_loss(model, rows, micro_batch: int) -> float:
    from flows.train.losses import causal_lm_loss

    if not rows:
        return float("nan")
    tot, cnt = 0.0, 0.0
    for m in range(0, len(rows), micro_batch):
        b = chat.rows_to_batch(rows[m : m + micro_batch], 1.0)
        out = causal_lm_loss(model, b)
        tot, cnt = tot + float(out.loss), cnt + float(out.count)
    return tot / max(cnt, 1.0)


def sft_spec(fc: FinetuneConfig, base, rows, val_rows) -> TrainSpec:
    """What SFT trains (rebuildable in a Ray Train worker): the policy, LoRA-wrapped when enabled, on
    the packed rows with the causal LM loss on assistant tokens."""
    lora = fc.lora
    t = fc.train

    def prepare(policy, _tok):
        if lora.enabled:
            from flows.finetune.lora import apply_lora

            apply_lora(policy, lora.rank, lora.alpha, lora.target_modules, lora.dropout)
        return policy

    def make_task(module, _tok, rank, world, _log):
        data = PackedChatData(rows, t.micro_batch, t.grad_accum, fc.seed, dp_rank=rank, dp_size=world)
        val = (
            PackedChatData(val_rows, t.micro_batch, 1, fc.seed, False, rank, world)
            if val_rows and t.eval_every
            else None
        )
        return Task(data, val, causal_lm_loss)

    return TrainSpec(str(base), prepare, make_task)


def run_sft(
    config,
    base_model_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    conversations=None,
    run_name: str | None = None,
) -> StageResult:
    """SFT `base_model_dir` (default: config.model.base); returns the exported checkpoint, metrics
    and MLflow run id. `conversations` (lists of messages) replaces the configured data (rejection
    sampling passes its kept samples)."""
    fc = config if isinstance(config, FinetuneConfig) else load_config(config, "sft")
    set_threads(fc)
    out = Path(out_dir) if out_dir else default_out_dir(fc)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = base_model_dir or fc.model.base
    model, tok = load_policy(base)
    rows, val_rows, counts = build_sft_data(fc, tok, conversations)
    if not rows:
        raise HerdError(f"SFT: no usable training conversations; dropped {counts.report()['dropped']}")
    heldout = heldout_tasks(fc) if fc.data.heldout else []
    metrics: dict = {"data": counts.report(), "train_rows": len(rows), "heldout_rows": len(val_rows)}
    with stage_run(fc, run_name or f"finetune-sft-{fc.name}") as log:
        log.artifact_json(counts.report(), "data_report.json")
        log.metrics(
            {
                "data_read": counts.read,
                "data_kept": counts.kept,
                "data_dropped": sum(counts.dropped.values()),
                "train_rows": len(rows),
            }
        )
        before = evaluate_tasks(model, tok, heldout, fc.data.system, fc.eval_max_tokens) if heldout else None
        metrics["heldout_loss_before"] = heldout_loss(model, val_rows, fc.train.micro_batch)
        spec = sft_spec(fc, resolve_model(base), rows, val_rows)
        module = prepare_module(fc, spec, model, tok)
        if fc.lora.enabled:
            metrics["lora_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
        run = run_loop(fc, spec, module, tok, out, log, eval_every=fc.train.eval_every)
        metrics["trainer"] = run.trainer
        metrics["train_loss_first"], metrics["train_loss_last"] = run.losses[0], run.losses[-1]
        metrics["heldout_loss_after"] = heldout_loss(model, val_rows, fc.train.micro_batch)
        if heldout:
            after = evaluate_tasks(model, tok, heldout, fc.data.system, fc.eval_max_tokens)
            metrics.update(heldout_comparison(log, heldout, before, after))
        return finish_stage(log, model, tok, out, metrics, t0, fc.train.steps)
