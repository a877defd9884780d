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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
            return Verdict(
                "rollback",
                f"loss spike: {loss:.4f} is {z:.1f} standard deviations above the last {len(self.losses)} steps' mean",
            )
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

    flag = (
        (
            ~torch.isfinite(loss.detach().float())
            | ~torch.isfinite(torch.as_tensor(grad_norm).detach().float().to(loss.device))
        )
        .float()
        .reshape(1)
    )
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
    def take(cls, step: int, params: list[torch.Tensor], optimizer, scheduler, data, rng: dict) -> Snapshot:
        import copy

        with torch.no_grad():
            host = [p.detach().to("cpu", copy=True) for p in params]
        return cls(
            step,
            host,
            _to_host(optimizer.state_dict()),
            copy.deepcopy(scheduler.state_dict()),
            copy.deepcopy(data.state_dict()),
            rng,
        )

    def restore(self, params: list[torch.Tensor], optimizer, scheduler, data) -> None:
        import copy

        with torch.no_grad():
            for p, saved in zip(params, self.params):
                p.copy_(saved.to(p.device))
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))  # it moves the state to each param's device
        scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        data.load_state_dict(copy.deepcopy(self.data))


# --- hangs -----------------------------------------------------------------------------------


def kill_self() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class HangWatchdog:
    """Watches the steps of one worker from a daemon thread. Armed from the `min_steps`-th
    finished step on: a step running past max(hang_min_s, factor x median step time) fires."""

    def __init__(
        self,
        factor: float,
        min_s: float,
        min_steps: int = 3,
        on_fire: Callable[[dict], None] | None = None,
        rank: int = 0,
        run_dir: Path | None = None,
        poll_s: float = 0.05,
    ):
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
        event = {
            "event": "hang",
            "rank": self.rank,
            "step": step,
            "seconds": round(elapsed, 2),
            "limit_s": round(limit, 2),
            "median_s": round(statistics.median(self.times), 4),
            "pid": os.getpid(),
            "time": time.time(),
        }
        print(
            f"herd train: hang watchdog: rank {self.rank} step {step} has run {elapsed:.1f}s (limit {limit:.1f}s "
            f"= max({self.min_s}, {self.factor} x median {event['median_s']}s)); every thread's stack:",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.run_dir is not None:
            with open(Path(self.run_dir) / EVENTS_FILE, "a") as f:
                f.write(json.dumps(event) + "\n")
        self.fired = event
        (self.on_fire or (lambda _event: kill_self()))(event)


def read_events(run_dir: Path, kind: str) -> list[dict]:
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if e.get("event") == kind]


# --- what the loop holds -----------------------------------------------------------------------


class LoopGuard:
    """The loop's side of error handling: one per training attempt (flows/train/loop.py).

    Per step: `begin(step)` (watchdog; True when the step's batch is an offending one to skip
    after a rollback), then `judge(step, loss, grad_norm)` before the optimizer: "ok" (step),
    "skip" (no update) or "rollback" (then `rollback(...)` gives the step to continue from);
    `saved(step, ...)` after a checkpoint refreshes the last good state; `end()`; `close()`.
    Events go to MLflow through rank 0's logger: metrics `skipped_steps`, `skipped_batches`,
    `rollbacks`, `hangs`; tags `herd.skip.<step>`, `herd.rollback.<n>`, `herd.hang.<n>`."""

    def __init__(self, g, rt, step: int, params, optimizer, scheduler, data, rng: dict):
        self.g, self.rt = g, rt
        self.judge_ = StepGuard(g.spike_zscore, g.window, g.min_window, g.max_bad_steps)
        self.snapshot = Snapshot.take(step, params, optimizer, scheduler, data, rng)
        self.skip_steps: set[int] = set()
        self.skipped_batches = 0
        self.reason = ""
        self.watchdog = None
        if g.hang_factor and rt.restartable:  # a killed worker is only useful when something restarts it
            self.watchdog = HangWatchdog(
                g.hang_factor, g.hang_min_s, g.hang_min_steps, on_fire=self._hang, rank=rt.rank, run_dir=rt.run_dir
            )

    def _log(self, metrics: dict, step: int, tag: tuple[str, str] | None = None) -> None:
        if self.rt.rank == 0 and self.rt.logger:
            self.rt.logger.metrics(metrics, step)
            if tag:
                self.rt.logger.tag(*tag)

    def _say(self, msg: str) -> None:
        if self.rt.rank == 0:
            print(f"herd train: {msg}", file=sys.stderr, flush=True)

    def _hang(self, event: dict) -> None:
        n = len(read_events(self.rt.run_dir, "hang")) if self.rt.run_dir else 1
        self._log({"hangs": n}, event["step"], (f"herd.hang.{n}", json.dumps(event)))
        kill_self()

    def begin(self, step: int) -> bool:
        if self.watchdog:
            self.watchdog.begin(step)
        if step in self.skip_steps:
            self.skip_steps.discard(step)
            self.skipped_batches += 1
            self._say(f"step {step}: skipping its batch (it took part in a rolled-back failure)")
            self._log({"skipped_batches": self.skipped_batches}, step)
            return True
        return False

    def judge(self, step: int, loss: torch.Tensor, grad_norm) -> str:
        bad = nonfinite_across_ranks(loss, grad_norm).item() > 0  # one answer on every rank
        value = float(loss.item())
        v = self.judge_.judge(step, value, float("inf") if bad and math.isfinite(value) else float(grad_norm))
        if v.action == "skip":
            self._say(f"step {step}: {v.reason}; step skipped before the optimizer ({self.judge_.skipped} so far)")
            self._log({"skipped_steps": self.judge_.skipped}, step, (f"herd.skip.{step}", v.reason))
        elif v.action == "rollback":
            self.reason = v.reason
        return v.action

    def rollback(self, params, optimizer, scheduler, data) -> int:
        from flows.train import checkpoint as ckpt
        from model.errors import HerdError

        if self.judge_.rollbacks >= self.g.max_rollbacks:
            raise HerdError(
                f"training keeps failing: {self.reason}, after {self.judge_.rollbacks} rollbacks (guard.max_rollbacks)"
            )
        offending = self.judge_.rolled_back()
        self.snapshot.restore(params, optimizer, scheduler, data)
        ckpt.set_rng_state(self.snapshot.rng)
        self.skip_steps.update(offending)
        n = self.judge_.rollbacks
        what = (
            f"{self.reason}: rolled back to step {self.snapshot.step}; the batches of steps "
            f"{', '.join(map(str, offending))} will be skipped"
        )
        self._say(f"rollback {n}: {what}")
        self._log({"rollbacks": n}, offending[-1], (f"herd.rollback.{n}", what))
        if self.watchdog:
            self.watchdog.end()
        return self.snapshot.step

    def saved(self, step: int, params, optimizer, scheduler, data, rng: dict) -> None:
        """A checkpoint was saved after a good step: it becomes the state to roll back to."""
        if not self.judge_.bad_run:
            self.snapshot = Snapshot.take(step, params, optimizer, scheduler, data, rng)

    def end(self) -> None:
        if self.watchdog:
            self.watchdog.end()

    def close(self) -> None:
        if self.watchdog:
            self.watchdog.stop()

    def metrics(self) -> dict:
        return {
            "skipped_steps": self.judge_.skipped,
            "rollbacks": self.judge_.rollbacks,
            "skipped_batches": self.skipped_batches,
        }


# --- fault injection (tests; FaultSection in flows/train/config.py) -----------------------------


def inject_inf_grad(f, rank: int, world: int, step: int, params) -> None:
    if f.inf_grad_at_step == step and rank == (f.rank if world > 1 else 0):
        p = next(p for p in params if p.grad is not None)
        with torch.no_grad():
            p.grad.view(-1)[0] = float("inf")
        print(
            f"herd train: fault injection: rank {rank} set a gradient to inf at step {step}",
            file=sys.stderr,
            flush=True,
        )


def inject_spike(f, step: int, total: torch.Tensor) -> torch.Tensor:
    return total * f.spike_factor if f.spike_at_step == step else total


def inject_hang(f, rank: int, world: int, step: int, run_dir: Path | None) -> None:
    if f.hang_at_step != step or rank != (f.rank if world > 1 else 0) or run_dir is None:
        return
    marker = Path(run_dir) / ".herd-hang-injected"
    if marker.exists():
        return
    marker.write_text(json.dumps({"step": step, "rank": rank, "pid": os.getpid()}))
    print(f"herd train: fault injection: rank {rank} hangs for {f.hang_s}s in step {step}", file=sys.stderr, flush=True)
    time.sleep(f.hang_s)


def inject_kill(f, rank: int, step: int, run_dir: Path | None) -> None:
    """Rank `f.rank` SIGKILLs itself after step `f.kill_at_step`, once per run (a marker in the run
    folder), first damaging the newest checkpoint when `f.corrupt_latest`."""
    if not f.kill_at_step or step != f.kill_at_step or rank != f.rank or run_dir is None:
        return
    from flows.train import checkpoint as ckpt

    marker = Path(run_dir) / ".herd-fault-injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"step": step, "rank": rank, "pid": os.getpid()}))
    if f.corrupt_latest:
        found = ckpt.candidates(run_dir)
        if found:
            ckpt.corrupt(found[0])
            print(f"herd pretrain: fault injection: corrupted {found[0]}", file=sys.stderr, flush=True)
    print(f"herd pretrain: fault injection: rank {rank} kills itself after step {step}", file=sys.stderr, flush=True)
    time.sleep(f.delay_s)  # an unregistered report would make the restart start from an older checkpoint
    kill_self()
