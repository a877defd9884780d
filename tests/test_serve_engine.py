"""The serving engine's pure core (no Ray): scheduler policy, continuous batching equals
one-at-a-time generation, chunked prefill, prefix caching, cancellation, sampling, detokenization."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch

from model.generate import SamplingParams, generate
from services.engine import ContextLengthError, EngineConfig, LLMEngine, QueueFullError
from services.engine.async_engine import AsyncLLMEngine
from services.engine.scheduler import Scheduler
from services.engine.sequence import Detokenizer, Sequence
from tests.tiny import random_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


# --- helpers -----------------------------------------------------------------------------------


def run_all(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    assert not engine.has_work()
    run_all.reasons = reasons
    return tokens


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Llama 3 model (sharp logits) with the real Llama 3 tokenizer."""
    from model.tokenizer import llama3_tokenizer

    return random_tiny(vocab_size=128256), llama3_tokenizer()


def prompts_of(n, vocab=5000, seed=0, lo=3, hi=60):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(10, vocab, (L,), generator=g).tolist() for L in lengths]


# --- scheduler (no model) ----------------------------------------------------------------------


def seq(rid, prompt, max_tokens=4):
    return Sequence(rid, list(prompt), SamplingParams(max_tokens=max_tokens))


def fake_step(sched: Scheduler, plan):
    """What the engine does after a forward: tokens computed, one sampled token per finished prompt."""
    sched.step_done(plan)
    for s in plan.decode:
        s.output_ids.append(7)
    for s, _, end in plan.prefill:
        if end == len(s.prompt_ids):
            s.output_ids.append(7)


def test_scheduler_chunks_long_prompts_and_interleaves_decode():
    sched = Scheduler(EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, prefill_chunk=32, block_size=16))
    short, long_ = seq("a", range(100, 110)), seq("b", range(200, 300))
    sched.add(short)
    sched.add(long_)
    plan = sched.schedule()
    assert [(s.request_id, a, b) for s, a, b in plan.prefill] == [("a", 0, 10), ("b", 0, 32)]
    fake_step(sched, plan)
    plan = sched.schedule()  # a decodes while b keeps prefilling, within the 64-token budget
    assert [s.request_id for s in plan.decode] == ["a"]
    assert [(s.request_id, a, b) for s, a, b in plan.prefill] == [("b", 32, 64)]
    assert plan.num_tokens <= 64
    fake_step(sched, plan)
    # A request arriving mid-way is admitted at the next step.
    sched.add(seq("c", range(5)))
    plan = sched.schedule()
    assert {s.request_id for s, _, _ in plan.prefill} == {"b", "c"}


def test_scheduler_admits_only_into_free_slots_and_frees_on_abort():
    sched = Scheduler(EngineConfig(max_num_seqs=2))
    seqs = [seq(str(i), [1, 2, 3]) for i in range(3)]
    for s in seqs:
        sched.add(s)
    sched.schedule()
    assert [s.slot for s in seqs] == [0, 1, None] and len(sched.waiting) == 1
    held = sched.pool.num_used
    assert sched.free(seqs[0]) == 0 and sched.pool.num_used == held - len(seqs[0].blocks or [1])
    sched.schedule()
    assert seqs[2].slot == 0 and sched.num_free_slots == 0


def test_admission_waits_for_blocks_not_slots():
    """Memory is blocks of live tokens: 8 slots, but a pool of 6 blocks of 4 tokens holds two requests
    of 3 + 8 tokens (3 blocks each) at a time; the others wait until blocks come back."""
    sched = Scheduler(EngineConfig(max_num_seqs=8, block_size=4, num_blocks=7, enable_prefix_caching=False))
    seqs = [seq(str(i), [10 + i, 11, 12], max_tokens=8) for i in range(4)]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert [s.request_id for s, _, _ in plan.prefill] == ["0", "1"] and len(sched.waiting) == 2
    fake_step(sched, plan)
    sched.free(seqs[0])
    plan = sched.schedule()
    assert seqs[2].slot is not None and seqs[3].slot is None


def test_prefix_cache_shares_blocks_and_copies_on_write():
    cfg = EngineConfig(max_num_seqs=4, block_size=4, max_num_batched_tokens=1000, prefill_chunk=1000)
    sched = Scheduler(cfg)
    system = list(range(1000, 1010))  # 10 tokens: 2 full blocks of 4
    a = seq("a", system + [1, 2, 3])
    sched.add(a)
    fake_step(sched, sched.schedule())
    b = seq("b", system + [4, 5])  # a is running: b holds a's first 2 blocks too
    sched.add(b)
    plan = sched.schedule()
    assert b.num_cached == 8 and b.blocks[:2] == a.blocks[:2] and plan.copies == []
    assert [(s.request_id, x, y) for s, x, y in plan.prefill] == [("b", 8, 12)]
    assert sched.pool.refs[a.blocks[0]] == 2
    fake_step(sched, plan)
    sched.free(a)
    c = seq("c", system + [1, 2, 3, 9])  # a's freed blocks stay cached: 12 of its 13 tokens come back
    sched.add(c)
    plan = sched.schedule()
    assert c.num_cached == 12 and c.blocks[:3] == a_blocks(sched, system + [1, 2]) and plan.copies == []
    assert sched.cached_tokens == 20 and sched.prompt_tokens == 13 + 12 + 14
    # A prompt that is entirely cached still computes its last token, in a copy of its last block.
    fake_step(sched, plan)
    d = seq("d", system[:8])
    sched.add(d)
    plan = sched.schedule()
    assert d.num_cached == 7 and plan.prefill[-1][1:] == (7, 8)
    assert plan.copies == [(c.blocks[1], d.blocks[1])] and d.blocks[0] == c.blocks[0]


def a_blocks(sched, tokens):
    return [e.block for e in sched.pool.match(tokens, None, len(tokens) // sched.bs)]


def test_a_prefix_hit_that_would_not_fit_is_computed_instead():
    """One slot, a cache of exactly one request: the repeated prompt's cached block plus its copy would
    need three blocks; admission computes the prompt again in two rather than wait forever."""
    sched = Scheduler(
        EngineConfig(max_num_seqs=1, block_size=4, max_model_len=8, max_num_batched_tokens=100, prefill_chunk=100)
    )
    first = seq("a", [5, 6, 7, 8], max_tokens=4)
    sched.add(first)
    fake_step(sched, sched.schedule())
    sched.free(first)
    again = seq("b", [5, 6, 7, 8], max_tokens=4)
    sched.add(again)
    plan = sched.schedule()
    assert again.slot == 0 and again.num_cached == 0 and plan.prefill[0][1:] == (0, 4)


def test_prefix_cache_compares_tokens_and_salt(monkeypatch):
    """Even when every block hashes alike, a lookup only matches equal tokens under an equal salt."""
    import services.engine.blocks as blocks

    monkeypatch.setattr(blocks, "block_hash", lambda parent, salt, tokens: 0)
    sched = Scheduler(EngineConfig(max_num_seqs=4, block_size=4, max_num_batched_tokens=1000, prefill_chunk=1000))
    a = seq("a", list(range(100, 113)))
    sched.add(a)
    fake_step(sched, sched.schedule())
    other = seq("other", list(range(200, 213)))  # same bucket, other tokens: no hit
    salted = seq("salted", list(range(100, 113)))
    salted.cache_salt = "tenant-b"  # same tokens, another tenant: no hit
    same = seq("same", list(range(100, 113)))
    for s in (other, salted, same):
        sched.add(s)
    sched.schedule()
    assert (other.num_cached, salted.num_cached, same.num_cached) == (0, 0, 12)


# --- engine on a tiny random model -------------------------------------------------------------


def reference(model, tok, prompt, max_tokens):
    return generate(model, [prompt], SamplingParams(max_tokens=max_tokens), tok)[0].token_ids


def test_continuous_batching_equals_one_at_a_time_tiny(tiny):
    model, tok = tiny
    prompts = prompts_of(12, seed=1)
    lengths = [5 + 3 * i for i in range(12)]
    engine = LLMEngine(
        model,
        tok,
        EngineConfig(max_num_seqs=5, max_model_len=256, max_num_batched_tokens=40, prefill_chunk=16, block_size=4),
    )
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add_request(p, SamplingParams(max_tokens=n), f"r{i}")
    got = run_all(engine)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert got.get(f"r{i}", []) == reference(model, tok, p, n), i


def test_prefix_cache_hits_give_the_same_tokens(tiny):
    model, tok = tiny
    system = prompts_of(1, seed=3, lo=40, hi=41)[0]
    prompts = [system + p for p in prompts_of(6, seed=4, lo=2, hi=9)]
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=3, max_model_len=256, block_size=8))
    engine.add_request(prompts[0], SamplingParams(max_tokens=6), "r0")
    first = engine.step()  # the shared prefix is computed once; later arrivals reuse it
    for i, p in enumerate(prompts[1:], 1):
        engine.add_request(p, SamplingParams(max_tokens=6), f"r{i}")
    got = run_all(engine)
    got["r0"] = first[0].token_ids + got["r0"]
    snap = engine.snapshot()
    assert snap["cached_tokens"] >= 5 * 40 and snap["hit_rate"] > 0.7, snap
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == reference(model, tok, p, 6), i


def test_prefix_hits_under_colliding_hashes_equal_a_cold_cache(tiny, monkeypatch):
    """Every block hash patched to one value: prompts that share some blocks, and prompts that share
    none, give exactly the tokens of an engine without prefix caching."""
    import services.engine.blocks as blocks

    model, tok = tiny
    system = prompts_of(1, seed=5, lo=24, hi=25)[0]
    prompts = [system + p for p in prompts_of(4, seed=6, lo=1, hi=12)] + prompts_of(4, seed=7, lo=20, hi=40)
    prompts.append(system[:16])  # wholly cached: its last block is copied before the write

    def run(caching):
        engine = LLMEngine(
            model, tok, EngineConfig(max_num_seqs=3, max_model_len=128, block_size=8, enable_prefix_caching=caching)
        )
        for i, p in enumerate(prompts):
            engine.add_request(p, SamplingParams(max_tokens=8), f"r{i}")
        return run_all(engine), engine.snapshot()

    cold, _ = run(False)
    monkeypatch.setattr(blocks, "block_hash", lambda parent, salt, tokens: 0)
    warm, snap = run(True)
    assert snap["cached_tokens"] >= 24 + 15, snap  # r3 hits the system prompt, the last prompt 15 of its 16
    assert warm == cold


def test_cache_salt_keeps_tenants_apart(tiny):
    model, tok = tiny
    prompt = prompts_of(1, seed=8, lo=40, hi=41)[0]
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=2, max_model_len=128, block_size=8))
    engine.add_request(prompt, SamplingParams(max_tokens=2), "a", cache_salt="tenant-a")
    run_all(engine)
    engine.add_request(prompt, SamplingParams(max_tokens=2), "b", cache_salt="tenant-b")
    run_all(engine)
    assert engine.snapshot()["cached_tokens"] == 0
    engine.add_request(prompt, SamplingParams(max_tokens=2), "a2", cache_salt="tenant-a")
    run_all(engine)
    assert engine.snapshot()["cached_tokens"] == 39  # all 40 but the last, recomputed in a copied block


def test_abort_frees_the_slot_at_once(tiny):
    model, tok = tiny
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=2, max_model_len=128))
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=50), "a")
    engine.add_request([8, 9], SamplingParams(max_tokens=50), "b")
    engine.add_request([10, 11], SamplingParams(max_tokens=5), "c")  # waits for a slot
    engine.step()
    engine.step()
    assert engine.snapshot()["slots_used"] == 2 and engine.num_waiting == 1
    held = engine.scheduler.pool.num_used
    assert engine.abort("a") and engine.snapshot()["slots_used"] == 1
    assert engine.scheduler.pool.num_used < held
    assert engine.abort("c") is False or engine.num_waiting == 0
    engine.abort("b")
    assert not engine.has_work() and engine.snapshot()["kv_usage"] == 0
    assert engine.metrics.aborted >= 2


def test_limits_context_and_queue(tiny):
    model, tok = tiny
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=1, max_model_len=64, max_queue=1))
    with pytest.raises(ContextLengthError, match="maximum context length is 64"):
        engine.add_request(list(range(10, 60)), SamplingParams(max_tokens=15))
    engine.add_request([1, 2], SamplingParams(max_tokens=2))
    engine.step()  # admitted to the one slot
    engine.add_request([1, 2], SamplingParams(max_tokens=2))  # the one queue place
    with pytest.raises(QueueFullError):
        engine.add_request([1, 2], SamplingParams(max_tokens=2))


class SlowAdmission(LLMEngine):
    """The real engine, slow to queue a request: the engine thread spends a while between taking
    requests from the hand-over and the scheduler counting them as waiting."""

    def add_request(self, *args, **kwargs):
        time.sleep(0.01)
        return super().add_request(*args, **kwargs)


def test_async_bound_counts_requests_in_hand_over(tiny):
    """A flood past the bound is refused at submit, while the engine thread is still queuing the
    first ones: exactly the excess is refused, and no admitted request fails later for capacity."""
    model, tok = tiny
    config = EngineConfig(max_num_seqs=4, max_model_len=64, max_queue=4)
    engine = AsyncLLMEngine(SlowAdmission(model, tok, config))

    async def flood():
        refused, queues = 0, []
        for i in range(config.max_in_flight + 20):
            try:
                queues.append(engine.submit([5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True), f"r{i}"))
            except QueueFullError:
                refused += 1
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.2)  # every admitted request is in the engine now, none has finished
        late = [o for q in queues for o in (q.get_nowait() for _ in range(q.qsize())) if isinstance(o, Exception)]
        return refused, len(queues), late

    try:
        refused, admitted, late = asyncio.run(flood())
    finally:
        engine.shutdown()
    assert (refused, admitted, late) == (20, config.max_in_flight, [])
    assert engine.metrics.rejected == 20


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    model, tok = tiny
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=123)
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=4, max_model_len=128))
    engine.add_request([5, 6, 7], p, "alone")
    alone = run_all(engine)["alone"]
    for i in range(4):
        engine.add_request([5, 6, 7] if i != 2 else [9, 9], dataclasses.replace(p, seed=123 if i != 2 else 7), f"r{i}")
    got = run_all(engine)
    assert got["r0"] == got["r1"] == got["r3"] == alone
    assert got["r2"] != alone


def test_stop_ids_and_stop_strings(tiny):
    model, tok = tiny
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=2, max_model_len=128))
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=20), "free")
    free = run_all(engine)["free"]
    stop_tok = free[4]
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=20, stop_ids=(stop_tok,)), "ids")
    got = run_all(engine)
    assert got["ids"] == free[: free.index(stop_tok)] and run_all.reasons["ids"] == "stop"
    text = tok.decode(free)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=20, stop_strings=(stop,)), "str")
    pieces = []
    while engine.has_work():
        for o in engine.step():
            pieces.append(o.text)
            reason = o.finish_reason
    assert "".join(pieces) == text[: text.find(stop)] and reason == "stop"


def test_ignore_eos_runs_past_the_models_stop_ids(tiny):
    model, tok = tiny
    prompt = [5, 6, 7]
    free = reference(model, tok, prompt, 20)
    eos = free[4]
    saved = model.config
    model.config = dataclasses.replace(saved, eos_token_ids=(eos,))  # greedy now meets an EOS at step 5
    try:
        engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=2, max_model_len=128))
        engine.add_request(prompt, SamplingParams(max_tokens=20), "eos")
        engine.add_request(prompt, SamplingParams(max_tokens=20, ignore_eos=True), "ignored")
        got = run_all(engine)
        assert got["eos"] == free[: free.index(eos)] and run_all.reasons["eos"] == "stop"
        assert got["ignored"] == free and run_all.reasons["ignored"] == "length"
        plain = generate(model, [prompt], SamplingParams(max_tokens=20))[0]
        assert plain.token_ids == free[: free.index(eos)] and plain.stop_token_id == eos
        past = generate(model, [prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0]
        assert past.token_ids == free and past.finish_reason == "length"
    finally:
        model.config = saved


def test_detokenizer_joins_utf8_split_across_tokens():
    from model.tokenizer import llama3_tokenizer

    tok = llama3_tokenizer()
    text = "naïve café 日本語 🦙 done"
    raw = text.encode()
    # Byte-level tokens: feed one byte per token so every multi-byte character is split.
    byte_ids = [tok.encode(bytes([b]).decode("latin-1"))[0] for b in raw]  # placeholder ids
    del byte_ids
    ids = tok.encode(text)
    d = Detokenizer(tok)
    deltas = [d.add(i)[0] for i in ids] + [d.flush()]
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)
    # The emoji alone is 2+ tokens in Llama 3: no delta holds half a character.
    emoji_ids = tok.encode("🦙")
    assert len(emoji_ids) >= 2
    d = Detokenizer(tok)
    deltas = [d.add(i)[0] for i in emoji_ids]
    assert deltas[:-1] == [""] * (len(emoji_ids) - 1) and deltas[-1] == "🦙"


def test_detokenizer_holds_back_a_partial_stop_string():
    from model.tokenizer import llama3_tokenizer

    tok = llama3_tokenizer()
    d = Detokenizer(tok, ("END",))
    out = [d.add(i)[0] for i in tok.encode("abc EN")]
    assert "".join(out) == "abc "  # " EN" may begin "END"
    new, stopped = d.add(tok.encode("D")[0])
    assert stopped and new == ""


# --- the acceptance check: SmolLM2, 16 concurrent greedy requests ------------------------------


@pytest.mark.slow
def test_16_concurrent_greedy_requests_equal_one_at_a_time(smollm2):
    model, tok = smollm2
    questions = [
        "What is the capital of France?",
        "Name three primary colors.",
        "Count from 1 to 10.",
        "Write a haiku about the sea.",
        "What is 12 times 12?",
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
        "Say hello.",
    ]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    max_tokens = [6 + 2 * i for i in range(16)]
    engine = LLMEngine(
        model, tok, EngineConfig(max_num_seqs=16, max_model_len=512, max_num_batched_tokens=128, prefill_chunk=32)
    )
    t = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(p, SamplingParams(max_tokens=n), f"r{i}")
    got = run_all(engine)
    batched_s = time.perf_counter() - t
    t = time.perf_counter()
    want = [generate(model, [p], SamplingParams(max_tokens=n), tok)[0].token_ids for p, n in zip(prompts, max_tokens)]
    single_s = time.perf_counter() - t
    same = sum(got[f"r{i}"] == w for i, w in enumerate(want))
    n_tok = sum(len(w) for w in want)
    print(
        f"16 concurrent greedy requests: {same}/16 identical to one-at-a-time, {n_tok} tokens; "
        f"batched {batched_s:.1f} s vs one-at-a-time {single_s:.1f} s"
    )
    for i, w in enumerate(want):
        assert got[f"r{i}"] == w, (i, tok.decode(got[f"r{i}"]), tok.decode(w))
