"""DDP vs FSDP2 vs tensor parallelism on 2 CPU processes (gloo, no Ray), and local resume.

Data: paragraphs of the shared corpus packed in-process (the shard format of data prep) with
the Llama 3 tokenizer; the model is the `tiny` preset.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus64(tmp_path_factory) -> Path:
    if not (SHARED / "corpus").is_dir():
        print(f"skipping: shared data not found at {SHARED}")
        pytest.skip(f"shared data not found at {SHARED}")
    from flows.train.data import pack_documents

    text = (SHARED / "corpus" / "austen_emma.txt").read_text()[:150_000]
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40]
    return pack_documents(paras, tmp_path_factory.mktemp("corpus64"), seq_len=64, validation_every=20)


def _cfg(data: Path, **over):
    from flows.train.config import config_from_dict

    base = {
        "name": "par",
        "data": {"dir": str(data)},
        "training": {"steps": 20, "micro_batch": 1, "grad_accum": 2},
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"every": 1000, "keep": 2},
        "eval": {"every": 0},
        "logging": {"every": 5},
    }
    cfg = config_from_dict(base)
    return cfg.replace(**over) if over else cfg


def test_fsdp_matches_ddp_after_20_steps(corpus64, tmp_path):
    from flows.train.launch import run_local

    ddp = run_local(_cfg(corpus64, parallel={"strategy": "ddp"}), 2, tmp_path / "ddp")
    fsdp = run_local(_cfg(corpus64, parallel={"strategy": "fsdp"}), 2, tmp_path / "fsdp")
    diff = abs(ddp.final_loss - fsdp.final_loss)
    print(
        f"DDP loss {ddp.losses[0]:.4f} -> {ddp.final_loss:.6f}, FSDP2 -> {fsdp.final_loss:.6f}, "
        f"|diff| after 20 steps = {diff:.2e}"
    )
    assert len(ddp.losses) == len(fsdp.losses) == 20
    assert ddp.final_loss < ddp.losses[0] - 0.5  # it learns
    assert diff < 1e-3


def test_tensor_parallel_matches_single_process(corpus64, tmp_path):
    from flows.train.launch import run_local

    over = dict(training={"steps": 1, "micro_batch": 2, "grad_accum": 1})
    single = run_local(_cfg(corpus64, **over), 1, tmp_path / "single", threads=2)
    tp = run_local(_cfg(corpus64, parallel={"strategy": "fsdp", "tp": 2}, **over), 2, tmp_path / "tp")
    diff = abs(single.final_loss - tp.final_loss)
    print(
        f"single-process loss {single.final_loss:.7f}, TP=2 loss {tp.final_loss:.7f}, |diff| = {diff:.2e}, "
        f"grad norm {single.metrics['grad_norm']:.6f} vs {tp.metrics['grad_norm']:.6f}"
    )
    assert diff < 1e-5
    assert tp.metrics["grad_norm"] == pytest.approx(single.metrics["grad_norm"], rel=1e-4)


def test_local_resume_repeats_no_batch(corpus64, tmp_path):
    """Stop after step 4 (checkpoint), start again: the loss curve equals an uninterrupted run's."""
    from flows.train.launch import run_local

    common = dict(checkpoint={"every": 2, "keep": 2}, schedule={"kind": "constant", "warmup_steps": 0})
    full = run_local(
        _cfg(corpus64, training={"steps": 6, "micro_batch": 1, "grad_accum": 1}, **common), 2, tmp_path / "full"
    )
    part = run_local(
        _cfg(corpus64, training={"steps": 4, "micro_batch": 1, "grad_accum": 1}, **common), 2, tmp_path / "resumed"
    )
    rest = run_local(
        _cfg(corpus64, training={"steps": 6, "micro_batch": 1, "grad_accum": 1}, **common), 2, tmp_path / "resumed"
    )
    assert "step-00000004" in rest.resumed_from
    assert part.losses + rest.losses == pytest.approx(full.losses, abs=1e-6)


@pytest.mark.parametrize("preset", ["tiny", pytest.param("small", marks=pytest.mark.acceptance)])
def test_resume_at_another_world_size(corpus64, tmp_path, preset):
    """Sharded (DCP) checkpoints: one run saved by 2 FSDP2 ranks at step 2, resumed by 1 rank to
    step 4, then by 2 ranks to step 6; its losses equal an uninterrupted 2-rank run's (<= 1e-5).
    The global batch stays 2 rows (grad_accum 2 on 1 rank, 1 on 2 ranks)."""
    from flows.train.launch import run_local

    def run(steps, world, out):
        cfg = _cfg(
            corpus64,
            model={"preset": preset},
            parallel={"strategy": "fsdp"},
            training={"steps": steps, "micro_batch": 1, "grad_accum": 2 // world},
            checkpoint={"every": 2, "keep": 2},
            schedule={"kind": "constant", "warmup_steps": 0},
        )
        return run_local(cfg, world, out)

    full = run(6, 2, tmp_path / "full")
    a = run(2, 2, tmp_path / "chain")
    b = run(4, 1, tmp_path / "chain")  # 2 -> 1
    c = run(6, 2, tmp_path / "chain")  # 1 -> 2
    assert "step-00000002" in b.resumed_from and "step-00000004" in c.resumed_from
    diffs = [abs(x - y) for x, y in zip(a.losses + b.losses + c.losses, full.losses)]
    print(
        f"{preset}: losses {full.losses[0]:.4f} -> {full.losses[-1]:.4f}; max |loss diff| vs uninterrupted: "
        f"steps 3-4 (resumed 2 -> 1) {max(diffs[2:4]):.1e}, steps 5-6 (resumed 1 -> 2) {max(diffs[4:6]):.1e}"
    )
    assert len(diffs) == 6 and max(diffs) <= 1e-5
    assert full.losses[-1] < full.losses[0]  # it learns


@pytest.mark.acceptance  # 4 processes: minutes on 2 cores
def test_fsdp_x_tp_2x2_matches_single_process(corpus64, tmp_path):
    """One DeviceMesh (dp 2, tp 2), 4 processes: FSDP2 over dp, the TP plan over tp; built on the
    meta device. Loss after 10 steps equals a single process's (same global batch) within 1e-5."""
    from flows.train.launch import run_local

    over = dict(schedule={"kind": "constant", "warmup_steps": 0})
    single = run_local(
        _cfg(corpus64, training={"steps": 10, "micro_batch": 1, "grad_accum": 2}, **over),
        1,
        tmp_path / "single",
        threads=2,
    )
    mesh = run_local(
        _cfg(
            corpus64,
            training={"steps": 10, "micro_batch": 1, "grad_accum": 1},
            parallel={"strategy": "fsdp", "tp": 2},
            **over,
        ),
        4,
        tmp_path / "2x2",
        threads=1,
    )
    diff = abs(single.final_loss - mesh.final_loss)
    print(
        f"FSDP2 x TP (2 x 2): loss {mesh.losses[0]:.4f} -> {mesh.final_loss:.7f}, single process "
        f"{single.final_loss:.7f}, |diff| after 10 steps = {diff:.1e}"
    )
    assert len(mesh.losses) == 10 and mesh.final_loss < mesh.losses[0]
    assert diff <= 1e-5


@pytest.mark.parametrize(
    "layout,workers,virtual",
    [
        ("pp2", 2, 1),
        pytest.param("pp2xdp2", 4, 1, marks=pytest.mark.acceptance),  # 4 processes: minutes on 2 cores
        pytest.param("pp2-interleaved", 2, 2, marks=pytest.mark.acceptance),
    ],
)
def test_pipeline_matches_single_process(corpus64, tmp_path, capfd, layout, workers, virtual):
    """torch.distributed.pipelining: PP = 2 (1F1B), PP = 2 x DP = 2 (FSDP2 inside each stage), and
    PP = 2 with 2 virtual stages per rank (interleaved 1F1B): loss after 10 steps equals a single
    process's (same global batch) within 1e-5; the bubble fraction is printed."""
    from flows.train.launch import run_local

    dp = workers // 2
    model = {"overrides": {"n_layers": 4}}  # 4 stages when interleaved
    over = dict(model=model, schedule={"kind": "constant", "warmup_steps": 0}, eval={"every": 10, "batches": 3})
    single = run_local(
        _cfg(corpus64, training={"steps": 10, "micro_batch": 2, "grad_accum": 2 * dp}, **over),
        1,
        tmp_path / "single",
        threads=2,
    )
    pipe = run_local(
        _cfg(
            corpus64,
            training={"steps": 10, "micro_batch": 2, "grad_accum": 2},
            parallel={"strategy": "fsdp", "pp": 2, "virtual_stages": virtual, "microbatches": 4},
            **over,
        ),
        workers,
        tmp_path / layout,
        threads=1,
    )
    printed = capfd.readouterr().out
    bubble = re.search(r"pipeline: .*bubble fraction ([\d.]+)", printed)
    diff = abs(single.final_loss - pipe.final_loss)
    print(
        f"{layout}: {bubble.group(0)}; loss {pipe.losses[0]:.4f} -> {pipe.final_loss:.7f}, single process "
        f"{single.final_loss:.7f}, |diff| after 10 steps = {diff:.1e}"
    )
    assert float(bubble.group(1)) == pytest.approx(1 / (4 * virtual + 1), abs=1e-3)
    assert len(pipe.losses) == 10 and pipe.final_loss < pipe.losses[0]
    assert diff <= 1e-5
    # validation, forward-only through the schedule (3 micro-batches padded to the micro-batch count)
    for k in ("initial_val_loss", "val_loss"):
        assert pipe.metrics[k] == pytest.approx(single.metrics[k], abs=1e-5), k
