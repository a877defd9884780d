"""The paged KV cache's attention paths agree: herd's C kernels, the gathered torch path, and the
Triton decode kernel (run on CPU tensors by Triton's interpreter where Triton is installed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.paged_cache import PagedKVCache
from tests.tiny import random_tiny

REPO = Path(__file__).resolve().parents[1]


def scattered_tables(lengths: list[int], block_size: int, num_blocks: int, width: int, seed: int = 0):
    """Each row's blocks drawn at random from the pool (never the null block 0)."""
    perm = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    tables = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        need = -(-(n + 1) // block_size)
        tables[r, :need] = torch.tensor([perm.pop() for _ in range(need)])
    return tables


def paged_steps(model, prompts, steps, monkeypatch=None, triton=False):
    """Prefill each prompt into scattered blocks, then decode `steps` tokens for all rows together."""
    cfg, bs = model.config, 4
    lengths = [len(p) for p in prompts]
    tables = scattered_tables([n + steps.shape[1] for n in lengths], bs, 64, 16)
    cache = PagedKVCache.for_model(cfg, 64, bs)
    cache.triton_decode = triton
    logits = []
    with torch.inference_mode():
        for r, p in enumerate(prompts):
            cache.set_step(tables[r : r + 1], torch.tensor([0]), len(p), span=len(p))
            model(torch.tensor([p]), cache=cache)
        pos = torch.tensor(lengths)
        for i in range(steps.shape[1]):
            cache.set_step(tables, pos, 1, span=int(pos.max()) + 1)
            logits.append(model(steps[:, i : i + 1], cache=cache)[:, -1])
            pos = pos + 1
    return torch.stack(logits)


def test_c_kernels_and_gathered_path_agree_on_scattered_blocks(monkeypatch):
    model = random_tiny(vocab_size=512, seed=3).fuse_projections()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 9, 17)]
    steps = torch.randint(0, 512, (3, 6), generator=g)
    with_kernels = paged_steps(model, prompts, steps)
    monkeypatch.setattr("model.model.attention_step", lambda *a: None)
    monkeypatch.setattr("model.model.decode_step", lambda *a: None)
    gathered = paged_steps(model, prompts, steps)
    torch.testing.assert_close(with_kernels, gathered, rtol=1e-4, atol=1e-4)
    # and both equal a full recompute of each row
    for r, p in enumerate(prompts):
        full = model(torch.tensor([p + steps[r].tolist()]))[0, len(p) - 1 + 1 :]
        torch.testing.assert_close(gathered[:, r], full, rtol=1e-4, atol=1e-4)


def test_triton_decode_kernel_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed here (torch's CUDA wheels ship it)")
    script = textwrap.dedent("""
        import torch
        import model.paged_attention as pa
        from tests.test_paged_attention import paged_steps
        from tests.tiny import random_tiny
        model = random_tiny(vocab_size=512, seed=3)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 9, 17)]
        steps = torch.randint(0, 512, (3, 4), generator=g)
        calls = []
        kernel = pa.paged_decode
        pa.paged_decode = lambda *args: calls.append(1) or kernel(*args)
        a = paged_steps(model, prompts, steps, triton=True)
        probe = [torch.zeros(1, 4, 64), torch.zeros(2, 2, 4, 64), torch.zeros(2, 2, 4, 64)]
        probe += [torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long)]
        assert len(calls) == 4 * model.config.n_layers and kernel(*probe) is not None
        b = paged_steps(model, prompts, steps, triton=False)
        print("max diff", float((a - b).abs().max()))
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    """)
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    print(done.stdout[-2000:], done.stderr[-2000:])
    assert done.returncode == 0 and "max diff" in done.stdout
