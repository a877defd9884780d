"""Random tiny Llama 3 models for fast tests: the weights depend on the seed alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from model.checkpoint import save_checkpoint
from model.config import get_preset
from model.model import Transformer


def random_tiny(seed: int = 0, std: float = 0.2, **overrides) -> Transformer:
    """The `tiny` preset with `overrides`. A large std gives sharp logits, so mistakes show."""
    torch.manual_seed(seed)  # tests draw their inputs from the global RNG next: the same inputs every run
    model = Transformer(dataclasses.replace(get_preset("tiny"), **overrides))
    model.init_weights(seed=seed, std=std)
    return model.eval()


def tiny_checkpoint(path: Path, seed: int = 0, std: float = 0.02, **overrides) -> Path:
    """A saved random tiny model with the real Llama 3 tokenizer."""
    from model.tokenizer import load_tokenizer

    return save_checkpoint(random_tiny(seed, std, **overrides), path, load_tokenizer("llama3"))
