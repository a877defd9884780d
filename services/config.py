"""The server's settings: the `args` of the Serve application (configs/serve/*.yaml).

    args:
      model: models:/herd@champion     # a model folder, `smollm2`, or an MLflow registry URI
      config: configs/serve/engine.yaml # optional: more settings from a YAML file (args win)
      dtype: bfloat16
      engine: {max_num_seqs: 32, max_model_len: 2048, ...}

Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.errors import HerdError
from services.engine.config import EngineConfig


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_num_seqs: int = Field(32, ge=1)
    max_model_len: int = Field(2048, ge=2)
    max_num_batched_tokens: int = Field(512, ge=1)
    prefill_chunk: int = Field(256, ge=1)
    block_size: int = Field(16, ge=1)
    enable_prefix_caching: bool = True
    max_queue: int = Field(256, ge=0)
    num_blocks: int = Field(0, ge=0)  # KV-cache blocks; 0: max_num_seqs sequences of max_model_len
    cuda_graphs: bool = True
    cuda_graph_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)

    def to_engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump())


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    config: str | None = None  # a YAML file of further settings, read by load_server_config
    served_model_name: str = "herd"
    dtype: Literal["auto", "float32", "bfloat16", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto: the GPU where one exists
    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads of the engine (None: torch's)
    request_timeout_s: float = Field(600.0, gt=0)  # a request running longer is cancelled
    default_max_tokens: int = Field(512, ge=1)  # when a request gives no max_tokens
    # Authentication fails closed: with `auth: api_key` (the default) the server refuses to start
    # unless the env var `api_key_env` holds a key; `auth: none` serves without one.
    auth: Literal["api_key", "none"] = "api_key"
    api_key_env: str = "HERD_API_KEY"
    public_metrics: bool = False  # true: /metrics answers without the key (a scraper inside the cluster)
    max_body_bytes: int = Field(4 * 2**20, ge=1024)  # larger request bodies get 413, unread
    engine: EngineSettings = Field(default_factory=EngineSettings)

    def api_key(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The key requests must carry; None with `auth: none`. No key under `auth: api_key` is an error."""
        if self.auth == "none":
            return None
        key = environ.get(self.api_key_env, "").strip()
        if not key:
            raise HerdError(
                f"no API key: {self.api_key_env} is empty or unset; set it, or set `auth: none` in the "
                "serve args to serve without authentication"
            )
        return key

    @field_validator("model")
    @classmethod
    def _model_given(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model must name a folder, `smollm2` or a models:/ URI")
        return v


def load_server_config(args: dict[str, Any] | ServerConfig) -> ServerConfig:
    """Serve app args -> ServerConfig; `config` (a YAML file) supplies defaults under the args."""
    if isinstance(args, ServerConfig):
        return args
    args = dict(args or {})
    merged: dict[str, Any] = {}
    if args.get("config"):
        path = Path(args["config"])
        if not path.is_file():
            raise HerdError(f"{path}: serve settings file not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise HerdError(f"{path}: expected a mapping of settings")
        merged.update(loaded)
        if isinstance(loaded.get("engine"), dict) and isinstance(args.get("engine"), dict):
            args["engine"] = {**loaded["engine"], **args["engine"]}
    merged.update(args)
    try:
        return ServerConfig(**merged)
    except Exception as e:  # pydantic.ValidationError
        raise HerdError(f"serve args: {e}") from None
