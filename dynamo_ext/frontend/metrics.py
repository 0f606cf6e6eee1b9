"""Prometheus metrics of the frontend, named as Dynamo's frontend names them
(``dynamo_frontend_*``), plus the disaggregation and migration counters of dynamo-ext."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_TOK = (16, 64, 256, 1024, 4096, 16384, 65536)
_HIT_ERR = (0, 16, 64, 128, 256, 512, 1024, 4096, 16384)


class FrontendMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "dynamo_frontend_"
        self.requests = Counter(
            p + "requests",
            "Requests by endpoint, streaming and final status",
            ["model", "endpoint", "request_type", "status"],
            registry=r,
        )
        self.inflight = Gauge(p + "inflight_requests", "Requests in flight", ["model"], registry=r)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=_LAT,
            registry=r,
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds",
            "Time between tokens",
            ["model"],
            buckets=_ITL,
            registry=r,
        )
        self.e2e = Histogram(
            p + "request_duration_seconds",
            "End-to-end request latency",
            ["model"],
            buckets=_LAT,
            registry=r,
        )
        self.isl = Histogram(
            p + "input_sequence_tokens",
            "Prompt tokens per request",
            ["model"],
            buckets=_TOK,
            registry=r,
        )
        self.osl = Histogram(
            p + "output_sequence_tokens",
            "Generated tokens per request",
            ["model"],
            buckets=_TOK,
            registry=r,
        )
        self.input_tokens = Counter(p + "input_tokens", "Prompt tokens", ["model"], registry=r)
        self.output_tokens = Counter(p + "output_tokens", "Generated tokens", ["model"], registry=r)
        q = "dynamo_ext_frontend_"
        self.prompt_blocks = Counter(
            q + "prompt_blocks", "Prompt blocks routed", ["model"], registry=r
        )
        self.hit_blocks = Counter(
            q + "prefix_hit_blocks",
            "Prompt blocks the router found cached on the chosen worker",
            ["model"],
            registry=r,
        )
        self.prefix_hit_rate = Gauge(
            q + "prefix_hit_rate",
            "Cumulative share of prompt blocks found cached",
            ["model"],
            registry=r,
        )
        self.prefill = Counter(
            q + "prefill",
            "Requests by where their prompt was prefilled",
            ["model", "where"],
            registry=r,
        )
        self.migrations = Counter(
            q + "migrations",
            "Requests moved to another worker after a worker failure",
            ["model", "reason"],
            registry=r,
        )
        self.fallbacks = Counter(
            q + "decode_fallbacks",
            "Requests served by a non-decode worker (role) because no decode worker was left",
            ["model", "role"],
            registry=r,
        )
        self.queued = Gauge(
            q + "queued_requests", "Requests waiting for a concurrency slot", ["model"], registry=r
        )
        self.rejected = Counter(
            q + "rejected_requests",
            "Requests refused before reaching a worker: queue_full (429), queue_timeout (503), "
            "deadline (504), client_disconnect",
            ["model", "reason"],
            registry=r,
        )
        self.disagg_errors = Counter(
            q + "disagg_errors",
            "Remote prefills that failed: prefill worker unreachable or refusing (the decode "
            "worker then prefilled itself), or its answer no usable handshake (the request "
            "failed)",
            ["model", "engine", "reason"],
            registry=r,
        )
        # Which routing backend chose the worker (FrontendConfig.routing_backend: our
        # router, or Dynamo's core in process) and how long the choice took.
        self.routes = Counter(
            q + "routes",
            "Workers chosen, by routing backend (router, dynamo_core)",
            ["model", "backend"],
            registry=r,
        )
        self.route_seconds = Histogram(
            q + "route_seconds",
            "Time to choose a worker, by routing backend",
            ["backend"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0),
            registry=r,
        )
        self.dynamo_core_workers = Gauge(
            q + "dynamo_core_workers",
            "Workers mirrored into Dynamo's selection core (routing_backend dynamo_core)",
            registry=r,
        )
        self.dynamo_core_open = Gauge(
            q + "dynamo_core_open_reservations",
            "Requests booked in Dynamo's selection core and not yet freed",
            registry=r,
        )
        # The router's index checked against the engine on every locally prefilled request:
        # predicted = chosen.prefix_hit_blocks * block_size, actual = the worker's
        # usage.prompt_tokens_details.cached_tokens.
        self.hit_prediction_error = Histogram(
            q + "hit_prediction_error_tokens",
            "|actual - predicted| cached prompt tokens per request, by worker",
            ["worker"],
            buckets=_HIT_ERR,
            registry=r,
        )
        self.hit_predicted_tokens = Counter(
            q + "hit_predicted_tokens",
            "Prompt tokens the router predicted cached on the chosen worker",
            ["worker"],
            registry=r,
        )
        self.hit_actual_tokens = Counter(
            q + "hit_actual_tokens",
            "Prompt tokens the worker reported it reused (cached_tokens)",
            ["worker"],
            registry=r,
        )
        self.hit_mispredictions = Counter(
            q + "hit_mispredictions",
            "Requests whose predicted hit was off by a block or more: over (the index holds "
            "blocks the worker no longer has) or under (blocks it never heard of)",
            ["worker", "direction"],
            registry=r,
        )
