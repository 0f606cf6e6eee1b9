"""Prometheus metrics of the router, on a registry of its own (several routers may share a
process in tests). Names follow Prometheus conventions with a ``dynamo_ext_router_`` prefix.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dynamo_ext import native

# (worker, KV events applied, routed prompt blocks, hit blocks, counts): ``counts`` maps
# "d:<role>" to the worker's routing decisions for that role and "h:<tier>" to the prompt
# blocks found cached there in that tier.
WorkerCounters = Callable[[], list[tuple[str, int, int, int, dict[str, int]]]]


class _PerWorker(Collector):
    """Per-worker counts kept as plain ints on the hot path (no lock, no labelled child to
    look up per route), exported at scrape time."""

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
        decisions = CounterMetricFamily(
            p + "decisions", "Routing decisions", labels=["worker", "role"]
        )
        tier_hits = CounterMetricFamily(
            p + "prefix_hit_blocks",
            "Prompt blocks found cached on the chosen worker, per tier",
            labels=["worker", "tier"],
        )
        for wid, events, routed, hits, counts in self._source():
            ev.add_metric([wid], events)
            blocks.add_metric([wid], routed)
            rate.add_metric([wid], hits / routed if routed else 0.0)
            for key, n in list(counts.items()):
                fam = decisions if key[0] == "d" else tier_hits
                fam.add_metric([wid, key[2:]], n)
        yield ev
        yield blocks
        yield rate
        yield decisions
        yield tier_hits


class PlainHistogram(Collector):
    """A histogram without labels or locks, observed by the event loop's thread only."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.doc = doc
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bucket le=b holds the values <= b: the first bound >= value
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        acc = 0
        buckets: list[tuple[str, float]] = []
        for b, c in zip(self.bounds, self.counts, strict=False):
            acc += c
            buckets.append((repr(float(b)), acc))
        buckets.append(("+Inf", acc + self.counts[-1]))
        yield HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.sum)


class RouterMetrics:
    def __init__(self, per_worker: WorkerCounters | None = None) -> None:
        r = self.registry = CollectorRegistry()
        if per_worker is not None:
            r.register(_PerWorker(per_worker))
        p = "dynamo_ext_router_"
        self.gc_collections = Counter(
            p + "gc_collections",
            "Cyclic GC collections run between the loop's callbacks (router.idle_gc)",
            ["generation"],
            registry=r,
        )
        self.gc_seconds = Counter(
            p + "gc_seconds", "Seconds spent in those collections", registry=r
        )
        # Routing decisions and prefix hits per worker are plain ints on each WorkerEntry,
        # exported by the per-worker collector (dynamo_ext_router_decisions_total,
        # dynamo_ext_router_prefix_hit_blocks_total); the decision time a plain histogram.
        self.decision_seconds = PlainHistogram(
            p + "decision_seconds",
            "Time to answer a route request (hashing, find_matches, scoring)",
            (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1),
        )
        r.register(self.decision_seconds)
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
