"""Serving throughput and latency: herd's endpoint vs transformers, same SmolLM2 weights and prompts.

For each concurrency (default 1, 8, 32), `concurrency` clients on 127.0.0.1 each send
`--requests` streaming chat requests back to back (greedy, `--max-tokens` each). Prints
aggregate output tok/s and time to first token p50/p99 for:

* herd: the FastAPI app and engine (services/) on uvicorn in its own process, as one Serve
  replica runs them;
* (a) transformers `generate`, one request at a time (a FIFO server: a request's TTFT includes
  its wait behind earlier ones; measured on --hf-requests requests, then replayed per concurrency);
* (b) `transformers serve --continuous-batching`, if it starts here.

    python -m bench.serve [--dtype bfloat16] [--max-tokens 64] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Count from one to ten.",
    "Write a haiku about the sea.",
    "What is twelve times twelve?",
    "Who wrote Hamlet?",
    "Explain photosynthesis in one sentence.",
    "List the planets of the solar system.",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
    "What is a prime number?",
    "Describe a cat in five words.",
    "What does CPU stand for?",
    "Say hello politely.",
    "How many legs does a spider have?",
    "What is the largest ocean?",
    "Suggest a name for a dog.",
    "What is the speed of light?",
    "Who painted the Mona Lisa?",
    "What is gravity?",
    "Give two tips for better sleep.",
    "What is the tallest mountain?",
    "Define democracy briefly.",
    "What language is spoken in Brazil?",
    "How do plants drink water?",
    "What is an atom?",
    "Name a famous composer.",
    "What is the freezing point of water?",
    "Why do we have seasons?",
    "What is the square root of 81?",
]


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def run_clients(
    url: str, model: str, concurrency: int, per_client: int, max_tokens: int, headers: dict | None = None
) -> dict:
    """`concurrency` streaming clients; returns tokens, wall time and TTFTs."""
    import httpx

    ttfts, tokens, errors = [], [], []
    counter = iter(range(10**9))

    async def client(c):
        for _ in range(per_client):
            i = next(counter)
            body = {
                "model": model,
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            t0 = time.perf_counter()
            first, n_chunks, usage = None, 0, None
            try:
                async with c.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ev = json.loads(line[6:])
                        if ev.get("usage"):
                            usage = ev["usage"]
                        for ch in ev.get("choices") or []:
                            if (ch.get("delta") or {}).get("content"):
                                n_chunks += 1
                                if first is None:
                                    first = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - a benchmark reports, never crashes
                errors.append(repr(e))
                continue
            ttfts.append(first if first is not None else time.perf_counter() - t0)
            tokens.append(usage["completion_tokens"] if usage else n_chunks)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as c:
        t = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t
    return {"tokens": sum(tokens), "wall": wall, "ttft": ttfts, "errors": errors}


def report(name: str, conc: int, r: dict) -> dict:
    row = {
        "server": name,
        "concurrency": conc,
        "tok_s": r["tokens"] / r["wall"] if r["wall"] else 0.0,
        "ttft_p50": pct(r["ttft"], 50),
        "ttft_p99": pct(r["ttft"], 99),
        "requests": len(r["ttft"]),
        "tokens": r["tokens"],
        "errors": len(r["errors"]),
    }
    print(
        f"{name:<22} c={conc:<3} {row['tok_s']:8.1f} tok/s  TTFT p50 {row['ttft_p50']:6.2f} s  "
        f"p99 {row['ttft_p99']:6.2f} s  ({row['requests']} requests, {row['tokens']} tokens, "
        f"{r['wall']:.1f} s{', errors: ' + str(r['errors'][:2]) if r['errors'] else ''})",
        flush=True,
    )
    return row


def wait_health(url: str, proc=None, timeout: float = 300) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return True
        except Exception:  # noqa: BLE001
            pass
        time.sleep(1)
    return False


# --- herd ----------------------------------------------------------------------------------------


def serve_herd(model_dir: str, port: int, dtype: str, threads: int | None, max_num_seqs: int) -> None:
    """The herd server process: the FastAPI app and engine on uvicorn, as one Serve replica runs them."""
    import uvicorn

    from services.api.app import build_state, create_app

    state = build_state(
        {
            "model": model_dir,
            "dtype": dtype,
            "num_threads": threads,
            "auth": "none",
            "engine": {
                "max_num_seqs": max_num_seqs,
                "max_model_len": 512,
                "max_num_batched_tokens": 512,
                "prefill_chunk": 256,
            },
        }
    )
    uvicorn.run(create_app(state), host="127.0.0.1", port=port, log_level="warning")


def bench_herd(args, model_dir: Path) -> list[dict]:
    """herd in its own process (as `transformers serve` is), so the clients don't share its cores' GIL."""
    from services.testing import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "bench.serve",
        "--herd-server",
        str(port),
        "--herd-model",
        str(model_dir),
        "--dtype",
        args.dtype,
        "--concurrency",
        ",".join(map(str, args.concurrency)),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return run_server("herd", url, "herd", cmd, os.environ, args)


def run_server(name: str, url: str, model: str, cmd: list[str], env: dict, args) -> list[dict]:
    """Start a server process, wait for /health, run the clients at each concurrency, stop it."""
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    rows = []
    try:
        if not wait_health(url, proc, timeout=240):
            log.seek(0)
            print(f"{name}: not run (did not become healthy): {log.read()[-600:]}")
            return []
        warm = asyncio.run(run_clients(url, model, 2, 1, 8))
        if warm["errors"] or not warm["tokens"]:
            print(f"{name}: not run (warm-up failed: {warm['errors'][:1]})")
            return []
        for c in args.concurrency:
            per = args.requests if c > 1 else args.requests * 4
            rows.append(report(name, c, asyncio.run(run_clients(url, model, c, per, args.max_tokens))))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


# --- (a) transformers generate, one request at a time --------------------------------------------


def bench_hf_generate(args, hf_dir: Path) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=getattr(torch, args.dtype)).eval()

    class FirstToken:
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # 1st put: the prompt; 2nd: the first new token
                self.first = time.perf_counter()

        def end(self):
            pass

    service, ttft_alone, n_tokens = [], [], []
    for i in range(args.hf_requests + 1):
        q = QUESTIONS[i % len(QUESTIONS)]
        ids = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        streamer = FirstToken()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=args.max_tokens, do_sample=False, streamer=streamer)
        dt = time.perf_counter() - t
        if i == 0:
            continue  # warm-up
        service.append(dt)
        ttft_alone.append((streamer.first or time.perf_counter()) - t)
        n_tokens.append(out.shape[1] - ids["input_ids"].shape[1])
    rows = []
    for c in args.concurrency:
        # Replay: c clients send back to back into one FIFO server with these service times.
        n = len(service)
        free_at, ttfts, client_ready = 0.0, [], [0.0] * c
        for k in range(n):
            client = k % c
            start = max(free_at, client_ready[client])
            ttfts.append(start - client_ready[client] + ttft_alone[k])
            free_at = start + service[k]
            client_ready[client] = free_at
        r = {"tokens": sum(n_tokens), "wall": free_at, "ttft": ttfts, "errors": []}
        rows.append(report("(a) hf generate 1-by-1", c, r))
    return rows


# --- (b) transformers serve --continuous-batching ------------------------------------------------


def bench_hf_serve(args, hf_dir: Path) -> list[dict]:
    from services.testing import free_port

    exe = Path(sys.executable).parent / "transformers"
    if not exe.exists():
        print("(b) transformers serve: not run (no `transformers` CLI in this environment)")
        return []
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(exe),
        "serve",
        str(hf_dir),
        "--continuous-batching",
        "--dtype",
        args.dtype,
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return run_server("(b) transformers serve", url, str(hf_dir), cmd, env, args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16"],
        help="float32 on CPUs without AVX512-BF16/AMX (they emulate bf16 matmuls)",
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=1, help="requests per client (concurrency 1: four times as many)")
    ap.add_argument("--hf-requests", type=int, default=6, help="requests measured for (a)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip", default="", help="comma list of herd,a,b to skip")
    ap.add_argument("--herd-server", type=int, default=None, help=argparse.SUPPRESS)  # the herd server process
    ap.add_argument("--herd-model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.herd_server:
        return serve_herd(args.herd_model, args.herd_server, args.dtype, args.threads, max(args.concurrency))
    skip = set(filter(None, args.skip.split(",")))

    import torch

    from model.assets import smollm2_gguf_path
    from model.checkpoint import export_hf, import_gguf

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="herd-bench-serve-"))
    native = import_gguf(smollm2_gguf_path(), work / "native")
    hf_dir = export_hf(native, work / "hf")
    # transformers needs the tokenizer files next to the weights: take them from the GGUF.
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(hf_dir)
    print(
        f"SmolLM2-135M-Instruct ({args.dtype}), {args.max_tokens} greedy tokens a request, {len(QUESTIONS)} "
        f"prompts, concurrency {args.concurrency}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    if "herd" not in skip:
        rows += bench_herd(args, native)
    if "a" not in skip:
        rows += bench_hf_generate(args, hf_dir)
    if "b" not in skip:
        rows += bench_hf_serve(args, hf_dir)
    by = {(r["server"], r["concurrency"]): r for r in rows}
    print("\nratios (herd tok/s / peer tok/s):")
    for c in args.concurrency:
        herd = by.get(("herd", c))
        for peer in ("(a) hf generate 1-by-1", "(b) transformers serve"):
            other = by.get((peer, c))
            if herd and other and other["tok_s"]:
                print(f"  c={c:<3} herd / {peer}: {herd['tok_s'] / other['tok_s']:.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
