"""``dynamo-ext router --demo``: the router against a simulated fleet, over real sockets.

The fleet is the simulator's (``dynamo_ext.sim.fleet.MockerFleet``), the one fake worker of
the project: each worker is a simulated vLLM engine with a small prefix cache that
publishes what it caches exactly as a vLLM worker does (KV event batches on a ZMQ PUB with
a replay socket, metrics on another PUB) and registers itself with the router over the
control socket. Multi-turn conversations that share system prompts are routed through
``RouterClient``; the chosen worker serves each request, and the prefix it found cached
(the engine's own count) is set beside the router's prediction. The same conversations are
run under the ``kv`` scorer and under ``round_robin``, and the prefix hit rates compared.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

from dynamo_ext.config import RouterConfig, ScorerConfig
from dynamo_ext.router.client import RouterClient
from dynamo_ext.router.server import RouterServer
from dynamo_ext.sim.fleet import MockerFleet
from dynamo_ext.sim.model import MockerConfig

BLOCK_SIZE = 16
IN_FLIGHT = 6
CAPACITY_BLOCKS = 160
MAX_TOKENS = 4


def conversations(n: int, seed: int = 0) -> list[list[list[int]]]:
    """``n`` multi-turn conversations; each turn's prompt extends the previous one."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1, 30000) for _ in range(BLOCK_SIZE * 8)] for _ in range(4)]
    convs = []
    for _ in range(n):
        prompt = list(rng.choice(systems))
        turns = []
        for _ in range(rng.randint(2, 5)):
            prompt = prompt + [rng.randrange(1, 30000) for _ in range(rng.randint(40, 200))]
            turns.append(list(prompt))
        convs.append(turns)
    return convs


async def _serve(fleet: MockerFleet, worker_id: str, tokens: list[int]) -> int:
    """Run the request on the chosen simulated engine; the prompt blocks it found cached."""
    req, q = fleet.workers[worker_id].submit(tokens, MAX_TOKENS)
    finish: str | None = None
    while finish is None:
        _tok, finish = await q.get()
    return req.hit_gpu // BLOCK_SIZE


async def _run(policy: str, workers: int, requests: int, verbose: bool) -> dict[str, float]:
    cfg = RouterConfig(
        bind="tcp://127.0.0.1:0",
        metrics_port=None,
        block_size=BLOCK_SIZE,
        worker_timeout_s=2.0,
        scorer=ScorerConfig(mode=policy, seed=0),  # type: ignore[arg-type]
    )
    srv = RouterServer(cfg)
    await srv.start()
    assert srv.bound_endpoint is not None
    mcfg = MockerConfig(
        block_size=BLOCK_SIZE,
        num_gpu_blocks=CAPACITY_BLOCKS,
        speedup=20.0,
        metrics_period_s=0.2,
    )
    fleet = MockerFleet(workers, mcfg, router=srv.bound_endpoint, prefix="worker")
    prompt_blocks = hit_blocks = predicted = 0
    try:
        await fleet.start()
        await asyncio.wait_for(fleet.registered.wait(), 10)
        async with RouterClient(srv.bound_endpoint) as client:
            for _ in range(100):  # until every worker's metrics arrived: all are up
                st = await client.workers()
                if sum(1 for w in st.workers if w.up) == workers:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # KV subscriptions connect
            # Interleave conversations turn by turn, as concurrent users would arrive.
            convs = conversations(max(1, requests // 3))
            queue = [(c, t) for t in range(5) for c in range(len(convs)) if t < len(convs[c])]
            in_flight: list[str] = []
            for i, (c, t) in enumerate(queue[:requests]):
                tokens = convs[c][t]
                rid = f"{policy}-{i}"
                r = await client.route(rid, tokens)
                hit = await _serve(fleet, r.worker_id, tokens)
                # The router keeps each request's predicted load while the next few are
                # routed, so that load spreads them as overlapping users would.
                in_flight.append(rid)
                if len(in_flight) > IN_FLIGHT:
                    await client.finished(in_flight.pop(0))
                n = len(tokens) // BLOCK_SIZE
                prompt_blocks += n
                hit_blocks += hit
                said = r.chosen.prefix_hit_blocks.get("GPU", 0)
                predicted += said
                if verbose:
                    print(
                        f"  {rid:>16}  conv {c:>2} turn {t}  {n:>3} blocks -> {r.worker_id}"
                        f"  hit {hit:>3} (router predicted {said:>3})"
                        f"  cost {r.chosen.cost:7.1f}  {r.decision_us:6.0f} us"
                    )
                await asyncio.sleep(0.02)  # let the step's KV events reach the router
    finally:
        await fleet.stop()
        await srv.stop()
    return {
        "prefix_hit_rate": round(hit_blocks / max(1, prompt_blocks), 3),
        "predicted_equals_actual": predicted == hit_blocks,
        "prompt_blocks": prompt_blocks,
    }


async def run_demo(workers: int = 4, requests: int = 40) -> int:
    # Worker registrations of a demo fleet are not news.
    logging.getLogger("dynamo_ext.router").setLevel(logging.WARNING)
    print(f"dynamo-ext router demo: {workers} simulated vLLM workers, {requests} requests\n")
    print("policy kv (prefix-aware):")
    kv = await _run("kv", workers, requests, verbose=True)
    rr = await _run("round_robin", workers, requests, verbose=False)
    summary = {"kv": kv, "round_robin": rr}
    print("\nsummary: " + json.dumps(summary))
    return 0
