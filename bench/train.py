"""Training-step throughput: herd vs transformers' LlamaForCausalLM, in one run.

Same shape (a herd preset, copied into a LlamaConfig with the same initial weights), batch,
sequence length, bf16 autocast, AdamW (fused, transformers Trainer's default `adamw_torch_fused`)
and gradient clipping. Steps of the two are interleaved so that a busy machine slows both
alike; the median step time is reported. Also printed: MFU against this device's peak
(CPU: the measured bf16 matmul rate; GPU: the datasheet bf16 peak, and the measured one) and
herd's cost of document masking (packed rows, positions restarting at each document).

    python -m bench.train                                  # small (~155M) at 4 x 512 on CPU
    python -m bench.train --device cuda --preset 1b        # 1B-class (dim 2048, 16 layers), 4 x 2048
    python -m bench.train --device cuda --preset 1b --compile
    # the issue-21 target, >= 400 TFLOP/s per GPU at sequence 8192 (torchtitan's flop count):
    python -m bench.train --device cuda --preset 1b --seq 8192 --batch 2 --compile --ac selective --steps 10 --warmup 3

With --compile, transformers runs both eager and compiled (its best settings: SDPA, and
torch.compile when it helps); herd's ratio is against the faster of the two. Levers on herd's side:
per-block torch.compile, `--ac` (activation checkpointing, flows/train/parallelize.py: selective
keeps matmul and attention outputs), the document mask built once per batch (flex BlockMask), and
no host syncs in the step (the loss and grad norm stay on the device until the step is timed).

Needs torch and transformers only (no Ray, no MLflow, no downloads).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

# The 1B-class shape of Llama 3.2 1B: dim 2048, 16 layers, 32 heads (8 KV), FFN 8192, tied.
EXTRA_PRESETS = {
    "1b": dict(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden_dim=8192,
        tie_embeddings=True,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
}


def model_config(preset: str):
    from model.config import get_preset

    if preset in EXTRA_PRESETS:
        return dataclasses.replace(get_preset("llama3-8b"), rope_scaling=None, **EXTRA_PRESETS[preset])
    return get_preset(preset)


def packed_positions(batch: int, seq: int, mean_doc: int, seed: int = 0) -> torch.Tensor:
    """Positions of rows packed with documents of random lengths (mean `mean_doc` tokens)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        pos, p = [], int(torch.randint(0, mean_doc, (1,), generator=g))  # a document continues from the last row
        while len(pos) < seq:
            length = max(8, int(torch.empty(1).exponential_(1 / mean_doc, generator=g)))
            pos += list(range(p, p + length))
            p = 0
        rows.append(pos[:seq])
    return torch.tensor(rows)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", help="herd preset, or 1b (1B-class)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 4")
    ap.add_argument("--seq", type=int, default=None, help="default: 512 on CPU, 2048 on CUDA")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per contender")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mean-doc", type=int, default=128, help="mean document length for the masking run")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile herd's blocks (CUDA); transformers then also runs compiled, beside eager",
    )
    ap.add_argument(
        "--ac",
        choices=("none", "full", "selective"),
        default="none",
        help="herd's activation checkpointing per block (memory for longer sequences)",
    )
    ap.add_argument("--no-hf", action="store_true", help="herd only")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bf16 autocast on CUDA and on CPUs with bf16 units (AVX512-BF16/AMX), else fp32",
    )
    args = ap.parse_args()

    from flows.train.losses import fused_linear_cross_entropy
    from flows.train.metrics import gpu_peak_flops, measured_matmul_flops
    from flows.train.optim import build_optimizer
    from flows.train.parallelize import clip_grad_norm_
    from model.checkpoint import hf_config_dict, hf_state_dict
    from model.model import Transformer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    B = args.batch or 4
    T = args.seq or (2048 if device.type == "cuda" else 512)
    cfg = model_config(args.preset)
    torch.manual_seed(0)
    herd = Transformer(cfg)
    herd.init_weights(seed=0)
    herd.to(device).train()
    n_params = cfg.num_params()
    flops_tok = cfg.flops_per_token(T)

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    weights = torch.full((B, T), 1.0 / (B * T), device=device)
    positions = packed_positions(B, T, args.mean_doc).to(device)
    n_mm = 4096 if device.type == "cuda" else 1024
    peak_bf16 = measured_matmul_flops(device.type, torch.bfloat16, n_mm, 1.0)
    peak_fp32 = measured_matmul_flops(device.type, torch.float32, n_mm, 1.0)
    # auto: bf16 where the hardware runs it faster (CUDA; AMX / AVX512-BF16 CPUs), else fp32. Measured, since
    # torch's CPU capability string says AVX512 on AMX machines too.
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and (device.type == "cuda" or peak_bf16 > 1.5 * peak_fp32))
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    h_opt = build_optimizer(herd, 3e-4, [0.9, 0.95], 1e-8, 0.1, ["norm", "embedding"], "auto")
    h_params = [p for p in herd.parameters()]
    compiled = False
    if args.ac != "none":
        from flows.train.parallelize import apply_activation_checkpointing

        apply_activation_checkpointing(herd, args.ac)
    if args.compile:
        for block in herd.layers:
            block.compile()
        compiled = True

    def herd_step(pos=None):
        h_opt.zero_grad(set_to_none=True)
        with amp():
            loss = herd(inputs, positions=pos, head=lambda h, w: fused_linear_cross_entropy(h, w, targets, weights))
        loss.backward()
        clip_grad_norm_(h_params, 1.0)
        h_opt.step()
        return loss

    contenders = {"herd": herd_step, "herd+docmask": lambda: herd_step(positions)}
    if not args.no_hf:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(**{k: v for k, v in hf_config_dict(cfg).items() if k != "architectures"})
        hf_cfg._attn_implementation = "sdpa"
        hf = LlamaForCausalLM(hf_cfg)
        missing, unexpected = hf.load_state_dict(hf_state_dict(herd.cpu()), strict=False)
        missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise SystemExit(
                f"weights do not map onto transformers: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        herd.to(device)
        hf.to(device).train()
        decay = [p for n, p in hf.named_parameters() if p.ndim == 2 and "embed" not in n]
        plain = [p for n, p in hf.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
        hf_opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
            lr=3e-4,
            betas=(0.9, 0.95),
            eps=1e-8,
            fused=True,
        )
        labels = tokens.to(device)  # transformers shifts the labels itself

        def hf_step_of(forward):
            def step():
                hf_opt.zero_grad(set_to_none=True)
                with amp():
                    loss = forward(input_ids=labels[:, :-1], labels=labels[:, :-1]).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
                hf_opt.step()
                return loss

            return step

        contenders = {"transformers": hf_step_of(hf), **contenders}
        if args.compile:  # the same weights and optimizer, compiled forward (and backward)
            contenders = {"transformers+compile": hf_step_of(torch.compile(hf)), **contenders}

    peak_sheet = gpu_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    peak_measured = peak_bf16 if bf16 else peak_fp32
    peak = peak_sheet if (peak_sheet and bf16) else peak_measured
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(
        f"device {device} ({where}), "
        f"preset {args.preset}: {n_params / 1e6:.1f}M params, batch {B} x {T}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, AdamW fused, clip 1.0"
        + (", herd blocks compiled" if compiled else "")
        + (f", herd AC {args.ac}" if args.ac != "none" else "")
    )
    print(
        f"flops/token (torchtitan: 6N + 12 L H Dh T) = {flops_tok / 1e9:.3f} GFLOP; measured matmul peak "
        f"({n_mm}^3): bf16 {peak_bf16 / 1e9:.2f} GFLOP/s, fp32 {peak_fp32 / 1e9:.2f} GFLOP/s"
        + (f"; datasheet bf16 {peak_sheet / 1e12:.0f} TFLOP/s" if peak_sheet else ""),
        flush=True,
    )
    if not bf16:
        print(
            f"note: bf16 matmul is not faster than fp32 here ({peak_bf16 / peak_fp32:.2f}x), so both contenders "
            f"run fp32 (--dtype bf16 forces autocast); MFU is against the fp32 peak"
        )

    times: dict[str, list[float]] = {k: [] for k in contenders}
    losses: dict[str, float] = {}
    for r in range(args.warmup + args.steps):
        for name, fn in contenders.items():
            sync(device)
            t = time.perf_counter()
            loss = fn()
            sync(device)
            dt = time.perf_counter() - t
            losses.setdefault(name, float(loss.detach()))  # the first step's loss: same weights, same batch
            if r >= args.warmup:
                times[name].append(dt)
            print(
                f"  round {r} {name:13s} {dt:7.2f} s  loss {float(loss.detach()):.4f}"
                + ("  (warmup)" if r < args.warmup else ""),
                flush=True,
            )

    print()
    tps = {k: B * T / statistics.median(v) for k, v in times.items()}
    for name in contenders:
        mfu = tps[name] * flops_tok / peak
        print(
            f"{name:13s} {tps[name]:9.1f} tok/s  {tps[name] * flops_tok / 1e9:8.1f} GFLOP/s  MFU {100 * mfu:5.1f}% "
            f"(vs measured {'bf16' if bf16 else 'fp32'} peak {100 * tps[name] * flops_tok / peak_measured:.1f}%)  "
            f"(median of {len(times[name])} steps; first-step loss {losses[name]:.4f})"
        )
    hf_best = max((k for k in tps if k.startswith("transformers")), key=tps.get, default=None)
    if hf_best:
        print(f"herd / transformers' best ({hf_best}): {tps['herd'] / tps[hf_best]:.2f}x (goal > 1)")
    overhead = tps["herd"] / tps["herd+docmask"] - 1
    print(f"document masking overhead (mean document {args.mean_doc} tokens): {100 * overhead:+.1f}% step time")
    print(
        f"herd {tps['herd']:.0f} tok/s = {tps['herd'] * flops_tok / 1e12:.1f} TFLOP/s per device (no masking; "
        f"goal on an H200 at 8192: >= 400); document-masked {tps['herd+docmask']:.0f} tok/s = "
        f"{100 * tps['herd+docmask'] / tps['herd']:.1f}% of it (goal >= 90%)"
    )
    if device.type == "cuda":
        print(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
