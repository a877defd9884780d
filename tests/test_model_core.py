"""Pure model tests on small random configs: config, rotary scaling, document masking, KV cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import ConfigError, ModelConfig, RopeScaling, get_preset
from model.generate import SamplingParams, generate, sample_next
from model.kv_cache import KVCache
from model.model import Transformer, pack_weight
from tests.tiny import random_tiny


def random_model(seed=0, **overrides) -> Transformer:
    return random_tiny(seed, vocab_size=512, **overrides)


def test_8b_preset_parameter_count():
    n = get_preset("llama3-8b").num_params()
    assert abs(n - 8.03e9) < 0.01e9, n
    assert 70.0e9 < get_preset("llama3-70b").num_params() < 71.0e9
    assert 405e9 < get_preset("llama3-405b").num_params() < 406e9


def test_num_params_matches_module():
    for preset in ("tiny", "smollm2-135m"):
        cfg = get_preset(preset)
        with torch.device("meta"):
            model = Transformer(cfg)
        assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_llama31_preset_has_scaling():
    cfg = get_preset("llama3.1-8b")
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert cfg.rope_theta == 500000.0


def test_unknown_preset_and_fields_are_named():
    with pytest.raises(ConfigError, match="llama9"):
        get_preset("llama9")
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dict({"hidden_size": 3})
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(n_heads=32, n_kv_heads=5)


def test_config_json_round_trip(tmp_path):
    cfg = get_preset("llama3.1-8b")
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg


def test_document_masking_equals_separate_documents():
    model = random_model()
    lengths = [7, 12, 5]
    docs = [torch.randint(0, 512, (n,)) for n in lengths]
    packed = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed_logits = model(packed, positions=positions)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
        plain_causal = model(packed)[0]
    assert (packed_logits - alone).abs().max() <= 1e-4
    # Without the mask, later documents see earlier ones: the test would notice a missing mask.
    assert (plain_causal[lengths[0] :] - alone[lengths[0] :]).abs().max() > 1e-2


def test_document_ids_equal_restarting_positions():
    model = random_model()
    tokens = torch.randint(0, 512, (2, 16))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]] * 2)
    doc_ids = (positions == 0).cumsum(-1)
    with torch.no_grad():
        a = model(tokens, positions=positions)
        b = model(tokens, positions=positions, doc_ids=doc_ids)
    assert torch.equal(a, b)


def greedy_full_recompute(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_kv_cache_greedy_equals_full_recompute():
    model = random_model(seed=1)
    prompt = torch.randint(0, 512, (9,)).tolist()
    params = SamplingParams(max_tokens=64, stop_ids=())
    model.config = dataclasses.replace(model.config, eos_token_ids=())
    cached = generate(model, [prompt], params)[0].token_ids
    assert cached == greedy_full_recompute(model, prompt, 64)


def test_batch_of_different_lengths_equals_each_alone():
    model = random_model(seed=2)
    model.config = dataclasses.replace(model.config, eos_token_ids=())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 11, 6, 17)]
    params = SamplingParams(max_tokens=24)
    batched = [r.token_ids for r in generate(model, prompts, params)]
    alone = [generate(model, [p], params)[0].token_ids for p in prompts]
    assert batched == alone


def test_cache_slots_decode_independently():
    """Rows selected by slot id see only their own history (continuous batching's contract)."""
    model = random_model(seed=3)
    cfg = model.config
    cache = KVCache.for_model(cfg, batch_size=3, max_len=64)
    a, b = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        cache.select([2])
        la = model(a, cache=cache, last_only=True)
        cache.advance(5)
        cache.select([0])
        lb = model(b, cache=cache, last_only=True)
        cache.advance(9)
        nxt = torch.tensor([[1], [2]])
        cache.select([2, 0])
        step = model(nxt, cache=cache)
        cache.advance(1)
        ref_a = model(torch.cat([a, nxt[:1]], 1))[:, -1]
        ref_b = model(torch.cat([b, nxt[1:]], 1))[:, -1]
    assert torch.allclose(la[:, -1], model(a)[:, -1], atol=1e-5)
    assert torch.allclose(lb[:, -1], model(b)[:, -1], atol=1e-5)
    assert torch.allclose(step[0, -1], ref_a[0], atol=1e-4)
    assert torch.allclose(step[1, -1], ref_b[0], atol=1e-4)
    assert cache.lengths.tolist() == [10, 0, 6]


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(4, 100)
    p = SamplingParams(temperature=1.0, top_k=3, seed=0)
    draws = torch.stack([sample_next(logits, p, torch.Generator().manual_seed(s)) for s in range(50)])
    top3 = logits.topk(3, dim=-1).indices
    assert all(int(draws[i, r]) in top3[r].tolist() for i in range(50) for r in range(4))
    again = sample_next(logits, p, torch.Generator().manual_seed(7))
    assert torch.equal(again, sample_next(logits, p, torch.Generator().manual_seed(7)))


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_p=0.7)
    seen = {int(sample_next(logits, p, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}


def test_bf16_forward_close_to_fp32():
    model = random_model(seed=4)
    tokens = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        ref = model(tokens).float().softmax(-1)
        low = model.to(torch.bfloat16)(tokens).float().softmax(-1)
    assert (ref - low).abs().max() < 0.05
    assert model.inv_freq.dtype == torch.float32


def test_fused_projections_keep_logits_and_state_dict():
    model = random_model(seed=5)
    tokens = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref = model(tokens)
        names = {k: v.clone() for k, v in model.state_dict().items()}
        model.fuse_projections()
        fused = model(tokens)
    assert (ref - fused).abs().max() <= 1e-5
    after = model.state_dict()
    assert set(after) == set(names)
    assert all(torch.equal(after[k], names[k]) for k in names)
    # The separate weights are views into the fused tensor: no extra memory.
    attn = model.layers[0].attention
    assert attn.wk.weight.untyped_storage().data_ptr() == attn.wqkv.untyped_storage().data_ptr()


def test_generation_records_the_stop_id_it_ended_on():
    model = random_model(seed=3)
    model.config = dataclasses.replace(model.config, eos_token_ids=())
    prompt = [5, 6, 7]
    free = generate(model, [prompt], SamplingParams(max_tokens=8))[0]
    stop = free.token_ids[2]  # greedy reaches this id by step 3: make it a stop id
    got = generate(model, [prompt], SamplingParams(max_tokens=8, stop_ids=(stop,)))[0]
    assert got.token_ids == free.token_ids[: free.token_ids.index(stop)]
    assert got.finish_reason == "stop" and got.stop_token_id == stop
    assert generate(model, [prompt], SamplingParams(max_tokens=2))[0].stop_token_id is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_weights_give_the_unpacked_logits(dtype):
    """fuse_projections(pack=True) (oneDNN-laid-out weights for several rows) changes the speed, not
    the numbers: a batched prefill and a batched cached step equal the unpacked model's, exactly in
    bf16 (oneDNN runs both), to fp32 rounding in fp32 (oneDNN's sums against MKL's)."""
    if pack_weight(torch.zeros(2, 2, dtype=dtype)) is None:
        pytest.skip(f"this CPU build has no oneDNN {dtype} matmul to pack for")
    plain = random_model(seed=5).to(dtype).fuse_projections()
    packed = random_model(seed=5).to(dtype).fuse_projections(pack=True)
    assert packed.packed and packed.layers[0].attention.packed and packed.layers[0].feed_forward.packed
    tokens = torch.randint(0, 512, (3, 10))
    with torch.no_grad():
        outs = []
        for model in (plain, packed):
            cache = KVCache.for_model(model.config, 3, 16, dtype=dtype)
            prefill = model(tokens[:, :9], cache=cache)
            cache.advance(9)
            outs.append((prefill, model(tokens[:, 9:], cache=cache)))
    if dtype == torch.bfloat16:
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    else:
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_inference_path_equals_training_path(dtype):
    """fuse_projections (one q/k/v and one gate/up matmul, joint rotary, mv for one bf16 row) computes
    what the unfused modules compute, in prefill and in a one-token cached step."""
    model = random_model(seed=4).to(dtype)
    fused = random_model(seed=4).to(dtype).fuse_projections()
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        ref = model(tokens)
        # bf16 rounds the one-row mv and the GEMM at different points: over 30 inputs the logits
        # (|x| ~ 5) differed by up to ~2.5 units in the last place, so allow 4 of them.
        ulp = 2.0 ** (torch.log2(ref.float().abs().max()).floor().item() - 7)
        tol = 0 if dtype == torch.float32 else 4 * ulp
        assert (fused(tokens) - ref).abs().max() <= tol
        cache = KVCache.for_model(fused.config, 1, 16, dtype=dtype)
        fused(tokens[:, :11], cache=cache)
        cache.advance(11)
        step = fused(tokens[:, 11:], cache=cache)[0, -1]
    assert (step.float() - ref[0, -1].float()).abs().max() <= max(tol, 1e-4)
