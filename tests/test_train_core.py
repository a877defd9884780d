"""Pretraining core without Ray or processes: config, schedules, fused loss, data cursor,
checkpoints (atomic write, checksum, fallback), optimizer groups."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import HerdError

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "corpus"


# --- config ------------------------------------------------------------------------------------


def test_configs_in_repo_load():
    from flows.train.config import load_config

    for path in sorted((REPO / "configs" / "pretrain").glob("*.yaml")):
        if path.name.startswith("data-"):
            continue  # data prep configs for `herd data prep`
        cfg = load_config(path)
        assert cfg.training.steps >= 1, path


@pytest.mark.parametrize(
    "data,message",
    [
        ({"optimizer": {"lr_max": 1}}, "unknown key 'optimizer.lr_max'"),
        ({"training": {"steps": "ten"}}, "training.steps must be an integer"),
        ({"parallel": {"strategy": "zero"}}, "parallel.strategy must be ddp or fsdp"),
        ({"checkpoint": {"keep": 1}}, "checkpoint.keep must be >= 2"),
    ],
)
def test_config_errors_name_the_key(data, message):
    from flows.train.config import config_from_dict

    with pytest.raises(HerdError, match=message):
        config_from_dict(data)


def test_config_replace_merges_sections():
    from flows.train.config import config_from_dict

    cfg = config_from_dict({"training": {"steps": 7, "micro_batch": 3}}).replace(training={"steps": 9}, seed=5)
    assert (cfg.training.steps, cfg.training.micro_batch, cfg.seed) == (9, 3, 5)


# --- schedules ---------------------------------------------------------------------------------


def test_schedules():
    from flows.train.optim import lr_ratio

    kw = dict(total=100, warmup=10, min_ratio=0.1, decay_fraction=0.2)
    cos = [lr_ratio(s, kind="cosine", **kw) for s in range(100)]
    assert cos[0] == pytest.approx(1 / 11) and cos[9] == pytest.approx(10 / 11)
    assert cos[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))  # monotone decay after warmup
    assert cos[99] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    wsd = [lr_ratio(s, kind="wsd", **kw) for s in range(100)]
    assert wsd[10:80] == [1.0] * 70  # stable
    assert wsd[99] == pytest.approx(0.1) and wsd[80] < 1.0  # linear decay over the last 20 %
    assert [lr_ratio(s, kind="constant", **kw) for s in (10, 99)] == [1.0, 1.0]


# --- fused loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_linear_cross_entropy_matches_reference(autocast):
    from flows.train.losses import fused_linear_cross_entropy, reference_cross_entropy

    torch.manual_seed(0)
    N, D, V = 37, 16, 1000
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::5] = -100
    wt = (t >= 0).float() / (t >= 0).sum()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        ref = reference_cross_entropy(h, w, t, wt)
    (gh_ref, gw_ref) = torch.autograd.grad(ref * 3.0, (h, w))
    with ctx:
        fused = fused_linear_cross_entropy(h, w, t, wt, chunk=8)  # several chunks, a ragged last one
    (gh, gw) = torch.autograd.grad(fused * 3.0, (h, w))
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, ref, **tol)
    torch.testing.assert_close(gh, gh_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, **tol)


def test_causal_lm_loss_through_model_head():
    """The model's head hook gives the same loss as full logits + cross-entropy."""
    import torch.nn.functional as F

    from flows.train.data import Batch
    from flows.train.losses import causal_lm_loss
    from model.config import get_preset
    from model.model import Transformer

    torch.manual_seed(0)
    model = Transformer(get_preset("tiny"))
    model.init_weights(seed=0)
    tokens = torch.randint(0, 1000, (2, 12))
    positions = torch.tensor([list(range(12)), [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1]])
    targets = torch.randint(0, 1000, (2, 12))
    weights = torch.full((2, 12), 1 / 24)
    out = causal_lm_loss(model, Batch(tokens, positions, targets, weights))
    logits = model(tokens, positions=positions)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    assert out.count.item() == pytest.approx(1.0)


# --- data --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from flows.train.data import pack_documents

    docs = [f"Document number {i}. " + "word " * (5 + (i * 7) % 60) for i in range(120)]
    return pack_documents(docs, tmp_path_factory.mktemp("packed"), seq_len=32, validation_every=10)


def test_rows_to_batch_masks_boundaries_and_padding():
    from flows.train.data import IGNORE, rows_to_batch

    tokens = np.arange(10, dtype=np.uint32)[None]
    positions = np.array([[5, 6, 7, 0, 1, 2, 0, 1, -1, -1]], dtype=np.int32)
    inputs, pos, targets, valid = rows_to_batch(tokens, positions)
    assert inputs.tolist() == [list(range(9))] and pos.tolist() == [[5, 6, 7, 0, 1, 2, 0, 1, -1]]
    # targets at a document start (position 0) and at padding (-1) carry no loss
    assert targets.tolist() == [[1, 2, IGNORE, 4, 5, IGNORE, 7, IGNORE, IGNORE]]
    assert valid.sum().item() == 5


def test_ranks_read_distinct_rows_and_cover_the_global_batch(packed):
    from flows.train.data import PackedData

    single = PackedData(packed, "train", micro_batch=4, grad_accum=2, dp_size=1, seed=3)
    ranks = [PackedData(packed, "train", micro_batch=2, grad_accum=2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for _ in range(3):
        ref = torch.cat([b.tokens for b in single.next_step()])
        parts = [[b.tokens for b in r.next_step()] for r in ranks]
        # micro-step m of rank r holds rows (m * dp + r) * mb ...: the ranks' rows are disjoint
        rows = torch.cat([parts[r][m] for m in range(2) for r in range(2)])
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, ref.tolist()))
        assert not set(map(tuple, parts[0][0].tolist())) & set(map(tuple, parts[1][0].tolist()))
    # loss weights sum to 1 over the whole global batch, whatever the split
    w = sum(b.weights.sum().item() for r in ranks for b in r.next_step())
    assert w == pytest.approx(1.0, abs=1e-6)


def test_cursor_resumes_exactly_and_epochs_reshuffle(packed):
    from flows.train.data import PackedData

    a = PackedData(packed, "train", micro_batch=3, seed=1)
    for _ in range(4):
        a.next_step()
    state = a.state_dict()
    rest = [a.next_step()[0].tokens for _ in range(3)]
    b = PackedData(packed, "train", micro_batch=3, seed=1)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(x, b.next_step()[0].tokens) for x in rest)
    assert state["cursor"] == 12
    n = a.num_rows
    order0 = [a._row_index(g) for g in range(n)]
    order1 = [a._row_index(g) for g in range(n, 2 * n)]
    assert sorted(order0) == list(range(n)) == sorted(order1) and order0 != order1
    with pytest.raises(HerdError, match="resume with the same data"):
        b.load_state_dict({**state, "num_rows": n + 1})


# --- checkpoints -------------------------------------------------------------------------------


def _write(parent, step, tag=""):
    from flows.train import checkpoint as ckpt
    from model.config import get_preset
    from model.model import Transformer

    model = Transformer(get_preset("tiny"))
    model.init_weights(seed=step)
    opt = torch.optim.AdamW(model.parameters())
    return ckpt.write_checkpoint(
        parent,
        ckpt.checkpoint_name(step, tag),
        rank=0,
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        model_config=model.config,
        tokenizer=None,
        trainer_state={"step": step, "data": {"cursor": step * 8}},
        rng_states=[ckpt.rng_state()],
        gather=lambda obj: [obj],
    ), model


def test_checkpoint_atomic_layout_and_sharded_model(tmp_path):
    from flows.train import checkpoint as ckpt
    from model.checkpoint import consolidate, load_model

    path, model = _write(tmp_path, 4)
    assert path.name == "step-00000004" and not list(tmp_path.glob(".tmp-*"))
    manifest = json.loads((path / "checkpoint.json").read_text())
    assert manifest["format"] == "herd.train-checkpoint/v2"
    assert set(manifest["files"]) == {
        "model/herd.json",
        "model/.metadata",
        "model/__0_0.distcp",
        "optimizer/.metadata",
        "optimizer/__0_0.distcp",
        "rng.pt",
        "trainer.json",
    }
    assert ckpt.verify(path) is None
    loaded, cfg = load_model(path)  # the DCP shards consolidated offline, in this one process
    assert cfg.dim == 64
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    native = consolidate(path / "model", tmp_path / "native")
    assert (native / "model.safetensors").is_file() and not list(native.glob("*.distcp"))
    assert torch.equal(load_model(native)[0].tok_embeddings.weight, model.tok_embeddings.weight)
    assert ckpt.load_trainer(path)["trainer"]["data"]["cursor"] == 32


def test_model_export_hf_consolidates_a_sharded_checkpoint(tmp_path):
    """`herd model export --to hf` on a training checkpoint: its DCP shards become one HF safetensors file."""
    from safetensors.torch import load_file

    from flows.cli import main as herd_main
    from model.checkpoint import herd_to_hf_name

    path, model = _write(tmp_path, 2)
    assert herd_main(["model", "export", "--to", "hf", str(path), str(tmp_path / "hf")]) == 0
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == 64
    for name, w in model.state_dict().items():  # herd's rotary layout is transformers' (rotate-half)
        assert torch.equal(hf[herd_to_hf_name(name)], w), name
    assert set(hf) == {herd_to_hf_name(n) for n in model.state_dict()}


def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path):
    from flows.train import checkpoint as ckpt

    for s in (2, 4, 6):
        _write(tmp_path, s)
    ckpt.corrupt(tmp_path / "step-00000006")
    (tmp_path / ".tmp-step-00000008-1").mkdir()  # an interrupted write is never a candidate
    cands = ckpt.candidates(tmp_path)
    assert [c.name for c in cands] == ["step-00000006", "step-00000004", "step-00000002"]
    with pytest.warns(ckpt.CheckpointWarning) as rec:
        path, messages = ckpt.select_valid(cands)
    assert path.name == "step-00000004"
    text = str(rec[0].message)
    assert "step-00000006 is corrupt (sha256 mismatch in model/__0_0.distcp)" in text
    assert "falling back to the previous checkpoint step-00000004" in text
    print("corruption warning:", text)
    # incomplete: no manifest
    (tmp_path / "step-00000004" / "checkpoint.json").unlink()
    assert ckpt.verify(tmp_path / "step-00000004") == "no checkpoint.json (incomplete write)"
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006"]


# --- optimizer ---------------------------------------------------------------------------------


def test_weight_decay_groups():
    from flows.train.optim import build_optimizer
    from model.config import get_preset
    from model.model import Transformer

    model = Transformer(get_preset("tiny"))
    opt = build_optimizer(model, 1e-3, [0.9, 0.95], 1e-8, 0.1, ["norm", "embedding"], "auto")
    decay, plain = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {names[id(p)] for p in plain["params"]} >= {
        "tok_embeddings.weight",
        "norm.weight",
        "layers.0.ffn_norm.weight",
    }
    assert all(
        names[id(p)].endswith(
            ("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight", "w3.weight", "output.weight")
        )
        for p in decay["params"]
    )
    assert opt.defaults["fused"] is True  # CPU, plain tensors: the fused kernel


def test_mfu_peak_table():
    from flows.train.metrics import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("Some Unknown Card") is None
