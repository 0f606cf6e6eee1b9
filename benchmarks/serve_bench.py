"""Load against an OpenAI endpoint, and ``dynamo-ext bench serve``.

``run_load`` drives N concurrent streaming clients over a list of prompts and accounts for
every request: each must end with ``[DONE]``, carry its own id, and deliver exactly the
tokens asked for (``ignore_eos``), so a lost or duplicated request or token shows. ``python
-m dynamo_ext.benchmarks.serve_bench --url URL ...`` runs it from a second process (the load
test) and prints a JSON summary.

``dynamo-ext bench serve`` starts a local fleet (router, 2 aggregated vLLM workers, frontend)
once per routing mode (round_robin, then kv), replays the same prefix-sharing workload
(groups of requests sharing a long document prefix, as in RAG or multi-turn chat) with
the same concurrency, and prints TTFT / ITL / throughput percentiles per mode and the
round_robin/kv ratios. On CPU the prefill of a long prompt dominates TTFT, so prefix hits
show there.

``dynamo-ext bench serve --routing-backend router,dynamo_core`` (``run``) is the A/B of who
chooses the worker on ONE fleet: our router (kv mode) through one frontend, Dynamo's own
SelectionService (``routing_backend: dynamo_core``) through a second one, the same load
through each in turn with every worker's prefix cache reset in between, judged by the
engines' own counters (``vllm:prefix_cache_hits_total`` / ``queries_total`` deltas,
``usage.prompt_tokens_details.cached_tokens``) and the clients' TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from dynamo_ext.stats import percentile


async def _one(
    client: httpx.AsyncClient, url: str, model: str, prompt: str | list[int], max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
        # the last chunk then carries usage.prompt_tokens_details.cached_tokens (workers run
        # with --enable-prompt-tokens-details): the engine's own word on prefix reuse
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    usage: dict[str, Any] = {}
    times: list[float] = []
    ids: set[str] = set()
    chunks = 0
    done = False
    error = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    error = obj["error"]
                    break
                ids.add(obj["id"])
                if isinstance(obj.get("usage"), dict):
                    usage = obj["usage"]
                for ch in obj.get("choices") or ():
                    if ch.get("text") is not None:
                        # a chunk may carry several tokens when the engine runs ahead
                        chunks += len(ch.get("token_ids") or [0])
                        times.append(time.perf_counter())
    except httpx.HTTPError as exc:
        error = repr(exc)
    end = time.perf_counter()
    ok = done and error is None and len(ids) == 1 and chunks == max_tokens
    itl = [b - a for a, b in zip(times, times[1:], strict=False)]
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return {
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": cached,
        "ok": ok,
        "error": error,
        "id": next(iter(ids)) if len(ids) == 1 else None,
        "ids": len(ids),
        "tokens": chunks,
        "done": done,
        "ttft": (times[0] - t0) if times else None,
        "itl": itl,
        "e2e": end - t0,
    }


async def run_load(
    url: str,
    model: str,
    prompts: list[str | list[int]],
    concurrency: int,
    max_tokens: int,
    timeout_s: float = 600,
) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def guarded(p: str | list[int]) -> dict[str, Any]:
            async with sem:
                return await _one(client, url, model, p, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(guarded(p) for p in prompts)), timeout_s)
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ids = [r["id"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    return {
        "requests": len(prompts),
        "succeeded": len(ok),
        "lost": len(prompts) - len(ok),
        "duplicated_ids": len(ids) - len(set(ids)),
        "errors": [r["error"] for r in results if not r["ok"]][:5],
        "tokens": sum(r["tokens"] for r in ok),
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1) if wall else 0.0,
        "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1),
        "ttft_p90_ms": round(percentile(ttft, 90) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttft, 99) * 1000, 1),
        "itl_p50_ms": round(percentile(itl, 50) * 1000, 2),
        "itl_p99_ms": round(percentile(itl, 99) * 1000, 2),
        "e2e_p50_ms": round(percentile([r["e2e"] for r in ok], 50) * 1000, 1),
        "prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in ok),
        "cached_tokens": sum(r.get("cached_tokens") or 0 for r in ok),
    }


def prefix_workload(
    groups: int, per_group: int, doc_words: int, question_words: int, seed: int = 0
) -> list[str]:
    """``groups`` long documents, each asked ``per_group`` different questions, shuffled."""
    from dynamo_ext.testing.tiny_model import english_like_text

    rng = random.Random(seed)
    out = []
    for g in range(groups):
        doc = english_like_text(doc_words, seed=1000 + g)
        for q in range(per_group):
            out.append(doc + " " + english_like_text(question_words, seed=5000 + g * 100 + q))
    rng.shuffle(out)
    return out


def _cli_load() -> int:
    p = argparse.ArgumentParser(description="streaming load against an OpenAI endpoint")
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--timeout", type=float, default=300)
    a = p.parse_args()
    from dynamo_ext.testing.tiny_model import english_like_text

    prompts: list[str | list[int]] = [
        english_like_text(a.prompt_words, seed=i) for i in range(a.requests)
    ]
    res = asyncio.run(run_load(a.url, a.model, prompts, a.concurrency, a.max_tokens, a.timeout))
    print(json.dumps(res))
    return 0 if res["lost"] == 0 and res["duplicated_ids"] == 0 else 1


# ---------------------------------------------------------------- dynamo-ext bench serve
BACKENDS = ("router", "dynamo_core")
_HEADLINE = ("ttft_p50_ms", "ttft_p90_ms", "engine_hit_rate", "cached_token_share")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", default="round_robin,kv", help="router scorer modes to compare")
    p.add_argument(
        "--routing-backend",
        help="A/B of routing backends on ONE fleet, e.g. router,dynamo_core (our router in kv "
        "mode vs Dynamo's SelectionService in the frontend); prefix caches reset between arms",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--groups", type=int, default=6, help="distinct long documents")
    p.add_argument("--per-group", type=int, default=4, help="questions per document")
    p.add_argument("--doc-words", type=int, default=1200, help="~tokens of each document")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="A/B: arms run this many times each")
    p.add_argument("--model", type=Path, help="model folder (default: the tiny local Llama)")
    p.add_argument("--workdir", type=Path, default=Path("out/bench-serve"))
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.routing_backend:
        out = run(
            backends=tuple(args.routing_backend.split(",")),
            workers=args.workers,
            groups=args.groups,
            per_group=args.per_group,
            doc_words=args.doc_words,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            rounds=args.rounds,
            model=args.model,
            workdir=args.workdir,
        )
        print(json.dumps(out))
        return 0
    return _modes_main(args)


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
                before = {w: _engine_counters(u) for w, u in bases.items()}
                pred0 = _frontend_hits(urls[b])
                res = asyncio.run(
                    run_load(urls[b], fleet.served_model_name, prompts, concurrency, max_tokens)
                )
                after = {w: _engine_counters(u) for w, u in bases.items()}
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
            res["frontend_prefix_hit_rate"] = _hit_rate(urls[b])
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


def _engine_counters(base: str) -> tuple[float, float]:
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


def _modes_main(args: argparse.Namespace) -> int:
    from dynamo_ext.plugins.vllm.fleet import LocalFleet
    from dynamo_ext.testing.tiny_model import build_tiny_model, default_model_dir

    model = args.model or build_tiny_model(default_model_dir())
    prompts: list[str | list[int]] = list(
        prefix_workload(args.groups, args.per_group, args.doc_words, 40)
    )
    out: dict[str, Any] = {
        "bench": "serve",
        "workers": args.workers,
        "requests": len(prompts),
        "modes": {},
    }
    for mode in args.modes.split(","):
        fleet = LocalFleet(
            model,
            aggregated=args.workers,
            workdir=args.workdir / mode,
            router_config={"scorer": {"mode": mode, "seed": 0}},
        )
        with fleet:
            # one warm-up request per worker so compilation/first-call costs don't land on
            # the measured requests
            warm: list[str | list[int]] = ["warm up " * 20] * args.workers
            asyncio.run(run_load(fleet.url, fleet.served_model_name, warm, args.workers, 2))
            res = asyncio.run(
                run_load(
                    fleet.url, fleet.served_model_name, prompts, args.concurrency, args.max_tokens
                )
            )
            res["frontend_prefix_hit_rate"] = _hit_rate(fleet.url)
        out["modes"][mode] = res
        print(
            f"{mode:>12}: TTFT p50 {res['ttft_p50_ms']} ms p90 {res['ttft_p90_ms']} ms, "
            f"throughput {res['throughput_tok_s']} tok/s, hit rate "
            f"{res['frontend_prefix_hit_rate']}",
            file=sys.stderr,
        )
    m = out["modes"]
    if "round_robin" in m and "kv" in m:
        out["ttft_p50_ratio_rr_over_kv"] = round(
            m["round_robin"]["ttft_p50_ms"] / max(m["kv"]["ttft_p50_ms"], 1e-9), 2
        )
        out["ttft_p90_ratio_rr_over_kv"] = round(
            m["round_robin"]["ttft_p90_ms"] / max(m["kv"]["ttft_p90_ms"], 1e-9), 2
        )
    print(json.dumps(out))
    return 0


def _hit_rate(url: str) -> float | None:
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("dynamo_ext_frontend_prefix_hit_rate{"):
            return round(float(line.split()[-1]), 3)
    return None


if __name__ == "__main__":
    sys.exit(_cli_load())
