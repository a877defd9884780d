"""Run one task on a loaded model: metrics, per-example predictions, skips. No MLflow here.

Metric names are flat and task-relative (`acc`, `acc_macro`, `<subset>/acc`, `bits_per_byte`,
`exact_match`, `refusal_rate`, ...); the stage prefixes them with the task name.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from flows import progress
from flows.eval.redteam import Rubric, rates
from flows.eval.scoring import Scorer, acc_from_scores
from flows.eval.task_spec import TaskSpec
from flows.eval.tasks import (
    Skip,
    load_generate,
    load_multiple_choice,
    load_texts,
    normalize,
    read_rows,
    render,
    resolve_data,
)
from model.errors import HerdError


@dataclass
class TaskResult:
    name: str
    type: str
    metrics: dict[str, float]
    predictions: list[dict]
    skipped: list[Skip] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)  # file name -> text
    seconds: float = 0.0


def run_task(
    spec: TaskSpec,
    model,
    tokenizer,
    scorer: Scorer,
    data_dir=None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    reference=None,
) -> TaskResult:
    """reference: a loaded (model, tokenizer) that rated tasks compare against (the champion)."""
    start = time.perf_counter()
    if spec.type == "multiple_choice":
        result = run_multiple_choice(spec, scorer, data_dir, limit, num_fewshot)
    elif spec.type == "perplexity":
        result = run_perplexity(spec, scorer, data_dir)
    elif spec.type == "generate":
        result = run_generate(spec, model, tokenizer, data_dir, limit, batch_size)
    elif spec.type in ("redteam", "transcripts"):
        result = run_prompts(spec, model, tokenizer, data_dir, limit, batch_size)
    elif spec.type == "rated":
        result = run_rated(spec, model, tokenizer, data_dir, limit, batch_size, reference)
    elif spec.type == "safety":
        result = run_safety(spec, model, tokenizer, data_dir, limit, batch_size)
    else:  # load_spec validates types; this is a programming error
        raise HerdError(f"task {spec.name}: unknown type {spec.type}")
    result.seconds = time.perf_counter() - start
    result.metrics["seconds"] = result.seconds
    result.metrics["skipped"] = float(len(result.skipped))
    return result


# --- multiple choice ----------------------------------------------------------------------------


def run_multiple_choice(spec: TaskSpec, scorer: Scorer, data_dir, limit, num_fewshot) -> TaskResult:
    loaded = load_multiple_choice(spec, data_dir, limit, num_fewshot)
    if loaded.n == 0:
        raise HerdError(
            f"task {spec.name}: no usable questions ({len(loaded.skipped)} rows skipped)"
            + (f"; first: {loaded.skipped[0]}" if loaded.skipped else "")
        )
    pairs, owners = [], []
    for s in loaded.subsets:
        for ex in s.examples:
            ctx = s.context(ex)
            for c in ex.choices:
                pairs.append((ctx, spec.target_delimiter + c))
            owners.append((s, ex))
    scores = scorer.loglikelihood(pairs)
    predictions, per_subset = [], defaultdict(list)
    i = 0
    for s, ex in owners:
        lls = [ll for ll, _ in scores[i : i + len(ex.choices)]]
        i += len(ex.choices)
        r = acc_from_scores(lls, ex.choices, ex.gold)
        key = "acc_norm" if spec.scoring == "acc_norm" else "acc"
        per_subset[s.name].append(r)
        predictions.append(
            {
                "subset": s.name,
                "where": ex.where,
                "question": ex.query,
                "choices": ex.choices,
                "gold": ex.gold,
                "pred": r["pred_norm"] if key == "acc_norm" else r["pred"],
                "correct": bool(r[key]),
                "loglikelihoods": [round(x, 4) for x in lls],
            }
        )
    metrics = _mc_metrics(per_subset, spec.scoring)
    return TaskResult(spec.name, spec.type, metrics, predictions, loaded.skipped)


def _mc_metrics(per_subset: dict[str, list[dict]], scoring: str) -> dict[str, float]:
    everything = [r for rs in per_subset.values() for r in rs]
    m = {
        "acc": sum(r["acc"] for r in everything) / len(everything),
        "acc_norm": sum(r["acc_norm"] for r in everything) / len(everything),
        "n": float(len(everything)),
    }
    m["score"] = m["acc_norm"] if scoring == "acc_norm" else m["acc"]
    if len(per_subset) > 1:
        subset_scores = {}
        for name, rs in per_subset.items():
            subset_scores[name] = sum(r[scoring] for r in rs) / len(rs)
            m[f"{name}/{scoring}"] = subset_scores[name]
            m[f"{name}/n"] = float(len(rs))  # the gate's noise per subset
        m[f"{scoring}_macro"] = sum(subset_scores.values()) / len(subset_scores)
    return m


# --- perplexity ---------------------------------------------------------------------------------


def run_perplexity(spec: TaskSpec, scorer: Scorer, data_dir) -> TaskResult:
    texts = load_texts(spec, data_dir)
    window = spec.window or min(scorer.max_length, 2048)
    results = scorer.loglikelihood_rolling([t for _, t in texts], max_length=window)
    ll = sum(r[0] for r in results)
    n_tokens = sum(r[1] for r in results)
    n_bytes = sum(len(t.encode("utf-8")) for _, t in texts)
    n_words = sum(len(t.split()) for _, t in texts)
    metrics = {
        "token_perplexity": math.exp(-ll / n_tokens),
        "word_perplexity": math.exp(-ll / max(1, n_words)),
        "byte_perplexity": math.exp(-ll / n_bytes),
        "bits_per_byte": -ll / n_bytes / math.log(2),
        "tokens": float(n_tokens),
        "bytes": float(n_bytes),
    }
    preds = [
        {"where": w, "loglikelihood": round(r[0], 3), "tokens": r[1], "bytes": len(t.encode("utf-8"))}
        for (w, t), r in zip(texts, results)
    ]
    return TaskResult(spec.name, spec.type, metrics, preds)


# --- generation ---------------------------------------------------------------------------------


def generate_texts(
    model,
    tokenizer,
    prompts: list[str | tuple[dict, ...]],
    max_tokens: int,
    until: list[str],
    chat: bool,
    batch_size: int,
) -> list[dict]:
    """Greedy, batched; prompts longer than the window lose tokens from the left. A prompt may be a
    conversation (a sequence of messages; chat only), answered as the next assistant turn."""
    from flows.eval.scoring import default_add_bos
    from model.generate import SamplingParams, generate

    add_bos = default_add_bos(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_strings=tuple(until))
    keep = model.config.max_seq_len - max_tokens
    if keep < 1:
        raise HerdError(
            f"max_tokens {max_tokens} leaves no room for a prompt in a {model.config.max_seq_len}-token window"
        )
    encoded = []
    for p in prompts:
        if not isinstance(p, str):
            ids = tokenizer.encode_chat(list(p))
        else:
            ids = tokenizer.encode_chat([{"role": "user", "content": p}]) if chat else tokenizer.encode(p, bos=add_bos)
        encoded.append((ids or [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id])[-keep:])
    out = []
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths decode together
    results: dict[int, dict] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        gens = generate(model, [encoded[i] for i in idx], params, tokenizer=tokenizer)
        for i, g in zip(idx, gens):
            results[i] = {"text": g.text, "tokens": len(g.token_ids), "finish_reason": g.finish_reason}
        progress.tick("questions", len(results), len(order))
    for i in range(len(prompts)):
        out.append(results[i])
    return out


def run_generate(spec: TaskSpec, model, tokenizer, data_dir, limit, batch_size) -> TaskResult:
    examples, skipped = load_generate(spec, data_dir, limit)
    if not examples:
        raise HerdError(f"task {spec.name}: no usable rows ({len(skipped)} skipped)")
    gens = generate_texts(
        model, tokenizer, [e.prompt for e in examples], spec.max_tokens, spec.until, spec.chat, batch_size
    )
    preds, hits = [], 0
    for e, g in zip(examples, gens):
        answer, gold = normalize(g["text"], spec.normalize), normalize(e.target, spec.normalize)
        ok = answer == gold
        hits += ok
        preds.append(
            {
                "where": e.where,
                "prompt": e.prompt,
                "target": e.target,
                "response": g["text"],
                "answer": answer,
                "correct": ok,
            }
        )
    metrics = {"exact_match": hits / len(examples), "n": float(len(examples))}
    return TaskResult(spec.name, spec.type, metrics, preds, skipped)


def run_prompts(spec: TaskSpec, model, tokenizer, data_dir, limit, batch_size) -> TaskResult:
    """redteam (rubric-labelled) and transcripts (a human-eval-style set for review)."""
    rows, skipped = [], []
    for path in resolve_data(spec, spec.data["test"], data_dir):
        for row in read_rows(path, spec.format):
            if limit is not None and len(rows) >= limit:
                break
            try:
                prompt = render(spec.prompt or "prompt", row.doc)
            except Exception as e:  # jinja errors and non-dict rows alike: a counted skip
                skipped.append(Skip(row.where, f"no prompt ({e})"))
                continue
            if not prompt.strip():
                skipped.append(Skip(row.where, "empty prompt"))
                continue
            rows.append((row, prompt))
    if not rows:
        raise HerdError(f"task {spec.name}: no usable prompts ({len(skipped)} skipped)")
    gens = generate_texts(model, tokenizer, [p for _, p in rows], spec.max_tokens, spec.until, spec.chat, batch_size)
    preds = []
    for (row, prompt), g in zip(rows, gens):
        rec = {
            "where": row.where,
            "category": str(row.doc.get("category", "")),
            "prompt": prompt,
            "response": g["text"],
            "tokens": g["tokens"],
            "finish_reason": g["finish_reason"],
        }
        preds.append(rec)
    metrics: dict[str, float] = {"n": float(len(preds))}
    if spec.type == "redteam":
        rubric = Rubric.from_spec(spec.rubric)
        for p in preds:
            p["label"], hits = rubric.classify(p["response"])
            p["matched"] = "; ".join(hits)
        metrics.update(rates([p["label"] for p in preds]))
    else:
        cats = Counter(p["category"] for p in preds)
        metrics["categories"] = float(len(cats))
        metrics["mean_response_tokens"] = sum(p["tokens"] for p in preds) / len(preds)
        metrics["empty_rate"] = sum(not p["response"].strip() for p in preds) / len(preds)
        metrics["truncated_rate"] = sum(p["finish_reason"] == "length" for p in preds) / len(preds)
    return TaskResult(
        spec.name, spec.type, metrics, preds, skipped, {f"{spec.name}.md": transcripts_markdown(spec, preds)}
    )


def run_rated(spec: TaskSpec, model, tokenizer, data_dir, limit, batch_size, reference) -> TaskResult:
    """The sealed prompt set, opened in memory: both models' answers, judged pairwise per use case.
    `limit`: prompts per use case. Aggregates only: no prediction rows, no transcripts."""
    from flows.eval.promptset import from_records
    from flows.eval.ratings import judge_pairs, make_judge, win_rate_metrics
    from flows.eval.sealed import unseal

    prompts = from_records(unseal(resolve_data(spec, spec.data["test"], data_dir)[0]))
    prompts = _first_per_group(prompts, "use_case", limit)
    texts = [p.prompt for p in prompts]
    gens = generate_texts(model, tokenizer, texts, spec.max_tokens, spec.until, True, batch_size)
    metrics: dict[str, float] = {
        "n": float(len(prompts)),
        "use_cases": float(len({p.use_case for p in prompts})),
        "mean_response_tokens": sum(g["tokens"] for g in gens) / len(gens),
        "empty_rate": sum(not g["text"].strip() for g in gens) / len(gens),
    }
    if reference is not None:
        ref_model, ref_tok = reference
        ref = generate_texts(ref_model, ref_tok, texts, spec.max_tokens, spec.until, True, batch_size)
        verdicts = judge_pairs(
            make_judge(spec.judge, batch_size),
            [(p.use_case, p.prompt) for p in prompts],
            [g["text"] for g in gens],
            [g["text"] for g in ref],
        )
        metrics.update(win_rate_metrics(verdicts))
    return TaskResult(spec.name, spec.type, metrics, [])


def run_safety(spec: TaskSpec, model, tokenizer, data_dir, limit, batch_size) -> TaskResult:
    """The scored red team: attack prompts per risk category, replies scored by the safety classifier
    trained on the other HH harmless pairs. `limit`: prompts per category. Also the scorer's and the
    keyword rubric's accuracy on the held-out pairs, and the scorer's on the hand-labelled replies."""
    from flows.eval import safety as S

    train, held = S.hh_pairs(resolve_data(spec, spec.data["test"], data_dir)[0])
    missing = [k for k in ("benign", "prompts", "questions") if k not in spec.data]
    if missing:
        raise HerdError(
            f"task {spec.name}: data.{', data.'.join(missing)} required (the safety scorer's benign requests: "
            "benign sft/alpaca_en_demo.json, prompts preference/dpo_en_demo.json, "
            "questions commonsenseqa/train_rand_split.jsonl)"
        )
    benign = (
        S.benign_instructions(resolve_data(spec, spec.data["benign"], data_dir)[0])
        + S.benign_prompts(resolve_data(spec, spec.data["prompts"], data_dir)[0])
        + S.benign_questions(resolve_data(spec, spec.data["questions"], data_dir)[0])
    )
    prompts = S.attack_prompts(held)
    prompts = _first_per_group(prompts, "category", limit)
    scorer = S.SafetyScorer.trained(train, benign)
    gens = generate_texts(
        model, tokenizer, [p.messages for p in prompts], spec.max_tokens, spec.until, True, batch_size
    )
    replies = [g["text"] for g in gens]
    unsafe = scorer.unsafe([p.request for p in prompts], replies)
    metrics = S.attack_success_metrics(prompts, unsafe)
    reqs = [S.last_request(p) for p in held]
    metrics["scorer_pair_accuracy"] = S.pair_accuracy(
        scorer.unsafe(reqs, [p["chosen"] for p in held]), scorer.unsafe(reqs, [p["rejected"] for p in held])
    )
    metrics["rubric_pair_accuracy"] = S.pair_accuracy(
        [S.rubric_harm(p["chosen"]) for p in held], [S.rubric_harm(p["rejected"]) for p in held]
    )
    labelled = (
        [r.doc for path in resolve_data(spec, spec.data["labelled"], data_dir) for r in read_rows(path, "jsonl")]
        if "labelled" in spec.data
        else []
    )
    if labelled:
        acc = S.labelled_accuracy(
            labelled, scorer.unsafe([r["request"] for r in labelled], [r["reply"] for r in labelled])
        )
        metrics["scorer_labelled_accuracy"] = acc.pop("accuracy")
        metrics.update({f"scorer_labelled/{k}": v for k, v in acc.items()})
    preds = [
        {"category": p.category, "attack": p.attack, "prompt": p.request, "response": r, "unsafe": round(float(x), 4)}
        for p, r, x in zip(prompts, replies, unsafe)
    ]
    return TaskResult(spec.name, spec.type, metrics, preds)


def _first_per_group(items: list, key: str, limit: int | None) -> list:
    """The first `limit` items of each group (by attribute `key`), groups in first-seen order."""
    if limit is None:
        return items
    groups = defaultdict(list)
    for it in items:
        groups[getattr(it, key)].append(it)
    return [it for g in groups.values() for it in g[:limit]]


def transcripts_markdown(spec: TaskSpec, preds: list[dict]) -> str:
    lines = [f"# {spec.name}: {len(preds)} transcripts", ""]
    if spec.type == "redteam":
        lines += ["Labels from the rubric in flows/eval/redteam.py (refusal / unsafe_compliance / other).", ""]
    by_cat = defaultdict(list)
    for p in preds:
        by_cat[p["category"] or "uncategorised"].append(p)
    for cat in sorted(by_cat):
        lines += [f"## {cat}", ""]
        for p in by_cat[cat]:
            label = f" — **{p['label']}**" if "label" in p else ""
            lines += [
                f"### {p['where']}{label}",
                "",
                "**Prompt**",
                "",
                _quote(p["prompt"]),
                "",
                "**Response**",
                "",
                _quote(p["response"] or "(empty)"),
                "",
            ]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in text.splitlines()) or "> "
