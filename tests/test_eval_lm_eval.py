"""The lm-evaluation-harness adapter (model=herd), and herd's MMLU against lm-eval's HF backend."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from flows.eval.lm_eval_adapter import HerdLM, write_local_tasks  # noqa: E402
from flows.eval.scoring import reference_loglikelihood  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402
from tests.tiny import random_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_lm():
    return HerdLM(model=random_tiny(max_seq_len=64), tokenizer=load_tokenizer("llama3"), batch_size=4)


def _inst(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("herd") is HerdLM


def test_loglikelihood_equals_plain_forward(tiny_lm):
    reqs = [("The sky is", " blue"), ("The sky is", " green today"), ("", "Hello world"), ("2 + 2 =", " 4")]
    got = tiny_lm.loglikelihood([_inst("loglikelihood", r, i) for i, r in enumerate(reqs)])
    enc = []
    for ctx, cont in reqs:
        if ctx == "":
            enc.append(([tiny_lm.prefix_token_id], tiny_lm.tok_encode(cont, add_special_tokens=False)))
        else:
            c = tiny_lm.tok_encode(ctx)
            enc.append((c, tiny_lm.tok_encode(ctx + cont)[len(c) :]))
    want = reference_loglikelihood(tiny_lm.model, enc, 64)
    assert [g for g, _ in got] == pytest.approx([w for w, _ in want], abs=1e-4)


def test_loglikelihood_rolling_covers_long_texts(tiny_lm):
    text = " ".join(f"word{i}" for i in range(120))  # longer than the 64-token window
    (ll,) = tiny_lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (text,))])
    tokens = tiny_lm.tok_encode(text, add_special_tokens=False)  # the prefix token (BOS) conditions the first
    assert len(tokens) > 64
    windows = tiny_lm.scorer.rolling_windows(tokens)
    assert ll == pytest.approx(sum(w for w, _ in reference_loglikelihood(tiny_lm.model, windows, 64)), abs=1e-3)


def test_generate_until_stops_at_until(tiny_lm):
    outs = tiny_lm.generate_until(
        [
            _inst("generate_until", ("Once upon a time", {"until": ["\n"], "max_gen_toks": 5}), 0),
            _inst("generate_until", ("Hello", {"until": [], "max_gen_toks": 3}), 1),
        ]
    )
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert "\n" not in outs[0]
    assert len(tiny_lm.tok_encode(outs[1], add_special_tokens=False)) <= 4
    assert tiny_lm.tok_encode("Hi")[0] == tiny_lm.tok.bos_id  # Llama 3: BOS first, as transformers


def test_lm_eval_task_on_herd_equals_herd_runner(tiny_lm, tmp_path):
    """A spec-defined task run by lm-eval through the adapter and by herd's own runner agree."""
    from lm_eval.tasks import TaskManager

    from flows.eval.runners import run_task
    from flows.eval.task_spec import load_spec

    rows = [
        {"question": f"Pick the number {i}.", "choices": [str(i), str(i + 1), str(i + 2)], "answer": 0}
        for i in range(6)
    ]
    data = tmp_path / "nums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "nums.yaml").write_text(
        json.dumps(
            {
                "task": "nums_local",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "Q: {{question}}\nA:",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "answer",
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
            }
        )
    )
    out = lm_eval.simple_evaluate(
        model=tiny_lm,
        tasks=["nums_local"],
        log_samples=False,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
    )
    theirs = out["results"]["nums_local"]
    spec = load_spec(
        {
            "name": "nums",
            "data": {"test": str(data)},
            "prompt": "Q: {{ question }}\nA:",
            "choices": "{{ choices }}",
            "target": "answer",
        }
    )
    ours = run_task(spec, tiny_lm.model, tiny_lm.tok, tiny_lm.scorer).metrics
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]


@pytest.mark.slow
@pytest.mark.acceptance
def test_mmlu_matches_lm_eval_hf_on_smollm2(smollm2_dir, smollm2_gguf, shared_data, tmp_path):
    """herd's MMLU (5-shot) vs lm-eval's HF backend on the same GGUF, questions and prompt:
    identical prompts and the same per-question verdicts on a small subset."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from flows.eval.runners import run_task
    from flows.eval.scoring import Scorer
    from flows.eval.task_spec import load_spec
    from model.sources import load_for_inference

    subjects, limit = ["abstract_algebra", "marketing"], 3
    names = write_local_tasks(shared_data, tmp_path / "tasks", subjects=subjects)["mmlu"]
    hf = HFLM(
        pretrained=str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype="float32", device="cpu", batch_size=4
    )
    out = lm_eval.simple_evaluate(
        model=hf,
        tasks=names,
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
    )
    data = tmp_path / "data" / "mmlu"
    for split in ("test", "dev"):
        (data / split).mkdir(parents=True)
        for s in subjects:
            (data / split / f"{s}_{split}.csv").symlink_to(shared_data / "mmlu" / split / f"{s}_{split}.csv")
    model, tok = load_for_inference(str(smollm2_dir), "float32", "cpu")
    ours = run_task(load_spec("mmlu"), model, tok, Scorer(model, tok), data_dir=tmp_path / "data", limit=limit)
    for subject, name in zip(subjects, names):
        theirs = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        mine = [p for p in ours.predictions if p["subset"] == subject]
        assert len(theirs) == len(mine) == limit
        for t, m in zip(theirs, mine):
            lls = [float(r[0]) for r in t["filtered_resps"]]
            assert m["loglikelihoods"] == pytest.approx(lls, abs=2e-3)
            assert float(m["correct"]) == t["acc"]
