"""Where a lifecycle step's output goes, and how its long loops report progress.

A step runs inside its Ray task under `run_captured`: its stdout and stderr (the file descriptors,
so C extensions and child loggers land there too) go to `<logs>/<step>.log`, and `tick` appends
progress events to `<logs>/events.jsonl`, which the driver follows (`Follower`) to draw its console.
Outside a captured step `tick` does nothing, so library code can call it unconditionally. Nothing
here prints; presenting the events is the CLI's job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

EVENTS = "events.jsonl"
# A loop ticking faster than this writes only its last tick of the interval (and always its last):
# the console redraws about once a second, and the events file should stay small.
MIN_INTERVAL_S = 0.5

# {"events": path, "step": name} while a captured step (or a process working for it) runs.
_current: dict | None = None
_last_write: dict[str, float] = {}


def run_logs(workdir: str | Path, run_id: str) -> Path:
    """One lifecycle run's log folder: each step's log, the progress events, Ray's own logs."""
    return Path(workdir) / "logs" / run_id


def step_log(logs_dir: str | Path, step: str) -> Path:
    return Path(logs_dir) / f"{step}.log"


def ray_log_options(stream: bool) -> dict:
    """init_ray keyword arguments: unless streaming, workers' output stays in Ray's log files
    instead of being forwarded to the driver, and Ray's own start-up messages stay out of the
    console (they are in its session logs, which `link_ray_logs` makes reachable)."""
    return {} if stream else {"log_to_driver": False, "logging_level": logging.ERROR}


def link_ray_logs(logs_dir: str | Path) -> Path | None:
    """Link this Ray session's log folder into `logs_dir` as `ray`: the workers' output (Ray Data
    operators, Ray Train workers, Serve replicas) is there, not in the step logs. None when this
    process is not connected to a Ray node whose logs are on this machine."""
    import ray

    try:
        session_logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    except AttributeError:  # no local node (a Ray Client connection), or not connected
        return None
    link = Path(logs_dir) / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(session_logs, target_is_directory=True)
    return link


def run_captured(fn, name: str, logs_dir: str, capture: bool, *args):
    """`fn(*args)` as step `name`: its output to the step's log (unless `capture` is false: the
    output then streams through Ray), its ticks to the events file. A failure's traceback ends
    the log, so the log's tail says why."""
    global _current
    logs = Path(logs_dir)
    logs.mkdir(parents=True, exist_ok=True)
    _current = {"events": str(logs / EVENTS), "step": name}
    _write({"event": "start"})
    try:
        with _redirected(step_log(logs, name)) if capture else contextlib.nullcontext():
            try:
                return fn(*args)
            except BaseException:
                traceback.print_exc()
                raise
    finally:
        _current = None
        _last_write.clear()


@contextlib.contextmanager
def _redirected(path: Path):
    """File descriptors 1 and 2 to `path`, and sys.stdout and sys.stderr with them (where they
    are not the descriptors' own streams, e.g. under a test runner's capture)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    out = open(1, "w", buffering=1, errors="replace", closefd=False)
    err = open(2, "w", buffering=1, errors="replace", closefd=False)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        out.flush()
        err.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def tick(kind: str, done: int, total: int, **extra) -> None:
    """Report `done` of `total` for a long loop of `kind` (e.g. "steps", "questions"); `extra`:
    numbers the console shows beside the bar (tok_s, loss, ...). A no-op outside a captured step."""
    if _current is None:
        return
    now = time.time()
    if done < total and now - _last_write.get(kind, 0.0) < MIN_INTERVAL_S:
        return
    _last_write[kind] = now
    _write({"event": "progress", "kind": kind, "done": int(done), "total": int(total), **extra}, now)


def handoff() -> dict | None:
    """The current step's progress target, for a process that works for it (a Ray Train worker);
    it passes it to `adopted`."""
    return dict(_current) if _current else None


@contextlib.contextmanager
def adopted(target: dict | None):
    """Ticks in this block go to `target` (from `handoff`; None: they stay no-ops)."""
    global _current
    before, _current = _current, target or _current
    try:
        yield
    finally:
        _current = before


def _write(event: dict, now: float | None = None) -> None:
    line = json.dumps({"t": round(now or time.time(), 3), "step": _current["step"], **event}) + "\n"
    # One write of a short line in append mode: lines from several processes do not interleave.
    with open(_current["events"], "a") as f:
        f.write(line)


class Follower:
    """Reads the events file as it grows: `poll()` returns the complete lines added since."""

    def __init__(self, logs_dir: str | Path):
        self.path = Path(logs_dir) / EVENTS
        self.offset = 0

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]
