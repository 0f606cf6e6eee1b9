"""Prometheus metrics of the router, on a registry of its own (several routers may share a
process in tests). Names follow Prometheus conventions with a ``dynamo_ext_router_`` prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dynamo_ext import native

WorkerCounters = Callable[[], list[tuple[str, int, int, int]]]


class _PerWorker(Collector):
    """Per-worker counts kept as plain ints on the hot path, exported at scrape time."""

    def __init__(self, source: WorkerCounters) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        p = "dynamo_ext_router_"
        ev = CounterMetricFamily(p + "kv_events", "KV events applied", labels=["worker"])
        blocks = CounterMetricFamily(
            p + "prompt_blocks", "Prompt blocks routed, per chosen worker", labels=["worker"]
        )
        rate = GaugeMetricFamily(
            p + "worker_prefix_hit_rate",
            "Share of routed prompt blocks found cached on the chosen worker",
            labels=["worker"],
        )
        for wid, events, routed, hits in self._source():
            ev.add_metric([wid], events)
            blocks.add_metric([wid], routed)
            rate.add_metric([wid], hits / routed if routed else 0.0)
        yield ev
        yield blocks
        yield rate


class RouterMetrics:
    def __init__(self, per_worker: WorkerCounters | None = None) -> None:
        r = self.registry = CollectorRegistry()
        if per_worker is not None:
            r.register(_PerWorker(per_worker))
        p = "dynamo_ext_router_"
        self.decisions = Counter(
            p + "decisions", "Routing decisions", ["worker", "role"], registry=r
        )
        self.gc_collections = Counter(
            p + "gc_collections",
            "Cyclic GC collections run between the loop's callbacks (router.idle_gc)",
            ["generation"],
            registry=r,
        )
        self.gc_seconds = Counter(
            p + "gc_seconds", "Seconds spent in those collections", registry=r
        )
        self.decision_seconds = Histogram(
            p + "decision_seconds",
            "Time to answer a route request (hashing, find_matches, scoring)",
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1),
            registry=r,
        )
        self.hit_blocks = Counter(
            p + "prefix_hit_blocks",
            "Prompt blocks found cached on the chosen worker, per tier",
            ["worker", "tier"],
            registry=r,
        )
        self.kv_blocks = Counter(
            p + "kv_blocks_applied",
            "Blocks stored/removed by applied KV events",
            ["op"],
            registry=r,
        )
        self.seq_gaps = Counter(
            p + "seq_gaps", "Sequence gaps seen on KV event streams", ["worker"], registry=r
        )
        self.replays = Counter(
            p + "replays",
            "Replay requests to a publisher, by result",
            ["worker", "result"],
            registry=r,
        )
        self.restarts = Counter(
            p + "worker_restarts",
            "Worker processes seen restarting (cache reset)",
            ["worker"],
            registry=r,
        )
        self.malformed = Counter(
            p + "malformed_messages",
            "Messages dropped as malformed or unknown",
            ["source"],
            registry=r,
        )
        self.hash_mismatch = Counter(
            p + "hash_mismatch",
            "BlockStored events whose hashes the router could not reproduce",
            ["worker"],
            registry=r,
        )
        self.prefetch_blocks = Counter(
            p + "prefetch_blocks",
            "Disk or pool blocks the router asked a worker to stage in CPU memory",
            ["worker"],
            registry=r,
        )
        self.prefetch_dropped = Counter(
            p + "prefetch_dropped",
            "Prefetch requests not sent (the worker's prefetch socket was full)",
            registry=r,
        )
        self.workers_up = Gauge(p + "workers_up", "Workers eligible for traffic", registry=r)
        self.workers_down = Gauge(p + "workers_down", "Workers marked down", registry=r)
        self.native = Gauge(p + "native", "1: hot loops in C (dynamo_ext._native)", registry=r)
        self.native.set_function(lambda: 1.0 if native.enabled() else 0.0)
        self.worker_up = Gauge(
            p + "worker_up", "1 if the worker gets traffic", ["worker"], registry=r
        )
        self.indexed_blocks = Gauge(
            p + "indexed_blocks", "Distinct blocks in the index, per tier", ["tier"], registry=r
        )
        self.index_stale = Gauge(
            p + "worker_index_stale",
            "1 while the worker's index may differ from its cache (lost KV batches)",
            ["worker"],
            registry=r,
        )
        self.kv_dropped = Counter(
            p + "kv_batches_dropped",
            "KV batches never applied: lost (no replay could fill the gap) or dropped from "
            "the bounded buffer while a replay ran",
            ["reason"],
            registry=r,
        )
        self.orphan_blocks = Counter(
            p + "orphan_blocks",
            "Blocks stored under a parent the worker's index does not hold (engine mode)",
            registry=r,
        )
        self.metrics_gaps = Counter(
            p + "metrics_gaps",
            "WorkerMetrics heartbeats missed (dropped by the metrics SUB or the network)",
            registry=r,
        )
        self.task_restarts = Counter(
            p + "task_restarts",
            "Router tasks that died with an exception and were restarted",
            ["task"],
            registry=r,
        )
        self.workers_expired = Counter(
            p + "workers_expired",
            "Workers removed with their index after being down past worker_expiry_s",
            registry=r,
        )
        self.rejected = Counter(
            p + "rejected_requests",
            "Control requests refused, by reason",
            ["reason"],
            registry=r,
        )
        self.hit_error = Histogram(
            p + "hit_prediction_error_tokens",
            "Predicted minus engine-reported cached prompt tokens, per finished request",
            buckets=(-4096, -1024, -256, -128, -1, 0, 1, 128, 256, 1024, 4096),
            registry=r,
        )
        self.worker_staleness = Gauge(
            p + "worker_hit_prediction_error",
            "Mean |predicted - reported| cached tokens of the worker's recent requests",
            ["worker"],
            registry=r,
        )
        self.active_requests = Gauge(
            p + "active_requests", "Routed requests not yet reported finished", registry=r
        )


def remove_label(metric: object, *labels: str) -> None:
    """Drop one labelled child of a metric (a removed worker's), if it exists."""
    try:
        metric.remove(*labels)  # type: ignore[attr-defined]
    except KeyError:
        pass
