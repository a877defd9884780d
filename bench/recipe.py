"""bench/recipe: the data recipe's language quota and domain mix on real multilingual input.

Input: English documents regrouped from the shared books (bench/data.py's corpus) plus the
lingua-py test sentences of 21 languages (../shared/data/langid, Apache-2.0) grouped into
short documents, one JSONL file each; the books are named domain "books", the sentences are
left to the rule-based classifier. The flow keeps every language, holds non-English at
`--share` of kept documents; a second run also holds the domains at MIX of packed tokens. Printed
and written to bench/results/recipe.json: the kept non-English share (documents and tokens)
against the target, documents and tokens per language, the achieved domain shares, and
kept + dropped = input.

`python -m bench.recipe --write-sample` (re)writes the embedded corpus' committed sample
(flows/data/samples/multilingual.jsonl) from the same sentences.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench.data import SHARED, make_corpus

SENTENCES = SHARED / "langid" / "sentences"
# Near the natural split after the quota (the sentences are a few percent of the tokens), so
# the mix thins the books a little rather than shrinking everything to the sentences' size.
MIX = {"books": 0.95, "general": 0.05}
SAMPLE = Path(__file__).resolve().parents[1] / "flows" / "data" / "samples" / "multilingual.jsonl"


def sentence_documents(
    folder: Path, per_lang: int | None = None, skip: tuple[str, ...] = (), min_sentences: int = 4, min_chars: int = 300
) -> list[dict]:
    """Consecutive sentences of each <lang>.txt grouped into documents of at least
    `min_sentences` sentences and `min_chars` characters: {id, lang, text}."""
    docs = []
    for path in sorted(folder.glob("*.txt")):
        lang = path.stem
        if lang in skip:
            continue
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        cur: list[str] = []
        n = 0
        for line in lines:
            cur.append(line)
            if len(cur) >= min_sentences and sum(map(len, cur)) >= min_chars:
                n += 1
                docs.append({"id": f"lang:{lang}:{n:03d}", "lang": lang, "text": " ".join(cur)})
                cur = []
                if per_lang and n >= per_lang:
                    break
    return docs


def write_sample(path: Path = SAMPLE, per_lang: int = 20) -> int:
    docs = sentence_documents(SENTENCES, per_lang, skip=("en",))
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path.stat().st_size


def run(
    share: float = 0.05, mix: dict[str, float] | None = None, english_docs: int = 6000, workdir: Path | None = None
) -> dict:
    """The flow on the shared corpus + sentences; returns the measured figures. mix None: the
    quota alone."""
    from flows.data.config import config_from_dict
    from flows.data.pipeline import run_prep

    mix = mix or {}
    work = Path(tempfile.mkdtemp(prefix="herd-recipe-", dir=workdir))
    try:
        books = work / "books.jsonl"
        books.write_text("".join(json.dumps(d) + "\n" for d in make_corpus(SHARED, english_docs)))
        sentences = work / "sentences.jsonl"
        lang_docs = sentence_documents(SENTENCES)
        sentences.write_text(
            "".join(json.dumps({"id": d["id"], "text": d["text"]}, ensure_ascii=False) + "\n" for d in lang_docs)
        )
        langs = sorted({d["lang"] for d in lang_docs})
        cfg = config_from_dict(
            {
                "name": "recipe",
                "input": {"paths": [str(books), str(sentences)], "domains": {str(books): "books"}},
                "langid": {"keep": langs, "quota_share": share},
                "semdedup": {"enabled": False},
                "quality": {"enabled": False},
                "pack": {
                    "tokenizer": "llama3",
                    "seq_len": 2048,
                    "sequences_per_shard": 512,
                    "validation_fraction": 0.0,
                },
                "mix": {"targets": mix},
                "ray": {"batch_size": 256, "progress_bars": False},
                "mlflow": {"enabled": False},
            }
        )
        report, _ = run_prep(cfg, work / "out")
        from flows.data.shards import read_manifest, token_stream

        manifest = read_manifest(work / "out")
        packed = int(len(token_stream(work / "out", "train")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    q = report["quota"]
    figures = {
        "target_share": share,
        "non_english_share_documents": q["share_documents"],
        "non_english_share_tokens": q["share_tokens"],
        "share_error_points": round(abs(q["share_documents"] - share) * 100, 3),
        "languages_in_input": langs,
        "languages_reported": sorted(manifest["languages"]),
        "languages": manifest["languages"],
        "mix_targets": mix,
        "mix": {
            d: {"share": v["share"], "tokens": v["tokens"], "documents": v["documents"], "dropped": v["dropped"]}
            for d, v in manifest["mix"]["domains"].items()
        },
        "mix_error_points": round(
            max(abs(v["share"] - v["target_present"]) for v in manifest["mix"]["domains"].values()) * 100, 3
        )
        if mix
        else None,
        "packed_tokens": packed,
        "input_documents": report["input_documents"],
        "kept": report["kept"],
        "dropped": report["dropped"],
        "dropped_by_stage": report["dropped_by_stage"],
        "seconds": report["phases"]["total"]["seconds"],
    }
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--share", type=float, default=0.05)
    ap.add_argument("--english-docs", type=int, default=6000)
    ap.add_argument(
        "--write-sample", action="store_true", help="rewrite flows/data/samples/multilingual.jsonl and exit"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "recipe.json"))
    args = ap.parse_args(argv)
    if not SENTENCES.is_dir():
        print(f"bench/recipe: skipped, {SENTENCES} is absent (../shared/data not on this machine)")
        return 0
    if args.write_sample:
        print(f"{SAMPLE}: {write_sample()} bytes")
        return 0
    results = {}
    for name, mix in (("quota", None), ("quota_and_mix", MIX)):
        figures = run(args.share, mix, english_docs=args.english_docs)
        print(
            f"--- {name}: target non-English share {args.share:.3f}, kept {figures['non_english_share_documents']:.4f} "
            f"of documents ({figures['share_error_points']} points off), {figures['non_english_share_tokens']:.4f} "
            "of tokens"
        )
        print(
            json.dumps(
                {
                    k: v
                    for k, v in figures.items()
                    if k not in ("languages", "languages_in_input", "languages_reported")
                },
                indent=1,
            )
        )
        for lang, row in figures["languages"].items():
            print(
                f"  {lang}: identified {row.get('identified', 0)}, kept {row['documents']} docs / {row['tokens']} "
                "tokens, "
                f"quota dropped {row['dropped_quota']}, mix dropped {row['dropped_mix']}"
            )
        results[name] = figures
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
