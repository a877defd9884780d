"""The batched sampler (model/sampler.py): exact truncated distributions, batch-independent seeds,
penalties and log-probabilities, on both of its paths (CPU candidates, and the sorted CUDA path run
here on the CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from model.sampler import RowSettings, Sampler, apply_penalties, uniform

pytestmark = pytest.mark.usefixtures("one_thread")

V = 1000
SETTINGS = [
    RowSettings(temperature=1.5, top_p=0.5),
    RowSettings(temperature=1.0, top_k=20),
    RowSettings(temperature=1.3, top_k=50, top_p=0.8),
    RowSettings(temperature=1.0, min_p=0.1),
    RowSettings(temperature=2.0, min_p=0.02, top_p=0.9),
    RowSettings(temperature=3.0, top_p=0.95),  # a wide nucleus: hundreds of tokens
    RowSettings(temperature=0.8),  # no truncation: the whole vocabulary
]


def exact_distribution(logits: torch.Tensor, p: RowSettings) -> torch.Tensor:
    """The reference: sort the whole vocabulary, cut min-p, top-k, then top-p (renormalised), softmax."""
    x = logits.double() / p.temperature
    srt, order = torch.sort(x, descending=True)
    rank = torch.arange(len(x))
    keep = torch.ones(len(x), dtype=torch.bool)
    if p.min_p > 0:
        keep &= srt >= srt[0] + math.log(p.min_p)
    if p.top_k:
        keep &= rank < p.top_k
    probs = torch.softmax(srt.masked_fill(~keep, -math.inf), 0)
    if p.top_p < 1:
        keep &= (probs.cumsum(0) - probs < p.top_p) | (rank == 0)
    out = torch.zeros(len(x), dtype=torch.float64)
    out[order] = torch.softmax(srt.masked_fill(~keep, -math.inf), 0)
    return out


def chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    from scipy.stats import chisquare

    big = expected >= 5
    obs, exp = counts[big].tolist(), expected[big].tolist()
    small = ~big & (expected > 0)
    if small.any():
        obs.append(float(counts[small].sum()))
        exp.append(float(expected[small].sum()))
    return 1.0 if len(obs) < 2 else float(chisquare(obs, exp).pvalue)


@pytest.mark.parametrize("dense", [False, True], ids=["candidates", "sorted"])
@pytest.mark.parametrize("p", SETTINGS, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_10000_draws_match_the_exact_truncated_softmax(dense, p):
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 3
    sampler, n, batch = Sampler(dense=dense), 10_000, 2_000
    draws = []
    for start in range(0, n, batch):  # one row per draw: a fresh seed for each
        draws += sampler(
            logits[None].expand(batch, -1), [p] * batch, list(range(start, start + batch)), [3] * batch
        ).token_ids
    counts = torch.bincount(torch.tensor(draws), minlength=V).double()
    expected = exact_distribution(logits, p) * n
    assert counts[expected == 0].sum() == 0, "a token outside the truncated set was drawn"
    pvalue = chi_square_p(counts, expected)
    print(f"{p}: support {int((expected > 0).sum())}, chi-square p = {pvalue:.3f}")
    assert pvalue > 0.01


def test_a_row_draws_the_same_token_whatever_shares_its_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, V, generator=g) * 2
    rows = [
        RowSettings(temperature=1.0, top_p=0.9),
        RowSettings(temperature=0.0),
        RowSettings(temperature=1.2, top_k=40),
        RowSettings(temperature=0.9, min_p=0.05),
        RowSettings(temperature=1.0),
        RowSettings(temperature=0.7, top_p=0.5),
    ]
    seeds, steps = [11, 12, 13, 14, 15, 16], [0, 1, 2, 3, 4, 5]
    together = Sampler()(logits, rows, seeds, steps).token_ids
    alone = [
        Sampler()(logits[i : i + 1], rows[i : i + 1], seeds[i : i + 1], steps[i : i + 1]).token_ids[0] for i in range(6)
    ]
    assert together == alone
    assert together[1] == int(logits[1].argmax())
    # The draw is a function of (seed, step): another step of the same seed is another number.
    assert uniform(11, 0) != uniform(11, 1) and uniform(11, 0) == uniform(11, 0)


def test_penalties_follow_openai_and_ctrl():
    x = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    rows = [RowSettings(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)]
    got = apply_penalties(x, rows, prompts=[[2]], outputs=[[0, 0, 1]])
    # token 0: seen twice in the output -> 2 / 2 - 2 * 0.25 - 0.5; token 1: once -> -1 * 2 - 0.25 - 0.5;
    # token 2: in the prompt only -> 0.5 / 2 (no presence/frequency); token 3: untouched.
    assert torch.allclose(got, torch.tensor([[0.0, -2.75, 0.25, 3.0]]))


def test_logprobs_are_the_models_raw_log_softmax():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    rows = [RowSettings(logprobs=3), RowSettings(temperature=1.0, logprobs=0), RowSettings()]
    out = Sampler()(logits, rows, [1, 2, 3], [0, 0, 0])
    ref = logits.log_softmax(-1)
    first = out.logprobs[0]
    assert first.logprob == pytest.approx(float(ref[0, out.token_ids[0]]), abs=1e-5)
    assert [t for t, _ in first.top] == ref[0].topk(3).indices.tolist()
    assert [lp for _, lp in first.top] == pytest.approx(ref[0].topk(3).values.tolist(), abs=1e-5)
    assert out.logprobs[1].top == () and out.logprobs[1].logprob == pytest.approx(
        float(ref[1, out.token_ids[1]]), abs=1e-5
    )
    assert out.logprobs[2] is None
