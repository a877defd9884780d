"""The lifecycle's console, for CLI modules only (library code reports through `log` and events).

`Console` takes `run_lifecycle`'s messages (`console(text)`) and events (`console.event(dict)`;
flows.lifecycle.run.text_events lists them). On a terminal it keeps one live table of the stages,
a progress bar for each running one, redrawn in place; otherwise (a pipe, a CI log) it prints a line
per finished stage and, while stages run, a progress line now and then, so the output stays short.
When a stage fails it prints the last lines of the stage's log and the log's path.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections import deque
from pathlib import Path

TAIL_LINES = 20
BAR_WIDTH = 20
PLAIN_EVERY_S = 60  # without a terminal, a progress line at most this often


class Console:
    def __init__(self, out=None, tty: bool | None = None, stream_logs: bool = False):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        # Streamed worker output interleaves with the console's lines: no redrawing over it, and a
        # failure's traceback has already streamed by (there is no step log to show).
        self.live = self.tty and not stream_logs
        self.stream_logs = stream_logs
        self.stages: dict[str, dict] = {}  # name -> status, start, seconds, progress (the last event), first
        self.drawn = 0  # lines of the live table now on the terminal
        self.last_line = time.monotonic()

    def __enter__(self) -> Console:
        # MLflow's notices on this process (creating a new store's tables, ...) are not the run's news.
        # MLflow sets its loggers' levels when first imported, so it is imported before they are set.
        import mlflow  # noqa: F401

        self._mlflow = logging.getLogger("mlflow")
        self._mlflow_level = self._mlflow.level
        self._mlflow.setLevel(max(self._mlflow_level, logging.WARNING))
        return self

    def __exit__(self, *exc) -> None:
        self._erase()
        self._mlflow.setLevel(self._mlflow_level)

    # --- what run_lifecycle calls ------------------------------------------------------------

    def __call__(self, text: str) -> None:
        self._erase()
        self._print(text)
        self._draw()

    def event(self, e: dict) -> None:
        kind, name = e["event"], e.get("step")
        if kind == "plan":
            self.stages = {n: {"status": "pending"} for n in e["stages"]}
        elif kind == "cached":
            self.stages.setdefault(name, {})["status"] = "cached"
            if not self.live:
                self._print(f"  {name:<9} cached")
        elif kind == "start":
            st = self.stages.setdefault(name, {})
            st.update(status="running", start=e["t"])
        elif kind == "progress":
            st = self.stages.setdefault(name, {})
            st["progress"] = e
            st.setdefault("first", {}).setdefault(e["kind"], e)
        elif kind == "done":
            self.stages.setdefault(name, {}).update(status=e["status"], seconds=e["seconds"])
            if not self.live:
                self._print(f"  {name:<9} {e['status']:<7} {e['seconds']:.1f}s")
        elif kind == "failed":
            self.stages.setdefault(name, {})["status"] = "failed"
            self._erase()
            self._print(f"  {name:<9} failed: {e['error']}")
            if not self.stream_logs:
                self._tail(Path(e["log"]))
        elif kind == "running" and not self.live and time.monotonic() - self.last_line >= PLAIN_EVERY_S:
            for n in e["steps"]:
                if self.stages.get(n, {}).get("status") == "running":
                    self._print(f"  ... {n:<9} {self._progress(n) or 'running'} ({self._elapsed(n)})")
        self._draw()

    # --- drawing -----------------------------------------------------------------------------

    def rows(self) -> list[str]:
        """The live table's lines."""
        out = []
        for n, st in self.stages.items():
            status = st.get("status", "pending")
            if status == "running":
                out.append(f"  {n:<9} {status:<8} {self._elapsed(n):>6}  {self._progress(n)}".rstrip())
            elif "seconds" in st:
                out.append(f"  {n:<9} {status:<8} {st['seconds']:>5.1f}s")
            else:
                out.append(f"  {n:<9} {status}")
        return out

    def _progress(self, name: str) -> str:
        """The stage's last progress event as a bar, its numbers, and an ETA from its rate so far."""
        st = self.stages[name]
        p = st.get("progress")
        if not p:
            return ""
        done, total = p["done"], max(1, p["total"])
        filled = round(BAR_WIDTH * min(done, total) / total)
        text = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {p['kind']} {done}/{p['total']}"
        extra = {k: v for k, v in p.items() if k not in ("t", "step", "event", "kind", "done", "total")}
        text += "".join(f"  {k.replace('_', '/')} {v}" for k, v in extra.items())
        first = st["first"][p["kind"]]
        if done < total and done > first["done"] and p["t"] > first["t"]:
            eta = (p["t"] - first["t"]) / (done - first["done"]) * (total - done)
            text += f"  ETA {eta:.0f}s"
        return text

    def _elapsed(self, name: str) -> str:
        start = self.stages[name].get("start")
        return f"{time.time() - start:.0f}s" if start else ""

    def _draw(self) -> None:
        if not self.live:
            return
        self._erase()
        width = shutil.get_terminal_size((120, 24)).columns - 1
        lines = [r[:width] for r in self.rows()]  # a wrapped line would throw the redraw off
        if lines:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()
        self.drawn = len(lines)

    def _erase(self) -> None:
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")  # up to the table's first line, clear below
            self.out.flush()
            self.drawn = 0

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()
        self.last_line = time.monotonic()

    def _tail(self, log: Path) -> None:
        try:
            with open(log, errors="replace") as f:
                lines = deque(f, maxlen=TAIL_LINES)
        except FileNotFoundError:
            self._print(f"  (no log at {log})")
            return
        self._print(f"  --- the last {len(lines)} lines of {log} ---")
        for line in lines:
            self._print("  | " + line.rstrip("\n"))
        self._print(f"  --- the whole log: {log}")
