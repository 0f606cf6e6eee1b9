"""Does one huge request delay the others? Short routes timed against a real router process
while it hashes one long prompt, beside the same short routes with nothing else going on
(the baseline, measured in the same run).

``dynamo-ext bench stall [--long-tokens 1000000] [--json]``: the router runs as a child
process (``dynamo-ext router``), the caller is a ``RouterClient`` over real sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from dynamo_ext.protocol import WorkerRegistration
from dynamo_ext.router.client import RouterClient
from dynamo_ext.stats import percentile
from dynamo_ext.testing import RouterProc

BLOCK = 128
SHORT = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--long-tokens", type=int, default=1_000_000, help="the long prompt (1M)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--baseline", type=int, default=300, help="short routes timed alone")
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout")


async def _run(long_tokens: int, workers: int, baseline: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="dynamo-ext-stall-"))
    router = RouterProc(
        tmp, {"block_size": BLOCK, "resync_interval_s": 0, "max_route_tokens": long_tokens}
    ).start()
    short = list(range(SHORT))
    try:
        async with RouterClient(router.endpoint, timeout_s=120) as c:
            for i in range(workers):
                await c.register(WorkerRegistration(f"w{i}", block_size=BLOCK))
            alone = []
            for _ in range(baseline):
                t0 = time.perf_counter()
                await c.route("short", short, track=False)
                alone.append(time.perf_counter() - t0)
            t_long = time.perf_counter()
            long = asyncio.create_task(c.route("long", list(range(long_tokens)), track=False))
            during = []
            while not long.done():
                t0 = time.perf_counter()
                await c.route("short", short, track=False)
                during.append(time.perf_counter() - t0)
            resp = await long
            long_s = time.perf_counter() - t_long
    finally:
        router.stop()

    def ms(xs: list[float], q: float) -> float:
        return round(percentile(xs, q) * 1e3, 3)

    return {
        "workers": workers,
        "short_tokens": SHORT,
        "long_tokens": long_tokens,
        "long_blocks": resp.num_blocks,
        "long_route_s": round(long_s, 3),
        "alone": {
            "n": len(alone),
            "p50_ms": ms(alone, 50),
            "p99_ms": ms(alone, 99),
            "max_ms": ms(alone, 100),
        },
        "during_long": {
            "n": len(during),
            "p50_ms": ms(during, 50),
            "p99_ms": ms(during, 99),
            "max_ms": ms(during, 100),
        },
        "p99_ratio_during_vs_alone": round(percentile(during, 99) / percentile(alone, 99), 2),
    }


def run(long_tokens: int = 1_000_000, workers: int = 8, baseline: int = 300) -> dict[str, Any]:
    return asyncio.run(_run(long_tokens, workers, baseline))


def main(args: argparse.Namespace) -> int:
    res = run(args.long_tokens, args.workers, args.baseline)
    if not args.json:
        print(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0
