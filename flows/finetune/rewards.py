"""Rewards: the verifiable checker of the embedded tasks, or a Bradley-Terry reward model.

The reward model is the policy's trunk with a scalar head on the last token's hidden state
(`RewardModel`); trained on preference pairs with -log sigmoid(r_chosen - r_rejected), through the
pretraining loop (stage `rm`). Saved as `<dir>/model` (a herd checkpoint) + `<dir>/reward_head.safetensors`.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flows.finetune import chat
from flows.finetune import tasks as T
from flows.finetune.common import (
    StageResult,
    default_out_dir,
    load_policy,
    mean,
    pad_id_of,
    pad_rows,
    resolve_model,
    set_threads,
    stage_run,
    train_tasks,
)
from flows.finetune.config import FinetuneConfig, load_config
from flows.finetune.trainer import TrainSpec, prepare_module, run_loop
from flows.train.loop import Task
from flows.train.losses import LossOutput
from model.errors import HerdError


class RewardModel(nn.Module):
    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk
        self.config = trunk.config
        self.reward_head = nn.Linear(trunk.config.dim, 1, bias=True)
        nn.init.zeros_(self.reward_head.weight)
        nn.init.zeros_(self.reward_head.bias)

    @property
    def layers(self):
        return self.trunk.layers

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded rows and their lengths -> (B,) rewards at each row's last token."""
        h = self.trunk(tokens, head=lambda h, w: h)
        last = h[torch.arange(tokens.shape[0]), lengths - 1]
        return self.reward_head(last.float()).squeeze(-1)


def save_reward_model(rm: RewardModel, tokenizer, out: Path) -> str:
    from safetensors.torch import save_file

    from model.checkpoint import save_checkpoint

    save_checkpoint(rm.trunk, Path(out) / "model", tokenizer)
    save_file(
        {k: v.contiguous() for k, v in rm.reward_head.state_dict().items()}, str(Path(out) / "reward_head.safetensors")
    )
    return str(out)


def load_reward_model(path: str | Path):
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "reward_head.safetensors").is_file():
        raise HerdError(f"{path}: not a reward model (reward_head.safetensors missing)")
    trunk, tok = load_policy(path / "model")
    rm = RewardModel(trunk)
    rm.reward_head.load_state_dict(load_file(str(path / "reward_head.safetensors")))
    return rm.eval(), tok


class ModelReward:
    """reward_fn(task, completion) from a reward model: scores prompt + completion in the chat template."""

    def __init__(self, path, system: str):
        self.rm, self.tok = load_reward_model(path)
        self.system = system

    @torch.no_grad()
    def __call__(self, task: dict, completion: str) -> float:
        msgs = task["messages"] if "messages" in task else T.messages(task, self.system)
        ids = self.tok.encode_chat(msgs + [{"role": "assistant", "content": completion}], add_generation_prompt=False)
        return float(self.rm(torch.tensor([ids]), torch.tensor([len(ids)]))[0])


def build_reward(fc: FinetuneConfig):
    if fc.reward.kind == "model":
        return ModelReward(fc.reward.model, fc.data.system)
    return T.check


# --- training (Bradley-Terry) ---------------------------------------------------------------------


class RMBatch:
    def __init__(self, tokens, lengths, weights):
        self.tokens, self.lengths, self.weights = tokens, lengths, weights

    def to(self, device):
        return RMBatch(self.tokens.to(device), self.lengths.to(device), self.weights.to(device))

    @property
    def num_tokens(self):
        return self.tokens.numel()


class RMData:
    """Preference pairs for the loop: a step takes dp_size x micro_batch pairs (rank r: the micro_batch
    at r x micro_batch); weights 1 / (pairs in the whole step)."""

    def __init__(
        self,
        pairs: list[tuple[list[int], list[int]]],
        micro_batch: int,
        pad_id: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if not pairs:
            raise HerdError("reward model: no usable preference pairs")
        self.pairs, self.micro_batch, self.pad_id, self.seed, self.cursor = pairs, micro_batch, pad_id, seed, 0
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seq_len = max(len(c) for c, _ in pairs)

    def batch(self, ps, weight):
        rows = [c for c, _ in ps] + [r for _, r in ps]
        return RMBatch(
            pad_rows(rows, self.pad_id), torch.tensor([len(x) for x in rows]), torch.full((len(ps),), weight)
        )

    def next_step(self):
        n, per = len(self.pairs), self.micro_batch
        ps = []
        for k in range(per * self.dp_size):
            epoch, i = divmod(self.cursor + k, n)
            order = list(range(n))
            random.Random(self.seed + epoch).shuffle(order)
            ps.append(self.pairs[order[i]])
        self.cursor += len(ps)
        mine = ps[self.dp_rank * per : (self.dp_rank + 1) * per]
        return [self.batch(mine, 1.0 / len(ps))]

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, s):
        self.cursor = int(s["cursor"])


def bt_loss(model, batch: RMBatch) -> LossOutput:
    r = model(batch.tokens, batch.lengths)
    n = batch.weights.shape[0]
    losses = -F.logsigmoid(r[:n] - r[n:])
    return LossOutput(
        (losses * batch.weights).sum(), batch.weights.sum(), {"accuracy": (r[:n] > r[n:]).float().mean().item()}
    )


@torch.no_grad()
def rm_accuracy(rm: RewardModel, data: RMData, pairs) -> float:
    accs = []
    for s in range(0, len(pairs), 8):
        b = data.batch(pairs[s : s + 8], 1.0)
        r = rm(b.tokens, b.lengths)
        n = len(pairs[s : s + 8])
        accs += (r[:n] > r[n:]).float().tolist()
    return mean(accs)


def run_reward_model(config, base_model_dir=None, out_dir=None, run_name: str | None = None) -> StageResult:
    """Train a Bradley-Terry reward model on preference pairs (files, or embedded right/wrong answers)."""
    from flows.finetune.sampling import task_pairs

    fc = config if isinstance(config, FinetuneConfig) else load_config(config, "rm")
    set_threads(fc)
    out = Path(out_dir) if out_dir else default_out_dir(fc)
    t0 = time.time()
    base = base_model_dir or fc.model.base
    trunk, tok = load_policy(base)
    counts = chat.Counts()
    if fc.data.paths:
        pairs, counts = chat.load_pairs(fc.data.paths, counts, fc.data.limit)
    else:
        pairs = task_pairs(train_tasks(fc, fc.dpo.pairs), fc.data.system, fc.seed)
        counts.read = len(pairs)
    tokd = []
    for p in pairs:
        try:
            c = tok.encode_chat(
                p["prompt"] + [{"role": "assistant", "content": p["chosen"]}], add_generation_prompt=False
            )
            r = tok.encode_chat(
                p["prompt"] + [{"role": "assistant", "content": p["rejected"]}], add_generation_prompt=False
            )
        except HerdError:
            counts.drop("format:template")
            continue
        if max(len(c), len(r)) > fc.model.max_seq_len:
            counts.drop("length:over_context")
            continue
        counts.kept += 1
        tokd.append((c, r))
    n_val = max(1, int(len(tokd) * fc.data.heldout_fraction)) if len(tokd) > 4 else 0
    val, train = tokd[:n_val], tokd[n_val:]
    pad = pad_id_of(tok)
    metrics = {"data": counts.report()}
    with stage_run(fc, run_name or f"finetune-rm-{fc.name}") as log:
        mb = fc.train.micro_batch

        def make_task(_rm, _tok, rank, world, _log):
            return Task(RMData(train, mb, pad, fc.seed, rank, world), None, bt_loss)

        spec = TrainSpec(str(resolve_model(base)), lambda trunk_, _tok: RewardModel(trunk_), make_task)
        rm = prepare_module(fc, spec, trunk, tok).train()
        probe = RMData(train, mb, pad, fc.seed)
        acc_before = rm_accuracy(rm, probe, val) if val else float("nan")
        run = run_loop(fc, spec, rm, tok, out, log)
        metrics.update(
            trainer=run.trainer,
            train_loss_first=run.losses[0],
            train_loss_last=run.losses[-1],
            heldout_accuracy_before=acc_before,
            heldout_accuracy_after=rm_accuracy(rm, probe, val) if val else float("nan"),
            seconds=time.time() - t0,
        )
        path = save_reward_model(rm, tok, out)
        log.metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, fc.train.steps)
        log.artifact_json(metrics, "metrics.json")
        return StageResult(path, metrics, log.run_id)
