"""Where every input document went: kept, or dropped with exactly one `stage:reason`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def stage_order(doc_filters: list) -> tuple[str, ...]:
    """The stages that drop documents, in pipeline order; the document filters' stages are their
    names, in their list's order."""
    names = tuple(f.name for f in doc_filters if f.drops)
    return ("read", "normalize", *names, "exact_dedup", "minhash", "semdedup", "quality", "quota", "mix")


class Accounting:
    def __init__(self, samples_per_reason: int, doc_filters: list):
        self.samples_per_reason = samples_per_reason
        self.stages = stage_order(doc_filters)
        self.kept = 0
        self.dropped: Counter[str] = Counter()
        self.samples: dict[str, list[dict]] = {}

    def add(self, ids, texts, sources, reasons) -> None:
        for doc_id, text, source, reason in zip(ids, texts, sources, reasons):
            if not reason:
                self.kept += 1
                continue
            self.dropped[reason] += 1
            bucket = self.samples.setdefault(reason, [])
            if len(bucket) < self.samples_per_reason:
                bucket.append({"id": str(doc_id), "source": str(source), "reason": reason, "text": str(text)})

    @property
    def total(self) -> int:
        return self.kept + sum(self.dropped.values())

    def by_stage(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for reason, n in self.dropped.items():
            out[reason.split(":", 1)[0]] += n
        return dict(sorted(out.items(), key=lambda kv: self.stages.index(kv[0]) if kv[0] in self.stages else 99))

    def stage_flow(self) -> dict[str, dict[str, int]]:
        """Per stage: documents that reached it, and how many it dropped."""
        flow, remaining = {}, self.total
        by_stage = self.by_stage()
        for stage in self.stages:
            dropped = by_stage.get(stage, 0)
            flow[stage] = {"in": remaining, "dropped": dropped}
            remaining -= dropped
        return flow

    def write(self, out: Path) -> tuple[Path, Path]:
        """rejects.jsonl: malformed records (read:*); dropped_samples.jsonl: the others."""
        rejects, dropped = out / "rejects.jsonl", out / "dropped_samples.jsonl"
        with open(rejects, "w") as fr, open(dropped, "w") as fd:
            for reason in sorted(self.samples):
                target = fr if reason.startswith("read:") else fd
                for row in self.samples[reason]:
                    target.write(json.dumps(row, ensure_ascii=False) + "\n")
        return rejects, dropped

    def summary(self) -> dict:
        return {
            "input_documents": self.total,
            "kept": self.kept,
            "dropped": sum(self.dropped.values()),
            "dropped_by_stage": self.by_stage(),
            "dropped_by_reason": dict(sorted(self.dropped.items())),
            "stages": self.stage_flow(),
        }
