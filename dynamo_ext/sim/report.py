"""What a replay measured, per policy: the records of one run (``PolicyRun``) and the
figures, table and plot made from them. Every percentile is ``dynamo_ext.stats.percentile``
(numpy's linear interpolation), the same definition as every other benchmark.

Figures (``summarize``): TTFT, ITL and end-to-end percentiles in ms, throughput (prompt plus
output tokens per second of the replay's span), ``prefix_hit_rate`` (the share of prompt
tokens the engines found cached, GPU or CPU, when they first admitted the request: the
engines' count, not the router's prediction, which is ``router_predicted_hit_rate``),
``load_imbalance`` (the busiest worker's routed tokens over the mean, 1.0 = even).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamo_ext.sim.model import MockerCore
from dynamo_ext.stats import percentile

DYNAMO_ROWS = ("dynamo_mocker_rr", "dynamo_mocker_kv")


def pct(xs: Sequence[float], p: float) -> float:
    """``dynamo_ext.stats.percentile`` of an already sorted sample."""
    return percentile(xs, p, presorted=True)


@dataclass(slots=True)
class Rec:
    arrival: float
    input_length: int
    output_length: int
    worker: int = -1
    first: float | None = None
    last: float | None = None
    finish: float | None = None
    predicted_hit_blocks: int = 0
    error: str | None = None


@dataclass
class PolicyRun:
    name: str
    recs: list[Rec]
    itl: array[float]
    cores: list[MockerCore]
    routed_tokens: list[int]
    wall_s: float
    block_size: int
    kv_events: int = 0
    metrics_msgs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def imbalance(per_worker: Sequence[float]) -> float:
    mean = sum(per_worker) / len(per_worker) if per_worker else 0.0
    return max(per_worker) / mean if mean else 1.0


# Goodput SLOs (DistServe's definition: a request counts when its TTFT and its mean time
# per output token both meet theirs). Defaults for an 8B model on one H100: interactive
# chat wants the first token within a second and ~20 tokens/s read speed at least.
SLO_TTFT_MS = 1000.0
SLO_TPOT_MS = 50.0


def tpot_ms(r: Rec) -> float:
    """Mean time per output token after the first (0 for one-token answers)."""
    if r.first is None or r.finish is None or r.output_length <= 1:
        return 0.0
    return (r.finish - r.first) * 1e3 / (r.output_length - 1)


def summarize(
    run: PolicyRun,
    slo_ttft_ms: float = SLO_TTFT_MS,
    slo_tpot_ms: float = SLO_TPOT_MS,
    physical_limit: float | None = None,
    fleet_limit: float | None = None,
) -> dict[str, Any]:
    """The figures of one run (module doc). ``physical_limit``: the workload's infinite-cache
    hit rate (``workloads.physical_limit_hit_rate``), to set the engines' hit rate beside;
    ``fleet_limit``: the same with one LRU cache of the fleet's whole KV capacity."""
    done = [r for r in run.recs if r.finish is not None and r.error is None]
    ttft = sorted((r.first - r.arrival) * 1e3 for r in done if r.first is not None)  # type: ignore[operator]
    e2e = sorted((r.finish - r.arrival) * 1e3 for r in done)  # type: ignore[operator]
    itl = sorted(x * 1e3 for x in run.itl)
    t0 = min(r.arrival for r in run.recs)
    t1 = max((r.finish for r in done), default=t0)  # type: ignore[type-var]
    span = max(1e-9, t1 - t0)  # type: ignore[operator]
    in_tok = sum(r.input_length for r in done)
    out_tok = sum(max(1, r.output_length) for r in done)
    queries = sum(c.prefix_queries for c in run.cores)
    gpu_hits = sum(c.prefix_hits for c in run.cores)
    cpu_hits = sum(c.cpu_hits for c in run.cores)
    busy = [c.busy_s for c in run.cores]
    predicted = sum(r.predicted_hit_blocks for r in run.recs) * run.block_size
    good = sum(
        1
        for r in done
        if r.first is not None
        and (r.first - r.arrival) * 1e3 <= slo_ttft_ms
        and tpot_ms(r) <= slo_tpot_ms
    )
    hit_rate = (gpu_hits + cpu_hits) / queries if queries else 0.0
    limit: dict[str, Any] = {}
    if physical_limit is not None:
        limit["physical_limit_hit_rate"] = round(physical_limit, 4)
        limit["hit_rate_of_limit"] = round(hit_rate / physical_limit, 3) if physical_limit else None
    if fleet_limit is not None:
        limit["fleet_cache_limit_hit_rate"] = round(fleet_limit, 4)
        limit["hit_rate_of_fleet_limit"] = round(hit_rate / fleet_limit, 3) if fleet_limit else None
    return {
        "ttft_p50_ms": round(pct(ttft, 50), 2),
        "ttft_p90_ms": round(pct(ttft, 90), 2),
        "ttft_p99_ms": round(pct(ttft, 99), 2),
        "ttft_mean_ms": round(sum(ttft) / len(ttft), 2) if ttft else float("nan"),
        "itl_p50_ms": round(pct(itl, 50), 3),
        "itl_p99_ms": round(pct(itl, 99), 3),
        "e2e_p50_ms": round(pct(e2e, 50), 2),
        "e2e_p99_ms": round(pct(e2e, 99), 2),
        "throughput_tok_s": round((in_tok + out_tok) / span, 1),
        "output_tok_s": round(out_tok / span, 1),
        "tpot_p50_ms": round(pct(sorted(tpot_ms(r) for r in done), 50), 3),
        "goodput_req_s": round(good / span, 3),
        "slo_attainment": round(good / len(run.recs), 4) if run.recs else 0.0,
        "prefix_hit_rate": round(hit_rate, 4),
        **limit,
        "gpu_hit_rate": round(gpu_hits / queries, 4) if queries else 0.0,
        "cpu_hit_rate": round(cpu_hits / queries, 4) if queries else 0.0,
        "router_predicted_hit_rate": round(
            predicted / max(1, sum(r.input_length for r in run.recs)), 4
        ),
        "load_imbalance": round(imbalance(run.routed_tokens), 3),
        "busy_imbalance": round(imbalance(busy), 3),
        "utilization": round(sum(busy) / len(busy) / span, 3),
        "preemptions": sum(c.preemptions for c in run.cores),
        "completed": len(done),
        "rejected": sum(1 for r in run.recs if r.error is not None),
        "kv_event_batches": sum(c.steps for c in run.cores),
        "sim_span_s": round(span, 2),
        "wall_s": round(run.wall_s, 2),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 3)


def ratios(policies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """TTFT ratios between arms of the same simulator and run only (a ratio across two
    simulators measures how near each runs to saturation, not the routers)."""
    out: dict[str, Any] = {}

    def get(name: str, key: str) -> float | None:
        p = policies.get(name)
        return None if p is None else p.get(key)

    targets: dict[str, bool] = {}
    for q in ("p50", "p99"):
        k = f"ttft_{q}_ms"
        out[f"ours_rr_over_kv_ttft_{q}"] = _ratio(get("round_robin", k), get("kv", k))
        out[f"ours_dynamo_over_kv_ttft_{q}"] = _ratio(get("dynamo", k), get("kv", k))
        out[f"dynamo_core_over_kv_ttft_{q}"] = _ratio(get("dynamo_core", k), get("kv", k))
        for name in ("dynamo", "dynamo_core"):
            r = out[f"{'ours_dynamo' if name == 'dynamo' else name}_over_kv_ttft_{q}"]
            if r is not None:
                targets[f"kv_beats_{name}_{q}"] = r > 1.0
    out["targets"] = targets
    return out


def table(policies: dict[str, dict[str, Any]]) -> str:
    cols = [
        ("policy", None, "{:<18}"),
        ("ttft p50", "ttft_p50_ms", "{:>9.1f}"),
        ("p90", "ttft_p90_ms", "{:>9.1f}"),
        ("p99", "ttft_p99_ms", "{:>9.1f}"),
        ("itl p50", "itl_p50_ms", "{:>8.2f}"),
        ("e2e p50", "e2e_p50_ms", "{:>9.1f}"),
        ("tok/s", "throughput_tok_s", "{:>9.0f}"),
        ("hit", "prefix_hit_rate", "{:>6.3f}"),
        ("imbal", "load_imbalance", "{:>6.2f}"),
        ("util", "utilization", "{:>5.2f}"),
        ("wall s", "wall_s", "{:>7.2f}"),
    ]
    head = " ".join(
        f"{c[0]:<18}" if i == 0 else f"{c[0]:>{len(c[2].format(0.0))}}" for i, c in enumerate(cols)
    )
    lines = [head, "-" * len(head)]
    for name, p in policies.items():
        cells = [f"{name:<18}"]
        for _title, key, fmt in cols[1:]:
            v = p.get(key)  # type: ignore[arg-type]
            width = len(fmt.format(0.0))
            cells.append(fmt.format(v) if isinstance(v, int | float) else f"{'-':>{width}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def plot(
    path: Path,
    ttfts: dict[str, list[float]],
    policies: dict[str, dict[str, Any]],
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    for name, xs in ttfts.items():
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        style = "--" if name.startswith("dynamo_mocker") else "-"
        a.plot([max(x, 1e-3) for x in xs], ys, style, label=name)
    a.set_xscale("log")
    a.set_xlabel("TTFT (ms, log)")
    a.set_ylabel("share of requests")
    a.set_title("TTFT CDF")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
    names = list(policies)
    b.bar(range(len(names)), [policies[n].get("prefix_hit_rate") or 0.0 for n in names])
    b.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    b.set_ylabel("prefix hit rate (prompt tokens cached)")
    b.set_ylim(0, 1)
    b.set_title("Prefix hit rate")
    b.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
