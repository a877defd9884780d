"""Engine metrics in Prometheus text format (no client library: a few counters and histograms)."""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, v)] += 1
            self.sum += v
            self.count += 1

    def quantile(self, q: float) -> float:
        """Upper bucket bound holding the q-quantile (for logs; Prometheus computes its own)."""
        if not self.count:
            return 0.0
        target, acc = q * self.count, 0
        for bound, c in zip(self.buckets + (float("inf"),), self.counts):
            acc += c
            if acc >= target:
                return bound
        return float("inf")

    def lines(self, name: str, labels: str) -> list[str]:
        out, acc = [], 0
        for bound, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{bound}"}} {acc}')
        out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum}", f"{name}_count{lab} {self.count}"]
        return out


class EngineMetrics:
    def __init__(self):
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()
        self.step_time = Histogram()
        self.finished = 0
        self.aborted = 0
        self.rejected = 0
        self.timeouts = 0
        self.generation_tokens = 0
        self.steps = 0
        self.batched_tokens = 0
        self.kv_usage = 0.0

    def step(self, seconds: float, decoding: int, tokens: int) -> None:
        self.steps += 1
        self.batched_tokens += tokens
        self.step_time.observe(seconds)


def render(metrics: EngineMetrics, snap: dict, model_name: str) -> str:
    """Prometheus exposition text (version 0.0.4)."""
    lab = f'model_name="{model_name}"'
    out: list[str] = []

    def metric(name, kind, help_, value=None, hist=None):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        if hist is not None:
            out.extend(hist.lines(name, lab))
        else:
            out.append(f"{name}{{{lab}}} {value}")

    metric(
        "herd_time_to_first_token_seconds",
        "histogram",
        "Time from arrival to the first output token.",
        hist=metrics.ttft,
    )
    metric("herd_inter_token_latency_seconds", "histogram", "Time between consecutive output tokens.", hist=metrics.itl)
    metric("herd_e2e_request_latency_seconds", "histogram", "Time from arrival to the last token.", hist=metrics.e2e)
    metric(
        "herd_engine_step_seconds",
        "histogram",
        "Duration of one engine step (forward + sampling).",
        hist=metrics.step_time,
    )
    metric("herd_num_requests_waiting", "gauge", "Requests queued for a KV-cache slot.", snap["waiting"])
    metric("herd_num_requests_running", "gauge", "Requests holding a KV-cache slot.", snap["running"])
    metric(
        "herd_kv_cache_usage_ratio",
        "gauge",
        "Share of KV-cache token positions in use (0-1).",
        f"{snap['kv_usage']:.6f}",
    )
    metric("herd_kv_cache_slots_used", "gauge", "KV-cache slots held by live requests.", snap["slots_used"])
    metric("herd_kv_cache_slots", "gauge", "KV-cache slots (max concurrent sequences).", snap["slots"])
    metric(
        "herd_prefix_cache_queries_total",
        "counter",
        "Prompt tokens looked up in the prefix cache.",
        snap["prompt_tokens"],
    )
    metric(
        "herd_prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.", snap["cached_tokens"]
    )
    metric("herd_prefix_cache_hit_rate", "gauge", "Prefix-cache hits / queries (tokens).", f"{snap['hit_rate']:.6f}")
    metric("herd_request_success_total", "counter", "Requests that finished (stop or length).", metrics.finished)
    metric("herd_request_aborted_total", "counter", "Requests cancelled or disconnected.", metrics.aborted)
    metric("herd_request_rejected_total", "counter", "Requests refused because the queue was full.", metrics.rejected)
    metric("herd_request_timeout_total", "counter", "Requests that ran past the request timeout.", metrics.timeouts)
    metric("herd_generation_tokens_total", "counter", "Output tokens of finished requests.", metrics.generation_tokens)
    return "\n".join(out) + "\n"
