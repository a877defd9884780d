"""herd's CPU gemv kernels against a float64 reference, including ragged shapes (row and column tails)."""

from __future__ import annotations

import pytest
import torch

from model import cpu_kernels

SHAPES = [(1, 1), (3, 100), (7, 37), (13, 1541), (960, 576), (4099, 64)]


def available(dtype) -> bool:
    return ("gemv", dtype) in cpu_kernels._library() and ("rms_norm", dtype) in cpu_kernels._library()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_matches_float64_reference(dtype, n, k):
    if not available(dtype):
        pytest.skip(
            f"herd's {dtype} gemv is not available here (no AVX-512{'-BF16' if dtype == torch.bfloat16 else ''}, "
            "no C compiler, or HERD_CPU_KERNELS=0)"
        )
    g = torch.Generator().manual_seed(n * 7919 + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(k, generator=g).to(dtype)
    ref = torch.mv(w.double(), x.double())
    y = cpu_kernels.gemv(w, x)
    assert y.dtype == dtype and y.shape == (n,)
    # fp32: accumulation order only; bf16: the output's rounding (8 bits of mantissa) on top.
    rel = 1e-5 if dtype == torch.float32 else 2**-8
    bound = rel * (w.double().abs() @ x.double().abs()) + 1e-6
    assert ((y.double() - ref).abs() <= bound).all()


def test_gemv_declines_what_it_does_not_cover():
    w = torch.randn(8, 16)
    x = torch.randn(16)
    assert cpu_kernels.gemv(w.t().contiguous().t(), x) is None  # not row-major
    assert cpu_kernels.gemv(w, x.double()) is None  # dtypes differ
    assert cpu_kernels.gemv(w.double(), x.double()) is None  # no float64 kernel
    assert cpu_kernels.gemv(w.requires_grad_(), x) is None  # autograd needs torch's op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,d", [(1, 576), (3, 37), (20, 64), (1, 1)])
def test_rms_norm_matches_the_torch_path(dtype, rows, d):
    """The kernel computes what model.RMSNorm's torch ops compute (bf16: the same two roundings)."""
    from model.model import RMSNorm

    if not available(dtype):
        pytest.skip(f"herd's {dtype} kernels are not available here")
    g = torch.Generator().manual_seed(rows * 31 + d)
    norm = RMSNorm(d, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
    x = (3 * torch.randn(rows, d, generator=g)).to(dtype)
    with torch.no_grad():
        got = cpu_kernels.rms_norm(x, norm.weight, norm.eps)
    with torch.enable_grad():
        ref = norm(x.requires_grad_())  # grad mode: torch's path
    assert got.dtype == dtype and got.shape == x.shape
    # fp32: summation order; bf16: at most one unit in the last place where that order flips a rounding.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(got, ref.detach(), **tol)


def _decode_model(dtype, tie: bool):
    from model.config import ModelConfig, RopeScaling
    from model.model import Transformer

    # GQA (8 over 2), llama3 rope scaling, an FFN width that is odd and not a multiple of the vector width
    cfg = ModelConfig(
        dim=256,
        n_layers=3,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=1000,
        ffn_hidden_dim=301,
        max_seq_len=128,
        tie_embeddings=tie,
        rope_scaling=RopeScaling(),
    )
    model = Transformer(cfg)
    model.init_weights(seed=1)
    return model.to(dtype).fuse_projections()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_equals_the_torch_path(monkeypatch, dtype, tie):
    """The one-call decode step gives the model's torch-path logits and writes the same keys/values,
    step after step, in a cache slot other than 0."""
    from model.kv_cache import KVCache

    if ("decode", dtype) not in cpu_kernels._library():
        pytest.skip(f"herd's {dtype} decode kernel is not available here")
    model = _decode_model(dtype, tie)
    tokens = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    runs, calls = [], []
    for use_kernel in (False, True):
        if not use_kernel:
            monkeypatch.setattr("model.model.decode_step", lambda *a: None)
        else:
            monkeypatch.setattr("model.model.decode_step", lambda *a: calls.append(1) or cpu_kernels.decode_step(*a))
        cache = KVCache.for_model(model.config, 3, 40, dtype=dtype)
        logits = []
        with torch.inference_mode():
            cache.select([1])
            model(tokens[:, :12], cache=cache)
            cache.advance(12)
            for i in range(12, 24):
                logits.append(model(tokens[:, i : i + 1], cache=cache).float())
                cache.advance(1)
        runs.append((torch.cat(logits), cache.k.float(), cache.v.float()))
    assert len(calls) == 12
    (ref, ref_k, ref_v), (got, got_k, got_v) = runs
    # fp32: summation order only; bf16: a rounding flipped by that order, one unit in the last place
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-6)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(got_k, ref_k, **tol)
    torch.testing.assert_close(got_v, ref_v, **tol)
    assert got_k[:, [0, 2]].abs().max() == 0  # the other slots are untouched


def test_decode_step_declines_what_it_does_not_cover():
    from model.kv_cache import KVCache

    if ("decode", torch.float32) not in cpu_kernels._library():
        pytest.skip("herd's float32 decode kernel is not available here")
    model = _decode_model(torch.float32, tie=True)
    token = torch.tensor([[7]])

    def step_cache(rows=1, dtype=torch.float32):
        cache = KVCache.for_model(model.config, rows, 8, dtype)
        cache.positions(1)  # the model's forward sets the step up before it tries the kernel
        return cache

    with torch.inference_mode():
        assert cpu_kernels.decode_step(model, token, step_cache()) is not None
        unfused = _decode_model(torch.float32, tie=True)
        for layer in unfused.layers:
            layer.attention.wqkv = layer.feed_forward.w13 = None
        assert cpu_kernels.decode_step(unfused, token, step_cache()) is None
        assert cpu_kernels.decode_step(model, token, step_cache(dtype=torch.bfloat16)) is None
        moved = model.double()  # .to() replaces the weights the plan points at: the plan is rebuilt, then declined
        assert cpu_kernels.decode_step(moved, token, step_cache(dtype=torch.float64)) is None
        assert cpu_kernels.decode_step(_decode_model(torch.float32, True), token, step_cache(rows=2)) is None
    assert cpu_kernels.decode_step(_decode_model(torch.float32, True), token, step_cache()) is None  # autograd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_step_equals_the_torch_path(monkeypatch, dtype):
    """A batched one-token step through the attention kernel gives the torch path's logits and cache,
    for rows of different lengths, all of them or some."""
    from model.kv_cache import KVCache

    if ("attention", dtype) not in cpu_kernels._library():
        pytest.skip(f"herd's {dtype} attention kernel is not available here")
    model = _decode_model(dtype, tie=False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (1, n), generator=g) for n in (3, 11, 6, 17)]
    steps = torch.randint(0, 1000, (3, 4, 1), generator=g)
    runs, used = [], []
    for use_kernel in (False, True):
        step = (lambda *a: used.append(cpu_kernels.attention_step(*a)) or used[-1]) if use_kernel else (lambda *a: None)
        monkeypatch.setattr("model.model.attention_step", step)
        cache = KVCache.for_model(model.config, 4, 40, dtype=dtype)
        logits = []
        with torch.inference_mode():
            for slot, prompt in enumerate(prompts):
                cache.select([slot])
                model(prompt, cache=cache)
                cache.advance(prompt.shape[1])
            for tokens in steps[:2]:  # all four rows, each at its own length
                cache.select([0, 1, 2, 3])
                logits.append(model(tokens, cache=cache).float())
                cache.advance(1)
            cache.select([0, 3])  # rows 1 and 2 idle
            logits.append(model(steps[2][[0, 3]], cache=cache).float())
            cache.advance(1)
        runs.append((logits, cache.k.float(), cache.v.float(), cache.lengths.clone()))
    (ref, ref_k, ref_v, ref_len), (got, got_k, got_v, got_len) = runs
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-6)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(got_k, ref_k, **tol)
    torch.testing.assert_close(got_v, ref_v, **tol)
    assert torch.equal(got_len, ref_len) and got_len.tolist() == [6, 13, 8, 20]
    assert len(used) == 3 * model.config.n_layers and all(u is not None for u in used)


def _ragged_rows(rng: torch.Generator):
    """Rows of a context then continuations: row-relative (prefix, seg) per token, as the scorer packs them."""
    from model.ragged import RaggedRows

    starts, prefix, seg, pos = [0], [], [], []
    for _ in range(5):
        context = int(torch.randint(1, 100, (), generator=rng))
        prefix += [0] * context
        seg += [0] * context
        pos += range(context)
        at = context
        for _ in range(int(torch.randint(0, 3, (), generator=rng))):
            n = int(torch.randint(1, 30, (), generator=rng))
            prefix += [context] * n
            seg += [at] * n
            pos += range(context, context + n)
            at += n
        starts.append(starts[-1] + at)
    rows = RaggedRows(*(torch.tensor(x) for x in (starts, prefix, seg)))
    return rows, torch.tensor(pos)


@pytest.mark.parametrize("n_heads,n_kv,hd", [(9, 3, 64), (8, 2, 128), (4, 4, 32), (6, 1, 16)])
def test_ragged_attention_matches_a_float64_reference(n_heads, n_kv, hd):
    """Each token attends to its row's first prefix[t] tokens and to its own segment up to itself,
    after rotary on q and k: against the definition computed pair by pair in float64."""
    from model.model import apply_rope, rope_cos_sin, rope_inv_freq

    if ("ragged_attention", torch.float32) not in cpu_kernels._library():
        pytest.skip("herd's ragged-attention kernel is not available here (no AVX-512 or no C compiler)")
    rng = torch.Generator().manual_seed(hd + n_heads)
    rows, pos = _ragged_rows(rng)
    N = len(pos)
    qkv = torch.randn(1, N, (n_heads + 2 * n_kv) * hd, generator=rng)
    cos, sin = rope_cos_sin(pos[None], rope_inv_freq(hd, 500000.0, None), torch.float32)
    heads = qkv.double().view(N, -1, hd)
    qk = apply_rope(heads[None, :, : n_heads + n_kv], cos.double(), sin.double())[0]
    q, k, v = qk[:, :n_heads], qk[:, n_heads:], heads[:, n_heads + n_kv :]
    want = torch.empty(N, n_heads, hd, dtype=torch.float64)
    starts = rows.starts.tolist()
    for r in range(len(starts) - 1):
        for t in range(starts[r + 1] - starts[r]):
            i = starts[r] + t
            shared = range(starts[r], starts[r] + int(rows.prefix[i]))
            keys = [*shared, *range(starts[r] + int(rows.seg[i]), i + 1)]
            for h in range(n_heads):
                g = h // (n_heads // n_kv)
                w = torch.softmax(k[keys, g] @ q[i, h] / hd**0.5, 0)
                want[i, h] = w @ v[keys, g]
    got = cpu_kernels.ragged_attention(qkv, cos, sin, rows, n_heads, n_kv)
    torch.testing.assert_close(got.view(N, n_heads, hd).double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qkv[0, :, : (n_heads + n_kv) * hd].double(), qk.reshape(N, -1), rtol=1e-5, atol=1e-5)


def test_ragged_attention_declines_what_it_does_not_cover():
    if ("ragged_attention", torch.float32) not in cpu_kernels._library():
        pytest.skip("herd's ragged-attention kernel is not available here (no AVX-512 or no C compiler)")
    rows, pos = _ragged_rows(torch.Generator().manual_seed(0))
    N = len(pos)
    cos, sin = torch.ones(1, N, 1, 48), torch.zeros(1, N, 1, 48)
    assert cpu_kernels.ragged_attention(torch.randn(1, N, 5 * 48), cos, sin, rows, 3, 1) is None  # head_dim 48
    cos, sin = torch.ones(1, N, 1, 64), torch.zeros(1, N, 1, 64)
    assert cpu_kernels.ragged_attention(torch.randn(1, N, 5 * 64).bfloat16(), cos, sin, rows, 3, 1) is None
    assert cpu_kernels.ragged_attention(torch.randn(1, N, 5 * 64, requires_grad=True), cos, sin, rows, 3, 1) is None
