"""``dynamo-ext router --demo``: the router against a synthetic fleet, over real sockets.

Each demo worker owns a small LRU prefix cache and publishes what it caches exactly as a
vLLM worker does (KV event batches on a ZMQ PUB with a replay socket, metrics on another
PUB) and registers itself with the router over the control socket. Multi-turn
conversations that share system prompts are routed through ``RouterClient``; the chosen
worker "serves" each request by caching its prompt blocks. The same conversations are run
under the ``kv`` scorer and under ``round_robin``, and the prefix hit rates are compared.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import OrderedDict

from dynamo_ext.config import RouterConfig, ScorerConfig
from dynamo_ext.hashing import BlockHasher
from dynamo_ext.protocol import BlockRemoved, BlockStored, WorkerMetrics, WorkerRegistration
from dynamo_ext.publisher import KvEventPublisher, MetricsPublisher
from dynamo_ext.router.client import RouterClient
from dynamo_ext.router.server import RouterServer

BLOCK_SIZE = 16
IN_FLIGHT = 6
CAPACITY_BLOCKS = 160


class DemoWorker:
    """A prefix cache of ``capacity`` blocks with LRU eviction, publishing its changes."""

    def __init__(self, worker_id: str, capacity: int, hasher: BlockHasher) -> None:
        self.worker_id = worker_id
        self.capacity = capacity
        self.hasher = hasher
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.kv = KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
        self.metrics = MetricsPublisher("tcp://127.0.0.1:0")
        self.running = 0

    def registration(self) -> WorkerRegistration:
        return WorkerRegistration(
            worker_id=self.worker_id,
            kv_events_endpoint=self.kv.endpoint,
            replay_endpoint=self.kv.replay_endpoint,
            metrics_endpoint=self.metrics.endpoint,
            http_endpoint=f"http://demo/{self.worker_id}",
            block_size=BLOCK_SIZE,
        )

    def snapshot(self, heartbeat: int) -> WorkerMetrics:
        return WorkerMetrics(
            worker_id=self.worker_id,
            heartbeat=heartbeat,
            ts=time.time(),
            running=self.running,
            kv_used_blocks=len(self.cache),
            kv_total_blocks=self.capacity,
        )

    def serve(self, tokens: list[int]) -> int:
        """Cache the prompt's blocks; returns how many were already cached (prefix hit)."""
        hashes = self.hasher.hash_tokens(tokens)
        hit = 0
        for h in hashes:
            if h not in self.cache:
                break
            hit += 1
        for h in hashes[:hit]:
            self.cache.move_to_end(h)
        new = hashes[hit:]
        evicted: list[int] = []
        while new and len(self.cache) + len(new) > self.capacity:
            evicted.append(self.cache.popitem(last=False)[0])
        events: list[BlockRemoved | BlockStored] = []
        if evicted:
            events.append(BlockRemoved(evicted, None))  # type: ignore[arg-type]
        if new:
            for h in new:
                self.cache[h] = None
            parent = hashes[hit - 1] if hit else None
            toks = tokens[hit * BLOCK_SIZE : len(hashes) * BLOCK_SIZE]
            ev = BlockStored(new, parent, toks, BLOCK_SIZE, None, None, None)  # type: ignore[arg-type]
            events.append(ev)
        if events:
            self.kv.publish(events)  # type: ignore[arg-type]
        return hit

    def close(self) -> None:
        self.kv.close()
        self.metrics.close()


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
    hasher = BlockHasher(BLOCK_SIZE)
    fleet = [
        DemoWorker(f"worker-{i}", capacity=CAPACITY_BLOCKS, hasher=hasher) for i in range(workers)
    ]
    by_id = {w.worker_id: w for w in fleet}
    assert srv.bound_endpoint is not None
    prompt_blocks = hit_blocks = predicted = 0
    try:
        async with RouterClient(srv.bound_endpoint) as client:
            for w in fleet:
                w.metrics.start(w.snapshot, period_s=0.2)
                await client.register(w.registration())
            await asyncio.sleep(0.3)  # subscriptions connect
            # Interleave conversations turn by turn, as concurrent users would arrive.
            convs = conversations(max(1, requests // 3))
            queue = [(c, t) for t in range(5) for c in range(len(convs)) if t < len(convs[c])]
            in_flight: list[str] = []
            for i, (c, t) in enumerate(queue[:requests]):
                tokens = convs[c][t]
                rid = f"{policy}-{i}"
                r = await client.route(rid, tokens)
                hit = by_id[r.worker_id].serve(tokens)
                # Requests overlap: each one stays in flight while the next few are routed,
                # so the router's predicted load spreads them.
                in_flight.append(rid)
                if len(in_flight) > IN_FLIGHT:
                    await client.finished(in_flight.pop(0))
                n = len(tokens) // BLOCK_SIZE
                prompt_blocks += n
                hit_blocks += hit
                predicted += r.chosen.prefix_hit_blocks.get("GPU", 0)
                if verbose:
                    said = r.chosen.prefix_hit_blocks.get("GPU", 0)
                    print(
                        f"  {rid:>16}  conv {c:>2} turn {t}  {n:>3} blocks -> {r.worker_id}"
                        f"  hit {hit:>3} (router predicted {said:>3})"
                        f"  cost {r.chosen.cost:7.1f}  {r.decision_us:6.0f} us"
                    )
                await asyncio.sleep(0.01)  # let the events reach the router
    finally:
        await srv.stop()
        for w in fleet:
            w.close()
    return {
        "prefix_hit_rate": round(hit_blocks / max(1, prompt_blocks), 3),
        "predicted_equals_actual": predicted == hit_blocks,
        "prompt_blocks": prompt_blocks,
    }


async def run_demo(workers: int = 4, requests: int = 40) -> int:
    print(f"dynamo-ext router demo: {workers} workers, {requests} requests, real ZMQ sockets\n")
    print("policy kv (prefix-aware):")
    kv = await _run("kv", workers, requests, verbose=True)
    rr = await _run("round_robin", workers, requests, verbose=False)
    summary = {"kv": kv, "round_robin": rr}
    print("\nsummary: " + json.dumps(summary))
    return 0
