"""Writes ``dynamo-ext.json``, the Grafana dashboard of a dynamo-ext fleet, from the panel
list below (run ``python examples/grafana/make_dashboard.py`` after changing it).

Every query names metrics that exist: the frontend's (``dynamo_frontend_*``,
``dynamo_ext_frontend_*``, dynamo_ext/frontend/metrics.py), the router's
(``dynamo_ext_router_*``, router/metrics.py) and vLLM's own (``vllm:*``, each worker's
/metrics). Event counters a healthy fleet may never increment (errors, migrations,
fallbacks, prefetch) end in ``or vector(0)`` so their panels show 0 instead of "no data".
tests/frontend/test_openai_surface.py evaluates each query against a real Prometheus.
"""

from __future__ import annotations

import json
from pathlib import Path

W = "[1m]"


def q(p: float, metric: str, by: str = "") -> str:
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket{W})))"


# (row, title, unit, [(legend, expr)])
PANELS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    (
        "Requests",
        "Requests per second by status",
        "reqps",
        [
            (
                "{{status}} {{request_type}}",
                f"sum by (status, request_type) (rate(dynamo_frontend_requests_total{W}))",
            ),
        ],
    ),
    (
        "Requests",
        "Errors per second",
        "reqps",
        [
            (
                "errors",
                f'sum(rate(dynamo_frontend_requests_total{{status="error"}}{W})) or vector(0)',
            ),
            (
                "refused {{reason}}",
                f"sum by (reason) (rate(dynamo_ext_frontend_rejected_requests_total{W}))"
                " or vector(0)",
            ),
        ],
    ),
    (
        "Requests",
        "In flight and queued",
        "short",
        [
            ("in flight", "sum(dynamo_frontend_inflight_requests)"),
            ("queued", "sum(dynamo_ext_frontend_queued_requests)"),
            ("router active", "dynamo_ext_router_active_requests"),
        ],
    ),
    (
        "Requests",
        "Tokens per second",
        "short",
        [
            ("output", f"sum(rate(dynamo_frontend_output_tokens_total{W}))"),
            ("input", f"sum(rate(dynamo_frontend_input_tokens_total{W}))"),
        ],
    ),
    (
        "Latency",
        "Time to first token",
        "s",
        [
            ("p50", q(0.5, "dynamo_frontend_time_to_first_token_seconds")),
            ("p99", q(0.99, "dynamo_frontend_time_to_first_token_seconds")),
        ],
    ),
    (
        "Latency",
        "Inter-token latency",
        "s",
        [
            ("p50", q(0.5, "dynamo_frontend_inter_token_latency_seconds")),
            ("p99", q(0.99, "dynamo_frontend_inter_token_latency_seconds")),
        ],
    ),
    (
        "Latency",
        "End-to-end request latency",
        "s",
        [
            ("p50", q(0.5, "dynamo_frontend_request_duration_seconds")),
            ("p99", q(0.99, "dynamo_frontend_request_duration_seconds")),
        ],
    ),
    (
        "Cache",
        "Prefix hit rate per worker (router)",
        "percentunit",
        [
            ("{{worker}}", "dynamo_ext_router_worker_prefix_hit_rate"),
        ],
    ),
    (
        "Cache",
        "Hit blocks per worker and tier",
        "short",
        [
            (
                "{{worker}} {{tier}}",
                f"sum by (worker, tier) (rate(dynamo_ext_router_prefix_hit_blocks_total{W}))",
            ),
        ],
    ),
    (
        "Cache",
        "Engine prefix cache hit rate per worker (vLLM)",
        "percentunit",
        [
            (
                "{{instance}}",
                f"sum by (instance) (rate(vllm:prefix_cache_hits_total{W})) / "
                f"sum by (instance) (rate(vllm:prefix_cache_queries_total{W}))",
            ),
        ],
    ),
    (
        "Cache",
        "KV cache usage per worker",
        "percentunit",
        [
            ("{{instance}}", "vllm:kv_cache_usage_perc"),
        ],
    ),
    (
        "Disaggregation",
        "P/D split: where prompts were prefilled",
        "reqps",
        [
            ("{{where}}", f"sum by (where) (rate(dynamo_ext_frontend_prefill_total{W}))"),
        ],
    ),
    (
        "Disaggregation",
        "Migrations and decode fallbacks",
        "short",
        [
            (
                "migrations {{reason}}",
                "sum by (reason) (increase(dynamo_ext_frontend_migrations_total[5m])) or vector(0)",
            ),
            (
                "fallback to {{role}}",
                "sum by (role) (increase(dynamo_ext_frontend_decode_fallbacks_total[5m]))"
                " or vector(0)",
            ),
            (
                "disagg errors",
                "sum(increase(dynamo_ext_frontend_disagg_errors_total[5m])) or vector(0)",
            ),
        ],
    ),
    (
        "Disaggregation",
        "Prompt tokens by source (vLLM)",
        "short",
        [
            (
                "{{instance}} {{source}}",
                f"sum by (instance, source) (rate(vllm:prompt_tokens_by_source_total{W}))",
            ),
        ],
    ),
    (
        "Router",
        "Router decision latency",
        "s",
        [
            ("p50", q(0.5, "dynamo_ext_router_decision_seconds")),
            ("p99", q(0.99, "dynamo_ext_router_decision_seconds")),
        ],
    ),
    (
        "Router",
        "Predicted vs actual hit error (tokens)",
        "short",
        [
            ("router p90 (signed)", q(0.9, "dynamo_ext_router_hit_prediction_error_tokens")),
            (
                "frontend mean |err| {{worker}}",
                f"sum by (worker) (rate(dynamo_ext_frontend_hit_prediction_error_tokens_sum{W})) / "
                f"clamp_min(sum by (worker) "
                f"(rate(dynamo_ext_frontend_hit_prediction_error_tokens_count{W})), 1e-9)",
            ),
            (
                "router recent mean |err| {{worker}}",
                "dynamo_ext_router_worker_hit_prediction_error",
            ),
        ],
    ),
    (
        "Router",
        "Workers up",
        "short",
        [
            ("up", "dynamo_ext_router_workers_up"),
            ("down", "dynamo_ext_router_workers_down"),
        ],
    ),
    (
        "Router",
        "Prefetch",
        "short",
        [
            (
                "blocks {{worker}}",
                f"sum by (worker) (rate(dynamo_ext_router_prefetch_blocks_total{W})) or vector(0)",
            ),
            ("dropped", f"sum(rate(dynamo_ext_router_prefetch_dropped_total{W})) or vector(0)"),
        ],
    ),
]


def dashboard() -> dict:
    panels: list[dict] = []
    y = 0
    pid = 1
    row = None
    x = 0
    for row_name, title, unit, targets in PANELS:
        if row_name != row:
            if x:
                y += 8
            panels.append(
                {
                    "type": "row",
                    "title": row_name,
                    "id": pid,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    "panels": [],
                }
            )
            pid += 1
            y += 1
            x = 0
            row = row_name
        if x >= 24:
            x = 0
            y += 8
        panels.append(
            {
                "type": "timeseries",
                "title": title,
                "id": pid,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 6, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {"refId": chr(65 + i), "expr": expr, "legendFormat": legend}
                    for i, (legend, expr) in enumerate(targets)
                ],
            }
        )
        pid += 1
        x += 6
    return {
        "title": "dynamo-ext",
        "uid": "dynamo-ext",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "tags": ["dynamo-ext", "vllm", "llm"],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                }
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("dynamo-ext.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out} ({sum(p['type'] != 'row' for p in dashboard()['panels'])} panels)")
