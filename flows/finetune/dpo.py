"""DPO: the sigmoid loss with beta, reference log-probs computed once and cached, optional on-policy pairs.

loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))), pi/ref the summed log-probs of the
response tokens. Pairs come from files (sharegpt / HH-RLHF / prompt-chosen-rejected), from the
embedded tasks (chosen: the exact answer, rejected: a wrong one) or on-policy (policy samples ranked
by the reward: best is chosen, worst is rejected).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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
    mean,
    pad_id_of,
    pad_masks,
    pad_rows,
    resolve_model,
    sequence_logps,
    set_threads,
    stage_run,
    train_tasks,
)
from flows.finetune.config import FinetuneConfig, load_config
from flows.finetune.sampling import sample_completions, task_pairs
from flows.finetune.trainer import TrainSpec, prepare_module, run_loop
from flows.train.loop import Task
from flows.train.losses import LossOutput
from model.errors import HerdError


def dpo_loss(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO loss (sigmoid; conservative DPO with label_smoothing > 0)."""
    logits = beta * ((pi_c - pi_r) - (ref_c - ref_r))
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


# --- tokenized pairs -----------------------------------------------------------------------------


@dataclass
class TokPair:
    tokens: list[list[int]]  # [chosen row, rejected row]
    masks: list[list[bool]]  # response tokens (positions of the tokens whose log-prob counts)
    ref: tuple[float, float] | None = None


def tokenize_pairs(tokenizer, pairs: list[dict], max_len: int, counts: chat.Counts) -> list[TokPair]:
    out = []
    for p in pairs:
        try:
            prompt_ids = chat.format_prompt(tokenizer, p["prompt"])
            c = chat.format_response(tokenizer, prompt_ids, p["prompt"], p["chosen"])
            r = chat.format_response(tokenizer, prompt_ids, p["prompt"], p["rejected"])
        except HerdError:
            counts.drop("format:template")
            continue
        if len(prompt_ids) + max(len(c), len(r)) > max_len:
            counts.drop("length:over_context")
            continue
        if not c or not r:
            counts.drop("format:empty_assistant")
            continue
        counts.kept += 1
        n = len(prompt_ids)
        out.append(
            TokPair([prompt_ids + c, prompt_ids + r], [[False] * n + [True] * len(c), [False] * n + [True] * len(r)])
        )
    return out


class PairBatch:
    def __init__(self, tokens, masks, ref_c, ref_r, weights):
        self.tokens, self.masks, self.ref_c, self.ref_r, self.weights = tokens, masks, ref_c, ref_r, weights

    def to(self, device):
        return PairBatch(*(t.to(device) for t in (self.tokens, self.masks, self.ref_c, self.ref_r, self.weights)))

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def collate(pairs: list[TokPair], pad_id: int, weight: float) -> PairBatch:
    """Rows: all chosen, then all rejected (one forward for both)."""
    rows = [p.tokens[0] for p in pairs] + [p.tokens[1] for p in pairs]
    masks = [p.masks[0] for p in pairs] + [p.masks[1] for p in pairs]
    ref = torch.tensor([p.ref for p in pairs], dtype=torch.float32)
    return PairBatch(pad_rows(rows, pad_id), pad_masks(masks), ref[:, 0], ref[:, 1], torch.full((len(pairs),), weight))


@torch.no_grad()
def pair_logps(model, pairs: list[TokPair], pad_id: int, batch: int = 8) -> list[tuple[float, float]]:
    was = model.training
    model.eval()
    out = []
    for s in range(0, len(pairs), batch):
        chunk = pairs[s : s + batch]
        b = collate([TokPair(p.tokens, p.masks, (0.0, 0.0)) for p in chunk], pad_id, 1.0)
        lp = sequence_logps(model, b.tokens, b.masks)
        n = len(chunk)
        out += list(zip(lp[:n].tolist(), lp[n:].tolist()))
    model.train(was)
    return out


def reference_logps(model, pairs: list[TokPair], pad_id: int, cache_dir: Path, model_id: str) -> tuple[int, bool]:
    """Fill `pair.ref` once: from the cache file when the same reference and pairs were scored before.
    Returns (pairs, cache hit)."""
    h = hashlib.sha256(model_id.encode())
    for p in pairs:
        h.update(json.dumps(p.tokens).encode())
    path = Path(cache_dir) / f"ref-logps-{h.hexdigest()[:24]}.pt"
    if path.is_file():
        refs = torch.load(path, weights_only=True).tolist()
        hit = True
    else:
        refs = pair_logps(model, pairs, pad_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.tensor(refs, dtype=torch.float64), path)
        hit = False
    for p, r in zip(pairs, refs):
        p.ref = (float(r[0]), float(r[1]))
    return len(pairs), hit


class PairData(EpochSampler):
    """Preference pairs for the loop; each micro-batch weighs 1 / (pairs in the whole step, all ranks)."""

    def __init__(
        self,
        pairs: list[TokPair],
        micro_batch: int,
        grad_accum: int,
        pad_id: int,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if not pairs:
            raise HerdError("DPO: no usable preference pairs (see the drop counts)")
        super().__init__(pairs, micro_batch, grad_accum, seed, True, dp_rank, dp_size)
        self.pad_id = pad_id
        self.seq_len = max(len(p.tokens[0]) for p in pairs)

    def next_step(self):
        pairs, micro = self.take_step()
        return [collate(m, self.pad_id, 1.0 / len(pairs)) for m in micro]


def make_loss(beta: float, label_smoothing: float = 0.0):
    """The loop's loss over a PairBatch; its metrics (the per-step curves) are the pairs' means."""

    def loss_fn(model, batch: PairBatch) -> LossOutput:
        lp = sequence_logps(model, batch.tokens, batch.masks)
        n = batch.ref_c.shape[0]
        pi_c, pi_r = lp[:n], lp[n:]
        losses = dpo_loss(pi_c, pi_r, batch.ref_c, batch.ref_r, beta, label_smoothing)
        with torch.no_grad():
            rc, rr = beta * (pi_c - batch.ref_c), beta * (pi_r - batch.ref_r)
            m = {
                "dpo_loss": losses.mean().item(),
                "margin": (pi_c - pi_r).mean().item(),
                "reward_chosen": rc.mean().item(),
                "reward_rejected": rr.mean().item(),
                "reward_margin": (rc - rr).mean().item(),
                "reward_accuracy": (rc > rr).float().mean().item(),
            }
        return LossOutput((losses * batch.weights).sum(), batch.weights.sum(), m)

    return loss_fn


def dpo_spec(fc: FinetuneConfig, base, pairs: list[TokPair], pad: int) -> TrainSpec:
    """What DPO trains (rebuildable in a Ray Train worker): the policy (LoRA-wrapped when enabled) on
    pairs whose reference log-probs are already filled in."""
    lora, t, d = fc.lora, fc.train, fc.dpo

    def prepare(policy, _tok):
        if lora.enabled:
            from flows.finetune.lora import apply_lora

            apply_lora(policy, lora.rank, lora.alpha, lora.target_modules, lora.dropout)
        return policy

    def make_task(module, _tok, rank, world, _log):
        data = PairData(pairs, t.micro_batch, t.grad_accum, pad, fc.seed, rank, world)
        return Task(data, None, make_loss(d.beta, d.label_smoothing))

    return TrainSpec(str(base), prepare, make_task)


# --- on-policy pairs -------------------------------------------------------------------------------


def on_policy_pairs(
    model, tokenizer, tasks: list[dict], fc: FinetuneConfig, reward_fn, counts: chat.Counts
) -> list[dict]:
    """Sample `sampling.n` completions per prompt; chosen = highest reward, rejected = lowest (ties skipped)."""
    samples = sample_completions(model, tokenizer, tasks, fc)
    pairs = []
    for t, texts in zip(tasks, samples):
        if fc.dpo.include_gold:
            texts = list(texts) + [t["answer"]]
        scored = sorted(((reward_fn(t, x), x) for x in texts), key=lambda s: -s[0])
        (best, c), (worst, r) = scored[0], scored[-1]
        if best <= worst or not c.strip() or not r.strip():
            counts.drop("on_policy:no_reward_gap")
            continue
        pairs.append({"prompt": T.messages(t, fc.data.system), "chosen": c, "rejected": r, "task": t})
    return pairs


def run_dpo(
    config,
    base_model_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    pairs: list[dict] | None = None,
    run_name: str | None = None,
) -> StageResult:
    fc = config if isinstance(config, FinetuneConfig) else load_config(config, "dpo")
    set_threads(fc)
    out = Path(out_dir) if out_dir else default_out_dir(fc)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = base_model_dir or fc.model.base
    model, tok = load_policy(base)
    pad = pad_id_of(tok)
    counts = chat.Counts()
    heldout = heldout_tasks(fc) if fc.data.heldout else []
    from flows.finetune.rewards import build_reward

    reward_fn = build_reward(fc)
    # pairs: given > files > on-policy > embedded
    if pairs is None:
        if fc.data.paths:
            pairs, counts = chat.load_pairs(fc.data.paths, counts, fc.data.limit)
        elif fc.dpo.on_policy:
            tasks = train_tasks(fc, fc.dpo.pairs)
            counts.read = len(tasks)
            pairs = on_policy_pairs(model, tok, tasks, fc, reward_fn, counts)
        else:
            pairs = task_pairs(train_tasks(fc, fc.dpo.pairs), fc.data.system, fc.seed)
            counts.read = len(pairs)
    else:
        counts.read = len(pairs)
    tok_pairs = tokenize_pairs(tok, pairs, fc.model.max_seq_len, counts)
    # held-out pairs: a share of file pairs, or embedded pairs on the held-out tasks
    if fc.data.paths:
        rng = random.Random(fc.seed)
        idx = list(range(len(tok_pairs)))
        rng.shuffle(idx)
        n_val = max(1, int(len(tok_pairs) * fc.data.heldout_fraction)) if len(tok_pairs) > 4 else 0
        val_pairs = [tok_pairs[i] for i in sorted(idx[:n_val])]
        tok_pairs = [tok_pairs[i] for i in sorted(idx[n_val:])]
    else:
        val_pairs = tokenize_pairs(
            tok, task_pairs(heldout, fc.data.system, fc.seed + 1), fc.model.max_seq_len, chat.Counts()
        )
    if not tok_pairs:
        raise HerdError(f"DPO: no usable preference pairs; dropped {counts.report()['dropped']}")
    metrics: dict = {"data": counts.report(), "train_pairs": len(tok_pairs), "heldout_pairs": len(val_pairs)}
    with stage_run(fc, run_name or f"finetune-dpo-{fc.name}") as log:
        log.artifact_json(counts.report(), "data_report.json")
        cache_dir = Path(fc.dpo.cache_dir) if fc.dpo.cache_dir else out / "ref_cache"
        tr = time.time()
        _, hit = reference_logps(model, tok_pairs, pad, cache_dir, str(resolve_model(base)))
        metrics["ref_logps_seconds"], metrics["ref_cache_hit"] = time.time() - tr, hit
        val_ref = pair_logps(model, val_pairs, pad) if val_pairs else []
        margin_before = mean(c - r for c, r in val_ref)
        before = (
            evaluate_tasks(model, tok, heldout, fc.data.system, fc.eval_max_tokens, reward_fn=reward_fn)
            if heldout
            else None
        )
        spec = dpo_spec(fc, resolve_model(base), tok_pairs, pad)
        run = run_loop(fc, spec, prepare_module(fc, spec, model, tok), tok, out, log)
        val_after = pair_logps(model, val_pairs, pad) if val_pairs else []
        margin_after = mean(c - r for c, r in val_after)
        acc = mean(float((a[0] - a[1]) > (b[0] - b[1])) for a, b in zip(val_after, val_ref))
        metrics.update(
            trainer=run.trainer,
            train_loss_first=run.losses[0],
            train_loss_last=run.losses[-1],
            heldout_margin_before=margin_before,
            heldout_margin_after=margin_after,
            heldout_reward_accuracy=acc,
        )
        if heldout:
            after = evaluate_tasks(model, tok, heldout, fc.data.system, fc.eval_max_tokens, reward_fn=reward_fn)
            metrics.update(heldout_comparison(log, heldout, before, after))
        return finish_stage(log, model, tok, out, metrics, t0, fc.train.steps)
