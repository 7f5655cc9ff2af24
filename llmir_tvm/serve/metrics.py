"""Prometheus metrics of the server (``GET /metrics``, text format, ``prometheus_client``).

Engine figures (KV blocks, waste, prefix cache, preemptions, queues) are read from the engine
thread's latest snapshot at scrape time; request figures (latencies, tokens, finished requests)
are recorded by the HTTP side as responses progress.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine_loop import EngineSnapshot

PREFIX = "llmir"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """Exports the engine snapshot as gauges and counters."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], num_blocks: int):
        self._snapshot, self._num_blocks = snapshot, num_blocks

    def collect(self) -> Iterator:
        s = self._snapshot()
        gauges = {
            "kv_blocks_used": ("KV-cache blocks held by running sequences", s.blocks_used),
            "kv_blocks_free": ("KV-cache blocks free", s.blocks_free),
            "kv_blocks_cached": ("KV-cache blocks kept by the prefix cache", s.blocks_cached),
            "kv_blocks_total": ("KV-cache blocks in the pool", self._num_blocks),
            "kv_internal_waste_percent": ("allocated KV slots holding no token, percent", s.internal_waste_pct),
            "prefix_cache_hit_rate": ("prompt tokens served from the prefix cache over prompt tokens admitted",
                                      s.cached_prompt_tokens / s.prompt_tokens if s.prompt_tokens else 0.0),
            "requests_running": ("requests' sequences running", s.running),
            "requests_waiting": ("sequences waiting for admission", s.waiting),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = {
            "prompt_tokens_admitted": ("prompt tokens admitted by the scheduler", s.prompt_tokens),
            "cached_prompt_tokens": ("prompt tokens served from the prefix cache", s.cached_prompt_tokens),
            "preemptions": ("sequences preempted for lack of KV blocks", s.preemptions),
            "engine_steps": ("engine steps run", s.steps),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class ServerMetrics:
    """The server's registry: engine snapshot plus latency histograms and token/request counters."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], num_blocks: int):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(snapshot, num_blocks))
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "time from request arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "time between two tokens of a response",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram(f"{PREFIX}_request_latency_seconds", "time from request arrival to its last token",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of answered requests", registry=self.registry)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens generated", registry=self.registry)
        self.requests = Counter(f"{PREFIX}_requests", "requests ended, by finish reason", ["finish_reason"],
                                registry=self.registry)
        self.rejected = Counter(f"{PREFIX}_requests_rejected", "requests refused, by HTTP status", ["status"],
                                registry=self.registry)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
