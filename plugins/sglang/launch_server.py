"""Stock ``sglang.launch_server`` as a dynamo-ext worker, wired in by launch arguments.

``python -m dynamo_ext.plugins.sglang.launch_server <SGLang args> --dynamo-ext-...``
starts SGLang as a child process with the flags of ``config.build_sglang_argv`` and runs a
sidecar in this process, on one asyncio loop:

- KV events: subscribes to SGLang's ``ZmqEventPublisher`` (sequence gaps are filled from
  SGLang's replay socket), translates each batch to the vLLM schema
  (``events.SglangEventTranslator``) and republishes it through our ``KvEventPublisher``,
  whose own replay socket serves the router;
- metrics: polls SGLang's Prometheus ``/metrics`` every period and publishes
  ``WorkerMetrics``; a scrape that fails publishes nothing, so the router's liveness
  follows SGLang's health;
- registration: once SGLang answers ``/health``, registers with the router
  (``engine="sglang"``, role, HTTP endpoint, PD bootstrap host:port), repeats it as a
  keep-alive that heals router restarts, and deregisters on exit.

With ``DYNAMO_EXT_WORKER_CURVE_SECRET_KEY`` and ``DYNAMO_EXT_WORKER_CURVE_SERVER_KEY`` set
(``dynamo_ext.security``), the republished KV events, their replay and the metrics are CURVE
servers admitting the router's key only, and registration is a CURVE client of the router
(SGLang's own PUB, read over local IPC, stays as SGLang makes it).

SIGTERM/SIGINT are forwarded to SGLang; the launcher exits with SGLang's exit code. The
SGLang command is ``DYNAMO_EXT_SGLANG_CMD`` when set (tests run a stand-in speaking
SGLang's wire formats; deployments may wrap SGLang in another launcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
import uuid
from collections import Counter

import httpx
import zmq
import zmq.asyncio

from dynamo_ext.config import advertise
from dynamo_ext.errors import ConfigError, DynamoExtError
from dynamo_ext.plugins.sglang.config import (
    LauncherConfig,
    SglangPlan,
    build_sglang_argv,
    options_help,
)
from dynamo_ext.plugins.sglang.config import split_argv as split_argv
from dynamo_ext.plugins.sglang.events import SglangEventTranslator
from dynamo_ext.plugins.sglang.metrics import MetricsParseError, worker_metrics
from dynamo_ext.protocol import REPLAY_END_SEQ, WorkerRegistration
from dynamo_ext.publisher import KvEventPublisher, MetricsPublisher
from dynamo_ext.router.client import RouterClient
from dynamo_ext.security import CurveConfig, load_curve

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0
REPLAY_TIMEOUT_S = 2.0
STOP_GRACE_S = 30.0


class Sidecar:
    """Everything the launcher adds beside SGLang; ``run()`` until ``stop()``."""

    def __init__(self, cfg: LauncherConfig, plan: SglangPlan) -> None:
        self.cfg = cfg
        self.plan = plan
        self.ctx = zmq.asyncio.Context()
        self.translator = SglangEventTranslator(plan.page_size, cfg.hash_algo, cfg.hash_seed)
        self.curve = load_curve(CurveConfig.from_env(), "DYNAMO_EXT_WORKER_CURVE")
        self.kv_pub = KvEventPublisher(
            cfg.kv_endpoint, cfg.replay_endpoint, topic="kv", curve=self.curve
        )
        self.metrics_pub = MetricsPublisher(cfg.metrics_endpoint, curve=self.curve)
        self.dropped: Counter[str] = Counter()  # frame-level; event-level in the translator
        self.batches = 0
        self.replayed = 0
        self.scrapes_failed = 0
        self.ready = asyncio.Event()
        self.registered = False
        self._last_seq = -1
        self._stop = asyncio.Event()
        self._http = httpx.AsyncClient(timeout=5.0)
        self.instance_id = uuid.uuid4().hex

    # ---------------------------------------------------------------- registration
    def registration(self) -> WorkerRegistration:
        host = self.cfg.advertise_host
        p = self.plan
        boot_host = p.host if p.host not in ("0.0.0.0", "::", "") else host
        return WorkerRegistration(
            worker_id=p.worker_id,
            role=p.role,
            http_endpoint=p.http_endpoint,
            kv_events_endpoint=advertise(self.kv_pub.endpoint, host),
            kv_events_topic="kv",
            replay_endpoint=advertise(self.kv_pub.replay_endpoint, host),
            metrics_endpoint=advertise(self.metrics_pub.endpoint, host),
            block_size=p.page_size,
            model=p.model,
            instance_id=self.instance_id,
            engine="sglang",
            bootstrap_endpoint=f"{boot_host}:{p.bootstrap_port}"
            if p.bootstrap_port is not None
            else None,
        )

    async def _register_loop(self) -> None:
        if self.cfg.router is None:
            return
        await self.ready.wait()
        reg = self.registration()
        failures = 0
        async with RouterClient(
            self.cfg.router, timeout_s=2.0, ctx=self.ctx, curve=self.curve
        ) as client:
            while not self._stop.is_set():
                try:
                    await client.register(reg)
                    if not self.registered:
                        log.info(
                            "registered SGLang worker %s (role %s, http %s, kv %s, bootstrap %s)"
                            " with router %s",
                            reg.worker_id,
                            reg.role,
                            reg.http_endpoint,
                            reg.kv_events_endpoint,
                            reg.bootstrap_endpoint,
                            self.cfg.router,
                        )
                    self.registered = True
                    failures = 0
                except DynamoExtError as exc:
                    failures += 1
                    if self.registered or failures == 1:
                        log.warning(
                            "router %s unreachable (%s); SGLang keeps serving, retrying",
                            self.cfg.router,
                            exc,
                        )
                    self.registered = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._stop.wait(),
                        KEEPALIVE_S if failures == 0 else min(0.5 * 2**failures, KEEPALIVE_S),
                    )

    async def deregister(self) -> None:
        if self.cfg.router is None or not self.registered:
            return
        try:
            async with RouterClient(
                self.cfg.router, timeout_s=1.0, ctx=self.ctx, curve=self.curve
            ) as c:
                await c.deregister(self.plan.worker_id)
            log.info("deregistered %s from router %s", self.plan.worker_id, self.cfg.router)
        except DynamoExtError as exc:
            log.warning("deregistration of %s failed: %s", self.plan.worker_id, exc)

    # ---------------------------------------------------------------- metrics
    async def _metrics_loop(self) -> None:
        base = f"http://127.0.0.1:{self.plan.port}"
        heartbeat = 0
        while not self._stop.is_set():
            if not self.ready.is_set():
                try:
                    r = await self._http.get(base + "/health")
                    if r.status_code == 200:
                        log.info("SGLang is up at %s", base)
                        self.ready.set()
                except httpx.HTTPError:
                    pass
            if self.ready.is_set():
                try:
                    r = await self._http.get(base + "/metrics")
                    r.raise_for_status()
                    heartbeat += 1
                    m = worker_metrics(
                        r.text,
                        self.plan.worker_id,
                        self.plan.role,
                        self.plan.page_size,
                        heartbeat,
                    )
                    self.metrics_pub.publish(m)
                except (httpx.HTTPError, MetricsParseError) as exc:
                    self.scrapes_failed += 1
                    if self.scrapes_failed == 1 or self.scrapes_failed % 100 == 0:
                        log.warning(
                            "scraping SGLang /metrics failed (%d times): %s",
                            self.scrapes_failed,
                            exc,
                        )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.cfg.metrics_period_s)

    # ---------------------------------------------------------------- KV events
    def _apply(self, seq: int, payload: bytes) -> None:
        self._last_seq = seq
        self.batches += 1
        out = self.translator.translate_payload(payload)
        if out is None:
            return
        ts, events = out
        if events:
            self.kv_pub.publish(events, ts)

    async def _replay(self, start: int, resync: bool = False) -> None:
        ep = self.plan.kv_replay_endpoint
        if ep is None:
            if not resync:
                log.warning(
                    "KV event gap at seq %d and no SGLang replay endpoint: blocks lost", start
                )
            return
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ep)
        n = 0
        try:
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await sock.poll(REPLAY_TIMEOUT_S * 1000):
                    if resync and not n:
                        return  # SGLang idle and not answering: nothing to say yet
                    log.warning("SGLang replay from seq %d timed out after %d batches", start, n)
                    return
                frames = await sock.recv_multipart()
                if len(frames) != 4:
                    self.dropped["replay_frames"] += 1
                    continue
                _, _topic, seq_raw, payload = frames
                if seq_raw == REPLAY_END_SEQ:
                    break
                seq = int.from_bytes(seq_raw, "big", signed=True)
                if seq > self._last_seq:
                    self._apply(seq, payload)
                    n += 1
        finally:
            sock.close(0)
        self.replayed += n
        if n or not resync:
            log.info("replayed %d SGLang KV batches from seq %d", n, start)

    async def _kv_loop(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.plan.kv_topic.encode())
        sub.connect(self.plan.kv_endpoint)
        log.info(
            "subscribed to SGLang KV events at %s (topic %r)",
            self.plan.kv_endpoint,
            self.plan.kv_topic,
        )
        try:
            while True:
                # A batch SGLang published while this SUB was joining, or dropped at its
                # HWM, is only revealed by the next one; an idle stream asks for it.
                if not await sub.poll(self.cfg.resync_s * 1000):
                    await self._replay(self._last_seq + 1, resync=True)
                    continue
                frames = await sub.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    self.dropped["frames"] += 1
                    if self.dropped["frames"] == 1:
                        log.warning("dropping a KV message of %d frames; counted", len(frames))
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                if seq <= self._last_seq:
                    continue  # already applied from a replay
                if seq > self._last_seq + 1:
                    await self._replay(self._last_seq + 1)
                    if seq <= self._last_seq:
                        continue
                self._apply(seq, frames[2])
        finally:
            sub.close(0)

    # ---------------------------------------------------------------- lifecycle
    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._kv_loop(), name="sglang-kv"),
            asyncio.create_task(self._metrics_loop(), name="sglang-metrics"),
            asyncio.create_task(self._register_loop(), name="sglang-register"),
        ]
        try:
            await self._stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        await self.deregister()
        await self._http.aclose()
        self.kv_pub.close()
        self.metrics_pub.close()
        self.ctx.destroy(linger=0)
        log.info(
            "sidecar stopped: %d SGLang KV batches (%d replayed), %d events republished, "
            "dropped %s, %d failed scrapes",
            self.batches,
            self.replayed,
            self.translator.translated,
            dict(self.dropped + self.translator.dropped) or "none",
            self.scrapes_failed,
        )


async def run_launcher(cfg: LauncherConfig, plan: SglangPlan) -> int:
    sidecar = Sidecar(cfg, plan)
    cmd = [*cfg.sglang_cmd, *plan.argv]
    log.info("starting SGLang: %s", " ".join(cmd))
    child = await asyncio.create_subprocess_exec(*cmd)
    loop = asyncio.get_running_loop()
    stopping = False

    def forward(sig: int) -> None:
        nonlocal stopping
        stopping = True
        if child.returncode is None:
            log.info("forwarding %s to SGLang (pid %d)", signal.Signals(sig).name, child.pid)
            child.send_signal(sig)
            loop.call_later(STOP_GRACE_S, kill)

    def kill() -> None:
        if child.returncode is None:
            log.warning("SGLang did not stop in %.0fs: killing it", STOP_GRACE_S)
            child.kill()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, forward, sig)
    side = asyncio.create_task(sidecar.run())
    try:
        rc = await child.wait()
    finally:
        sidecar.stop()
        await side
        await sidecar.close()
    log.info("SGLang exited with %d%s", rc, " (stopped by signal)" if stopping else "")
    return rc


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = sys.argv[1:] if argv is None else argv
    if "--dynamo-ext-help" in args:
        print(options_help())
        return 0
    try:
        cfg, rest = split_argv(args)
        plan = build_sglang_argv(cfg, rest)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape otherwise
    t0 = time.monotonic()
    rc = asyncio.run(run_launcher(cfg, plan))
    log.info("launcher ran %.1fs", time.monotonic() - t0)
    # SGLang killed by a signal reports -N; exit like a shell would.
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    # main() from the module under its package name: run as __main__, the module's logger
    # would be "__main__" instead of dynamo_ext.plugins.sglang.launch_server.
    from dynamo_ext.plugins.sglang.launch_server import main as _main

    sys.exit(_main())
