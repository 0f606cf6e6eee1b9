"""The launcher end to end, with a real router, against a STAND-IN for SGLang.

SGLang cannot serve a model on this CPU-only machine (its install needs CUDA kernels), so
``DYNAMO_EXT_SGLANG_CMD`` points the launcher at ``standin_sglang.py``, a process that
speaks SGLang 0.5.23's wire formats with payloads recorded from SGLang's own classes (see
its docstring). Everything else is real: the launcher process and its sidecar, ZMQ
sockets, the router process indexing and routing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dynamo_ext.router.client import RouterClient
from dynamo_ext.testing import free_port, wait_for

HERE = Path(__file__).parent
STANDIN = HERE / "standin_sglang.py"
PAGE = 4


def start_launcher(
    tmp: Path, router: str, worker_id: str, extra: list[str], port: int | None = None
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = port or free_port()
    log = tmp / f"launcher-{worker_id}.log"
    env = {
        **os.environ,
        "DYNAMO_EXT_SGLANG_CMD": f"{sys.executable} {STANDIN}",
        "STANDIN_ARGV_OUT": str(tmp / f"argv-{worker_id}.json"),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynamo_ext.plugins.sglang.launch_server",
            "--model-path",
            "stand-in-model",
            "--port",
            str(port),
            "--dynamo-ext-router",
            router,
            "--dynamo-ext-worker-id",
            worker_id,
            "--dynamo-ext-block-size",
            str(PAGE),
            "--dynamo-ext-metrics-period",
            "0.2",
            *extra,
        ],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    return proc, port, log


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM to the launcher alone (it must forward it); the group only if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


def post(url: str) -> dict:
    req = urllib.request.Request(url, b"", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


async def worker_state(client: RouterClient, wid: str):
    fleet = await client.workers()
    return next((w for w in fleet.workers if w.worker_id == wid), None)


def test_launcher_registers_indexes_routes_and_stops(router_factory, tmp_path: Path) -> None:
    router = router_factory(block_size=PAGE)
    proc, port, log = start_launcher(tmp_path, router.endpoint, "sg0", [])
    try:
        asyncio.run(_scenario(router.endpoint, port, tmp_path))
        rc = stop(proc)
        text = log.read_text()
        assert rc == 3, text  # the stand-in's exit code on SIGTERM, passed on
        assert "forwarding SIGTERM to SGLang" in text
        assert "replayed 2 SGLang KV batches from seq 0" in text
        assert "deregistered sg0" in text
        assert "worker sg0 deregistered" in router.log()
        assert router.log().count("worker sg0 added (engine=sglang") == 1
    finally:
        stop(proc)


async def _scenario(endpoint: str, port: int, tmp: Path) -> None:
    base = f"http://127.0.0.1:{port}"
    async with RouterClient(endpoint) as client:
        # registration and metrics: values of the recorded SGLang /metrics text
        w = await wait_for(lambda: _with_metrics(client, "sg0"), timeout=60, every=0.2)
        m = w.last_metrics
        assert w.up and w.http_endpoint == base
        assert (m.running, m.waiting, m.kv_total_blocks, m.kv_used_blocks) == (3, 3, 1024, 256)
        assert m.offload_blocks == {"CPU": 160}
        assert (m.prefix_cache_queries, m.prefix_cache_hits) == (1000, 400)

        argv = json.loads((tmp / "argv-sg0.json").read_text())
        assert "--enable-metrics" in argv and argv[argv.index("--page-size") + 1] == "4"
        assert json.loads(argv[argv.index("--kv-events-config") + 1])["publisher"] == "zmq"

        # KV events: steps 0 (dropped on the wire, replayed) and 1 of the recorded session
        assert post(base + "/standin/kv?upto=2") == {"sent": 2}
        w = await wait_for(lambda: _blocks(client, "sg0", {"GPU": 5, "CPU": 3}), timeout=20)
        prompt = list(range(1, 21)) + [99, 98]
        d = await client.route("r1", prompt, track=False)
        assert d.worker_id == "sg0" and d.engine == "sglang"
        assert d.chosen.prefix_hit_blocks.get("GPU") == 5

        # step 2: two namespaced pages stored, B's two pages evicted (GPU count unchanged:
        # wait on what the route sees instead)
        post(base + "/standin/kv?upto=3")

        async def gpu_hits() -> bool:
            d = await client.route("r2", prompt, track=False)
            return d.chosen.prefix_hit_blocks.get("GPU") == 3

        await wait_for(gpu_hits, timeout=20)
        await wait_for(lambda: _blocks(client, "sg0", {"GPU": 5, "CPU": 3}), timeout=20)

        # step 3: flush_cache clears the device tier; the host copy of A stays
        post(base + "/standin/kv?upto=4")
        await wait_for(lambda: _blocks(client, "sg0", {"CPU": 3}), timeout=20)
        d = await client.route("r3", prompt, track=False)
        assert d.chosen.prefix_hit_blocks.get("GPU", 0) == 0
        assert d.chosen.prefix_hit_blocks.get("CPU") == 3


def test_sidecar_resyncs_a_batch_sglang_sent_before_going_idle(router_factory, tmp_path):
    """SGLang's only batch is lost on the wire (the stand-in never sends batch 0; a SUB
    still joining loses one the same way) and nothing follows, so no gap is ever seen: the
    sidecar asks SGLang's replay socket for it when the stream has been idle."""
    router = router_factory(block_size=PAGE)
    proc, port, log = start_launcher(
        tmp_path, router.endpoint, "sg2", ["--dynamo-ext-resync-s", "0.3"]
    )
    try:

        async def scenario() -> None:
            async with RouterClient(router.endpoint) as client:
                await wait_for(lambda: _with_metrics(client, "sg2"), timeout=60, every=0.2)
                assert post(f"http://127.0.0.1:{port}/standin/kv?upto=1") == {"sent": 1}

                async def indexed():
                    w = await worker_state(client, "sg2")
                    return w is not None and sum(w.indexed_blocks.values()) > 0

                await wait_for(indexed, timeout=20)

        asyncio.run(scenario())
        assert "replayed 1 SGLang KV batches from seq 0" in log.read_text()
    finally:
        stop(proc)


async def _with_metrics(client: RouterClient, wid: str):
    w = await worker_state(client, wid)
    return w if w is not None and w.last_metrics is not None else None


async def _blocks(client: RouterClient, wid: str, want: dict[str, int]):
    w = await worker_state(client, wid)
    got = {k: v for k, v in (w.indexed_blocks if w else {}).items() if v}
    return w if got == want else None


def test_launcher_survives_router_outage_and_late_router(router_factory, tmp_path) -> None:
    """The router starts after the worker: SGLang serves meanwhile, registration follows."""
    from dynamo_ext.testing import RouterProc

    r = RouterProc(tmp_path, {"block_size": PAGE})
    proc, port, log = start_launcher(
        tmp_path,
        r.endpoint,
        "sg1",
        ["--dynamo-ext-role", "prefill", "--dynamo-ext-bootstrap-port", str(free_port())],
    )
    try:
        deadline = time.monotonic() + 30
        while "unreachable" not in log.read_text():  # SGLang up, registration failed
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        r.start()

        async def check() -> None:
            async with RouterClient(r.endpoint) as client:
                w = await wait_for(lambda: _with_metrics(client, "sg1"), timeout=30, every=0.2)
                assert w.role == "prefill"
                d = await client.route("p", list(range(8)), role="prefill", track=False)
                assert d.engine == "sglang" and d.bootstrap_endpoint is not None
                assert d.bootstrap_endpoint.startswith("127.0.0.1:")

        asyncio.run(check())
        deadline = time.monotonic() + 15
        while "registered SGLang worker sg1" not in log.read_text():  # the keep-alive's answer
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        stop(proc)
        r.stop()
