"""Starting Ray: the one function every stage, the lifecycle and `herd serve` call."""

from __future__ import annotations

import sys


def init_ray(attempts: int = 3, **kwargs) -> bool:
    """Connect this process to Ray unless it is already: `ray.init(**kwargs)`, retried, since on a
    busy machine the raylet can miss Ray's fixed 30 s start-up window. A local Ray (no `address`)
    starts without the dashboard unless asked for one: it starts faster on a small machine.
    Returns True when this call connected, False when the process already was."""
    import ray

    if ray.is_initialized():
        return False
    if not kwargs.get("address"):
        kwargs.setdefault("include_dashboard", False)
    for i in range(attempts):
        try:
            ray.init(**kwargs)
            return True
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception ("timed out during startup")
            if "timed out during startup" not in str(e) or i == attempts - 1:
                raise
            print(f"Ray did not start in time (attempt {i + 1}/{attempts}); retrying", file=sys.stderr, flush=True)
            ray.shutdown()
    return True
