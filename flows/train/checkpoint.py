"""Training checkpoints: sharded with torch.distributed.checkpoint (DCP), a checksum manifest,
verified on restore.

Layout of one checkpoint directory (`step-00000120-<ms>`):
  model/herd.json, model/tokenizer.json   the config and tokenizer (herd's native files)
  model/.metadata, model/__<rank>_<n>.distcp   the weights, DCP: each rank writes the shards it
                                holds, keyed by herd's parameter names; model.checkpoint.load_model
                                reads (consolidates) the folder offline, without processes
  optimizer/.metadata, optimizer/__<rank>_<n>.distcp   AdamW state, DCP, keyed by parameter name
  trainer.json    step, scheduler, data position, world size, metrics at save time
  rng.pt          torch / numpy / Python RNG states of every rank
  checkpoint.json format, step and the sha256 of every file above; written last

DCP reshards on load, so a checkpoint resumes under another world size or layout (DDP, FSDP2,
TP, PP). Every rank writes into `.tmp-<name>` of its staging folder; each hashes the shard
files it wrote, rank 0 the rest, and rank 0 writes the manifest from all of them, then renames
the folder, so a crash mid-write leaves no directory that looks complete. Restore checks every
sha256 and falls back to the previous checkpoint (with a warning) when the newest is damaged.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from flows.digest import sha256_file
from model.errors import HerdError

FORMAT = "herd.train-checkpoint/v2"
MANIFEST = "checkpoint.json"
_NAME = re.compile(r"^step-(\d{8})(?:-.*)?$")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped on restore (damaged or incomplete)."""


def checkpoint_name(step: int, tag: str = "") -> str:
    return f"step-{step:08d}" + (f"-{tag}" if tag else "")


def step_of(path: str | Path) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- RNG -------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- write ---------------------------------------------------------------------------------


def _hash_files(root: Path, rank: int) -> dict[str, str]:
    """sha256 of the files this rank wrote: its own DCP shards; rank 0 also every other file."""
    own = re.compile(rf"^__{rank}_\d+\.distcp$")
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        if own.match(p.name) or (rank == 0 and not p.name.endswith(".distcp")):
            out[str(p.relative_to(root))] = sha256_file(p)
    return out


def write_checkpoint(
    parent: str | Path,
    name: str,
    *,
    rank: int,
    model_state: dict,
    optimizer_state: dict,
    model_config,
    tokenizer,
    trainer_state: dict,
    rng_states: list,
    gather,
) -> Path:
    """Write a checkpoint to `parent/name` (collective: every rank calls it with the same `name`;
    `gather(obj)` returns every rank's obj on rank 0). `model_state` and `optimizer_state` are
    this rank's (sharded) state dicts, from torch.distributed.checkpoint.state_dict. Returns the
    folder this rank wrote (the same one on ranks that share `parent`)."""
    import torch.distributed.checkpoint as dcp

    parent = Path(parent)
    final = parent / name
    tmp = parent / f".tmp-{name}"
    (tmp / "model").mkdir(parents=True, exist_ok=True)
    single = not torch.distributed.is_initialized()
    dcp.save(model_state, checkpoint_id=str(tmp / "model"), no_dist=single)
    dcp.save(optimizer_state, checkpoint_id=str(tmp / "optimizer"), no_dist=single)
    if rank == 0:
        model_config.save(tmp / "model" / "herd.json")
        if tokenizer is not None:
            tokenizer.save(tmp / "model")
        torch.save({"ranks": rng_states}, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2, default=float) + "\n")
    hashes = gather(_hash_files(tmp, rank))  # also the barrier: every rank has written
    if rank == 0:
        files = {k: v for h in hashes for k, v in h.items()}
        manifest = {"format": FORMAT, "step": trainer_state["step"], "files": dict(sorted(files.items()))}
        with open(tmp / MANIFEST, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _rename(tmp, final)
    gather(None)  # rank 0 has renamed a shared folder; a rank with its own staging renames its part
    if tmp.exists():
        _rename(tmp, final)
    return final


def _rename(tmp: Path, final: Path) -> None:
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def prune(parent: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (and stale temporary ones) in `parent`."""
    parent = Path(parent)
    found = sorted(
        (p for p in parent.iterdir() if p.is_dir() and step_of(p) is not None),
        key=lambda p: (step_of(p), p.stat().st_mtime),
    )
    removed = found[:-keep] if keep > 0 else []
    removed += [p for p in parent.iterdir() if p.name.startswith(".tmp-")]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# --- verify and restore ----------------------------------------------------------------------


def verify(path: str | Path) -> str | None:
    """None when the checkpoint is complete and every checksum matches, else what is wrong."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        return f"no {MANIFEST} (incomplete write)"
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{MANIFEST} is not valid JSON ({e})"
    if manifest.get("format") != FORMAT:
        return f"format {manifest.get('format')!r}, expected {FORMAT!r}"
    for rel, digest in manifest.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if sha256_file(f) != digest:
            return f"sha256 mismatch in {rel}"
    return None


def candidates(parent: str | Path, newest: str | Path | None = None) -> list[Path]:
    """Checkpoints in `parent`, newest first; with `newest`, only it and older ones."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.is_dir() and step_of(p) is not None]
    if newest is not None:
        limit = step_of(newest)
        found = [p for p in found if step_of(p) <= limit]
    return sorted(found, key=lambda p: (step_of(p), p.stat().st_mtime), reverse=True)


def select_valid(paths: list[Path], warn=True) -> tuple[Path | None, list[str]]:
    """The first checkpoint of `paths` that verifies; a warning for each one skipped."""
    messages = []
    for i, p in enumerate(paths):
        problem = verify(p)
        if problem is None:
            return p, messages
        nxt = paths[i + 1].name if i + 1 < len(paths) else None
        msg = f"checkpoint {p} is corrupt ({problem}); " + (
            f"falling back to the previous checkpoint {nxt}" if nxt else "no earlier checkpoint to fall back to"
        )
        messages.append(msg)
        if warn:
            warnings.warn(msg, CheckpointWarning, stacklevel=2)
    return None, messages


def load_trainer(path: str | Path) -> dict:
    """The trainer state and RNG states of a verified checkpoint (the sharded parts: load_sharded)."""
    path = Path(path)
    return {
        "trainer": json.loads((path / "trainer.json").read_text()),
        "rng": torch.load(path / "rng.pt", weights_only=True)["ranks"],
        "path": str(path),
    }


def load_sharded(path: str | Path, model_state: dict, optimizer_state: dict) -> None:
    """Read the checkpoint's weights and optimizer state into this rank's state dicts, in place
    (collective); DCP reshards from whatever layout wrote them."""
    import torch.distributed.checkpoint as dcp

    single = not torch.distributed.is_initialized()
    dcp.load(model_state, checkpoint_id=str(Path(path) / "model"), no_dist=single)
    dcp.load(optimizer_state, checkpoint_id=str(Path(path) / "optimizer"), no_dist=single)


def corrupt(path: str | Path, rel: str = "model/__0_0.distcp") -> None:
    """Flip bytes in the middle of one file (fault-injection tests)."""
    f = Path(path) / rel
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.seek(size // 2)
        chunk = fh.read(64)
        fh.seek(size // 2)
        fh.write(bytes(b ^ 0xFF for b in chunk))
    if not chunk:
        raise HerdError(f"{f}: empty file, nothing to corrupt")
