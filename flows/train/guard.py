"""Training that detects and handles its own errors (the loop in flows/train/loop.py calls these).

- `StepGuard` judges each step before the optimizer sees it, from the loss and the global
  gradient norm that every rank agrees on: a non-finite value skips the step (no update; the
  batch is spent) and counts it; a loss spike (z-score of the loss against a window of the
  recent good steps above `spike_zscore`) or `max_bad_steps` bad steps in a row asks for a
  rollback to the last good state, with the offending steps' batches skipped when replayed.
- `Snapshot` is that last good state, held in host memory: the trainable parameters (this
  rank's shards), the optimizer, scheduler and batch-source states, and the RNG. It is taken at
  the start and whenever the loop saves a checkpoint after a good step, so it is the state of
  the last good checkpoint (or of the start), restored without reading storage.
- `HangWatchdog` is a thread that, when a step runs longer than `hang_factor` x the median of the
  finished steps (and at least `hang_min_s`), dumps every thread's stack to the log and ends the
  worker process, so that Ray Train restarts the group from its last checkpoint.
"""
from __future__ import annotations

import faulthandler
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

EVENTS_FILE = "herd-events.jsonl"  # in the run folder: hangs (a killed worker cannot log to MLflow itself)


@dataclass
class Verdict:
    action: str  # "ok" | "skip" (no update) | "rollback"
    reason: str = ""  # "non-finite loss", "loss spike (z=...)", ...


@dataclass
class StepGuard:
    """The per-step decision; plain numbers in, a Verdict out (the same on every rank, since
    its inputs are all-reduced)."""

    spike_zscore: float = 6.0  # 0: no spike detection
    window: int = 20  # recent good losses the z-score is taken over
    min_window: int = 5  # no spike verdict before this many good steps
    max_bad_steps: int = 3  # bad steps in a row that ask for a rollback
    losses: deque = field(default_factory=deque)
    bad_run: list[int] = field(default_factory=list)  # the current run of bad steps
    skipped: int = 0
    rollbacks: int = 0

    def judge(self, step: int, loss: float, grad_norm: float) -> Verdict:
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            return self._bad(step, Verdict("skip", f"non-finite {what} ({loss if what == 'loss' else grad_norm})"))
        z = self.zscore(loss)
        if self.spike_zscore and z is not None and z > self.spike_zscore:
            self.bad_run.append(step)
            return Verdict("rollback", f"loss spike: {loss:.4f} is {z:.1f} standard deviations above the last "
                                       f"{len(self.losses)} steps' mean")
        self.bad_run.clear()
        self.losses.append(loss)
        while len(self.losses) > self.window:
            self.losses.popleft()
        return Verdict("ok")

    def _bad(self, step: int, verdict: Verdict) -> Verdict:
        self.bad_run.append(step)
        self.skipped += 1
        if len(self.bad_run) >= self.max_bad_steps:
            return Verdict("rollback", f"{len(self.bad_run)} bad steps in a row (last: {verdict.reason})")
        return verdict

    def zscore(self, loss: float) -> float | None:
        if len(self.losses) < self.min_window:
            return None
        mean = statistics.fmean(self.losses)
        std = statistics.pstdev(self.losses)
        # a flat curve: one part in a thousand of the loss stands for its spread
        return (loss - mean) / max(std, 1e-3 * abs(mean), 1e-8)

    def rolled_back(self) -> list[int]:
        """After a rollback: the offending steps (their batches are skipped when replayed)."""
        offending, self.bad_run = list(self.bad_run), []
        self.rollbacks += 1
        self.losses.clear()  # the window restarts from the restored state
        return offending


def nonfinite_across_ranks(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """1.0 on every rank when any rank saw a non-finite loss or gradient norm, else 0.0."""
    import torch.distributed as dist

    flag = (~torch.isfinite(loss.detach().float()) | ~torch.isfinite(torch.as_tensor(grad_norm).detach().float()
                                                                       .to(loss.device))).float().reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


# --- the last good state ---------------------------------------------------------------------

def _to_host(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


@dataclass
class Snapshot:
    step: int
    params: list[torch.Tensor]  # host copies of the trainable parameters, in `parameters()` order
    optimizer: dict
    scheduler: dict
    data: dict
    rng: dict

    @classmethod
    def take(cls, step: int, params: list[torch.Tensor], optimizer, scheduler, data, rng: dict) -> "Snapshot":
        import copy

        with torch.no_grad():
            host = [p.detach().to("cpu", copy=True) for p in params]
        return cls(step, host, _to_host(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict()),
                   copy.deepcopy(data.state_dict()), rng)

    def restore(self, params: list[torch.Tensor], optimizer, scheduler, data) -> None:
        import copy

        with torch.no_grad():
            for p, saved in zip(params, self.params):
                p.copy_(saved.to(p.device))
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))  # it moves the state to each param's device
        scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        data.load_state_dict(copy.deepcopy(self.data))


# --- hangs -----------------------------------------------------------------------------------

def _kill_self() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class HangWatchdog:
    """Watches the steps of one worker from a daemon thread. Armed from the `min_steps`-th
    finished step on: a step running past max(hang_min_s, factor x median step time) fires."""

    def __init__(self, factor: float, min_s: float, min_steps: int = 3, on_fire: Callable[[dict], None] | None = None,
                 rank: int = 0, run_dir: Path | None = None, poll_s: float = 0.05):
        self.factor, self.min_s, self.min_steps = factor, min_s, min_steps
        self.rank, self.run_dir, self.poll_s = rank, run_dir, poll_s
        self.on_fire = on_fire
        self.times: deque = deque(maxlen=50)
        self.step, self.started = 0, None
        self.fired: dict | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="herd-hang-watchdog", daemon=True)
        self._thread.start()

    def limit(self) -> float | None:
        if len(self.times) < self.min_steps:
            return None
        return max(self.min_s, self.factor * statistics.median(self.times))

    def begin(self, step: int) -> None:
        with self._lock:
            self.step, self.started = step, time.monotonic()

    def end(self) -> None:
        with self._lock:
            if self.started is not None:
                self.times.append(time.monotonic() - self.started)
            self.started = None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                limit, started, step = self.limit(), self.started, self.step
            if limit is None or started is None or time.monotonic() - started <= limit:
                continue
            self._fire(step, time.monotonic() - started, limit)
            return

    def _fire(self, step: int, elapsed: float, limit: float) -> None:
        event = {"event": "hang", "rank": self.rank, "step": step, "seconds": round(elapsed, 2),
                 "limit_s": round(limit, 2), "median_s": round(statistics.median(self.times), 4),
                 "pid": os.getpid(), "time": time.time()}
        print(f"herd train: hang watchdog: rank {self.rank} step {step} has run {elapsed:.1f}s (limit {limit:.1f}s "
              f"= max({self.min_s}, {self.factor} x median {event['median_s']}s)); every thread's stack:",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.run_dir is not None:
            with open(Path(self.run_dir) / EVENTS_FILE, "a") as f:
                f.write(json.dumps(event) + "\n")
        self.fired = event
        (self.on_fire or (lambda _event: _kill_self()))(event)


def read_events(run_dir: Path, kind: str) -> list[dict]:
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if e.get("event") == kind]
