"""Multi-tier KV offload and router-driven prefetch on real vLLM-CPU engines.

Two stock vLLM servers, configured by flags alone (``--kv-transfer-config`` from
``offload_transfer_config``), share one global KV pool (a directory standing in for a 3FS
mount) and register with a real router process:

* ``w0``: CPU primary tier + vLLM's local-disk ``fs`` tier + our pool tier;
* ``w1``: CPU primary tier + our pool tier (no disk), with a prefetch socket, composed
  with the NIXL disaggregation connector in one ``MultiConnector`` config.

GPU caches are tiny (16 blocks) and CPU tiers hold 8 chunks, so a few prompts push a prefix
out of the device and CPU tiers. Covered: offload events with their tier reach the router
and match what the disk and pool tiers hold; an evicted prefix comes back from offload
with the same tokens as the first run; a prefix written by ``w0`` is served to ``w1`` from
the global pool; the router stages it in ``w1``'s CPU memory before the request lands.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import pytest

from dynamo_ext.plugins.vllm.offload import offload_transfer_config
from dynamo_ext.router.client import RouterClient
from dynamo_ext.testing import RouterProc, free_port, wait_for
from dynamo_ext.testing.tiny_model import english_like_text

from .conftest import BLOCK_SIZE, kv_events_args

pytestmark = pytest.mark.engine

CHUNK_TOKENS = BLOCK_SIZE
CPU_CHUNKS = 8


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, start_vllm, tiny_model):
    root = tmp_path_factory.mktemp("offload")
    pool = root / "pool"
    (root / "router").mkdir()
    router = RouterProc(
        root / "router", {"block_size": BLOCK_SIZE, "log_decisions": True, "prefetch": True}
    )
    router.start()
    cpu_bytes = CPU_CHUNKS * 2 * 2 * CHUNK_TOKENS * 64 * 4  # 2 layers x K,V x 64 dims x fp32
    cfgs = {
        "w0": offload_transfer_config(
            cpu_bytes,
            disk_dir=str(root / "disk"),
            pool_root=str(pool),
            prefetch_endpoint=f"tcp://*:{free_port()}",
            pool_sweep_interval_s=0.5,
        ),
        # one flag for both: vLLM's MultiConnector of our NIXL connector and the offload stack
        "w1": offload_transfer_config(
            cpu_bytes,
            pool_root=str(pool),
            prefetch_endpoint=f"tcp://*:{free_port()}",
            pool_sweep_interval_s=0.5,
            nixl={"kv_role": "kv_both", "kv_buffer_device": "cpu"},
        ),
    }
    servers = {}
    for wid, cfg in cfgs.items():
        env = {
            "DYNAMO_EXT_WORKER_ROUTER": router.endpoint,
            "DYNAMO_EXT_WORKER_ID": wid,
            "DYNAMO_EXT_WORKER_METRICS_PERIOD": "0.2",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
        }
        args = [
            *kv_events_args(free_port(), free_port()),
            "--max-model-len", "1024",
            "--num-gpu-blocks-override", "16",
            "--kv-transfer-config", json.dumps(cfg),
        ]  # fmt: skip
        servers[wid] = start_vllm(args, env, wait=False)
    for s in servers.values():
        s.wait_ready()

    async def registered():
        async with RouterClient(router.endpoint) as c:
            ws = {w.worker_id: w for w in (await c.workers()).workers}
        return set(ws) == {"w0", "w1"} and all(w.up for w in ws.values())

    run(wait_for(registered, timeout=30))
    yield {"router": router, "servers": servers, "pool": pool, "disk": root / "disk",
           "model": str(tiny_model)}  # fmt: skip
    router.stop()


def complete(s, model: str, prompt, max_tokens: int = 6) -> dict:
    return post(
        s.url + "/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
    )


def tokens(s, text: str) -> list[int]:
    return post(s.url + "/tokenize", {"prompt": text})["tokens"]


async def fleet(router: RouterProc):
    async with RouterClient(router.endpoint) as c:
        return {w.worker_id: w for w in (await c.workers()).workers}


def pool_files(pool: Path) -> list[Path]:
    return [p for p in pool.rglob("*.kv") if p.is_file()]


def disk_files(disk: Path) -> list[Path]:
    return [p for p in disk.rglob("*.bin") if p.is_file()]


def fill(s, model: str, n: int, seed0: int) -> None:
    """Push other prefixes through the worker until earlier ones left its GPU and CPU tiers."""
    for i in range(n):
        complete(s, model, english_like_text(420, seed=seed0 + i), max_tokens=1)


def test_offload_events_reach_router_and_match_tier_contents(setup) -> None:
    s, router, model = setup["servers"]["w0"], setup["router"], setup["model"]
    text = english_like_text(420, seed=501)
    toks = tokens(s, text)
    n_blocks = len(toks) // BLOCK_SIZE
    assert n_blocks >= 3
    complete(s, model, toks)

    async def tiers_indexed():
        f = await fleet(router)
        ib = f["w0"].indexed_blocks
        return all(ib.get(t, 0) >= n_blocks for t in ("GPU", "CPU", "DISK", "REMOTE")) and ib

    ib = run(wait_for(tiers_indexed, timeout=30))
    # The router's per-tier view equals what the storage tiers hold: every chunk file the
    # disk tier and the pool wrote was announced with its tier, and nothing else was.
    assert ib["DISK"] == len(disk_files(setup["disk"]))
    assert ib["REMOTE"] == len(pool_files(setup["pool"]))
    assert ib["CPU"] <= CPU_CHUNKS

    async def explain():
        async with RouterClient(router.endpoint) as c:
            return await c.route("probe-a", toks, track=False, explain=True)

    r = run(explain())
    w0 = next(c for c in r.candidates if c.worker_id == "w0")
    assert w0.prefix_hit_blocks.get("GPU") == n_blocks


def test_evicted_prefix_restored_from_offload_tiers_same_tokens(setup) -> None:
    s, router, model = setup["servers"]["w0"], setup["router"], setup["model"]
    text = english_like_text(420, seed=777)
    toks = tokens(s, text)
    n_blocks = len(toks) // BLOCK_SIZE
    first = complete(s, model, toks)["choices"][0]["text"]
    fill(s, model, 8, seed0=9000)  # 8 x 3 blocks: beyond 16 GPU blocks and 8 CPU chunks

    async def evicted_from_gpu_and_cpu():
        async with RouterClient(router.endpoint) as c:
            r = await c.route("probe-b", toks, track=False, explain=True)
        hits = next(c for c in r.candidates if c.worker_id == "w0").prefix_hit_blocks
        on_storage = hits.get("DISK", 0) + hits.get("REMOTE", 0)
        return hits.get("GPU", 0) == 0 and on_storage == n_blocks and hits

    hits = run(wait_for(evicted_from_gpu_and_cpu, timeout=30))
    assert hits.get("CPU", 0) == 0
    before = metric(scrape(s.url), "vllm:kv_offload_total_bytes_total", transfer_type="CPU_to_GPU")
    again = complete(s, model, toks)["choices"][0]["text"]
    after = metric(scrape(s.url), "vllm:kv_offload_total_bytes_total", transfer_type="CPU_to_GPU")
    assert again == first
    assert after > before  # the prefix came back through the CPU tier, not recomputed


def test_router_prefetches_from_the_workers_disk_tier(setup) -> None:
    """A prefix that left w0's GPU and CPU but is on its local disk: the router tells w0 to
    stage it, w0 reads it from its disk tier (not the pool) into RAM, and the request's
    promotion copies from RAM. Same tokens as the first run."""
    s, router, model = setup["servers"]["w0"], setup["router"], setup["model"]
    toks = tokens(s, english_like_text(420, seed=8080))
    n_blocks = len(toks) // BLOCK_SIZE
    first = complete(s, model, toks)["choices"][0]["text"]
    fill(s, model, 8, seed0=12000)

    async def on_disk_only():
        async with RouterClient(router.endpoint) as c:
            r = await c.route("probe-d", toks, track=False, explain=True)
        hits = next(c for c in r.candidates if c.worker_id == "w0").prefix_hit_blocks
        fast = hits.get("GPU", 0) + hits.get("CPU", 0)
        return fast == 0 and hits.get("DISK", 0) == n_blocks and hits

    run(wait_for(on_disk_only, timeout=30))
    mark = len(s.log_path.read_text())

    async def route_to_w0():
        async with RouterClient(router.endpoint) as c:
            return await c.route("req-disk", toks, exclude_workers=["w1"])

    assert run(route_to_w0()).worker_id == "w0"
    pat = rf"prefetch req-disk: staged {n_blocks} chunks \({n_blocks} from local disk"
    run(wait_for(lambda: re.search(pat, s.log_path.read_text()[mark:]), timeout=20))
    assert complete(s, model, toks)["choices"][0]["text"] == first
    tail = s.log_path.read_text()[mark:]
    assert re.search(rf"pool load: {n_blocks} chunks into CPU \({n_blocks} from prefetch", tail)


def test_global_pool_serves_other_worker_and_router_prefetches(setup) -> None:
    w0, w1 = setup["servers"]["w0"], setup["servers"]["w1"]
    router, model = setup["router"], setup["model"]
    text = english_like_text(420, seed=4242)
    toks = tokens(w0, text)
    n_blocks = len(toks) // BLOCK_SIZE
    before = len(pool_files(setup["pool"]))
    ref = complete(w0, model, toks)["choices"][0]["text"]

    async def pooled_and_indexed():
        n = len(pool_files(setup["pool"]))
        f = await fleet(router)
        return n >= before + n_blocks and f["w0"].indexed_blocks.get("REMOTE") == n

    run(wait_for(pooled_and_indexed, timeout=30))
    log_before = w1.log_path.read_text()

    async def route_to_w1():
        async with RouterClient(router.endpoint) as c:
            return await c.route("req-pool", toks, exclude_workers=["w0"])

    r = run(route_to_w1())
    assert r.worker_id == "w1"

    def staged() -> bool:
        new = w1.log_path.read_text()[len(log_before) :]
        return re.search(rf"prefetch req-pool: staged {n_blocks} chunks", new) is not None

    run(wait_for(staged, timeout=20))
    assert "dynamo_ext_router_prefetch_blocks_total" in router.scrape()
    out = complete(w1, model, toks)["choices"][0]["text"]
    assert out == ref  # KV written by w0, read by w1 from the pool: same tokens
    new_log = w1.log_path.read_text()[len(log_before) :]
    assert re.search(rf"pool load: {n_blocks} chunks into CPU \({n_blocks} from prefetch", new_log)

    # Without the router's prefetch, w1 reads the pool on the request's path.
    text2 = english_like_text(420, seed=4343)
    toks2 = tokens(w0, text2)
    ref2 = complete(w0, model, toks2)["choices"][0]["text"]
    run(wait_for(lambda: len(pool_files(setup["pool"])) >= before + 2 * n_blocks, timeout=20))
    mark = len(w1.log_path.read_text())
    assert complete(w1, model, toks2)["choices"][0]["text"] == ref2
    tail = w1.log_path.read_text()[mark:]
    assert re.search(r"pool load: \d+ chunks into CPU \(0 from prefetch staging, \d+ read", tail)


def test_corrupt_pool_chunk_is_recomputed_not_served_nor_retried(setup) -> None:
    """A pooled chunk whose bytes rot after it was announced: the pool tier's lookup (on its
    lookup thread) still finds the file, the load verifies the checksum and fails, the chunk
    is marked a miss for the request (no promotion livelock) and recomputed: same tokens."""
    w0, w1, model, pool = (setup["servers"]["w0"], setup["servers"]["w1"], setup["model"],
                           setup["pool"])  # fmt: skip
    toks = tokens(w0, english_like_text(420, seed=6161))
    n_blocks = len(toks) // BLOCK_SIZE
    before = set(pool_files(pool))
    ref = complete(w0, model, toks)["choices"][0]["text"]
    run(wait_for(lambda: len(set(pool_files(pool)) - before) >= n_blocks, timeout=20))
    victim = max(set(pool_files(pool)) - before, key=lambda p: p.stat().st_mtime)
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF  # same size, so only the checksum can tell
    victim.write_bytes(bytes(raw))
    mark = len(w1.log_path.read_text())
    assert complete(w1, model, toks)["choices"][0]["text"] == ref
    tail = w1.log_path.read_text()[mark:]
    assert "corrupt chunk" in tail and "checksum mismatch" in tail, tail[-3000:]
    assert re.search(r"pool load of \d+ chunks failed", tail), tail[-3000:]
    # dropped from the pool, then written again by w1 from its recomputed KV (self-healing)
    run(wait_for(lambda: victim.exists() and victim.read_bytes() != bytes(raw), timeout=20))


def test_chunks_leaving_the_pool_are_announced_removed(setup) -> None:
    """Another process's eviction (here: the files deleted under the workers) reaches the
    router as BlockRemoved(STORAGE/REMOTE) from each worker that had announced them, while
    the workers are idle (the pool tier wakes its engine core to publish them)."""
    router, pool = setup["router"], setup["pool"]
    files = pool_files(pool)
    assert files
    f = run(fleet(router))
    holders = [w for w in ("w0", "w1") if f[w].indexed_blocks.get("REMOTE", 0) > 0]
    assert "w0" in holders
    for p in files:
        p.unlink()
    # No request follows: each idle engine is woken to publish its removals.

    async def forgotten():
        f = await fleet(router)
        return all(f[w].indexed_blocks.get("REMOTE", 0) == 0 for w in ("w0", "w1")) and f

    run(wait_for(forgotten, timeout=30))
    for wid in holders:
        assert "announced chunks left the pool" in setup["servers"][wid].log_path.read_text()
