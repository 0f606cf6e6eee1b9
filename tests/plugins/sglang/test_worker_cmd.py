"""``dynamo-ext worker sglang``'s exec path: the command becomes the SGLang launcher (the same
process), which starts SGLang (here the stand-in of ``test_launcher.py``: SGLang cannot serve
on CPU) and registers it with a real router under the given id, role and page size."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from dynamo_ext.router.client import RouterClient
from dynamo_ext.testing import free_port, wait_for

HERE = Path(__file__).parent
STANDIN = HERE / "standin_sglang.py"
PAGE = 4


def test_exec_becomes_the_launcher_and_registers(router_factory, tmp_path: Path) -> None:
    router = router_factory(block_size=PAGE)
    port = free_port()
    log = tmp_path / "worker.log"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "dynamo_ext.cli", "worker", "sglang", "stand-in-model",
            "--role", "both", "--router", router.endpoint, "--worker-id", "sg-exec",
            "--host", "127.0.0.1", "--port", str(port), "--block-size", str(PAGE),
        ],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "DYNAMO_EXT_SGLANG_CMD": f"{sys.executable} {STANDIN}",
            "STANDIN_ARGV_OUT": str(tmp_path / "argv.json"),
            "DYNAMO_EXT_WORKER_METRICS_PERIOD": "0.2",
            "PYTHONUNBUFFERED": "1",
        },
        start_new_session=True,
    )  # fmt: skip
    try:
        launcher = "dynamo_ext.plugins.sglang.launch_server"
        deadline = time.monotonic() + 30
        while launcher not in " ".join(psutil.Process(proc.pid).cmdline()):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)

        async def registered() -> None:
            async with RouterClient(router.endpoint) as c:

                async def state():
                    st = await c.workers()
                    return next((w for w in st.workers if w.worker_id == "sg-exec" and w.up), None)

                w = await wait_for(state, timeout=60, every=0.2)
                assert w.http_endpoint == f"http://127.0.0.1:{port}"

        asyncio.run(registered())
        argv = json.loads((tmp_path / "argv.json").read_text())  # what SGLang was given
        assert "--enable-metrics" in argv and argv[argv.index("--page-size") + 1] == str(PAGE)
        assert argv[argv.index("--model-path") + 1] == "stand-in-model"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(5)
