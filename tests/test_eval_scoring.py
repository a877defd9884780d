"""The KV-cache scorer equals one plain forward per request: shared prefixes, forks, padding, truncation."""

from __future__ import annotations

import random

import pytest
import torch

from flows.eval.scoring import Scorer, acc_from_scores, reference_loglikelihood
from model.model import Transformer
from tests.tiny import random_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


class _Tok:
    bos_id, eos_id = 1, 2


def random_model(seed=0, **overrides) -> Transformer:
    return random_tiny(seed, vocab_size=97, **overrides)


def _requests(seed=0):
    """Three 'subjects' (long shared few-shot prefixes), zero-shot questions, 1- and multi-token choices."""
    rng = random.Random(seed)
    reqs = []
    for _subject in range(3):
        prefix = [rng.randrange(3, 97) for _ in range(rng.randrange(40, 70))]
        for _ in range(rng.randrange(3, 6)):
            ctx = prefix + [rng.randrange(3, 97) for _ in range(rng.randrange(1, 25))]
            for letter in range(4):
                reqs.append((ctx, [10 + letter]))
    for _ in range(4):  # no shared prefix, choices of 1-5 tokens (one shared context, several forks)
        ctx = [rng.randrange(3, 97) for _ in range(rng.randrange(1, 30))]
        for _ in range(3):
            reqs.append((ctx, [rng.randrange(3, 97) for _ in range(rng.randrange(1, 6))]))
    rng.shuffle(reqs)
    return reqs


@pytest.mark.parametrize("batch_size,share", [(1, False), (4, True), (64, True)])
def test_scorer_equals_plain_forward(batch_size, share):
    model = random_model()
    reqs = _requests()
    scorer = Scorer(model, _Tok(), batch_size=batch_size, share_prefix=share, min_prefix=16)
    got = scorer.loglikelihood_tokens(reqs)
    want = reference_loglikelihood(model, reqs, model.config.max_seq_len)
    for (g, gg), (w, wg) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
        assert gg == wg
    if share:
        # the three subjects' prefixes were computed once each, not once per question
        assert scorer.stats["prefix_tokens"] > 0
        contexts = {tuple(c) for c, _ in reqs}
        assert scorer.stats["forward_tokens"] < sum(len(c) for c in contexts)


@pytest.mark.parametrize("fused", [False, True], ids=["torch-attention", "fused"])
@pytest.mark.parametrize("pack_max_len,budget,attn_budget", [(1024, 8192, 2048), (8, 40, 2048), (1024, 8192, 30)])
def test_packed_rows_equal_plain_forward_and_the_fork_path(monkeypatch, pack_max_len, budget, attn_budget, fused):
    """Contexts in no family go through packed rows (a context and its continuations in one masked
    row, the rows laid end to end without padding); a short pack_max_len splits a context's
    continuations over several rows, a small budget makes batches of one row, a small attention
    budget splits a batch's attention into several padded groups (torch's SDPA path). A fused model
    on CPU in fp32 runs herd's ragged-attention kernel where it is available. All equal the plain
    forward and the KV-fork path."""
    from model import cpu_kernels

    model = random_model(seed=2)
    calls = []
    if fused:
        model.fuse_projections()
        kernel = cpu_kernels.ragged_attention
        monkeypatch.setattr("model.model.ragged_attention", lambda *a: calls.append(1) or kernel(*a))
    rng = random.Random(5)
    reqs = []
    for _ in range(6):
        ctx = [rng.randrange(3, 97) for _ in range(rng.randrange(1, 20))]
        for _ in range(rng.randrange(1, 5)):
            reqs.append((ctx, [rng.randrange(3, 97) for _ in range(rng.randrange(1, 12))]))
    packed = Scorer(
        model, _Tok(), share_prefix=False, pack_max_len=pack_max_len, token_budget=budget, attn_budget=attn_budget
    )
    got = packed.loglikelihood_tokens(reqs)
    forks = Scorer(model, _Tok(), share_prefix=False, pack=False).loglikelihood_tokens(reqs)
    want = reference_loglikelihood(model, reqs, model.config.max_seq_len)
    for (g, gg), (f, fg), (w, wg) in zip(got, forks, want):
        assert g == pytest.approx(w, abs=1e-4) and f == pytest.approx(w, abs=1e-4)
        assert gg == wg == fg
    if fused and ("ragged_attention", torch.float32) in cpu_kernels._library():
        assert calls, "the fused fp32 model on CPU should run the ragged-attention kernel"
    # every context ran once per row, not once per continuation
    assert (
        packed.stats["forward_tokens"]
        <= sum(len(c) for c in {tuple(c) for c, _ in reqs})
        + sum(len(x) - 1 for _, x in reqs)
        + (len(reqs) if pack_max_len < 20 else 0) * 20
    )


@pytest.mark.parametrize("rows,cols", [(512, 4096), (3, 7), (1, 97)])
def test_blocked_target_logprobs_equal_a_full_log_softmax(rows, cols):
    """The output projection in blocks of rows x vocabulary columns gives the log-probabilities and
    the greedy flags of one full log-softmax, the first of tied maxima counting as the argmax."""
    model = random_model(seed=4)
    scorer = Scorer(model, _Tok())
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, model.config.dim, generator=g)
    logits = torch.nn.functional.linear(hidden, model.output_weight)
    targets = torch.randint(0, 97, (11,), generator=g)
    targets[:4] = logits[:4].argmax(-1)  # greedy positions
    with torch.no_grad():  # a tie: entry 90 copies the projection row of position 4's argmax
        model.output_weight[90] = model.output_weight[int(logits[4].argmax())]
        logits = torch.nn.functional.linear(hidden, model.output_weight)
        targets[4] = 90  # tied with an earlier maximum: not the argmax
        ll, greedy = scorer._target_logprobs(hidden, targets, rows=rows, cols=cols)
    want = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(ll, want, rtol=0, atol=1e-5)
    assert greedy.tolist() == (logits.argmax(-1) == targets).tolist()
    assert greedy[:4].all() and not greedy[4]


def test_families_split_at_subject_boundaries():
    model = random_model()
    scorer = Scorer(model, _Tok(), batch_size=8, min_prefix=16)
    reqs = _requests(seed=3)
    scorer.loglikelihood_tokens(reqs)
    contexts = {tuple(c) for c, _ in reqs}
    # prefill of 3 prefixes (one per subject) plus every context's own suffix
    assert scorer.stats["forward_tokens"] < 0.6 * sum(len(c) for c in contexts)


def test_left_truncation_matches_lm_eval_rule():
    model = random_model(max_seq_len=32)
    rng = random.Random(1)
    reqs = [
        ([rng.randrange(3, 97) for _ in range(n)], [rng.randrange(3, 97) for _ in range(m)])
        for n, m in [(50, 1), (50, 3), (31, 2), (10, 1), (33, 1)]
    ]
    scorer = Scorer(model, _Tok(), batch_size=3)
    got = scorer.loglikelihood_tokens(reqs)
    want = reference_loglikelihood(model, reqs, 32)
    assert [g for g, _ in got] == pytest.approx([w for w, _ in want], abs=1e-4)
    assert scorer.stats["truncated"] == 3


def test_rolling_windows_predict_every_token_once():
    model = random_model(max_seq_len=16)
    scorer = Scorer(model, _Tok())
    tokens = list(range(3, 43))
    windows = scorer.rolling_windows(tokens, 16)
    assert [t for _, pred in windows for t in pred] == tokens
    assert windows[0][0][0] == 1  # the prefix token (BOS) conditions the first token
    assert all(len(ctx) + len(pred) <= 17 for ctx, pred in windows)
    # equal to lm-eval's own windows where lm-eval is installed
    lm_utils = pytest.importorskip("lm_eval.utils")
    theirs = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(tokens, 1, 16, 1)]
    assert windows == [(list(a), list(b)) for a, b in theirs]


def test_acc_norm_divides_by_characters():
    r = acc_from_scores([-4.0, -6.0], ["ab", "abcdef"], gold=1)
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0
