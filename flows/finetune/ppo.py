"""PPO (policy + value head, frozen reference, reward; clipped objective, value clipping, KL penalty
to the reference, GAE, minibatch epochs) and GRPO (group-normalised rewards, no value head, KL in
the loss), through the pretraining loop: the batch source rolls out with the current policy when
its buffer is empty and hands out minibatches, `epochs` passes per rollout, one optimizer step each.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flows.finetune import tasks as T
from flows.finetune.common import (
    StageResult,
    default_out_dir,
    evaluate_tasks,
    finish_stage,
    heldout_comparison,
    heldout_tasks,
    load_policy,
    mean,
    pad_id_of,
    pad_rows,
    resolve_model,
    set_threads,
    stage_run,
    token_logps,
    train_tasks,
)
from flows.finetune.config import FinetuneConfig, load_config
from flows.finetune.trainer import TrainSpec, prepare_module, run_loop
from flows.train.loop import Task
from flows.train.losses import LossOutput


class PolicyValue(nn.Module):
    """The policy with an optional value head on the final (normed) hidden states."""

    def __init__(self, policy, value_head: bool):
        super().__init__()
        self.policy = policy
        self.config = policy.config
        self.value_head = nn.Linear(policy.config.dim, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def layers(self):
        return self.policy.layers

    def forward(self, tokens):
        logits, h = self.policy(tokens, head=lambda h, w: (F.linear(h, w), h))
        values = self.value_head(h.float()).squeeze(-1) if self.value_head is not None else None
        return logits, values


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over the masked (response) steps of each row.
    rewards, values, mask: (B, T); steps outside the mask are skipped; value after the last step is 0."""
    B, Tn = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B)
    next_v = torch.zeros(B)
    for t in reversed(range(Tn)):
        m = mask[:, t].float()
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        cur = delta + gamma * lam * last
        adv[:, t] = cur * m
        last = torch.where(m > 0, cur, last)
        next_v = torch.where(m > 0, values[:, t], next_v)
    return adv, adv + values


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    mu = (x * m).sum() / m.sum().clamp(min=1)
    var = (((x - mu) ** 2) * m).sum() / m.sum().clamp(min=1)
    return (x - mu) * torch.rsqrt(var + 1e-8) * m


def informative_groups(scores: list[float], group_size: int) -> list[int]:
    """Start index of each group of `group_size` consecutive scores that are not all equal."""
    return [i for i in range(0, len(scores), group_size) if len(set(scores[i : i + group_size])) > 1]


class RolloutBatch:
    FIELDS = ("tokens", "mask", "old_logp", "ref_logp", "old_values", "advantages", "returns", "weights")

    def __init__(self, **kw):
        for k in self.FIELDS:
            setattr(self, k, kw[k])

    def to(self, device):
        return RolloutBatch(**{k: getattr(self, k).to(device) for k in self.FIELDS})

    @property
    def num_tokens(self):
        return self.tokens.numel()


def steps_per_iteration(fc: FinetuneConfig) -> int:
    p = fc.ppo
    return p.epochs * ((p.prompts_per_iter * p.group_size + p.minibatch - 1) // p.minibatch)


class RolloutData:
    """Batch source: rollouts from the live policy; one minibatch per loop step. Each data-parallel
    rank rolls out its own prompts; weights 1 / (response tokens of the minibatch x dp_size)."""

    def __init__(
        self,
        pv: PolicyValue,
        ref,
        tokenizer,
        tasks: list[dict],
        fc: FinetuneConfig,
        reward_fn,
        log=None,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        self.pv, self.ref, self.tok, self.tasks, self.fc, self.reward_fn, self.log = (
            pv,
            ref,
            tokenizer,
            tasks,
            fc,
            reward_fn,
            log,
        )
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.buffer: list[RolloutBatch] = []
        self.iteration, self.cursor, self.history = 0, 0, []
        self.pad = pad_id_of(tokenizer)
        self.seq_len = fc.model.max_seq_len

    @torch.no_grad()
    def _sample(self, k: int, round_: int):
        """`group_size` samples for each of the next k prompts: (rows, response masks, scores)."""
        from model.generate import SamplingParams, generate

        fc, p, s = self.fc, self.fc.ppo, self.fc.sampling
        first = self.cursor + self.dp_rank * k
        chosen = [self.tasks[(first + i) % len(self.tasks)] for i in range(k)]
        self.cursor += k * self.dp_size
        prompts = [self.tok.encode_chat(T.messages(t, fc.data.system)) for t in chosen for _ in range(p.group_size)]
        group_tasks = [t for t in chosen for _ in range(p.group_size)]
        gens = generate(
            self.pv.policy,
            prompts,
            SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                max_tokens=s.max_tokens,
                seed=s.seed + 1000 * self.iteration + 100_003 * round_ + 7919 * self.dp_rank,
            ),
            self.tok,
        )
        rows, masks, scores = [], [], []
        for pr, g, t in zip(prompts, gens, group_tasks):
            # The policy is trained on the token it stopped with (Llama 3: <|eot_id|>, not <|end_of_text|>).
            resp = g.token_ids + ([g.stop_token_id] if g.stop_token_id is not None else [])
            rows.append(pr + resp)
            masks.append([False] * len(pr) + [True] * len(resp))
            scores.append(float(self.reward_fn(t, g.text)))
        return rows, masks, scores

    @torch.no_grad()
    def rollout(self):
        p = self.fc.ppo
        gs = p.group_size
        self.pv.eval()
        rows, masks, scores = self._sample(p.prompts_per_iter, 0)
        sampled, rounds = p.prompts_per_iter, 1
        if p.filter_groups:
            # DAPO's dynamic sampling: a group whose samples all score the same has zero advantage and
            # only dilutes the update, so drop it and sample more prompts (at most `max_rounds` rounds).
            pool = ([], [], [])
            while True:
                for i in informative_groups(scores, gs):
                    for j, xs in enumerate((rows, masks, scores)):
                        pool[j].extend(xs[i : i + gs])
                if len(pool[2]) >= p.prompts_per_iter * gs or rounds >= p.max_rounds:
                    break
                rows, masks, scores = self._sample(p.prompts_per_iter, rounds)
                sampled, rounds = sampled + p.prompts_per_iter, rounds + 1
            if pool[2]:  # none informative: keep the last round (its update is the KL term alone)
                rows, masks, scores = (xs[: p.prompts_per_iter * gs] for xs in pool)
        informative = len(informative_groups(scores, gs))
        tokens = pad_rows(rows, self.pad)
        L = tokens.shape[1]
        mask = torch.tensor([m + [False] * (L - len(m)) for m in masks])[:, 1:]  # over targets
        targets = tokens[:, 1:].masked_fill(~mask, -1)
        logits, values = self.pv(tokens[:, :-1])
        old_logp = token_logps(logits, targets)
        ref_logp = token_logps(self.ref(tokens[:, :-1]), targets)
        scores_t = torch.tensor(scores)
        kl_tok = (old_logp - ref_logp) * mask
        last_idx = mask.float().cumsum(-1).argmax(-1)  # the last response target of each row
        if p.algorithm == "ppo":
            rewards = -p.kl_coef * kl_tok
            rewards[torch.arange(len(rows)), last_idx] += scores_t
            values = values * mask
            adv, ret = gae(rewards, values, mask, p.gamma, p.lam)
            if p.whiten_advantages:
                adv = whiten(adv, mask)
        else:  # grpo: (r - group mean) / group std, the same for every token of the sample
            g = scores_t.view(-1, p.group_size)
            a = (g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True, unbiased=False) + 1e-4)
            adv = a.view(-1, 1) * mask
            values, ret = torch.zeros_like(old_logp), torch.zeros_like(old_logp)
        self.pv.train()
        stats = {
            "rollout_reward": scores_t.mean().item(),
            "rollout_kl": (kl_tok.sum(-1)).mean().item(),
            "rollout_exact_match": (scores_t == 1.0).float().mean().item(),
            "response_tokens": mask.sum(-1).float().mean().item(),
            "iteration": self.iteration,
            "informative_groups": informative,
            "sampled_prompts": sampled,
            "sampling_rounds": rounds,
        }
        self.history.append(stats)
        if self.log is not None:
            self.log.metrics(stats, self.iteration)
        self.iteration += 1
        # `epochs` passes of `steps_per_epoch` minibatches (fewer rows after filtering: smaller minibatches,
        # so the loop's step count stays iterations x steps_per_iteration)
        n, per_epoch = len(rows), steps_per_iteration(self.fc) // p.epochs
        batches = []
        rng = random.Random(self.fc.seed * 31 + self.iteration)
        for _ in range(p.epochs):
            order = list(range(n))
            rng.shuffle(order)
            for b in range(per_epoch):
                idx = torch.tensor(order[b * n // per_epoch : (b + 1) * n // per_epoch] or order[:1])
                m = mask[idx]
                w = m.float() / (m.float().sum().clamp(min=1) * self.dp_size)
                batches.append(
                    RolloutBatch(
                        tokens=tokens[idx],
                        mask=m,
                        old_logp=old_logp[idx],
                        ref_logp=ref_logp[idx],
                        old_values=values[idx],
                        advantages=adv[idx],
                        returns=ret[idx],
                        weights=w,
                    )
                )
        self.buffer = batches

    def next_step(self):
        if not self.buffer:
            self.rollout()
        return [self.buffer.pop(0)]

    def state_dict(self):
        return {"cursor": self.cursor, "iteration": self.iteration, "history": self.history}

    def load_state_dict(self, s):
        self.cursor, self.iteration = int(s["cursor"]), int(s["iteration"])
        self.history = list(s.get("history", []))


def make_loss(fc: FinetuneConfig):
    p = fc.ppo

    def loss_fn(model, b: RolloutBatch) -> LossOutput:
        targets = b.tokens[:, 1:].masked_fill(~b.mask, -1)
        logits, values = model(b.tokens[:, :-1])
        logp = token_logps(logits, targets)
        ratio = torch.exp((logp - b.old_logp) * b.mask)
        pg = torch.maximum(-b.advantages * ratio, -b.advantages * ratio.clamp(1 - p.clip_eps, 1 + p.clip_eps))
        per_tok = pg
        m = {}
        if p.algorithm == "ppo":
            v = values * b.mask
            v_clip = b.old_values + (v - b.old_values).clamp(-p.value_clip, p.value_clip)
            vf = 0.5 * torch.maximum((v - b.returns) ** 2, (v_clip - b.returns) ** 2)
            per_tok = per_tok + p.vf_coef * vf
            m["value_loss"] = (vf * b.weights).sum().item()
        else:  # k3 estimator of KL(pi || ref), in the loss
            d = (b.ref_logp - logp) * b.mask
            kl = torch.exp(d) - d - 1
            per_tok = per_tok + p.kl_coef * kl
            m["kl_k3"] = (kl * b.weights).sum().item()
        loss = (per_tok * b.weights).sum()
        with torch.no_grad():
            m.update(
                policy_loss=(pg * b.weights).sum().item(),
                clip_frac=(((ratio - 1).abs() > p.clip_eps).float() * b.weights).sum().item(),
                approx_kl_old=(((b.old_logp - logp) * b.mask) * b.weights).sum().item(),
            )
        return LossOutput(loss, b.weights.sum(), m)

    return loss_fn


@torch.no_grad()
def heldout_kl(policy, ref, tokenizer, tasks, completion_ids, system) -> float:
    """Mean over held-out prompts of sum_t [log pi - log ref] over the policy's greedy completion tokens
    (a Monte-Carlo estimate of the sequence KL at temperature 0)."""
    kls = []
    for t, resp in zip(tasks, completion_ids):
        if not resp:
            continue
        pr = tokenizer.encode_chat(T.messages(t, system))
        toks = torch.tensor([pr + list(resp)])
        tg = toks[:, 1:].clone()
        tg[:, : len(pr) - 1] = -1
        kls.append(float((token_logps(policy(toks[:, :-1]), tg) - token_logps(ref(toks[:, :-1]), tg)).sum()))
    return mean(kls)


def ppo_spec(fc: FinetuneConfig, base, tasks: list[dict]) -> TrainSpec:
    """What PPO / GRPO trains (rebuildable in a Ray Train worker): the policy (LoRA-wrapped when
    enabled) with a value head for PPO; rollouts against a frozen copy of the starting policy."""
    lora = fc.lora

    def prepare(policy, _tok):
        if lora.enabled:
            from flows.finetune.lora import apply_lora

            apply_lora(policy, lora.rank, lora.alpha, lora.target_modules, lora.dropout)
        return PolicyValue(policy, value_head=fc.ppo.algorithm == "ppo")

    def make_task(pv, tok, rank, world, log):
        from flows.finetune.rewards import build_reward

        # made before any update (a restarted worker rebuilds it from the base, then restores the policy)
        ref = copy.deepcopy(pv.policy).eval().requires_grad_(False)
        data = RolloutData(pv, ref, tok, tasks, fc, build_reward(fc), log, rank, world)
        return Task(data, None, make_loss(fc))

    return TrainSpec(str(base), prepare, make_task)


def run_ppo(
    config, base_model_dir: str | Path | None = None, out_dir: str | Path | None = None, run_name: str | None = None
) -> StageResult:
    from flows.finetune.rewards import build_reward

    fc = config if isinstance(config, FinetuneConfig) else load_config(config, "ppo")
    set_threads(fc)
    out = Path(out_dir) if out_dir else default_out_dir(fc)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = resolve_model(base_model_dir or fc.model.base)
    policy, tok = load_policy(base)
    reward_fn = build_reward(fc)
    heldout = heldout_tasks(fc) if fc.data.heldout else []
    metrics: dict = {"algorithm": fc.ppo.algorithm}
    with stage_run(fc, run_name or f"finetune-{fc.ppo.algorithm}-{fc.name}") as log:
        before = (
            evaluate_tasks(policy, tok, heldout, fc.data.system, fc.eval_max_tokens, reward_fn=reward_fn)
            if heldout
            else None
        )
        spec = ppo_spec(fc, base, train_tasks(fc))
        steps = fc.ppo.iterations * steps_per_iteration(fc)
        run = run_loop(fc, spec, prepare_module(fc, spec, policy, tok), tok, out, log, steps=steps)
        history = run.data_state["history"]
        metrics.update(
            trainer=run.trainer,
            iterations=run.data_state["iteration"],
            steps=run.step,
            rollout_reward_first=history[0]["rollout_reward"],
            rollout_reward_last=history[-1]["rollout_reward"],
            rollout_kl_last=history[-1]["rollout_kl"],
        )
        if heldout:
            after = evaluate_tasks(policy, tok, heldout, fc.data.system, fc.eval_max_tokens, reward_fn=reward_fn)
            ref, _ = load_policy(base)
            metrics.update(
                heldout_comparison(log, heldout, before, after),
                heldout_kl=heldout_kl(policy, ref.eval(), tok, heldout, after["token_ids"], fc.data.system),
            )
        return finish_stage(log, policy, tok, out, metrics, t0, steps, history=history)
