"""Prometheus metrics of one server, in their own registry (so tests can build many apps).

Rates (tokens/s, loads/s) come from the counters with PromQL `rate()`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tier_hits = Counter("lorafleet_residency_hits", "adapter lookups served by a tier", ["tier"], registry=r)
        self.tier_misses = Counter("lorafleet_residency_misses", "adapter lookups that missed a tier", ["tier"], registry=r)
        self.loads = Counter("lorafleet_cold_loads", "cold loads from the store into host memory", registry=r)
        self.load_seconds = Histogram("lorafleet_cold_load_seconds", "seconds per cold-load batch", buckets=_LATENCY_BUCKETS, registry=r)
        self.evictions = Counter("lorafleet_residency_evictions", "adapters evicted from a tier", ["tier"], registry=r)
        self.load_queue_depth = Gauge("lorafleet_cold_load_queue_depth", "adapters waiting for a cold load", registry=r)
        self.load_rejections = Counter("lorafleet_cold_load_rejections", "cold loads refused with 429 (queue full)", registry=r)
        self.resident = Gauge("lorafleet_resident_adapters", "adapters resident per tier", ["tier"], registry=r)
        self.batch_size = Histogram("lorafleet_batch_rows", "rows per engine batch", ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.tokens = Counter("lorafleet_tokens", "tokens processed", ["kind"], registry=r)
        self.request_latency = Histogram("lorafleet_request_seconds", "request latency", ["api"], buckets=_LATENCY_BUCKETS, registry=r)
        self.first_token_latency = Histogram("lorafleet_time_to_first_token_seconds", "time to first token", ["api"], buckets=_LATENCY_BUCKETS, registry=r)
