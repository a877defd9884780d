"""Typed model configuration and the named presets.

One dataclass describes every Llama-3-architecture model herd knows; the
presets reproduce Meta's published shapes so that parameter counts can be
checked against the papers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from model.errors import HerdError


class ConfigError(HerdError, ValueError):
    """A config field is missing, unknown or inconsistent."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    ffn_hidden_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    # Token ids the tokenizer adds; kept with the weights so a checkpoint is self-describing.
    bos_token_id: int | None = 128000
    eos_token_ids: tuple[int, ...] = (128001, 128009)
    tokenizer: str = "llama3"

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"head_dim ({self.dim // self.n_heads}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self) -> int:
        """Exact parameter count of `Transformer(self)`."""
        hd = self.head_dim
        attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.ffn_hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim
        out = 0 if self.tie_embeddings else emb
        return self.n_layers * per_layer + emb + out + self.dim

    def flops_per_token(self, seq_len: int) -> int:
        """Training flops per token (fwd+bwd), as torchtitan counts them:
        6 * matmul params + 12 * layers * heads * head_dim * seq_len for attention.
        The embedding lookup is free; the output projection is a matmul even when tied."""
        matmul_params = self.num_params() - self.vocab_size * self.dim
        if self.tie_embeddings:
            matmul_params += self.vocab_size * self.dim
        return 6 * matmul_params + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        d = dict(d)
        rs = d.get("rope_scaling")
        if isinstance(rs, dict):
            try:
                d["rope_scaling"] = RopeScaling(**rs)
            except TypeError as e:
                raise ConfigError(f"rope_scaling: {e}") from None
        if "eos_token_ids" in d and d["eos_token_ids"] is not None:
            d["eos_token_ids"] = tuple(int(t) for t in d["eos_token_ids"])
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(str(e)) from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: model config not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


_LLAMA3_8B = ModelConfig()
PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": _LLAMA3_8B,
    "llama3-70b": dataclasses.replace(_LLAMA3_8B, dim=8192, n_layers=80, n_heads=64, ffn_hidden_dim=28672),
    "llama3-405b": dataclasses.replace(_LLAMA3_8B, dim=16384, n_layers=126, n_heads=128, ffn_hidden_dim=53248),
    "llama3.1-8b": dataclasses.replace(_LLAMA3_8B, rope_scaling=RopeScaling(), max_seq_len=131072),
    "smollm2-135m": ModelConfig(
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        vocab_size=49152,
        ffn_hidden_dim=1536,
        norm_eps=1e-5,
        rope_theta=100000.0,
        max_seq_len=8192,
        tie_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
        tokenizer="gguf",
    ),
    # Small enough for unit tests, with the real Llama 3 vocabulary and rope scaling.
    "tiny": dataclasses.replace(
        _LLAMA3_8B,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden_dim=192,
        rope_scaling=RopeScaling(),
        max_seq_len=8192,
    ),
    # ~155M, the shape the training benchmark uses.
    "small": dataclasses.replace(
        _LLAMA3_8B,
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        ffn_hidden_dim=2048,
        max_seq_len=8192,
        tie_embeddings=True,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None
