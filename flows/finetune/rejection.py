"""Rejection sampling: N completions per prompt (batched, KV-cached generation) spread over Ray
actors, scored by the reward (verifiable checker or reward model); the best one at or above the
threshold becomes SFT data, then (optionally) SFT on it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from flows.finetune import tasks as T
from flows.finetune.common import (
    StageResult,
    default_out_dir,
    load_policy,
    mean,
    resolve_model,
    set_threads,
    stage_run,
    train_tasks,
)
from flows.finetune.config import FinetuneConfig, load_config
from flows.finetune.sampling import sample_completions


def _sampler_actor():
    import ray

    @ray.remote(num_cpus=1)
    class Sampler:
        def __init__(self, model_dir: str, threads: int):
            torch.set_num_threads(threads)
            self.model, self.tok = load_policy(model_dir)

        def sample(self, tasks, fc_dict, seed):
            from flows.finetune.config import config_from_dict

            return sample_completions(self.model, self.tok, tasks, config_from_dict(fc_dict), seed)

    return Sampler


def sample_distributed(model_dir: str, tasks: list[dict], fc: FinetuneConfig) -> list[list[str]]:
    """Shard prompts over `rejection.workers` Ray actors (0: in this process)."""
    workers = min(fc.rejection.workers, len(tasks))
    if workers <= 0:
        model, tok = load_policy(model_dir)
        return sample_completions(model, tok, tasks, fc)
    import ray

    from flows.ray_runtime import init_ray

    init_ray(
        num_cpus=max(workers, 1),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    Sampler = _sampler_actor()
    actors = [Sampler.remote(str(model_dir), 1) for _ in range(workers)]
    shards = [tasks[i::workers] for i in range(workers)]
    futures = [
        a.sample.remote(shard, fc.to_dict(), fc.sampling.seed + 7919 * i)
        for i, (a, shard) in enumerate(zip(actors, shards))
    ]
    results = ray.get(futures)
    for a in actors:
        ray.kill(a)
    out: list = [None] * len(tasks)
    for i, res in enumerate(results):
        for j, r in enumerate(res):
            out[i + j * workers] = r
    return out


def select_best(tasks, samples, reward_fn, threshold: float, system: str):
    """For each prompt, the highest-reward sample if its reward >= threshold, as an SFT conversation."""
    kept, stats = [], []
    for t, texts in zip(tasks, samples):
        rewards = [float(reward_fn(t, x)) for x in texts]
        best = max(range(len(texts)), key=lambda i: rewards[i])
        stats.append({"task": t, "samples": texts, "rewards": rewards})
        if rewards[best] >= threshold and texts[best].strip():
            kept.append(T.messages(t, system) + [{"role": "assistant", "content": texts[best].strip()}])
    return kept, stats


def run_rejection_sampling(
    config, base_model_dir: str | Path | None = None, out_dir: str | Path | None = None, run_name: str | None = None
) -> StageResult:
    """Sample, score, keep the best above the threshold; then SFT the same model on the kept samples
    (rejection.then_sft). The checkpoint returned is the SFT'd model (or the input model without SFT)."""
    from flows.finetune.rewards import build_reward
    from flows.finetune.sft import run_sft

    fc = config if isinstance(config, FinetuneConfig) else load_config(config, "rs")
    set_threads(fc)
    out = Path(out_dir) if out_dir else default_out_dir(fc)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model_dir = resolve_model(base_model_dir or fc.model.base)
    tasks = train_tasks(fc, fc.rejection.prompts, split="rs")
    reward_fn = build_reward(fc)
    metrics: dict = {}
    with stage_run(fc, run_name or f"finetune-rs-{fc.name}") as log:
        ts = time.time()
        samples = sample_distributed(str(model_dir), tasks, fc)
        metrics["sample_seconds"] = time.time() - ts
        kept, stats = select_best(tasks, samples, reward_fn, fc.reward.threshold, fc.data.system)
        if fc.rejection.include_gold:
            kept += [T.messages(t, fc.data.system) + [{"role": "assistant", "content": t["answer"]}] for t in tasks]
        all_r = [r for s in stats for r in s["rewards"]]
        best_r = [max(s["rewards"]) for s in stats]
        metrics.update(
            prompts=len(tasks),
            samples=len(all_r),
            kept=len(kept),
            keep_rate=len(kept) / max(1, len(tasks)),
            sample_reward_mean=mean(all_r),
            best_reward_mean=mean(best_r),
            sample_exact_match=mean(float(r == 1.0) for r in all_r),
        )
        for i, s in enumerate(stats):  # the reward curve over prompts
            log.metrics({"prompt_best_reward": max(s["rewards"]), "prompt_mean_reward": mean(s["rewards"])}, i)
        (out / "kept.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in kept))
        log.artifact_json({"samples": stats[:50]}, "samples.json")
        log.metrics(metrics)
        ckpt = str(model_dir)
        if fc.rejection.then_sft and kept:
            res = run_sft(
                fc.replace(stage="sft"),
                model_dir,
                out / "sft",
                conversations=kept,
                run_name=f"finetune-rs-sft-{fc.name}",
            )
            ckpt = res.checkpoint
            metrics.update({f"sft_{k}": v for k, v in res.metrics.items() if isinstance(v, (int, float))})
            metrics["sft_run_id"] = res.run_id
        metrics["seconds"] = time.time() - t0
        log.artifact_json(metrics, "metrics.json")
        return StageResult(ckpt, metrics, log.run_id)
