"""The quality classifier: its pure parts, the shipped head's ranking, and the judge's batched
prompt-prefix rating against one plain forward per document."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.data import quality
from flows.data.quality_judge import PROMPTS, prompt_sha256

HEAD = Path(quality.__file__).parent / "assets" / "quality_head.npz"

EDUCATIONAL = (
    "Photosynthesis is the process by which green plants turn light energy into chemical energy. "
    "In the chloroplasts, chlorophyll absorbs sunlight, and the plant uses that energy to combine carbon "
    "dioxide from the air with water from the soil, making glucose and releasing oxygen. The glucose is "
    "stored as starch or used to build cellulose for new cell walls. Because almost every food chain starts "
    "with a plant, photosynthesis is the source of the energy that animals, including people, depend on."
)
BOILERPLATE = (
    "We use cookies to improve your experience and personalise ads. By clicking Accept All you consent to "
    "our use of cookies. Cookie settings | Reject non-essential\nHome | About Us | Contact | Shop | Cart | "
    "Login | Register | Sitemap | Privacy Policy | Terms of Service\n(c) 2024 ShopNow. All rights reserved. "
    "In no event shall ShopNow be liable for any indirect or consequential damages."
)
SPAM = (
    "BUY NOW!!! Limited time offer! Cheap watches best price guaranteed! Click here to claim your FREE iPhone! "
    "Hot singles in your area! Win $1000 today casino bonus! Earn money from home $$$ visit www.bestdeals.biz now"
)


def test_metrics_and_split():
    y = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert quality.spearman(y, y**2) == pytest.approx(1.0)
    assert quality.auc(y >= 3, y) == 1.0 and quality.auc(y >= 3, -y) == 0.0
    assert np.isnan(quality.auc(y >= 9, y))  # one class: no ranking to measure
    keys = [f"doc{i}" for i in range(2000)]
    held = quality.heldout_split(keys, 0.2, 0)
    assert 0.17 < held.mean() < 0.23
    assert np.array_equal(held[::-1], quality.heldout_split(keys[::-1], 0.2, 0))  # per key, not per position


def test_hashed_head_fits_saves_and_loads(tmp_path):
    texts = [f"lesson {i}: the cell membrane controls what enters and leaves the cell" for i in range(20)]
    texts += [f"buy cheap pills now click here offer {i}" for i in range(20)]
    y = np.array([4.0] * 20 + [0.5] * 20)
    feat = quality.Featurizer("hashed", n_features=1 << 12)
    head = quality.fit_head(feat(texts), y, "hashed", 0.1, 128, 1 << 12, {"made_by": "test"})
    loaded = quality.QualityHead.load(head.save(tmp_path / "h.npz"))
    assert loaded.features == "hashed" and loaded.meta == {"made_by": "test"} and loaded.n_features == 1 << 12
    scores = quality.QualityClassifier(loaded)(["the cell membrane controls transport", "cheap pills click here"])
    assert scores[0] > 3 and scores[1] < 1.5
    with pytest.raises(Exception, match="quality head not found"):
        quality.QualityHead.load(tmp_path / "missing.npz")


def test_prompt_digests_differ_and_are_stable():
    digests = {p: prompt_sha256(p) for p in PROMPTS}
    assert len(set(digests.values())) == len(PROMPTS)
    assert digests == {p: prompt_sha256(p) for p in PROMPTS}


@pytest.mark.slow
def test_shipped_head_ranks_education_above_boilerplate_and_spam():
    """The head bench/quality trained on SmolLM2's ratings (its meta says how, on how many documents)."""
    head = quality.QualityHead.load(HEAD)
    assert head.meta["prompt_sha256"] == prompt_sha256("fineweb_edu")
    print(f"head made by {head.meta['made_by']} from {head.meta['rated']} rated documents")
    edu, boiler, spam = quality.QualityClassifier(head)([EDUCATIONAL, BOILERPLATE, SPAM])
    print(f"educational {edu:.3f}  boilerplate {boiler:.3f}  spam {spam:.3f}  threshold {head.meta['threshold']}")
    assert edu > boiler and edu > spam


@pytest.mark.acceptance  # three plain forwards over the ~700-token few-shot prompt: minutes on a busy 2-core box
def test_judge_batched_prefix_rating_matches_plain_forward(smollm2_dir, one_thread):
    """Cached rubric prefix + right-padded batch == a full forward per document, renormalised over 0-5."""
    import torch

    from flows.data.quality_judge import EduJudge, JudgeConfig, prompt_messages

    judge = EduJudge(smollm2_dir, JudgeConfig(max_tokens=24, batch_size=2))
    docs = [EDUCATIONAL, SPAM, BOILERPLATE]  # 3 docs, batch 2: a full batch and a partial one
    got = judge(docs)
    for doc, r in zip(docs, got):
        ids = judge.tok.encode(" ".join(doc.split()))[:24]
        full = judge.tok.encode_chat(prompt_messages("fineweb_edu", judge.tok.decode(ids).strip())) + judge.answer
        with torch.inference_mode():
            logits = judge.model(torch.tensor([full]), last_only=True)[0, -1]
        p = torch.softmax(logits[judge.digit_ids].double(), -1).numpy()
        assert r == pytest.approx(float(p @ np.arange(6)), abs=1e-4)
    assert np.all((got >= 0) & (got <= 5))
