"""bench/eval's merge of per-subject MMLU reports into group and total reports."""

import pytest

from bench.eval import merge_rows


def _row(n, herd_acc, lm_acc, same, subsets, macro, herd_s, hf_s):
    return {
        "questions": n,
        "herd_acc": herd_acc,
        "lm_eval_acc": lm_acc,
        "same_correctness": same,
        "identical_prompts": f"{n}/{n}",
        "differ_at_lm_eval_ties": "0/1",
        "lm_eval_tied": 1,
        "subsets": subsets,
        "herd": {"acc_macro": macro, "wall_s": herd_s, "scoring_s": herd_s},
        "lm_eval_hf": {"wall_s": hf_s, "loglikelihood_s": hf_s},
    }


def test_merge_weights_by_questions_and_subjects():
    # one subject (herd gives no macro for it) of 10 questions and a two-subject group of 30
    m = merge_rows([_row(10, 0.5, 0.4, "9/10", 1, None, 2.0, 10.0), _row(30, 0.2, 0.2, "30/30", 2, 0.25, 6.0, 30.0)])
    assert m["questions"] == 40 and m["subsets"] == 3
    assert m["herd_acc"] == pytest.approx(11 / 40) and m["lm_eval_acc"] == pytest.approx(10 / 40)
    assert m["acc_diff_points"] == pytest.approx(2.5)
    assert m["herd"]["acc_macro"] == pytest.approx((0.5 + 2 * 0.25) / 3)
    assert m["same_correctness"] == "39/40" and m["identical_prompts"] == "40/40"
    assert m["differ_at_lm_eval_ties"] == "0/2" and m["lm_eval_tied"] == 2
    assert m["herd"]["q_per_s"] == pytest.approx(5.0) and m["speedup_wall"] == pytest.approx(5.0)
