"""The model CLI end to end: init, import (GGUF/HF/Meta), export, tokenize, generate, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.cli import main as herd_main
from model.checkpoint import half_to_interleaved, load_model

REPO = Path(__file__).resolve().parents[1]


def herd(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    assert herd_main(["model", "init", "--preset", "tiny", "--seed", "3", str(out)]) == 0
    return out


def logits_of(path, ids):
    model, _ = load_model(path)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def test_tokenize_cli_prints_ids(capsys):
    assert herd_main(["tokenize", "Hello world"]) == 0
    assert json.loads(capsys.readouterr().out) == [9906, 1917]
    assert herd_main(["tokenize", "--chat", "Hi"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids[:5] == [128000, 128006, 882, 128007, 271] and ids[-1] == 128009


def test_init_then_generate_json(tiny_dir, capsys):
    assert herd_main(["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "token_ids"}
    assert 1 <= len(out["token_ids"]) <= 5


def test_sampling_with_seed_is_reproducible(tiny_dir, capsys):
    args = [
        "generate",
        "--model",
        str(tiny_dir),
        "--prompt",
        "Hello",
        "--max-tokens",
        "8",
        "--json",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "11",
    ]
    herd_main(args)
    first = json.loads(capsys.readouterr().out)["token_ids"]
    herd_main(args)
    assert json.loads(capsys.readouterr().out)["token_ids"] == first


def test_hf_export_then_import_round_trip(tiny_dir, tmp_path):
    assert herd_main(["model", "export", "--to", "hf", str(tiny_dir), str(tmp_path / "hf")]) == 0
    assert herd_main(["model", "import", "--from", "hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    ids = list(range(100, 140))
    assert torch.equal(logits_of(tiny_dir, ids), logits_of(tmp_path / "back", ids))


def test_meta_import_undoes_rotary_permutation(tiny_dir, tmp_path):
    """Write the tiny model as Meta would (interleaved q/k rows, params.json), import it back."""
    model, cfg = load_model(tiny_dir)
    meta = tmp_path / "meta"
    meta.mkdir()
    state = {}
    for name, w in model.state_dict().items():
        if name.endswith("attention.wq.weight"):
            w = half_to_interleaved(w, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = half_to_interleaved(w, cfg.n_kv_heads)
        state[name] = w.clone()
    # Two model-parallel shards, cut as Meta cuts them.
    shards = [{}, {}]
    for name, w in state.items():
        short = name.split(".")[-2]
        dim = {"wo": 1, "w2": 1, "tok_embeddings": 1}.get(short, 0)
        if w.ndim == 1:
            shards[0][name] = shards[1][name] = w
        else:
            a, b = w.chunk(2, dim=dim)
            shards[0][name], shards[1][name] = a.contiguous(), b.contiguous()
    for i, shard in enumerate(shards):
        torch.save(shard, meta / f"consolidated.{i:02d}.pth")
    # ffn hidden 192 = 256-multiple rounding of int(2*4*64/3)=170 with multiple_of 64.
    params = {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "multiple_of": 64,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "use_scaled_rope": True,
    }
    (meta / "params.json").write_text(json.dumps(params))
    assert (
        herd_main(["model", "import", "--from", "meta", str(meta), str(tmp_path / "out"), "--tokenizer", "llama3"]) == 0
    )
    ids = list(range(5, 45))
    assert torch.equal(logits_of(tiny_dir, ids), logits_of(tmp_path / "out", ids))


# --- bad input: one line naming the file or field, non-zero exit, no traceback -----------------


def test_truncated_gguf(tmp_path, smollm2_gguf):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    assert_one_line_error(herd("model", "import", "--from", "gguf", str(bad), str(tmp_path / "o")), str(bad))


def test_truncated_safetensors(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert_one_line_error(herd("generate", "--model", str(bad), "--prompt", "hi"), str(weights))


def test_weight_config_shape_mismatch(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "herd.json").read_text())
    cfg["ffn_hidden_dim"] = 256
    (bad / "herd.json").write_text(json.dumps(cfg))
    assert_one_line_error(herd("generate", "--model", str(bad), "--prompt", "hi"), "feed_forward.w1", "shape")


def test_unknown_config_field(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "herd.json").read_text())
    cfg["n_layer"] = 2
    (bad / "herd.json").write_text(json.dumps(cfg))
    assert_one_line_error(herd("generate", "--model", str(bad), "--prompt", "hi"), "herd.json", "n_layer")


def test_unknown_preset(tmp_path):
    assert_one_line_error(herd("model", "init", "--preset", "llama9-1t", str(tmp_path / "o")), "llama9-1t")


def test_empty_prompt(tiny_dir):
    assert_one_line_error(herd("generate", "--model", str(tiny_dir), "--prompt", "  "), "prompt")


def test_missing_model_path(tmp_path):
    assert_one_line_error(herd("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"), "nope")


def test_prompt_longer_than_context(tiny_dir):
    assert_one_line_error(
        herd("generate", "--model", str(tiny_dir), "--prompt", "word " * 9000, "--max-tokens", "10"), "context"
    )
