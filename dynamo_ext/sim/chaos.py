"""Chaos harness: the real router process under load and randomized, seeded faults, checked
against the simulated fleet's true caches (issue 12, item 7; ``dynamo-ext bench chaos``).

A fleet of mocker workers (each a one-worker ``MockerFleet`` in this process, so the harness
can read its true cache through ``MockerCore``'s public calls) sits behind fault-injecting
proxies: every worker's KV stream reaches the router through our own SUB->PUB forwarder,
which can drop batches or slip malformed frames in, and its replay ROUTER through a proxy
that can delay or never answer. The router is ``dynamo-ext router`` as a child process
(``RouterProc``). Clients route prompts with shared prefixes through ``RouterClient`` and
send them to the chosen worker's OpenAI endpoint, so the caches the router indexes are the
ones the routed load builds. Faults, one every ``fault_every_s`` or so, in seeded rounds
of every kind: a worker killed (its sockets gone at once, no deregistration) and restarted
with a new instance id, under its old id or a new one (a pod rescheduled); KV batches
dropped for a while; replay stalled or slow while batches drop; the router killed with -9
and restarted, also while a worker's replay does not answer; malformed peers on the
control socket (garbage, bad headers, deeply nested msgpack, an oversized frame, a prompt
over the token cap), on a KV stream (garbage, nested msgpack, oversized) and on a metrics
stream (garbage, nested msgpack; each worker's metrics pass a forwarder of ours too). With
``curve`` every router-facing socket speaks CURVE (a key per worker slot, one for the
clients) and impostors join the mix: another worker's key, an unlisted key or none at all
registers a worker's id with endpoints of its own and reports it failed.

At checkpoints (every ``checkpoint_every_s`` and at the end) the load pauses, faults heal,
and the harness waits up to ``settle_s`` for the router's index to equal the union of the
live workers' true caches: per worker and tier block counts (``FleetState``), the exact
hash sets (the router's audit, ``RouterQuery(what="index")``, against the hashes each
mocker holds; dead workers must hold none) and the prefix each worker holds of sampled
served prompts (``explain`` routes, ``track=False``). Throughout: every request ends within
``request_deadline_s``; a route is answered (a route or a clear error) unless we took the
router down around it; ``no_worker`` only when no live worker has been up a while; no route
to a worker dead past its lease; every malformed control message with a correlation id is
answered; the router never exits on its own; its RSS and open fds (``/proc``) stay within
a budget calibrated with the whole fleet up before any fault. The report is one JSON object
of counts and the invariants' verdicts, with the evidence for each one that fails; a
baseline router from another source tree runs with ``--router-src``.

The proxies, the simulated worker, the CURVE keys and the hostile payloads are
``sim.chaos_parts``; this module is the harness that drives them and its command.

Not a process kill for the workers: a killed worker's sockets close at once and it never
deregisters, which is what the router sees of a SIGKILL, but its HTTP handlers in flight
are abandoned by the client side (the harness cancels them) rather than reset by a kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from dynamo_ext.config import RouterConfig
from dynamo_ext.errors import DynamoExtError, NoWorkerAvailable, ProtocolError, RouterUnavailable
from dynamo_ext.hashing import BlockHasher
from dynamo_ext.protocol import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    PROTOCOL_HEADER,
    ErrorReply,
    RouteRequest,
    RouterQuery,
    WorkerIndex,
    encode,
)
from dynamo_ext.router.client import RouterClient
from dynamo_ext.security import start_authenticator
from dynamo_ext.sim.fleet import MockerFleet
from dynamo_ext.sim.model import MockerConfig
from dynamo_ext.stats import percentile
from dynamo_ext.sim.chaos_parts import (
    Keys,
    SimWorker,
    counter_totals,
    nested_kv_batch,
    nested_route_request,
    nested_worker_metrics,
    proc_usage,
)
from dynamo_ext.testing import RouterProc

log = logging.getLogger("dynamo_ext.sim.chaos")

FAULT_KINDS: tuple[str, ...] = (
    "kill_worker",
    "drop_batches",
    "stall_replay",
    "kill_router",
    "restart_during_stall",
    "control_garbage",
    "control_nested",
    "control_oversized",
    "kv_garbage",
    "kv_nested",
    "metrics_garbage",
    "metrics_nested",
    "impostor",
)
# Kinds that killed a router task when the harness was written (issue 12, item 1).
_LETHAL = frozenset({"control_nested", "kv_nested", "metrics_nested"})


class ChaosConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    duration_s: float = 40.0
    seed: int = 0
    workers: int = 6
    clients: int = 4  # concurrent request loops
    think_s: float = 0.02  # pause of a client between two requests
    block_size: int = 16
    gpu_blocks: int = 256  # per worker: small, so the load evicts and BlockRemoved flows
    cpu_blocks: int = 512  # CPU offload tier per worker (its own KV events, medium "CPU")
    speedup: float = 2.0
    prefix_groups: int = 8  # distinct shared system prompts
    prefix_blocks: int = 8  # blocks in each shared prefix
    max_tokens: int = 6
    faults: list[str] = msgspec.field(default_factory=lambda: list(FAULT_KINDS))
    fault_every_s: float = 1.5
    drop_rate: float = 0.3  # fraction of batches a lossy proxy drops
    checkpoint_every_s: float = 8.0
    settle_s: float = 8.0  # how long the index may take to converge once faults heal
    request_deadline_s: float = 10.0
    probes: int = 24  # served prompts whose per-worker prefix is compared exactly
    rss_slack_mb: float = 64.0
    fd_slack: int = 4
    router: dict[str, Any] = {}  # RouterConfig overrides
    # CURVE on every router-facing socket (keys per worker slot, one for the clients), and
    # impostor faults: another worker's key, an unlisted key, no key at all.
    curve: bool = False
    # Run the router from another source tree (a baseline: ``git archive REV | tar -x``);
    # None: this checkout's.
    router_src: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.faults) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {list(FAULT_KINDS)}")
        if self.workers < 1 or self.clients < 1 or self.duration_s <= 0:
            raise ValueError("workers, clients and duration_s must be > 0")


# Short timers so that one checkpoint's settle_s covers them: down after 2 s without
# metrics, removed 4 s later, a silent stream resynced after 2 s.
ROUTER_DEFAULTS: dict[str, Any] = {
    "worker_timeout_s": 2.0,
    "worker_expiry_s": 4.0,
    "failure_holdoff_s": 2.0,
    "replay_timeout_s": 1.0,
    "resync_interval_s": 2.0,
}


# ======================================================================================
# The harness
# ======================================================================================
class Harness:
    def __init__(self, cfg: ChaosConfig, tmp: Path) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.rng = random.Random(cfg.seed)
        self.prompt_rng = random.Random(cfg.seed + 1)
        self.proxy_rng = random.Random(cfg.seed + 2)
        self.ctx = zmq.asyncio.Context()
        self.mcfg = MockerConfig(
            block_size=cfg.block_size,
            num_gpu_blocks=cfg.gpu_blocks,
            num_cpu_blocks=cfg.cpu_blocks,
            speedup=cfg.speedup,
            metrics_period_s=0.25,
        )
        self.hasher = BlockHasher(
            cfg.block_size, "engine", self.mcfg.hash_algo, self.mcfg.hash_seed
        )
        tmp = tmp.resolve()
        self.keys = Keys(tmp / "keys", cfg.workers) if cfg.curve else None
        known = _router_fields(cfg.router_src)  # a router older than a knob lacks it
        defaults = {k: v for k, v in ROUTER_DEFAULTS.items() if k in known}
        router_cfg = {**defaults, "block_size": cfg.block_size, **cfg.router}
        if self.keys is not None:
            router_cfg["security"] = self.keys.router_security()
        self.router_cfg = router_cfg
        self.router = RouterProc(tmp, router_cfg)
        self.router_logs: list[Path] = []
        self.router_down = False
        self.router_incarnation = 0
        self._starting: asyncio.Task[None] | None = None
        self.slots: list[SimWorker | None] = [None] * cfg.workers
        self.generation = [0] * cfg.workers
        self.by_id: dict[str, SimWorker] = {}  # live workers by worker id
        self.teardowns: list[asyncio.Task[None]] = []
        self.fault_tasks: set[asyncio.Task[None]] = set()
        self.faults: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.route_latency: list[float] = []
        self.routed_to_dead = 0
        self.routed_to_long_dead = 0  # dead for longer than worker_timeout_s + 1 s
        self.died_at: dict[str, float] = {}
        self.phantom_checks = 0
        self.timeline: list[dict[str, Any]] = []  # faults as injected, for the evidence
        self.phantoms: list[dict[str, Any]] = []  # blocks indexed that a worker never had
        self.retries = 0
        self.no_worker_while_live = 0
        self.unanswered_while_up = 0
        self.malformed_unanswered = 0  # malformed control messages the live router ignored
        self.router_up_since: float | None = None  # monotonic; None while it is down
        self.control_replies: Counter[str] = Counter()  # "<kind> answered|unanswered"
        self.injected = Counter[str]()
        self.unexpected_router_exits = 0
        self.harness_errors = 0
        self.resume = asyncio.Event()
        self.resume.set()
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.stop = asyncio.Event()
        self.checkpoints: list[dict[str, Any]] = []
        self.samples: list[tuple[float, float, int]] = []  # (t, rss MB, fds)
        self.rss_max = 0.0
        self.fds_max = 0
        self.fd_base: int | None = None  # router fds with no worker
        self.rss_base: float | None = None
        self.fd_per_worker: float | None = None
        self.rss_limit: float | None = None
        self.bound_violations: list[str] = []
        front = self.keys.frontend if self.keys is not None else None
        self.ctl = RouterClient(self.router.endpoint, timeout_s=2.0, ctx=self.ctx, curve=front)
        self.load = RouterClient(self.router.endpoint, timeout_s=2.0, ctx=self.ctx, curve=front)
        # Registrations speak as each worker's own key (the router binds an id to its key).
        self.registrars = [
            RouterClient(
                self.router.endpoint,
                timeout_s=2.0,
                ctx=self.ctx,
                curve=self.keys.slots[i] if self.keys is not None else None,
            )
            for i in range(cfg.workers)
        ]
        self.impostors_accepted: list[str] = []
        self._auth: Any = None
        self.t0 = time.monotonic()
        self.t0_wall = time.strftime("%Y-%m-%d %H:%M:%S")  # t=0 of the report, as logs write it
        groups = []
        for _ in range(cfg.prefix_groups):
            n = cfg.prefix_blocks * cfg.block_size
            groups.append([self.prompt_rng.randrange(1, 30000) for _ in range(n)])
        self.groups = groups
        self.recent: list[tuple[int, ...]] = []

    # ------------------------------------------------------------------ processes
    def now(self) -> float:
        return time.monotonic() - self.t0

    async def start_router(self) -> None:
        """Start the router unless it runs; one start at a time, never cut short (a
        cancelled fault's cleanup and a checkpoint's heal may both ask)."""
        if self._starting is None or self._starting.done():
            if self.router_pid() is not None:
                self.router_down = False
                return
            self._starting = asyncio.get_running_loop().create_task(self._start_router())
        await asyncio.shield(self._starting)

    async def _start_router(self) -> None:
        if self.router.log_path.exists():  # RouterProc waits for a *new* "listening" line
            old = self.router.log_path.with_suffix(f".log.{self.router_incarnation}")
            self.router.log_path.rename(old)
            self.router_logs.append(old)
        await asyncio.to_thread(self._popen_router)
        self.router_incarnation += 1
        self.router_down = False
        self.router_up_since = time.monotonic()
        pid = self.router_pid()
        if pid is not None and self.fd_base is None:
            await asyncio.sleep(0.2)
            rss, fds = proc_usage(pid)
            self.fd_base, self.rss_base = fds, rss

    def _popen_router(self) -> None:
        # RouterProc passes our environment on: PYTHONPATH picks the router's source tree.
        if self.cfg.router_src is None:
            self.router.start()
            return
        env = {"PYTHONPATH": self.cfg.router_src, "PYTHONSAFEPATH": "1"}  # not the cwd's tree
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.router.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v

    def router_pid(self) -> int | None:
        p = self.router.proc
        return p.pid if p is not None and p.poll() is None else None

    async def start_worker(self, slot: int, new_id: bool) -> SimWorker:
        if new_id:
            self.generation[slot] += 1
        g = self.generation[slot]
        sw = SimWorker(f"w{slot}" + (f"g{g}" if g else ""), self.mcfg)
        curve = self.keys.slots[slot] if self.keys is not None else None
        await sw.start(self.ctx, random.Random(self.proxy_rng.random()), curve)
        sw.slot = slot
        self.slots[slot] = sw
        self.by_id[sw.worker_id] = sw
        await self.register(sw, 2.0)
        return sw

    async def register(self, sw: SimWorker, timeout: float) -> None:
        with contextlib.suppress(DynamoExtError, OSError, TimeoutError):
            await asyncio.wait_for(self.registrars[sw.slot].register(sw.registration()), timeout)

    def kill_slot(self, slot: int) -> SimWorker | None:
        sw = self.slots[slot]
        if sw is None or not sw.alive:
            return None
        self.slots[slot] = None
        if self.by_id.get(sw.worker_id) is sw:
            del self.by_id[sw.worker_id]
        self.died_at[sw.worker_id] = time.monotonic()
        self.teardowns.append(sw.kill())
        return sw

    def live(self) -> list[SimWorker]:
        return [w for w in self.slots if w is not None and w.alive]

    # ------------------------------------------------------------------ background loops
    async def keepalive(self) -> None:
        """Re-register every live worker each second, as our plugins do: a restarted router
        learns the fleet again."""
        while not self.stop.is_set():
            for sw in self.live():
                await self.register(sw, 1.0)
            await asyncio.sleep(1.0)

    async def watcher(self) -> None:
        """Under load and faults, not only at checkpoints: the router never indexes for a
        worker a block that worker could not have held (one outside the chains of every
        prompt sent to it). Unlike equality this holds at any instant: in-flight events
        only make the index lag, never invent."""
        rng = random.Random(self.cfg.seed + 3)
        while not self.stop.is_set():
            await asyncio.sleep(2.0)
            await self.resume.wait()
            now = time.monotonic()
            ready = [w for w in self.live() if now - w.started_at > 2.0]
            if not ready or self.router_pid() is None:
                continue
            sw = rng.choice(ready)
            try:
                reply = await self.ctl.call(RouterQuery(what="index", worker_id=sw.worker_id))
            except DynamoExtError:
                continue
            if not isinstance(reply, WorkerIndex) or not sw.alive:
                continue
            self.phantom_checks += 1
            got = {h for hs in reply.blocks.values() for h in hs}
            phantom = got - sw.universe
            if phantom:
                self.phantoms.append(
                    {"t": round(self.now(), 1), "worker": sw.worker_id, "phantom": len(phantom)}
                )

    async def sampler(self) -> None:
        while not self.stop.is_set():
            pid = self.router_pid()
            if pid is not None:
                with contextlib.suppress(OSError):
                    rss, fds = proc_usage(pid)
                    self.samples.append((self.now(), rss, fds))
                    self.rss_max = max(self.rss_max, rss)
                    self.fds_max = max(self.fds_max, fds)
            elif not self.router_down:
                self.unexpected_router_exits += 1
                log.error("router exited on its own:\n%s", self.router.log()[-2000:])
                await self.start_router()
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ load
    def next_prompt(self) -> tuple[int, ...]:
        r = self.prompt_rng
        if self.recent and r.random() < 0.3:
            return r.choice(self.recent)  # a repeated request: full prefix hit
        g = r.choice(self.groups)
        tail = [r.randrange(1, 30000) for _ in range(r.randrange(8, 4 * self.cfg.block_size))]
        p = tuple(g + tail)
        self.recent.append(p)
        if len(self.recent) > 64:
            self.recent.pop(0)
        return p

    async def client_loop(self, cid: int, http: Any) -> None:
        n = 0
        while not self.stop.is_set():
            await self.resume.wait()
            if self.stop.is_set():
                break
            n += 1
            rid = f"c{cid}-{n}"
            self.inflight += 1
            self.idle.clear()
            try:
                outcome = await asyncio.wait_for(
                    self.one_request(rid, self.next_prompt(), http), self.cfg.request_deadline_s
                )
            except TimeoutError:
                outcome = "hang"
                log.warning("request %s hung past %.0fs", rid, self.cfg.request_deadline_s)
            finally:
                self.inflight -= 1
                if not self.inflight:
                    self.idle.set()
            self.outcomes[outcome] += 1
            await asyncio.sleep(self.cfg.think_s)

    async def one_request(self, rid: str, prompt: tuple[int, ...], http: Any) -> str:
        import aiohttp

        exclude: list[str] = []
        grace = self.router_cfg.get("worker_timeout_s", 5.0) + 1.0
        for attempt in range(4):
            t = time.monotonic()
            up_since = self.router_up_since
            router_settled = up_since is not None and t - up_since > grace
            try:
                resp = await self.load.route(rid, prompt, exclude_workers=exclude)
            except NoWorkerAvailable:
                # Wrong if a worker has lived (and kept re-registering) for a while with a
                # router that has run a while: the router lost a worker it could use.
                if router_settled and any(t - w.started_at > grace for w in self.live()):
                    self.no_worker_while_live += 1
                return "no_worker"
            except RouterUnavailable:
                # Wrong unless we killed the router around this request.
                if router_settled and self.router_up_since == up_since:
                    self.unanswered_while_up += 1
                return "router_unavailable"
            except ProtocolError:
                return "router_error"
            self.route_latency.append(time.monotonic() - t)
            sw = self.by_id.get(resp.worker_id)
            if sw is None or sw.dead is None:
                self.routed_to_dead += 1
                died = self.died_at.get(resp.worker_id)
                if died is not None and time.monotonic() - died > grace:
                    self.routed_to_long_dead += 1  # its lease should have run out
                    log.warning("routed to %s, dead for %.1fs", resp.worker_id, t - died)
                exclude.append(resp.worker_id)
                self.retries += 1
                with contextlib.suppress(DynamoExtError, OSError):
                    await self.load.finished(rid)
                    await self.load.worker_failed(resp.worker_id, "connection refused")
                continue
            sw.served(prompt, self.hasher, self.cfg.max_tokens)
            body = {"prompt": list(prompt), "max_tokens": self.cfg.max_tokens}
            post = asyncio.ensure_future(
                http.post(f"{resp.http_endpoint}/v1/completions", json=body)
            )
            try:
                await asyncio.wait({post, sw.dead}, return_when=asyncio.FIRST_COMPLETED)
                ok = False
                if post.done():
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        r = post.result()
                        ok = r.status == 200
                        await r.read()
                        r.release()
            finally:
                if not post.done():
                    post.cancel()  # the worker died under the request: connection reset
                    with contextlib.suppress(BaseException):
                        await post
            with contextlib.suppress(DynamoExtError, OSError):
                await self.load.finished(rid)
            if ok:
                return "ok" if attempt == 0 else "ok_after_retry"
            exclude.append(resp.worker_id)
            self.retries += 1
            with contextlib.suppress(DynamoExtError, OSError):
                await self.load.worker_failed(resp.worker_id, "request failed")
        return "worker_error"

    # ------------------------------------------------------------------ faults
    async def fault_loop(self) -> None:
        kinds = list(self.cfg.faults)
        if not kinds:
            return
        order: list[str] = []
        while not self.stop.is_set():
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.cfg.fault_every_s)
            await self.resume.wait()
            if self.stop.is_set():
                return
            if not order:
                # Rounds of every kind in a seeded order, the lethal ones last in a round
                # (a run learns the most before a router task may die): even coverage, so
                # a short run sees each kind about duration / (fault_every * kinds) times.
                order = [k for k in kinds if k not in _LETHAL]
                self.rng.shuffle(order)
                order += [k for k in kinds if k in _LETHAL]
            kind = order.pop(0)
            t = asyncio.get_running_loop().create_task(self.guarded(kind), name=f"fault-{kind}")
            self.fault_tasks.add(t)
            t.add_done_callback(self.fault_tasks.discard)

    async def guarded(self, kind: str) -> None:
        try:
            await self.inject(kind)
        except Exception:  # a broken fault is the harness's bug: counted in the report
            self.harness_errors += 1
            log.exception("fault %s failed", kind)

    async def inject(self, kind: str) -> None:
        rng = self.rng
        live = self.live()
        if kind == "impostor" and self.keys is None:
            return  # without CURVE any peer may speak for any worker: nothing to test
        if kind in (
            "kill_worker",
            "drop_batches",
            "stall_replay",
            "kv_garbage",
            "kv_nested",
            "restart_during_stall",
            "metrics_garbage",
            "metrics_nested",
            "impostor",
        ):
            if not live:
                return
            sw = rng.choice(live)
            target: str | None = sw.worker_id
        else:
            target = None
        self.faults[kind] += 1
        self.timeline.append({"t": round(self.now(), 1), "fault": kind, "worker": target})
        if kind == "kill_worker":
            slot = self.slots.index(sw)
            new_id = rng.random() < 0.5
            down_s = rng.uniform(0.3, 2.0)
            self.kill_slot(slot)
            log.info("fault: kill %s (back in %.1fs, new id: %s)", sw.worker_id, down_s, new_id)
            try:
                await asyncio.sleep(down_s)
            finally:
                if self.slots[slot] is None:
                    await self.start_worker(slot, new_id)
        elif kind == "drop_batches":
            assert sw.proxy is not None
            sw.proxy.drop_rate = self.cfg.drop_rate
            try:
                await asyncio.sleep(rng.uniform(1.0, 4.0))
            finally:
                sw.proxy.drop_rate = 0.0
        elif kind == "stall_replay":
            # While the stream loses batches too, so that the router asks for replays.
            assert sw.proxy is not None
            sw.proxy.replay_mode = "stall" if rng.random() < 0.5 else "delay"
            sw.proxy.drop_rate = self.cfg.drop_rate / 2
            try:
                await asyncio.sleep(rng.uniform(2.0, 5.0))
            finally:
                sw.proxy.heal()
        elif kind == "kill_router":
            if self.router_down:
                self.faults[kind] -= 1
                return  # one router outage at a time
            self.router_down = True
            self.router_up_since = None
            self.router.stop(signal.SIGKILL)
            log.info("fault: router killed -9")
            try:
                await asyncio.sleep(rng.uniform(0.2, 1.5))
            finally:
                await self.start_router()
        elif kind == "restart_during_stall":
            # The router restarts while one worker's replay socket does not answer: its
            # history must still be fetched once the socket answers again.
            if self.router_down:
                self.faults[kind] -= 1
                return
            assert sw.proxy is not None
            sw.proxy.replay_mode = "stall"
            self.router_down = True
            self.router_up_since = None
            self.router.stop(signal.SIGKILL)
            log.info("fault: router killed -9 while %s's replay stalls", sw.worker_id)
            try:
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                await self.start_router()
                await asyncio.sleep(rng.uniform(1.0, 3.0))
            finally:
                sw.proxy.heal()
                await self.start_router()
        elif kind.startswith("control_"):
            await self.control_peer(kind)
        elif kind in ("kv_garbage", "kv_nested"):
            await self.kv_peer(sw, kind)
        elif kind in ("metrics_garbage", "metrics_nested"):
            await self.metrics_peer(sw, kind)
        elif kind == "impostor":
            await self.impostor(sw)

    async def control_peer(self, kind: str) -> None:
        """A hostile or broken client on the router's control socket."""
        rng = self.rng
        msgs: list[tuple[str, list[bytes]]] = []
        corr = rng.randrange(1, 1 << 62).to_bytes(8, "big")
        if kind == "control_garbage":
            for _ in range(10):
                pick = rng.randrange(4)
                if pick == 0:
                    msgs.append(("garbage", [PROTOCOL_HEADER, corr, rng.randbytes(64)]))
                elif pick == 1:
                    msgs.append(("bad_header", [b"dynamo-ext/99", corr, b"\x80"]))
                elif pick == 2:
                    msgs.append(("frames", [rng.randbytes(5)]))
                else:
                    bad = msgspec.msgpack.encode({"type": "route", "request_id": 7})
                    msgs.append(("bad_fields", [PROTOCOL_HEADER, corr, bad]))
        elif kind == "control_nested":
            msgs.append(("nested", [PROTOCOL_HEADER, corr, nested_route_request()]))
        else:  # control_oversized
            msgs.append(("oversized", [PROTOCOL_HEADER, corr, rng.randbytes(17 << 20)]))
            huge = RouteRequest(request_id="huge", token_ids=[7] * 1_500_000, track=False)
            msgs.append(("huge_prompt", [PROTOCOL_HEADER, corr, encode(huge)]))
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            self.keys.frontend.client(sock)  # a buggy peer with a valid key
        sock.connect(self.router.endpoint)
        try:
            for what, frames in msgs:
                self.injected["control_" + what] += 1
                up_since = self.router_up_since
                await sock.send_multipart(frames)
                if len(frames) != 3:
                    continue  # nothing to correlate an answer with
                if await sock.poll(3000):
                    await sock.recv_multipart()
                    self.control_replies[what + " answered"] += 1
                elif up_since is None or self.router_up_since != up_since:
                    self.control_replies[what + " router_down"] += 1  # we killed it meanwhile
                elif what == "oversized":
                    # Over max_message_bytes ZMQ drops the peer that sent it: no answer.
                    self.control_replies[what + " unanswered"] += 1
                else:
                    self.control_replies[what + " unanswered"] += 1
                    self.malformed_unanswered += 1
        finally:
            sock.close(linger=0)

    async def kv_peer(self, sw: SimWorker, kind: str) -> None:
        """Malformed frames on a worker's proxied KV stream. Garbage carries the seq of a
        batch already forwarded, so a router that drops it loses nothing."""
        proxy = sw.proxy
        assert proxy is not None
        seq = proxy.last_forwarded
        if seq is None:
            return
        topic = b"kv"
        if kind == "kv_nested":
            frames = [[topic, seq, nested_kv_batch()]]
        else:
            frames = [
                [topic, b"short"],
                [topic, seq, self.rng.randbytes(200)],
                [topic, b"\x00" * 3, b"x"],
                [topic, seq, self.rng.randbytes(4 << 20)],
            ]
        for f in frames:
            self.injected[kind] += 1
            await proxy.inject(f)

    async def metrics_peer(self, sw: SimWorker, kind: str) -> None:
        """Malformed frames on a worker's proxied metrics stream: if they kill the router's
        metrics task, every worker goes down for want of metrics (``no_worker`` replies
        while workers live)."""
        mp = sw.metrics_proxy
        assert mp is not None
        seq = (0).to_bytes(8, "big")
        if kind == "metrics_nested":
            frames = [[b"metrics", seq, nested_worker_metrics(sw.worker_id)]]
        else:
            bad = msgspec.msgpack.encode({"type": "metrics", "worker_id": sw.worker_id})
            frames = [
                [b"metrics", seq, self.rng.randbytes(100)],
                [b"metrics"],
                [b"metrics", seq, bad],  # heartbeat and ts missing
            ]
        for f in frames:
            self.injected[kind] += 1
            await mp.inject(f)

    async def impostor(self, victim: SimWorker) -> None:
        """Someone else speaks for ``victim``: another worker's valid key, a key nobody
        lists, or no key at all, registers its id with endpoints of its own and reports it
        failed. A CURVE router refuses all of it; the victim keeps its endpoints and stays up."""
        keys = self.keys
        if keys is None:
            return  # without CURVE any peer may speak for any worker: nothing to test
        pick = self.rng.randrange(3)
        if pick == 0 and keys.n > 1:
            what, curve = "other_worker_key", keys.slots[(victim.slot + 1) % keys.n]
        elif pick == 1:
            what, curve = "unlisted_key", keys.rogue
        else:
            what, curve = "no_key", None
        self.injected["impostor_" + what] += 1
        bogus = msgspec.structs.replace(
            victim.registration(),
            http_endpoint="http://127.0.0.1:9/impostor",
            kv_events_endpoint="tcp://127.0.0.1:9",
            replay_endpoint=None,
            instance_id="impostor",
        )
        up_since = self.router_up_since
        before = await self._state_of(victim.worker_id)
        client = RouterClient(self.router.endpoint, timeout_s=1.0, ctx=self.ctx, curve=curve)
        try:
            with contextlib.suppress(DynamoExtError, OSError):
                await client.register(bogus)
                self.impostors_accepted.append(f"{what}: registration of {victim.worker_id}")
            with contextlib.suppress(DynamoExtError, OSError):
                await client.worker_failed(victim.worker_id, "impostor")
        finally:
            await client.close()
        await asyncio.sleep(0.3)
        after = await self._state_of(victim.worker_id)
        if after is None or self.router_up_since != up_since or not victim.alive:
            return  # the router restarted meanwhile, or the victim died: nothing to compare
        if after.http_endpoint == bogus.http_endpoint:
            self.impostors_accepted.append(f"{what}: {victim.worker_id} now has its endpoints")
        elif before is not None and before.up and not after.up:
            self.impostors_accepted.append(f"{what}: {victim.worker_id} marked down")

    async def _state_of(self, worker_id: str) -> Any:
        try:
            fleet = await self.ctl.workers()
        except DynamoExtError:
            return None
        return next((w for w in fleet.workers if w.worker_id == worker_id), None)

    async def heal(self) -> None:
        for t in list(self.fault_tasks):
            t.cancel()
        if self.fault_tasks:
            await asyncio.gather(*self.fault_tasks, return_exceptions=True)
        for sw in self.live():
            assert sw.proxy is not None
            sw.proxy.heal()
        for slot, cur in enumerate(self.slots):
            if cur is None:
                await self.start_worker(slot, False)
        if self.router_pid() is None:
            await self.start_router()

    # ------------------------------------------------------------------ invariants
    async def checkpoint(self, final: bool) -> dict[str, Any]:
        self.resume.clear()
        t_start = self.now()
        await self.heal()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), self.cfg.request_deadline_s)
        for sw in self.live():  # the router may have restarted since the last keep-alive
            await self.register(sw, 2.0)
        t_heal = self.now()
        deadline = time.monotonic() + self.cfg.settle_s
        result: dict[str, Any] = {}
        while True:
            result = await self.compare()
            if result["mismatches"] == 0 or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
        result = {
            "t": round(t_start, 1),
            "final": final,
            "converged": result["mismatches"] == 0,
            "converge_s": round(self.now() - t_heal, 2),
            **result,
        }
        self.check_bounds(result)
        self.checkpoints.append(result)
        log.info("checkpoint: %s", json.dumps(result))
        if not final:
            self.resume.set()
        return result

    async def compare(self) -> dict[str, Any]:
        """The router's index vs the union of the live workers' true caches."""
        out: dict[str, Any] = {"mismatches": 0}
        try:
            fleet = await self.ctl.workers()
        except DynamoExtError as exc:
            return {"mismatches": 1, "error": f"workers() failed: {exc}"}
        live = {sw.worker_id: sw for sw in self.live()}
        count_mm: list[dict[str, Any]] = []
        seen = set()
        for ws in fleet.workers:
            seen.add(ws.worker_id)
            got = {k: v for k, v in ws.indexed_blocks.items() if v}
            sw = live.get(ws.worker_id)
            want = sw.true_counts() if sw is not None else {}
            if got != want:
                count_mm.append(
                    {
                        "worker": ws.worker_id,
                        "live": sw is not None,
                        "router": got,
                        "true": want,
                        "up": ws.up,
                        "stale": getattr(ws, "stale", ""),
                    }
                )
        for wid, sw in live.items():
            if wid not in seen and sw.true_counts():
                count_mm.append(
                    {"worker": wid, "live": True, "router": None, "true": sw.true_counts()}
                )
        harness_mm = [
            sw.worker_id
            for sw in live.values()
            if len(sw.true_hashes()) != sw.true_counts().get(MEDIUM_GPU, 0)
        ]
        probe_mm: list[dict[str, Any]] = []
        probes = 0
        prompts = [p for sw in live.values() for p in sw.prompts[-64:]]
        rng = random.Random(len(self.checkpoints))
        for prompt in rng.sample(prompts, min(self.cfg.probes, len(prompts))):
            hashes = self.hasher.chain(None, prompt)[0]
            try:
                resp = await self.ctl.route(f"probe-{probes}", prompt, track=False, explain=True)
            except DynamoExtError as exc:
                probe_mm.append({"error": str(exc)})
                break
            probes += 1
            got = {c.worker_id: c.prefix_hit_blocks.get(MEDIUM_GPU, 0) for c in resp.candidates}
            for wid, blocks in got.items():
                sw = live.get(wid)
                want_blocks = sw.true_prefix(hashes) if sw is not None else 0
                if blocks != want_blocks:
                    probe_mm.append(
                        {
                            "worker": wid,
                            "live": sw is not None,
                            "router": blocks,
                            "true": want_blocks,
                        }
                    )
        ghosts = sorted(w.worker_id for w in fleet.workers if w.worker_id not in live)
        audit_mm = await self.audit(live, ghosts)
        # Workers whose index is wrong while the router says nothing (no stale reason).
        flagged = {w.worker_id for w in fleet.workers if getattr(w, "stale", "")}
        wrong = {d["worker"] for d in count_mm + audit_mm if "worker" in d}
        wrong |= {d["worker"] for d in probe_mm if "worker" in d}
        out.update(
            wrong_workers=sorted(wrong),
            silently_wrong=sorted(wrong - flagged),
            mismatches=len(count_mm) + len(probe_mm) + len(audit_mm),
            audit_mismatches=len(audit_mm),
            count_mismatches=len(count_mm),
            probe_mismatches=len(probe_mm),
            probes=probes,
            router_workers=len(fleet.workers),
            router_up=sum(1 for w in fleet.workers if w.up),
            live_workers=len(live),
            dead_listed=ghosts,
            harness_universe_gaps=harness_mm,
            count_details=count_mm[:6],
            probe_details=probe_mm[:6],
            audit_details=audit_mm[:6],
        )
        return out

    async def audit(self, live: dict[str, SimWorker], ghosts: list[str]) -> list[dict[str, Any]]:
        """Exact sets: the router's audit of each worker's indexed GPU blocks vs the hashes
        its mocker holds (dead workers must hold none)."""
        out: list[dict[str, Any]] = []
        for wid in [*live, *ghosts]:
            sw = live.get(wid)
            want = sw.true_hashes() if sw is not None else set()
            try:
                reply = await self.ctl.call(RouterQuery(what="index", worker_id=wid))
            except DynamoExtError as exc:
                out.append({"worker": wid, "error": str(exc)})
                continue
            if isinstance(reply, ErrorReply):
                if reply.code == "bad_request" and reply.message.startswith("malformed"):
                    return []  # a router without the audit call (older than 6cea24c)
                if want:
                    out.append({"worker": wid, "error": reply.message, "true": len(want)})
                continue
            if not isinstance(reply, WorkerIndex):
                return []  # a router without the audit call
            tiers = {MEDIUM_GPU, MEDIUM_CPU} | {t for t, b in reply.blocks.items() if b}
            for tier in sorted(tiers):
                want_t = want if tier == MEDIUM_GPU else set()
                if sw is not None and tier != MEDIUM_GPU:
                    want_t = sw.true_hashes(tier)
                got = set(reply.blocks.get(tier, []))
                if got != want_t:
                    out.append(
                        {
                            "worker": wid,
                            "tier": tier,
                            "live": sw is not None,
                            "missing": len(want_t - got),
                            "extra": len(got - want_t),
                            "stale": reply.stale,
                            "last_seq": reply.last_seq,
                        }
                    )
        return out

    def calibrate(self) -> None:
        """The budget, taken with the whole fleet up and no fault yet: a router holds a few
        sockets per live worker and an index bounded by their caches, whatever the churn."""
        pid = self.router_pid()
        assert pid is not None and self.fd_base is not None and self.rss_base is not None
        rss, fds = proc_usage(pid)
        self.fd_per_worker = max(1.0, (fds - self.fd_base) / max(1, len(self.live())))
        self.rss_limit = max(rss, self.rss_base) + self.cfg.rss_slack_mb

    def check_bounds(self, cp: dict[str, Any]) -> None:
        """RSS and fds at a quiet point against the budget of ``calibrate``."""
        pid = self.router_pid()
        if pid is None or self.fd_per_worker is None or self.rss_limit is None:
            return
        assert self.fd_base is not None
        rss, fds = proc_usage(pid)
        for _ in range(4):  # the least of a few looks: a resync opens a socket for a moment
            time.sleep(0.1)
            fds = min(fds, proc_usage(pid)[1])
        live = len(self.live())
        fd_limit = self.fd_base + self.fd_per_worker * live + self.cfg.fd_slack
        cp.update(
            router_rss_mb=round(rss, 1),
            router_fds=fds,
            fd_limit=round(fd_limit, 1),
            rss_limit_mb=round(self.rss_limit, 1),
        )
        if fds > fd_limit:
            self.bound_violations.append(
                f"t={cp['t']}: {fds} fds > {fd_limit:.0f} for {live} live workers"
            )
        if rss > self.rss_limit:
            self.bound_violations.append(f"t={cp['t']}: RSS {rss:.0f} MB > {self.rss_limit:.0f} MB")

    # ------------------------------------------------------------------ the run
    async def run(self) -> dict[str, Any]:
        import aiohttp

        cfg = self.cfg
        await self.start_router()
        if self.keys is not None:  # our proxies are CURVE servers: they admit the router's key
            self._auth = start_authenticator(self.ctx, self.keys.slots[0])
        self.ctl.connect()
        self.load.connect()
        for r in self.registrars:
            r.connect()
        for slot in range(cfg.workers):
            await self.start_worker(slot, False)
        bg = [
            asyncio.create_task(self.keepalive(), name="chaos-keepalive"),
            asyncio.create_task(self.sampler(), name="chaos-sampler"),
            asyncio.create_task(self.watcher(), name="chaos-watcher"),
        ]
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            try:
                await asyncio.sleep(1.0)  # registrations and subscriptions settle
                self.calibrate()
                clients = [
                    asyncio.create_task(self.client_loop(i, http), name=f"chaos-client-{i}")
                    for i in range(cfg.clients)
                ]
                faults = asyncio.create_task(self.fault_loop(), name="chaos-faults")
                end = time.monotonic() + cfg.duration_s
                next_cp = time.monotonic() + cfg.checkpoint_every_s
                while time.monotonic() < end:
                    await asyncio.sleep(min(0.25, max(0.0, end - time.monotonic())))
                    if time.monotonic() >= next_cp and end - time.monotonic() > cfg.settle_s:
                        await self.checkpoint(final=False)
                        next_cp = time.monotonic() + cfg.checkpoint_every_s
                faults.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await faults
                await self.checkpoint(final=True)
                self.stop.set()
                self.resume.set()
                await asyncio.gather(*clients, return_exceptions=True)
            finally:
                self.stop.set()
                self.resume.set()
                for t in bg:
                    t.cancel()
                await asyncio.gather(*bg, return_exceptions=True)
                report = await self.report()
                await self.shutdown()
        return report

    async def report(self) -> dict[str, Any]:
        metrics: dict[str, float] = {}
        with contextlib.suppress(OSError):
            metrics = counter_totals(await asyncio.to_thread(self.router.scrape))
        logs = self.router_logs + [self.router.log_path]
        errors: list[str] = []
        for p in logs:
            with contextlib.suppress(OSError):
                for line in p.read_text(errors="replace").splitlines():
                    if re.search(r"ERROR|Traceback|Error:|exception", line):
                        errors.append(f"{p.name}: {line[:300]}")
        final = self.checkpoints[-1] if self.checkpoints else {}
        lat = sorted(self.route_latency)
        total = sum(self.outcomes.values())
        invariants = {
            "index_equals_truth": bool(self.checkpoints)
            and all(c["converged"] for c in self.checkpoints),
            "no_request_hung": self.outcomes["hang"] == 0,
            "answered_while_router_up": self.unanswered_while_up == 0,
            "no_worker_only_when_none_live": self.no_worker_while_live == 0,
            "no_route_to_long_dead_worker": self.routed_to_long_dead == 0,
            "malformed_control_answered": self.malformed_unanswered == 0,
            "rss_bounded": not any("RSS" in v for v in self.bound_violations),
            "fds_bounded": not any("fds" in v for v in self.bound_violations),
            "router_never_exited": self.unexpected_router_exits == 0,
            "no_phantom_blocks": not self.phantoms,
            "impostors_refused": not self.impostors_accepted,
        }
        return {
            "seed": self.cfg.seed,
            "t0": self.t0_wall,
            "duration_s": self.cfg.duration_s,
            "workers": self.cfg.workers,
            "faults": dict(sorted(self.faults.items())),
            "malformed_sent": dict(sorted(self.injected.items())),
            "requests": {
                "total": total,
                **dict(sorted(self.outcomes.items())),
                "retries": self.retries,
                "routed_to_dead": self.routed_to_dead,
                "routed_to_long_dead": self.routed_to_long_dead,
                "no_worker_while_live": self.no_worker_while_live,
                "unanswered_while_router_up": self.unanswered_while_up,
                "route_p50_ms": round(percentile(lat, 50) * 1e3, 2) if lat else 0.0,
                "route_p99_ms": round(percentile(lat, 99) * 1e3, 2) if lat else 0.0,
                "route_max_ms": round((lat[-1] if lat else 0.0) * 1e3, 1),
            },
            "failures": total - self.outcomes["ok"] - self.outcomes["ok_after_retry"],
            "harness_errors": self.harness_errors,
            "control_malformed_replies": dict(sorted(self.control_replies.items())),
            "index_mismatches": final.get("mismatches", -1),
            "phantom_checks": self.phantom_checks,
            "phantom_blocks": self.phantoms[:12],
            "impostors_accepted": self.impostors_accepted[:12],
            # Per checkpoint that did not converge: workers wrong, and wrong unflagged.
            "unconverged_checkpoints": [
                {
                    "t": c["t"],
                    "wrong": c.get("wrong_workers"),
                    "silently_wrong": c.get("silently_wrong"),
                    "error": c.get("error"),
                }
                for c in self.checkpoints
                if not c["converged"]
            ],
            "checkpoints": self.checkpoints,
            "fault_timeline": self.timeline[:400],
            "proxies": {
                "batches_dropped": sum(s.proxy.dropped for s in self.live() if s.proxy),
                "replays_stalled": sum(s.proxy.replays_stalled for s in self.live() if s.proxy),
            },
            "router": {
                "source": _source_of(self.cfg.router_src),
                "incarnations": self.router_incarnation,
                "unexpected_exits": self.unexpected_router_exits,
                "max_rss_mb": round(self.rss_max, 1),
                "max_fds": self.fds_max,
                "bound_violations": self.bound_violations,
                "config": self.router_cfg,
                "counters": metrics,
                "log_errors": len(errors),
                "log_error_lines": errors[:12],
            },
            "invariants": invariants,
            "ok": all(invariants.values()),
        }

    async def shutdown(self) -> None:
        for t in list(self.fault_tasks):
            t.cancel()
        for slot in range(len(self.slots)):
            self.kill_slot(slot)
        with contextlib.suppress(Exception):
            await self.ctl.close()
            await self.load.close()
            for r in self.registrars:
                await r.close()
        if self._auth is not None:
            self._auth.stop()
        self.router.stop()
        # A killed worker's HTTP server waits for handlers that will never finish.
        done, pending = (
            await asyncio.wait(self.teardowns, timeout=2.0) if self.teardowns else (set(), set())
        )
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self.ctx.destroy(linger=0)


def _router_fields(src: str | None) -> set[str]:
    """RouterConfig's fields as the router that will run knows them."""
    if src is None:
        return set(RouterConfig.__struct_fields__)
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _FIELDS_SCRIPT],
        env=dict(os.environ, PYTHONPATH=src, PYTHONSAFEPATH="1"),
        check=True,
        capture_output=True,
        text=True,
    )
    return set(out.stdout.split())


_FIELDS_SCRIPT = (
    "from dynamo_ext.config import RouterConfig; print(*RouterConfig.__struct_fields__)"
)


def _source_of(src: str | None) -> dict[str, Any]:
    """Which router ran: the tree and, for a git checkout, its commit and local changes."""
    import subprocess

    root = src or str(Path(__file__).resolve().parents[2])
    info: dict[str, Any] = {"tree": root}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = ["git", "-C", root]
        info["commit"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "router", "dynamo_ext/protocol.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split("\n")
        info["uncommitted"] = sorted(line[3:] for line in dirty if line.strip())
    return info


async def run_chaos(cfg: ChaosConfig, tmp: Path | None = None) -> dict[str, Any]:
    if tmp is not None:
        return await Harness(cfg, tmp).run()
    with tempfile.TemporaryDirectory(prefix="dynamo-ext-chaos-") as d:
        return await Harness(cfg, Path(d)).run()


# ======================================================================================
# CLI: dynamo-ext bench chaos
# ======================================================================================
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Chaos run: real router, mocker fleet, seeded faults, invariants (JSON)."
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load and faults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--clients", type=int, default=4, help="concurrent request loops")
    p.add_argument(
        "--cpu-blocks", type=int, default=512, help="CPU offload tier per worker (0: none)"
    )
    p.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated fault kinds ('' for none): {','.join(FAULT_KINDS)}",
    )
    p.add_argument("--fault-every", type=float, default=1.5, help="mean seconds between faults")
    p.add_argument(
        "--checkpoint-every",
        type=float,
        default=8.0,
        help="seconds of load between checkpoints; each heals the faults, and frequent ones "
        "see a fault's aftermath before another fault (a router restart) masks it",
    )
    p.add_argument("--settle", type=float, default=8.0, help="convergence budget per checkpoint")
    p.add_argument(
        "--router-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="RouterConfig override (YAML value), repeatable",
    )
    p.add_argument(
        "--router-src",
        help="source tree of the router to run (e.g. a baseline: git archive REV | tar -x)",
    )
    p.add_argument(
        "--curve",
        action="store_true",
        help="CURVE keys on every router-facing socket, and impostor faults",
    )
    p.add_argument("--keep-logs", help="folder for the router logs (default: a temp folder)")
    p.add_argument("--json", action="store_true", help="one JSON object on one line")


def main(args: argparse.Namespace) -> int:
    import yaml

    overrides: dict[str, Any] = {}
    for item in args.router_set:
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--router-set wants KEY=VALUE, got {item!r}")
        overrides[k] = yaml.safe_load(v)
    cfg = ChaosConfig(
        duration_s=args.duration,
        seed=args.seed,
        workers=args.workers,
        clients=args.clients,
        cpu_blocks=args.cpu_blocks,
        faults=[f for f in args.faults.split(",") if f],
        fault_every_s=args.fault_every,
        checkpoint_every_s=args.checkpoint_every,
        settle_s=args.settle,
        router=overrides,
        router_src=args.router_src,
        curve=args.curve,
    )
    tmp = Path(args.keep_logs) if args.keep_logs else None
    if tmp is not None:
        tmp.mkdir(parents=True, exist_ok=True)
    res = asyncio.run(run_chaos(cfg, tmp))
    print(json.dumps(res) if args.json else json.dumps(res, indent=2))
    return 0 if res["ok"] else 1
