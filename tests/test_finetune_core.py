"""Post-training core: loss formulas, assistant-only masking, packing, bad-data accounting, LoRA, GAE.
Fast: fixed tensors, a tiny random model, tokenizers only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flows.finetune import chat
from flows.finetune import tasks as T
from flows.finetune.common import sequence_logps, token_logps
from flows.finetune.dpo import dpo_loss
from tests.tiny import random_tiny

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def llama3_tok():
    from model.tokenizer import load_tokenizer

    return load_tokenizer("llama3")


@pytest.fixture(scope="module")
def tiny():
    return random_tiny(std=0.02, vocab_size=512, max_seq_len=128)


# --- loss formulas ------------------------------------------------------------------------------


def test_dpo_loss_matches_formula_on_fixed_tensors():
    pi_c = torch.tensor([-12.5, -3.25, -40.0, -7.0], dtype=torch.float64)
    pi_r = torch.tensor([-13.0, -2.0, -39.5, -9.5], dtype=torch.float64)
    ref_c = torch.tensor([-12.0, -3.0, -41.0, -8.0], dtype=torch.float64)
    ref_r = torch.tensor([-12.75, -2.5, -40.0, -8.0], dtype=torch.float64)
    for beta in (0.1, 0.5):
        got = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
        import math

        want = [
            -math.log(1 / (1 + math.exp(-beta * ((a - b) - (c - d)))))
            for a, b, c, d in zip(pi_c.tolist(), pi_r.tolist(), ref_c.tolist(), ref_r.tolist())
        ]
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)
    # default beta in the config is 0.1
    from flows.finetune.config import FinetuneConfig

    assert FinetuneConfig().dpo.beta == 0.1


def test_sequence_logps_match_manual_sum(tiny):
    torch.manual_seed(1)
    tokens = torch.randint(0, 512, (3, 10))
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 4:] = True
    mask[1, 6:9] = True
    mask[2, 1:] = True
    got = sequence_logps(tiny, tokens, mask)
    with torch.no_grad():
        logits = tiny(tokens).double()
    logp = torch.log_softmax(logits, -1)
    want = torch.zeros(3, dtype=torch.float64)
    for b in range(3):
        for t in range(1, 10):
            if mask[b, t]:
                want[b] += logp[b, t - 1, tokens[b, t]]
    assert torch.allclose(got.double(), want, atol=1e-4)  # fp32 model, sums of ~9 terms
    # and the full DPO pipeline on these log-probs against the closed form
    pi_c, pi_r = got[:1].double(), got[1:2].double()
    ref_c, ref_r = torch.tensor([-50.0], dtype=torch.float64), torch.tensor([-30.0], dtype=torch.float64)
    loss = dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.1)
    manual = -F.logsigmoid(0.1 * ((want[0] - want[1]) - (-50.0 + 30.0)))
    assert abs(loss.item() - manual.item()) < 1e-5


def test_token_logps_ignores_negative_targets():
    logits = torch.randn(1, 3, 7)
    out = token_logps(logits, torch.tensor([[1, -1, 2]]))
    assert out[0, 1] == 0 and out[0, 0] < 0


def test_repeated_prompts_share_one_prefill(tiny):
    """Group sampling (GRPO, rejection sampling) prefills a repeated prompt once: the copies decode
    exactly as the prompt alone does, and sample independently."""
    from model.generate import SamplingParams, generate

    p, q = [5, 6, 7, 8], [9, 10, 11]
    greedy = SamplingParams(max_tokens=5)
    alone = {tuple(x): generate(tiny, [x], greedy)[0].token_ids for x in (p, q)}
    prefills = []

    def count_prefill(_module, args):
        if args[0].shape[1] > 1:  # decode steps feed one token per row
            prefills.append(args[0].shape[1])

    hook = tiny.register_forward_pre_hook(count_prefill)
    try:
        batch = generate(tiny, [p, p, q, p], greedy)
    finally:
        hook.remove()
    assert prefills == [len(p), len(q)]  # one prefill per distinct prompt
    assert [g.token_ids for g in batch] == [alone[tuple(p)], alone[tuple(p)], alone[tuple(q)], alone[tuple(p)]]
    sampled = generate(tiny, [p] * 4, SamplingParams(temperature=1.0, max_tokens=5, seed=0))
    assert len({tuple(g.token_ids) for g in sampled}) > 1


# --- masking -------------------------------------------------------------------------------------

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "It is 6."},
]


def _assistant_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_sft_mask_is_exactly_assistant_tokens_llama3(llama3_tok):
    tok = llama3_tok
    ids, mask = chat.format_conversation(tok, CONV)
    assert ids == tok.encode_chat(CONV, add_generation_prompt=False)
    eot = "<|eot_id|>"
    assert _assistant_text(tok, ids, mask) == f"4{eot}It is 6.{eot}"
    # the unmasked part is everything else: headers, system, user turns
    rest = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "What is 2 + 2?" in rest and "assistant" in rest and "4" not in rest.replace("<|", "")
    # through packing and shifting: the loss targets are exactly those tokens
    batch = chat.rows_to_batch(chat.pack([chat.Example(ids, mask)], len(ids) + 5, 0), 1.0)
    targets = batch.targets[0]
    assert tok.decode(targets[targets >= 0].tolist()) == f"4{eot}It is 6.{eot}"
    assert int((batch.weights > 0).sum()) == sum(mask)


def test_sft_mask_is_exactly_assistant_tokens_chatml():
    from model.assets import smollm2_gguf_path
    from model.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(str(smollm2_gguf_path()))
    except Exception as e:  # pragma: no cover
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")
    ids, mask = chat.format_conversation(tok, CONV)
    assert "<|im_start|>assistant\n" in tok.decode(ids)
    assert _assistant_text(tok, ids, mask) == "4<|im_end|>It is 6.<|im_end|>"


def test_packing_keeps_documents_apart(tiny, llama3_tok):
    """Loss on a packed row (document masking) equals the sum over the conversations alone."""
    from flows.train.losses import causal_lm_loss

    exs = []
    for a in ("1", "22", "333"):
        ids = [5, 6, 7, 8] + [10 + len(a)] * len(a) + [3]
        exs.append(chat.Example(ids, [False] * 4 + [True] * (len(a) + 1)))
    rows = chat.pack(exs, 40, 0)
    assert len(rows) == 1 and rows[0][1][:7] == [0, 1, 2, 3, 4, 5, 0]
    with torch.no_grad():
        packed = causal_lm_loss(tiny, chat.rows_to_batch(rows, 1.0))
        alone = sum(causal_lm_loss(tiny, chat.rows_to_batch(chat.pack([e], len(e.ids), 0), 1.0)).loss for e in exs)
    assert packed.count == sum(sum(e.mask[1:]) for e in exs)
    assert torch.allclose(packed.loss, alone, atol=1e-4)


# --- bad data --------------------------------------------------------------------------------------


def test_bad_data_is_counted_not_raised(tmp_path, llama3_tok):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [
        json.dumps(good),
        json.dumps({"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}),
        json.dumps({"messages": [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "ok"}]}),
        json.dumps({"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        "{not json",
        json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}),
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
        json.dumps({"weird": 1}),
    ]
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    convs, counts = chat.load_conversations([p])
    exs = chat.tokenize_conversations(llama3_tok, convs, 128, counts)
    r = counts.report()
    assert r["read"] == 9 and r["kept"] == 3 == len(exs)
    assert r["dropped"] == {
        "format:empty_assistant": 1,
        "format:missing_role": 1,
        "format:bad_role": 1,
        "length:over_context": 1,
        "read:bad_json": 1,
        "format:unknown": 1,
    }
    assert r["kept"] + r["dropped_total"] == r["read"]


def test_pair_loaders_and_bad_pairs(tmp_path):
    recs = [
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        },
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        {"prompt": "q", "chosen": "a", "rejected": ""},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
    ]
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))
    pairs, counts = chat.load_pairs([p])
    assert len(pairs) == 2 and pairs[1]["prompt"] == [{"role": "user", "content": "hi"}]
    assert pairs[1]["chosen"] == "hello" and pairs[1]["rejected"] == "go away"
    assert counts.report()["dropped"] == {"format:empty_assistant": 1, "format:identical_pair": 1}


def test_bad_pairs_missing_roles_and_over_context_are_counted(tmp_path, llama3_tok):
    from flows.finetune.dpo import tokenize_pairs

    recs = [
        {"prompt": [{"content": "no role"}], "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": None, "rejected": "b"},
        {"prompt": "short", "chosen": "yes", "rejected": "no"},
        {"prompt": "long " * 300, "chosen": "yes", "rejected": "no"},
    ]
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))
    pairs, counts = chat.load_pairs([p])
    toks = tokenize_pairs(llama3_tok, pairs, 128, counts)
    r = counts.report()
    assert len(toks) == 1 == r["kept"] and r["read"] == 4
    assert r["dropped"] == {"format:missing_role": 1, "format:missing_response": 1, "length:over_context": 1}
    # the kept pair's masks cover exactly its two replies (and their end-of-turn token)
    (c, rj), (mc, mr) = toks[0].tokens, toks[0].masks
    eot = "<|eot_id|>"
    assert llama3_tok.decode([t for t, m in zip(c, mc) if m]) == f"yes{eot}"
    assert llama3_tok.decode([t for t, m in zip(rj, mr) if m]) == f"no{eot}"


def test_shared_samples_load():
    if not SHARED.is_dir():
        print(f"skip: shared data not found at {SHARED}")
        pytest.skip(f"shared data not found at {SHARED}")
    convs, c1 = chat.load_conversations([SHARED / "sft" / "alpaca_en_demo.json"])
    # the sealed eval set's sources (flows/heldout.py) never reach training: ~30% of the shared records
    assert 250 < c1.dropped["heldout:eval_set"] < 350 and len(convs) > 650
    assert c1.read == len(convs) + sum(c1.dropped.values())
    pairs, c2 = chat.load_pairs([SHARED / "preference" / "dpo_en_demo.json"])
    assert len(pairs) > 200 and c2.dropped["heldout:eval_set"] > 50
    hh, c3 = chat.load_pairs([SHARED / "preference" / "hh-rlhf_harmless-base_test.jsonl"], limit=200)
    assert len(hh) == 200


# --- tasks, LoRA, GAE ----------------------------------------------------------------------------------


def test_embedded_tasks_are_deterministic_and_checkable():
    a, b = T.generate_tasks(50, 0), T.generate_tasks(50, 0)
    assert a == b and {t["kind"] for t in a} == set(T.KINDS)
    held = {t["prompt"] for t in T.generate_tasks(48, 0, split="heldout")}
    assert not held & {t["prompt"] for t in T.generate_tasks(500, 0)}
    t = {"prompt": "What is 2 + 3?", "answer": "5"}
    assert T.check(t, " 5.") == 1.0 and T.check(t, "The answer is 5.") == 0.5 and T.check(t, "15") == 0.0


def test_lora_merge_equals_wrapped_forward(tiny):
    import copy

    from flows.finetune.lora import LoRALinear, apply_lora, merge_lora

    m = copy.deepcopy(tiny)
    n = apply_lora(m, rank=4, alpha=8.0, targets=["wq", "wv", "w2"])
    assert n > 0 and all(not p.requires_grad for k, p in m.named_parameters() if "lora_" not in k)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_b.normal_(0, 0.05)
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        wrapped = m(x)
        merge_lora(m)
        merged = m(x)
    assert set(m.state_dict()) == set(tiny.state_dict())
    assert torch.allclose(wrapped, merged, atol=1e-4)


def test_gae_matches_reference_loop():
    from flows.finetune.ppo import gae

    torch.manual_seed(0)
    r, v = torch.randn(2, 6), torch.randn(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    adv, ret = gae(r, v, mask, 0.9, 0.8)
    for b in range(2):
        idx = [t for t in range(6) if mask[b, t]]
        last, want = 0.0, {}
        for k in reversed(range(len(idx))):
            t = idx[k]
            nv = v[b, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            delta = r[b, t].item() + 0.9 * nv - v[b, t].item()
            last = delta + 0.9 * 0.8 * last
            want[t] = last
        for t in range(6):
            assert abs(adv[b, t].item() - want.get(t, 0.0)) < 1e-5
    assert torch.allclose(ret[mask], (adv + v)[mask])


def test_config_errors_name_the_key(tmp_path):
    from flows.finetune.config import load_config
    from model.errors import HerdError

    p = tmp_path / "c.yaml"
    p.write_text("dpo:\n  betta: 0.2\n")
    with pytest.raises(HerdError, match="dpo.betta"):
        load_config(p)
    p.write_text("train:\n  steps: many\n")
    with pytest.raises(HerdError, match="train.steps"):
        load_config(p)
    for name in ("sft", "rs", "dpo", "ppo", "grpo"):
        path = Path(__file__).resolve().parents[1] / "configs" / "finetune" / f"{name}.yaml"
        if path.exists():
            load_config(path)


def test_cli_registers_finetune():
    import argparse

    from flows.finetune.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for stage in ("sft", "rs", "dpo", "ppo"):
        args = parser.parse_args(["finetune", stage, "--config", "configs/finetune/x.yaml"])
        assert args.stage == stage and args.config == "configs/finetune/x.yaml"
