"""Champion rollout without downtime: which exact model version a replica serves, and the swap.

A replica serves one pinned version at a time (`models:/herd@champion` is resolved once, to
`models:/herd/3`). A new version is loaded beside the old one while the old one keeps answering;
once loaded, new requests go to it, and requests already running finish on the old one, which is
shut down when it has none left. A swap is triggered by Serve's `reconfigure` (a `user_config`
naming the version: `herd k8s promote` patches it into the RayService) or by watching the alias
(`user_config.watch_s`), so a promotion reaches a long-lived endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from model.errors import HerdError

log = logging.getLogger("herd.serve")
# After a swap the old engine lives until it has no requests left, but at least this long:
# a request that picked it up an instant before the swap has not reached it yet.
DRAIN_GRACE_S = 2.0
# user_config keys (Serve's in-place configuration of the deployment).
USER_CONFIG_KEYS = {"model", "watch_s"}


@dataclass(frozen=True)
class Pinned:
    """A model spec resolved to what exactly gets loaded: `uri` to load, `label` the registered
    version it is (NAME/VERSION; "" for a folder, `smollm2` or runs:/, which have no version)."""

    uri: str
    label: str


def pin(spec: str, tracking_uri: str | None = None) -> Pinned:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> the version now behind it (label NAME/VERSION);
    anything else (a folder, `smollm2`, runs:/) is loaded as is and labelled by its name."""
    if spec.startswith("models:/"):
        from flows.eval.registry import get_version

        mv = get_version(spec, tracking_uri)
        return Pinned(f"models:/{mv.name}/{mv.version}", f"{mv.name}/{mv.version}")
    return Pinned(spec, "")


def check_user_config(user_config: dict | None) -> dict:
    config = dict(user_config or {})
    unknown = set(config) - USER_CONFIG_KEYS
    if unknown:
        raise HerdError(f"user_config: unknown key(s) {', '.join(sorted(unknown))} (known: model, watch_s)")
    if "watch_s" in config and not (isinstance(config["watch_s"], (int, float)) and config["watch_s"] >= 0):
        raise HerdError(f"user_config.watch_s must be a number of seconds >= 0, got {config['watch_s']!r}")
    return config


class Rollout:
    """The replica's current state and the swap to a new model version.

    `load(pinned) -> state` builds a serving state (blocking: it runs in a thread); `self.state` is
    the one new requests get, and `publish(state)`, when given, is told of each. A state has
    `.engine` (snapshot(), shutdown()) and gets `.version` / `.since` set here."""

    def __init__(self, load: Callable[[Pinned], Any], publish: Callable[[Any], None] | None = None):
        self._load = load
        self._publish = publish
        self.state = None
        self.current: Pinned | None = None
        self.target: Pinned | None = None  # the version being loaded, if any
        self.error: str | None = None  # why the last rollout failed (the old version still serves)
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks

    def spawn(self, coro) -> asyncio.Task:
        """Run `coro` in the background on the running loop."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start(self, pinned: Pinned) -> None:
        """The first version (replica start-up: nothing to keep serving meanwhile)."""
        self._swap_in(self._load(pinned), pinned)

    def _swap_in(self, state, pinned: Pinned) -> None:
        state.version, state.since = pinned.label, time.time()
        old, self.state, self.current = self.state, state, pinned
        if self._publish is not None:
            self._publish(state)
        log.info("serving %s (%s)", pinned.label, pinned.uri)
        if old is not None:
            self.spawn(self._retire(old))

    async def _retire(self, old) -> None:
        await asyncio.sleep(DRAIN_GRACE_S)
        while True:
            snap = old.engine.snapshot()
            if snap["waiting"] + snap["running"] == 0:
                break
            await asyncio.sleep(0.2)
        await asyncio.to_thread(old.engine.shutdown)
        log.info("retired %s", old.version)

    async def roll_to(self, spec: str) -> bool:
        """Serve the version `spec` names now; True when it swapped. The old version keeps serving
        while the new one loads, and after a failed load (the error is kept in `self.error`)."""
        async with self._lock:
            try:
                pinned = await asyncio.to_thread(pin, spec)
                if pinned == self.current:
                    return False
                self.target = pinned
                t = time.perf_counter()
                state = await asyncio.to_thread(self._load, pinned)
            except Exception as e:  # noqa: BLE001 - a failed rollout must not take the replica down
                self.error = f"{spec}: {type(e).__name__}: {e}"
                log.error(
                    "rollout to %s failed; still serving %s: %s",
                    spec,
                    self.state.version if self.state else None,
                    self.error,
                )
                return False
            finally:
                self.target = None
            self.error = None
            log.info(
                "loaded %s beside %s in %.1fs",
                pinned.uri,
                self.current.uri if self.current else None,
                time.perf_counter() - t,
            )
            self._swap_in(state, pinned)
            return True

    def watch(self, spec: str, every_s: float) -> None:
        """Follow `spec` (an alias) every `every_s` seconds; 0 stops watching."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if every_s > 0 and spec.startswith("models:/"):
            self._watch = self.spawn(self._follow(spec, every_s))

    async def _follow(self, spec: str, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.roll_to(spec)


# The replica's Rollout, for the HTTP middleware. A module global here, not in services/deployment.py:
# Serve pickles the deployment class by value, with a copy of its module's globals, so only a
# module both sides import by name is shared.
_CURRENT: Rollout | None = None


def set_current(rollout: Rollout | None) -> None:
    global _CURRENT
    _CURRENT = rollout


def current() -> Rollout | None:
    return _CURRENT


def wait_for_version(url: str, label: str, timeout_s: float = 600, api_key: str | None = None) -> float:
    """Poll the endpoint until it answers with model version `label`; returns the seconds waited."""
    import requests

    t0 = time.perf_counter()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    seen = None
    while time.perf_counter() - t0 < timeout_s:
        try:
            r = requests.get(f"{url}/health", headers=headers, timeout=10)
            seen = r.headers.get("x-herd-model-version")
            if seen == label:
                return time.perf_counter() - t0
            failed = r.headers.get("x-herd-rollout-error")
            if failed:
                raise HerdError(f"{url} still serves {seen}: its replicas could not load {label}: {failed}")
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise HerdError(f"{url} did not move to {label} within {timeout_s:.0f}s (it serves {seen})")
