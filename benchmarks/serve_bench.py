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

``dynamo-ext bench serve --routing-backend router,dynamo_core`` (``run``, in
``benchmarks/serve_ab.py``) is the A/B of who chooses the worker on ONE fleet: our router
(kv mode) through one frontend, Dynamo's own SelectionService (``routing_backend:
dynamo_core``) through a second one, judged by the engines' own prefix-cache counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
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
            tuple(args.routing_backend.split(",")),
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


def run(backends: tuple[str, ...] = BACKENDS, **kw: Any) -> dict[str, Any]:
    """The routing backends A/B on one real fleet (``benchmarks/serve_ab.py``)."""
    from dynamo_ext.benchmarks.serve_ab import run as run_ab

    return run_ab(backends, **kw)


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
            res["frontend_prefix_hit_rate"] = hit_rate(fleet.url)
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


def hit_rate(url: str) -> float | None:
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
