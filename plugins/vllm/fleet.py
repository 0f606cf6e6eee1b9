"""A whole dynamo-ext system on one machine: router, vLLM workers, frontend, as processes.

Used by ``examples/`` (aggregated and disaggregated deployments of the tiny local model),
by the end-to-end tests and by ``dynamo-ext bench serve``. Every worker is a stock vLLM
OpenAI server started with flags only: vLLM's own ``--kv-events-config``, our connector in
``--kv-transfer-config`` for prefill/decode roles, and ``DYNAMO_EXT_WORKER_*`` variables for the
stat-logger plugin (metrics + registration). Everything is stopped on ``stop()`` / exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamo_ext.plugins.vllm.launcher import (
    CPU_FAST_ARGS,
    CPU_FAST_ENV,
    VllmServer,
    engine_threads_env,
)
from dynamo_ext.plugins.vllm.worker_cmd import (
    CONNECTOR,
    ROLE_TO_KV,
    Role,
    VllmWorkerSpec,
    engine_args,
    vllm_worker_command,
)
from dynamo_ext.testing import RouterProc, free_port


@dataclass
class Worker:
    worker_id: str
    role: str
    server: VllmServer
    nixl_port: int | None = None
    spec: VllmWorkerSpec | None = None
    restarts: int = 0


def worker_spec(
    model: Path, role: Role, worker_id: str, router: str, nixl_port: int | None
) -> VllmWorkerSpec:
    """A local worker of the tiny-model fleet: fresh ports, fast metrics, CPU fast-start."""
    return VllmWorkerSpec(
        model=str(model),
        role=role,
        router=router,
        worker_id=worker_id,
        host="127.0.0.1",
        port=free_port(),
        kv_port=free_port(),
        replay_port=free_port(),
        metrics_period_s=0.2,
        nixl_port=nixl_port,
        kv_buffer_device="cpu",
        connector=os.environ.get("DYNAMO_EXT_LAUNCH_CONNECTOR", CONNECTOR),
        extra_args=list(CPU_FAST_ARGS),
    )


@dataclass
class LocalFleet:
    model: Path
    aggregated: int = 1
    prefill: int = 0
    decode: int = 0
    workdir: Path = field(default_factory=lambda: Path("out/fleet"))
    frontend_port: int | None = None
    router_config: dict[str, Any] = field(default_factory=dict)
    frontend_args: list[str] = field(default_factory=list)
    served_model_name: str = "tiny-llama"
    # True: no router process; the frontend embeds the router (routing_backend embedded)
    # with router_config, bound where the workers register
    embedded_router: bool = False
    # OpenMP threads of each engine: None (default), the machine's cores over the fleet's
    # engines (``engine_threads_env``: what ``sim.calibrate`` measured); 0, torch's
    # default, a thread per core for every engine (several engines then oversubscribe the
    # cores: decode steps 5.5-79 ms where one engine alone took 5.5); N, N each
    engine_threads: int | None = None
    router: RouterProc | None = None
    router_endpoint: str = ""
    workers: list[Worker] = field(default_factory=list)
    frontend: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.frontend_port}"

    def threads_env(self) -> dict[str, str]:
        """The OpenMP variables each engine of this fleet starts with (``engine_threads``);
        an engine outside the fleet that must compute as its engines do takes the same."""
        if self.engine_threads is None:
            return engine_threads_env(self.prefill + self.decode + self.aggregated)
        if self.engine_threads > 0:
            return {"OMP_NUM_THREADS": str(self.engine_threads)}
        return {}

    def start(self) -> LocalFleet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "block_size": 128,
            "worker_timeout_s": 3.0,
            "log_decisions": True,
            **self.router_config,
        }
        if self.embedded_router:
            self.router_endpoint = f"tcp://127.0.0.1:{free_port()}"
            cfg = {"embedded_router": {**cfg, "metrics_port": None}}
            (self.workdir / "frontend.json").write_text(json.dumps(cfg))
        else:
            self.router = RouterProc(self.workdir, cfg).start()
            self.router_endpoint = self.router.endpoint
        plan: list[tuple[Role, str]] = (
            [("prefill", f"prefill-{i}") for i in range(self.prefill)]
            + [("decode", f"decode-{i}") for i in range(self.decode)]
            + [("both", f"worker-{i}") for i in range(self.aggregated)]
        )
        for role, wid in plan:
            self.add_worker(role, wid, wait=False)
        self._spawn_frontend()  # starts while the engines load
        for w in self.workers:
            w.server.wait_ready()
        self._wait_frontend()
        self.wait_registered()
        return self

    def add_worker(self, role: Role, worker_id: str, wait: bool = True) -> Worker:
        assert self.router_endpoint
        nixl = free_port() if role in ROLE_TO_KV else None
        spec = worker_spec(self.model, role, worker_id, self.router_endpoint, nixl)
        w = Worker(worker_id, role, self._server(spec), nixl, spec)
        self.workers.append(w)
        w.server.start()
        if wait:
            w.server.wait_ready()
        return w

    def _server(self, spec: VllmWorkerSpec) -> VllmServer:
        cmd = vllm_worker_command(spec, environ={})
        return VllmServer(
            self.model,
            spec.port,
            engine_args(spec, curve=False),
            {**os.environ, **CPU_FAST_ENV, **self.threads_env(), **cmd.env},
            self.workdir / f"{spec.worker_id}.log",
        )

    def restart_worker(self, w: Worker, wait: bool = False, fresh_ports: bool = False) -> Worker:
        """Stop what is left of ``w``'s process group and start it again with the same worker
        id (and ports, unless ``fresh_ports``: one may have been taken meanwhile); it registers
        anew (a new instance id), replacing its old self in the router."""
        assert w.spec is not None
        w.server.stop()
        if fresh_ports:
            w.spec.port, w.spec.kv_port, w.spec.replay_port = free_port(), free_port(), free_port()
            if w.spec.nixl_port is not None:
                w.spec.nixl_port = w.nixl_port = free_port()
        w.server = self._server(w.spec)
        w.restarts += 1
        w.server.start()
        if wait:
            w.server.wait_ready()
        return w

    def _spawn_frontend(self) -> None:
        assert self.router_endpoint
        embedded = (
            ["--routing-backend", "embedded", "--config", str(self.workdir / "frontend.json")]
            if self.embedded_router
            else []
        )
        self.frontend_port = self.frontend_port or free_port()
        log = open(self.workdir / "frontend.log", "ab")
        self.frontend = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dynamo_ext.cli",
                "frontend",
                "--model",
                str(self.model),
                "--served-model-name",
                self.served_model_name,
                "--port",
                str(self.frontend_port),
                "--router",
                self.router_endpoint,
                *embedded,
                *self.frontend_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def restart_frontend(self) -> None:
        """Start the frontend again on its port (it exited); does not wait."""
        if self.frontend is not None and self.frontend.poll() is None:
            return
        self._spawn_frontend()

    def _wait_frontend(self) -> None:
        assert self.frontend is not None
        # transformers' import alone takes ~10 s, several times that on a loaded 2-core box
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.frontend.poll() is not None:
                raise RuntimeError(f"frontend exited: see {self.workdir / 'frontend.log'}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("frontend did not become healthy in 240 s")

    def wait_registered(self, timeout: float = 60) -> None:
        """Until the router lists every worker as up with metrics."""
        import asyncio

        from dynamo_ext.router.client import RouterClient

        want = {w.worker_id for w in self.workers if w.server.is_alive()}

        async def check() -> bool:
            async with RouterClient(self.router_endpoint) as c:
                st = await c.workers()
            up = {w.worker_id for w in st.workers if w.up and w.last_metrics is not None}
            return want <= up

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if asyncio.run(check()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"workers {sorted(want)} not all registered with the router")

    def stop(self) -> None:
        if self.frontend is not None and self.frontend.poll() is None:
            os.killpg(self.frontend.pid, signal.SIGTERM)
            try:
                self.frontend.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.frontend.pid, signal.SIGKILL)
        # in parallel: each engine may take its full grace period to shut down
        threads = [threading.Thread(target=w.server.stop) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.router is not None:
            self.router.stop()

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
