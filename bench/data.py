"""bench/data: herd's data flow against datatrove on the same input, in one run.

Both run the same Gopher repetition + Gopher quality + C4 + FineWeb filters (published
thresholds, FineWeb's C4 settings) and the same MinHash dedup (word 5-grams, 14 x 8) on
the same JSONL (two files, so both use two workers). datatrove: LocalPipelineExecutor,
2 workers. herd: flows.data on a local Ray with 2 CPUs (started before timing, as a
platform's cluster is). Printed: docs/s of each, the ratio, kept-set agreement (Jaccard of
kept ids), herd docs/s at 10k/40k/160k documents, and tiktoken vs HF tokenizers tokens/s.

The corpus is synthetic but deterministic: sentences of the shared books (../shared/data)
regrouped into documents, plus verse windows, exact copies and edited copies (5-15% words).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_corpus(shared: Path, n_docs: int, seed: int = 0) -> list[dict]:
    prose, verse = [], []
    for f in sorted((shared / "corpus").glob("*.txt")):
        text = f.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
        if "shakespeare" in f.name:
            verse = text.split("\n")
            continue
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            prose += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", para) if len(s.split()) >= 3]
    vocab = sorted({w for s in prose[:5000] for w in s.split()})
    rng = random.Random(seed)
    docs: list[dict] = []
    for i in range(n_docs):
        r = rng.random()
        if docs and r < 0.10:  # an edited copy of an earlier document
            words = rng.choice(docs)["text"].split(" ")
            for j in rng.sample(range(len(words)), max(1, int(rng.uniform(0.05, 0.15) * len(words)))):
                words[j] = rng.choice(vocab)
            text = " ".join(words)
        elif docs and r < 0.13:  # an exact copy
            text = rng.choice(docs)["text"]
        elif r < 0.25:  # verse: short lines, many without end punctuation
            start = rng.randrange(len(verse) - 60)
            text = "\n".join(verse[start : start + rng.randint(8, 50)]).strip()
        else:
            text = "\n\n".join(
                " ".join(rng.choice(prose) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 5))
            )
        docs.append({"id": f"d{i:07d}", "text": text})
    return docs


def write_input(docs: list[dict], folder: Path, files: int = 2) -> None:
    folder.mkdir(parents=True)
    per = -(-len(docs) // files)
    for k in range(files):
        with open(folder / f"part-{k:02d}.jsonl", "w") as f:
            for d in docs[k * per : (k + 1) * per]:
                f.write(json.dumps(d) + "\n")


def run_datatrove(inp: Path, work: Path) -> tuple[float, set[str]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    mc = MinhashConfig()  # 5-grams, 14 buckets x 8 hashes
    logs = str(work / "logs")
    start = time.perf_counter()
    LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(inp)),
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            C4QualityFilter(filter_no_terminal_punct=False),
            FineWebQualityFilter(),
            JsonlWriter(str(work / "filtered")),
            MinhashDedupSignature(output_folder=str(work / "sigs"), config=mc),
        ],
        tasks=2,
        workers=2,
        logging_dir=f"{logs}/1",
    ).run()
    LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=mc)],
        tasks=mc.num_buckets,
        workers=2,
        logging_dir=f"{logs}/2",
    ).run()
    LocalPipelineExecutor(
        pipeline=[MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=mc)],
        tasks=1,
        logging_dir=f"{logs}/3",
    ).run()
    LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(work / "filtered")),
            MinhashDedupFilter(str(work / "remove")),
            JsonlWriter(str(work / "out")),
        ],
        tasks=2,
        workers=2,
        logging_dir=f"{logs}/4",
    ).run()
    seconds = time.perf_counter() - start
    kept = set()
    for path in sorted((work / "out").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            kept.update(json.loads(line)["id"] for line in f)
    return seconds, kept


def run_herd(inp: Path, out: Path) -> tuple[float, set[str], dict]:
    from flows.data.config import load_config
    from flows.data.pipeline import run_prep

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "data" / "bench.yaml")
    cfg.input.paths = [str(inp)]
    start = time.perf_counter()
    report, _ = run_prep(cfg, out, log=lambda *_: None)
    seconds = time.perf_counter() - start
    with open(out / "documents.jsonl") as f:
        kept = {json.loads(line)["id"] for line in f}
    return seconds, kept, report


def tokenizer_speed(texts: list[str]) -> None:
    from transformers import AutoTokenizer

    from model.assets import smollm2_gguf_path
    from model.tokenizer import load_tokenizer

    gguf = smollm2_gguf_path()  # one vocabulary for both: SmolLM2's, read from its GGUF
    ours = load_tokenizer(gguf)
    hf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).backend_tokenizer  # a `tokenizers` object
    llama3 = load_tokenizer("llama3")
    for name, fn in (
        ("herd tiktoken (SmolLM2 vocab)", lambda: ours.encode_batch(texts)),
        ("HF tokenizers (SmolLM2 vocab)", lambda: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]),
        ("herd tiktoken (Llama 3 128K)", lambda: llama3.encode_batch(texts)),
    ):
        fn()  # warm-up
        start = time.perf_counter()
        n = sum(map(len, fn()))
        print(f"tokenize  {name:32s} {n / (time.perf_counter() - start):12,.0f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.data")
    parser.add_argument("--compare-docs", type=int, default=10_000, help="corpus size for the datatrove comparison")
    parser.add_argument(
        "--scale", type=int, nargs="*", default=[10_000, 40_000, 160_000], help="herd sizes for docs/s growth"
    )
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"bench/data skipped: shared data not found at {SHARED}")
        return
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="herd-bench-data-"))
    try:
        biggest = make_corpus(SHARED, max([args.compare_docs, *args.scale]))
        write_input(biggest[:300], root / "warm")
        run_herd(root / "warm", root / "herd-warm")  # start Ray's workers: a platform's cluster is warm
        inp = root / f"in-{args.compare_docs}"
        write_input(biggest[: args.compare_docs], inp)
        herd_s, herd_kept, report = run_herd(inp, root / "herd-cmp")
        dt_s, dt_kept = run_datatrove(inp, root / "datatrove")
        n = args.compare_docs
        agreement = len(herd_kept & dt_kept) / max(1, len(herd_kept | dt_kept))
        print(
            f"\ndocs {n}: datatrove {dt_s:.1f} s ({n / dt_s:,.0f} docs/s, kept {len(dt_kept)}), "
            f"herd {herd_s:.1f} s ({n / herd_s:,.0f} docs/s, kept {len(herd_kept)})"
        )
        print(f"herd / datatrove throughput: {dt_s / herd_s:.2f}x   (goal >= 1.5x)")
        print(f"kept-set agreement (Jaccard of kept ids): {agreement:.4f}   (goal >= 0.98)")
        print(f"herd dropped by stage: {report['dropped_by_stage']}")
        for size in args.scale:
            inp = root / f"in-{size}"
            if not inp.exists():
                write_input(biggest[:size], inp)
            secs, kept, _ = run_herd(inp, root / f"herd-{size}")
            print(f"herd scale {size:>7} docs: {secs:7.1f} s  {size / secs:8,.0f} docs/s  kept {len(kept)}")
            shutil.rmtree(root / f"herd-{size}", ignore_errors=True)
        tokenizer_speed([d["text"] for d in biggest[:3000]])
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
