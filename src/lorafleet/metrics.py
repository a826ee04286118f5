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


class EngineCollector:
    """Per-engine series of Ray engine fleets (lorafleet/fleet/), labelled `engine` and `base`,
    read from the fleets' last reports at scrape time: alive, queue depth, resident adapters per
    tier, runs placed, restarts, sample jobs that found their adapter resident (hits) or not."""

    def __init__(self) -> None:
        self.fleets: list = []

    def collect(self):  # noqa: ANN201
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["engine", "base"]
        alive = GaugeMetricFamily("lorafleet_engine_alive", "1 while the engine actor is live", labels=labels)
        depth = GaugeMetricFamily("lorafleet_engine_queue_depth", "jobs sent and not answered", labels=labels)
        runs = GaugeMetricFamily("lorafleet_engine_runs", "training runs placed on the engine", labels=labels)
        resident = GaugeMetricFamily("lorafleet_engine_resident_adapters", "adapters resident per tier",
                                     labels=labels + ["tier"])
        restarts = CounterMetricFamily("lorafleet_engine_restarts", "engine deaths seen", labels=labels)
        hits = CounterMetricFamily("lorafleet_engine_sample_jobs", "sample jobs by whether their adapter "
                                   "was resident on arrival", labels=labels + ["resident"])
        for fleet in self.fleets:
            for e in fleet.engines():
                lv = [e["id"], e["base"]]
                alive.add_metric(lv, 1.0 if e["alive"] else 0.0)
                depth.add_metric(lv, e["queue_depth"])
                runs.add_metric(lv, len(e["runs"]))
                restarts.add_metric(lv, e["restarts"])
                resident.add_metric(lv + ["slot"], len(e["resident"]))
                resident.add_metric(lv + ["host"], e.get("host", 0))
                hits.add_metric(lv + ["yes"], e.get("sample_hits", 0))
                hits.add_metric(lv + ["no"], e.get("sample_misses", 0))
        yield from (alive, depth, runs, resident, restarts, hits)


def add_engines(metrics: Metrics, fleet) -> None:  # noqa: ANN001
    """Export a fleet's per-engine series on `metrics`' registry (one collector per registry)."""
    collector = getattr(metrics, "engine_collector", None)
    if collector is None:
        collector = metrics.engine_collector = EngineCollector()
        metrics.registry.register(collector)
    collector.fleets.append(fleet)
