"""``dynamo-ext bench serve --routing-backend router,dynamo_core``: who chooses the worker,
A/B on ONE real vLLM fleet.

One router (kv mode) and its frontend, a second frontend with ``routing_backend:
dynamo_core`` (Dynamo's SelectionService in process, over the same workers), the same
prefix-sharing load (``serve_bench.prefix_workload``) through each in turn, every worker's
prefix cache reset (vLLM's dev-mode ``POST /reset_prefix_cache``) before each arm and the
arms' order alternating per round. The judges are the engines': each worker's
``vllm:prefix_cache_hits_total`` / ``queries_total`` deltas and the
``usage.prompt_tokens_details.cached_tokens`` of every answer; beside them the clients'
TTFT and what each backend predicted cached (the frontend's hit-prediction counters).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from dynamo_ext.benchmarks.serve_bench import BACKENDS, hit_rate, prefix_workload, run_load
from dynamo_ext.stats import percentile

_HEADLINE = ("ttft_p50_ms", "ttft_p90_ms", "engine_hit_rate", "cached_token_share")


def run(
    backends: tuple[str, ...] = BACKENDS,
    workers: int = 2,
    groups: int = 6,
    per_group: int = 4,
    doc_words: int = 1200,
    concurrency: int = 2,
    max_tokens: int = 8,
    rounds: int = 1,
    model: Path | None = None,
    workdir: Path = Path("out/bench-serve"),
) -> dict[str, Any]:
    """Routing backends A/B on one real vLLM fleet (``dynamo-ext bench serve
    --routing-backend router,dynamo_core``): one router (kv mode), one frontend per backend,
    the same prefix-sharing load through each in turn, every worker's prefix cache reset
    (vLLM's dev-mode ``POST /reset_prefix_cache``) before each arm. Judged by the engines:
    ``vllm:prefix_cache_hits_total`` / ``queries_total`` deltas of each worker's /metrics and
    the ``usage.prompt_tokens_details.cached_tokens`` of every answer; TTFT p50/p90 as the
    client saw it."""
    import logging
    import os

    from dynamo_ext.plugins.vllm.fleet import LocalFleet
    from dynamo_ext.testing.tiny_model import build_tiny_model, default_model_dir

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per call otherwise
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise SystemExit(f"--routing-backend: {bad or backends} not among {BACKENDS}")
    model = model or build_tiny_model(default_model_dir())
    prompts: list[str | list[int]] = list(prefix_workload(groups, per_group, doc_words, 40))
    wd = workdir / "ab"
    saved = os.environ.get("VLLM_SERVER_DEV_MODE")
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # the workers' /reset_prefix_cache
    fleet = LocalFleet(
        model,
        aggregated=workers,
        workdir=wd,
        router_config={"scorer": {"mode": "kv", "seed": 0}},
        frontend_args=["--no-disaggregation"],
    )
    extra: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {
        "bench": "serve_ab",
        "workers": workers,
        "requests": len(prompts),
        "concurrency": concurrency,
        "doc_words": doc_words,
        "rounds": rounds,
        "judge": "engines' vllm:prefix_cache_hits_total/queries_total deltas and "
        "usage.prompt_tokens_details.cached_tokens",
        "backends": {},
    }
    t_start = time.perf_counter()
    try:
        fleet.start()
        assert fleet.router is not None
        urls = {"router": fleet.url}
        if "dynamo_core" in backends:
            url, proc = _frontend(
                model, fleet.router.endpoint, fleet.served_model_name, wd, "dynamo_core"
            )
            extra.append(proc)
            urls["dynamo_core"] = url
            _wait_mirrored(url, workers)
        bases = {w.worker_id: w.server.url for w in fleet.workers}
        warm: list[str | list[int]] = ["warm up " * 20] * workers
        for b in backends:  # first-call costs off the measured requests, each frontend
            asyncio.run(run_load(urls[b], fleet.served_model_name, warm, workers, 2))
        runs: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
        for i in range(rounds):
            for b in backends if i % 2 == 0 else backends[::-1]:  # no arm always goes first
                _reset_prefix_caches(bases)
                before = {w: engine_counters(u) for w, u in bases.items()}
                pred0 = _frontend_hits(urls[b])
                res = asyncio.run(
                    run_load(urls[b], fleet.served_model_name, prompts, concurrency, max_tokens)
                )
                after = {w: engine_counters(u) for w, u in bases.items()}
                q = {w: after[w][0] - before[w][0] for w in bases}
                h = {w: after[w][1] - before[w][1] for w in bases}
                pred1 = _frontend_hits(urls[b])
                # what the backend predicted cached, against what the engines reported
                res["predicted_cached_tokens"] = int(pred1[0] - pred0[0])
                res["reported_cached_tokens"] = int(pred1[1] - pred0[1])
                res["engine_prefix_queries"] = q
                res["engine_prefix_hits"] = h
                res["engine_hit_rate"] = round(sum(h.values()) / max(sum(q.values()), 1), 4)
                res["cached_token_share"] = round(
                    res["cached_tokens"] / max(res["prompt_tokens"], 1), 4
                )
                runs[b].append(res)
                print(
                    f"{b:>12}: TTFT p50 {res['ttft_p50_ms']} ms p90 {res['ttft_p90_ms']} ms, "
                    f"engine hit rate {res['engine_hit_rate']}, cached tokens "
                    f"{res['cached_token_share']}, prompt tokens per worker {q}",
                    file=sys.stderr,
                )
        for b in backends:
            rs = runs[b]
            res = dict(rs[-1])
            if len(rs) > 1:  # medians over the rounds of the headline numbers
                for k in _HEADLINE:
                    res[k] = round(percentile([r[k] for r in rs], 50), 4)
                keep = (*_HEADLINE, "predicted_cached_tokens", "reported_cached_tokens")
                res["rounds"] = [{k: r[k] for k in keep} for r in rs]
            res["frontend_prefix_hit_rate"] = hit_rate(urls[b])
            out["backends"][b] = res
    finally:
        for proc in extra:
            _stop(proc)
        fleet.stop()
        if saved is None:
            os.environ.pop("VLLM_SERVER_DEV_MODE", None)
        else:
            os.environ["VLLM_SERVER_DEV_MODE"] = saved
    m = out["backends"]
    if "router" in m and "dynamo_core" in m:
        r, d = m["router"], m["dynamo_core"]
        out["ttft_p50_ratio_dynamo_over_router"] = round(
            d["ttft_p50_ms"] / max(r["ttft_p50_ms"], 1e-9), 2
        )
        out["ttft_p90_ratio_dynamo_over_router"] = round(
            d["ttft_p90_ms"] / max(r["ttft_p90_ms"], 1e-9), 2
        )
        out["engine_hit_rate_router_minus_dynamo"] = round(
            r["engine_hit_rate"] - d["engine_hit_rate"], 4
        )
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    return out


def _frontend(
    model: Path, router: str, served: str, workdir: Path, backend: str
) -> tuple[str, subprocess.Popen[bytes]]:
    """A second frontend of the fleet, with another routing backend; waits until healthy."""
    from dynamo_ext.testing import free_port

    port = free_port()
    log = open(workdir / f"frontend-{backend}.log", "ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynamo_ext.cli",
            "frontend",
            "--model",
            str(model),
            "--served-model-name",
            served,
            "--port",
            str(port),
            "--router",
            router,
            "--routing-backend",
            backend,
            "--no-disaggregation",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{backend} frontend exited: see {workdir}/frontend-{backend}.log")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    _stop(proc)
    raise SystemExit(f"{backend} frontend not healthy in 240 s")


def _wait_mirrored(url: str, workers: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("dynamo_ext_frontend_dynamo_core_workers "):
                if float(line.split()[-1]) >= workers:
                    return
        time.sleep(0.3)
    raise SystemExit(f"Dynamo's core did not mirror {workers} workers in {timeout_s} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _frontend_hits(url: str) -> tuple[float, float]:
    """The frontend's ``(hit_predicted_tokens, hit_actual_tokens)`` so far: what its routing
    backend predicted cached on the chosen workers, and what they reported reusing."""
    text = httpx.get(url + "/metrics", timeout=10).text
    p = a = 0.0
    for line in text.splitlines():
        if line.startswith("dynamo_ext_frontend_hit_predicted_tokens_total{"):
            p += float(line.split()[-1])
        elif line.startswith("dynamo_ext_frontend_hit_actual_tokens_total{"):
            a += float(line.split()[-1])
    return p, a


def engine_counters(base: str) -> tuple[float, float]:
    """``(prefix_cache_queries, prefix_cache_hits)`` in tokens, from a vLLM worker's
    /metrics (every engine's series summed)."""
    text = httpx.get(base + "/metrics", timeout=10).text
    q = h = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:prefix_cache_queries_total"):
            q += float(line.split()[-1])
        elif line.startswith("vllm:prefix_cache_hits_total"):
            h += float(line.split()[-1])
    return q, h


def _reset_prefix_caches(bases: dict[str, str], timeout_s: float = 30) -> None:
    """Every worker's prefix cache emptied (retried while blocks are still held), and its
    AllBlocksCleared event published to both indexes."""
    for wid, base in bases.items():
        deadline = time.monotonic() + timeout_s
        while True:
            r = httpx.post(base + "/reset_prefix_cache", timeout=10)
            if r.status_code == 200 and r.json().get("success"):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"worker {wid}: reset_prefix_cache failed: {r.text[:200]}")
            time.sleep(0.5)
        # vLLM queues AllBlocksCleared until its scheduler's next step: one short request
        # (under a block, so it caches nothing) publishes it now, before the arm's first
        # route reads a stale index.
        served = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
        httpx.post(
            base + "/v1/completions",
            json={"model": served, "prompt": [1, 2, 3], "max_tokens": 1},
            timeout=60,
        ).raise_for_status()
    time.sleep(1.0)
