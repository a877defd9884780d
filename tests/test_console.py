"""The lifecycle's console (flows/console.py) and the step logs and progress events it shows
(flows/progress.py), without Ray: events are fed by hand, steps run in this process."""

from __future__ import annotations

import io
import json
import os

import pytest

from flows import progress
from flows.console import TAIL_LINES, Console

STAGES = ["data", "pretrain", "sft", "dpo", "eval", "register", "promote", "deploy"]


def _run(console: Console, fail: str | None = None, log: str = "") -> None:
    """A lifecycle's events as the driver relays them: each stage starts, ticks and ends."""
    console("lifecycle default: run abc (config 123, git 456); stages: " + " -> ".join(STAGES))
    console.event({"event": "plan", "stages": STAGES})
    for i, name in enumerate(STAGES):
        console.event({"event": "start", "step": name, "t": 100.0 + i})
        for step in range(1, 7):
            console.event(
                {"event": "progress", "step": name, "t": 100.0 + i + step, "kind": "steps", "done": step, "total": 6}
            )
            console.event({"event": "running", "steps": STAGES[i:], "seconds": 10.0 * step})
        if name == fail:
            console.event({"event": "failed", "step": name, "error": "HerdError: boom", "log": log})
            return
        console.event({"event": "done", "step": name, "status": "ran", "seconds": 12.5})


def test_plain_console_prints_a_line_per_stage():
    out = io.StringIO()
    with Console(out, tty=False) as console:
        _run(console)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + len(STAGES)
    assert lines[1].split() == ["data", "ran", "12.5s"]
    assert "\x1b" not in out.getvalue()


def test_plain_console_prints_progress_now_and_then(monkeypatch):
    clock = iter(range(0, 10_000, 30))  # every call: 30 s later
    monkeypatch.setattr("flows.console.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    console = Console(out, tty=False)
    console.event({"event": "plan", "stages": ["pretrain"]})
    console.event({"event": "start", "step": "pretrain", "t": 0.0})
    for step in (1, 2, 3):
        console.event(
            {"event": "progress", "step": "pretrain", "t": 10.0 * step, "kind": "steps", "done": step, "total": 6}
            | {"tok_s": 40.5}
        )
        console.event({"event": "running", "steps": ["pretrain"], "seconds": 10.0 * step})
    lines = out.getvalue().splitlines()
    assert 1 <= len(lines) <= 2
    assert "pretrain" in lines[-1] and "steps" in lines[-1] and "tok/s 40.5" in lines[-1]


def test_live_table_shows_bars_and_an_eta_and_is_erased_at_the_end(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the terminal's width: rows wider than it are cut (see below)
    out = io.StringIO()
    with Console(out, tty=True) as console:
        console.event({"event": "plan", "stages": ["data", "pretrain"]})
        console.event({"event": "done", "step": "data", "status": "cached", "seconds": 0.1})
        console.event({"event": "start", "step": "pretrain", "t": 0.0})
        for step in (1, 3):
            console.event(
                {"event": "progress", "step": "pretrain", "t": 10.0 * step, "kind": "steps", "done": step, "total": 6}
                | {"tok_s": 40.5, "loss": 3.2}
            )
        rows = console.rows()
        assert rows[0].split()[:2] == ["data", "cached"]
        assert "[##########----------] steps 3/6" in rows[1] and "tok/s 40.5" in rows[1]
        assert "ETA 30s" in rows[1]  # 2 steps in 20 s, 3 to go
        assert out.getvalue().endswith("\n".join(rows) + "\n")
    assert out.getvalue().endswith(f"\x1b[{len(rows)}F\x1b[J")  # erased: the summary follows


def test_live_table_rows_are_cut_to_the_terminal_width(monkeypatch):
    """A row wider than the terminal would wrap and throw the redraw's line count off."""
    monkeypatch.setenv("COLUMNS", "40")
    out = io.StringIO()
    with Console(out, tty=True) as console:
        console.event({"event": "plan", "stages": ["pretrain"]})
        console.event({"event": "start", "step": "pretrain", "t": 0.0})
        console.event({"event": "progress", "step": "pretrain", "t": 1.0, "kind": "steps", "done": 1, "total": 6})
        assert len(console.rows()[0]) > 39
        drawn = out.getvalue().split("\x1b[J")[-1].splitlines()
        assert drawn == [console.rows()[0][:39]]


@pytest.mark.parametrize("tty", [False, True])
def test_a_failing_stage_shows_its_last_log_lines_and_the_path(tmp_path, tty):
    log = tmp_path / "logs" / "sft.log"
    log.parent.mkdir()
    log.write_text("".join(f"line {i}\n" for i in range(1, 101)))
    out = io.StringIO()
    with Console(out, tty=tty) as console:
        _run(console, fail="sft", log=str(log))
    text = out.getvalue()
    shown = [ln for ln in text.splitlines() if ln.startswith("  | ")]
    assert shown == [f"  | line {i}" for i in range(101 - TAIL_LINES, 101)]
    assert str(log) in text and "sft" in text and "boom" in text
    if not tty:
        assert len(text.splitlines()) <= 1 + 2 + 2 + TAIL_LINES + 2


def test_a_captured_step_logs_its_output_and_progress(tmp_path, capfd):
    def step(x):
        print("from python")
        os.write(1, b"from the fd\n")
        os.write(2, b"to stderr\n")
        for i in range(1, 4):
            progress.tick("questions", i, 3, task="mc")
        return x * 2

    assert progress.run_captured(step, "eval", str(tmp_path), True, 21) == 42
    assert capfd.readouterr() == ("", "")  # nothing reached the console
    assert (tmp_path / "eval.log").read_text().splitlines() == ["from python", "from the fd", "to stderr"]
    events = progress.Follower(tmp_path).poll()
    assert [e["event"] for e in events][0] == "start" and all(e["step"] == "eval" for e in events)
    ticks = [e for e in events if e["event"] == "progress"]
    assert ticks[-1] | {"t": 0} == {
        "t": 0,
        "step": "eval",
        "event": "progress",
        "kind": "questions",
        "done": 3,
        "total": 3,
        "task": "mc",
    }
    progress.tick("questions", 1, 3)  # outside a captured step: nothing
    assert progress.Follower(tmp_path).poll() == events
    print("back on the console")
    assert capfd.readouterr().out == "back on the console\n"


def test_a_failing_captured_step_ends_its_log_with_the_traceback(tmp_path):
    def step():
        print("working")
        raise ValueError("bad value for lr")

    with pytest.raises(ValueError):
        progress.run_captured(step, "pretrain", str(tmp_path), True)
    lines = (tmp_path / "pretrain.log").read_text().splitlines()
    assert lines[0] == "working" and lines[-1] == "ValueError: bad value for lr"
    assert lines[1].startswith("Traceback")


def test_follower_reads_complete_lines_once_and_a_worker_adopts_the_step(tmp_path):
    follower = progress.Follower(tmp_path)
    assert follower.poll() == []
    path = tmp_path / progress.EVENTS
    path.write_text(json.dumps({"event": "start"}) + "\n" + '{"event": "prog')
    assert follower.poll() == [{"event": "start"}]
    with open(path, "a") as f:
        f.write('ress"}\n')
    assert follower.poll() == [{"event": "progress"}]
    assert follower.poll() == []

    assert progress.handoff() is None
    with progress.adopted({"events": str(path), "step": "pretrain"}):  # as a Ray Train worker does
        assert progress.handoff() == {"events": str(path), "step": "pretrain"}
        progress.tick("steps", 6, 6, tok_s=40.0)
    assert progress.handoff() is None
    (tick,) = follower.poll()
    assert tick["step"] == "pretrain" and tick["done"] == 6 and tick["tok_s"] == 40.0
