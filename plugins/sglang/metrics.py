"""SGLang's Prometheus ``/metrics`` (``--enable-metrics``) read as our ``WorkerMetrics``.

Names are SGLang 0.5.23's (``sglang/srt/observability/metrics_collector.py``): scheduler
gauges labelled by model, engine type and ranks, tokenizer counters labelled by streaming
and cache source. Series of one name are summed (counts, counters) or maxed (ratios,
capacity), so a tensor- or pipeline-parallel worker reads as one.
"""

from __future__ import annotations

import time
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from dynamo_ext.errors import DynamoExtError
from dynamo_ext.protocol import MEDIUM_CPU, Role, WorkerMetrics

RUNNING = "sglang:num_running_reqs"
# Requests admitted and not running: the scheduler's waiting queue plus the PD queues
# (prefill waiting for its decode peer's bootstrap, decode waiting for memory or for KV).
WAITING = (
    "sglang:num_queue_reqs",
    "sglang:num_prefill_bootstrap_queue_reqs",
    "sglang:num_decode_prealloc_queue_reqs",
    "sglang:num_decode_transfer_queue_reqs",
)
TOKEN_USAGE = "sglang:token_usage"  # used / total KV slots, 0..1
MAX_TOKENS = "sglang:max_total_num_tokens"
HOST_USED_TOKENS = "sglang:hicache_host_used_tokens"
PROMPT_TOKENS = "sglang:prompt_tokens_total"
CACHED_TOKENS = "sglang:cached_tokens_total"

_MAXED = {TOKEN_USAGE, MAX_TOKENS}


class MetricsParseError(DynamoExtError, ValueError):
    """The text is not Prometheus exposition format."""


def parse_samples(text: str) -> dict[str, float]:
    """Sample name -> summed (or, for ratios and capacity, maxed) value across series."""
    out: dict[str, float] = defaultdict(float)
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name in _MAXED:
                    out[s.name] = max(out[s.name], s.value)
                else:
                    out[s.name] += s.value
    except ValueError as exc:
        raise MetricsParseError(str(exc)) from exc
    return out


def worker_metrics(
    text: str, worker_id: str, role: Role, page_size: int, heartbeat: int
) -> WorkerMetrics:
    v = parse_samples(text)
    total_blocks = _count(v.get(MAX_TOKENS, 0.0)) // max(page_size, 1)
    offload: dict[str, int] = {}
    if HOST_USED_TOKENS in v:
        offload[MEDIUM_CPU] = _count(v[HOST_USED_TOKENS]) // max(page_size, 1)
    return WorkerMetrics(
        worker_id=worker_id,
        heartbeat=heartbeat,
        ts=time.time(),
        role=role,
        running=_count(v.get(RUNNING, 0.0)),
        waiting=_count(sum(v.get(n, 0.0) for n in WAITING)),
        kv_used_blocks=_count(v.get(TOKEN_USAGE, 0.0) * total_blocks),
        kv_total_blocks=total_blocks,
        offload_blocks=offload,
        prefix_cache_queries=_count(v.get(PROMPT_TOKENS, 0.0)),
        prefix_cache_hits=_count(v.get(CACHED_TOKENS, 0.0)),
    )


def _count(x: float) -> int:
    """A scraped gauge as a count the router accepts (``protocol.Count``): NaN, negative
    and absurd values of a broken exporter become 0 or the bound, not a dropped report."""
    if not x > 0:  # NaN, zero or negative
        return 0
    return round(x) if x < 1 << 48 else 1 << 48  # inf too
