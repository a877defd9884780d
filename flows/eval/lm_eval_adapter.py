"""lm-evaluation-harness adapter: `--model herd` runs any lm-eval task on a herd model.

    import flows.eval.lm_eval_adapter  # registers "herd"
    lm_eval.simple_evaluate(model="herd", model_args="pretrained=models:/herd@champion", tasks=[...])

model_args: pretrained (a folder, .gguf, smollm2 or models:/NAME@ALIAS), dtype, device,
batch_size, max_length, max_gen_toks, share_prefix. Log-likelihoods go through herd's Scorer
(contexts computed once, shared prefixes reused, left truncation); generation through
model.generate (greedy; lm-eval's `until` strings stop it).

`write_local_tasks` writes lm-eval task YAMLs for MMLU and CommonsenseQA on the local files in
../shared/data (lm-eval's own tasks download from the hub), with lm-eval's prompts unchanged.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from model.errors import HerdError


@register_model("herd")
class HerdLM(TemplateLM):
    def __init__(
        self,
        pretrained: str = "smollm2",
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int | str = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        share_prefix: bool = True,
        model=None,
        tokenizer=None,
        **kwargs,
    ):
        super().__init__()
        from flows.eval.scoring import Scorer

        if model is None:
            from flows.eval.registry import resolve_model_uri
            from model.sources import load_for_inference

            model, tokenizer = load_for_inference(str(resolve_model_uri(pretrained)), dtype, device, pack=True)
        self.model, self.tok = model, tokenizer
        bs = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(
            model,
            tokenizer,
            batch_size=bs,
            max_length=int(max_length) if max_length else None,
            share_prefix=str(share_prefix).lower() not in ("false", "0"),
        )
        self.max_gen_toks = int(max_gen_toks)
        self._batch_size = bs

    # --- tokenizer facts lm-eval asks for ---
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.scorer.add_bos if add_special_tokens is None else bool(add_special_tokens)
        if bos and self.tok.bos_id is not None and string.startswith(self.tok.decode([self.tok.bos_id])):
            bos = False  # the text already starts with BOS (lm-eval's has_bos_prefix rule)
        return self.tok.encode(string, bos=bos and self.tok.bos_id is not None)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(list(tokens))

    # --- requests ---
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.scorer.loglikelihood_tokens([(list(ctx), list(cont)) for _, ctx, cont in requests])
        for (key, _, _), r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        out = [ll for ll, _ in self.scorer.loglikelihood_rolling(texts)]
        for text, ll in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from flows.eval.runners import generate_texts

        out: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for key, idx in by_kwargs.items():
            kw = json.loads(key)
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eot = self.tok.decode([self.eot_token_id])
            if eot and eot not in until:
                until.append(eot)
            if kw.get("do_sample") or (kw.get("temperature") or 0) > 0:
                raise HerdError("herd's lm-eval adapter generates greedily; the task asks for sampling")
            gens = generate_texts(
                self.model,
                self.tok,
                [requests[i].args[0] for i in idx],
                int(kw.get("max_gen_toks", self.max_gen_toks)),
                until,
                False,
                self._batch_size,
            )
            for i, g in zip(idx, gens):
                out[i] = g["text"]
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), g["text"])
        return out  # type: ignore[return-value]


# --- lm-eval task files on local data ------------------------------------------------------------

MMLU_TEXT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
CSQA_TEXT = (
    "Question: {{ question.strip() }}\nA. {{choices['text'][0]}}\nB. {{choices['text'][1]}}\n"
    "C. {{choices['text'][2]}}\nD. {{choices['text'][3]}}\nE. {{choices['text'][4]}}\nAnswer:"
)


def _mmlu_jsonl(src: Path, dst: Path) -> None:
    with open(src, newline="", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for row in csv.DictReader(f):
            rec = {
                "question": row["question"],
                "choices": [row[f"choice{i}"] for i in range(4)],
                "answer": int(row["answer"]),
            }
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _csqa_jsonl(src: Path, dst: Path) -> None:
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            r = json.loads(line)
            q = r["question"]
            rec = {
                "id": r["id"],
                "question": q["stem"],
                "question_concept": q.get("question_concept", ""),
                "choices": {"label": [c["label"] for c in q["choices"]], "text": [c["text"] for c in q["choices"]]},
                "answerKey": r["answerKey"],
            }
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_local_tasks(
    data_dir: str | Path, out_dir: str | Path, subjects: list[str] | None = None, prefix: str = "local"
) -> dict[str, list[str]]:
    """lm-eval task YAMLs for {prefix}_mmlu_<subject> (5-shot, first_n from dev) and
    {prefix}_commonsense_qa, reading the local files (converted to JSONL so every field stays a
    string, as in the CSV). Returns {"mmlu": [task names], "commonsenseqa": [name]}."""
    import yaml

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    names = {"mmlu": [], "commonsenseqa": []}
    tests = sorted((data_dir / "mmlu" / "test").glob("*_test.csv"))
    if not tests:
        raise HerdError(f"{data_dir / 'mmlu' / 'test'}: no *_test.csv files")
    for test in tests:
        subject = test.name[: -len("_test.csv")]
        if subjects is not None and subject not in subjects:
            continue
        t_json, d_json = out_dir / "data" / f"{subject}_test.jsonl", out_dir / "data" / f"{subject}_dev.jsonl"
        _mmlu_jsonl(test, t_json)
        _mmlu_jsonl(data_dir / "mmlu" / "dev" / f"{subject}_dev.csv", d_json)
        name = f"{prefix}_mmlu_{subject}"
        task = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(t_json), "dev": str(d_json)}},
            "test_split": "test",
            "fewshot_split": "dev",
            "fewshot_config": {"sampler": "first_n"},
            "num_fewshot": 5,
            "output_type": "multiple_choice",
            "doc_to_text": MMLU_TEXT,
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "answer",
            "description": "The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
        names["mmlu"].append(name)
    csqa = data_dir / "commonsenseqa"
    if (csqa / "dev_rand_split.jsonl").is_file():
        _csqa_jsonl(csqa / "dev_rand_split.jsonl", out_dir / "data" / "csqa_validation.jsonl")
        _csqa_jsonl(csqa / "train_rand_split.jsonl", out_dir / "data" / "csqa_train.jsonl")
        name = f"{prefix}_commonsense_qa"
        task = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {
                "data_files": {
                    "train": str(out_dir / "data" / "csqa_train.jsonl"),
                    "validation": str(out_dir / "data" / "csqa_validation.jsonl"),
                }
            },
            "training_split": "train",
            "validation_split": "validation",
            "output_type": "multiple_choice",
            "doc_to_text": CSQA_TEXT,
            "doc_to_target": "answerKey",
            "doc_to_choice": ["A", "B", "C", "D", "E"],
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
        names["commonsenseqa"].append(name)
    return names


def write_rendered_task(name: str, examples, out_dir: str | Path) -> str:
    """An lm-eval task YAML over already-rendered questions (herd's MCExample: query, choices,
    gold), zero-shot, delimiter " ": for shapes lm-eval has no local layout for (bench/eval's
    long-choice HH task). The prompt is herd's rendering by construction; the scoring is lm-eval's."""
    import yaml

    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    data = out_dir / "data" / f"{name}_test.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"query": ex.query, "choices": ex.choices, "gold": ex.gold}, ensure_ascii=False) + "\n")
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return name
