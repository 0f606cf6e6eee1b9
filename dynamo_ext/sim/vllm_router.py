"""vLLM's own router (``vllm-router``, PyPI 0.1.17, a Rust binary) in front of a mocker
fleet: the third arm of the live replay, beside our router and Dynamo's SelectionService.

Two of its policies are arms: ``vllm_router_kv`` (``--policy kv_aware``: an index of the
workers' blocks fed by vLLM's KV events) and ``vllm_router_cache`` (``--policy
cache_aware``: an approximate prefix tree of the prompts it routed, no events). Requests
go through its HTTP proxy; the worker that served each one is read off the fleet (every
``MockerWorker.submit`` is observed), and hit rates are the engines' own counters, as for
the other arms.

How kv_aware must be configured to see anything, found by experiment (and held by
``tests/sim/test_vllm_router.py``): it keys blocks by a sha256 of each block's token ids,
the ones it reads from the request (a token-id ``prompt`` is used as is; text would need
the tokenizer named by ``--kv-event-model``) and the ones carried in ``BlockStored``. Two
settings silently leave its index empty, after which every request scores zero cached
blocks and falls back to the least loaded worker, which in a trace replay is round robin's
hit rate, while an idle fleet (one repeated prompt at a time) sends every repeat to the
same worker by that same tie-break and looks right:

- the KV event topic: its static sources (``--kv-event-source``) read vLLM's default empty
  topic only, and there is no flag for another one; a publisher on topic ``kv`` (our
  worker commands' and the fleet's default) is never indexed. The arm's fleet publishes on
  ``""`` (``VLLM_TOPIC``).
- the block size: ``--kv-event-block-size`` (default 16) cuts the request into blocks, the
  events carry the engine's; at 64 (the replay's default) against 16 no request block ever
  matches. The arm passes the fleet's block size.

``--kv-event-model`` is required with static sources (the cache identity); the fleet's
model name is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamo_ext.errors import ConfigError, DynamoExtError

if TYPE_CHECKING:
    from dynamo_ext.sim.fleet import MockerFleet
    from dynamo_ext.sim.model import MockerConfig, SimRequest
    from dynamo_ext.sim.report import PolicyRun

log = logging.getLogger(__name__)

# replay policy name -> vllm-router --policy
VLLM_ROUTER_POLICIES: dict[str, str] = {
    "vllm_router_kv": "kv_aware",
    "vllm_router_cache": "cache_aware",
}
# vLLM's ZmqEventPublisher default topic, the only one vllm-router's static sources read.
VLLM_TOPIC = ""

# Its knobs, as flags, with its shipped defaults (vllm-router --help, 0.1.17).
KNOB_FLAGS: dict[str, str] = {
    "router_temperature": "--router-temperature",
    "kv_penalty_host": "--kv-penalty-host",
    "kv_penalty_disk": "--kv-penalty-disk",
    "kv_penalty_external": "--kv-penalty-external",
    "cache_threshold": "--cache-threshold",
    "balance_abs_threshold": "--balance-abs-threshold",
    "balance_rel_threshold": "--balance-rel-threshold",
}
DEFAULTS: dict[str, dict[str, float]] = {
    "kv_aware": {
        "router_temperature": 0.0,
        "kv_penalty_host": 0.8,
        "kv_penalty_disk": 0.3,
        "kv_penalty_external": 0.6,
    },
    "cache_aware": {
        "cache_threshold": 0.3,
        "balance_abs_threshold": 64.0,
        "balance_rel_threshold": 1.5,
    },
}
# What `bench vllm-router --budget` samples (low, high, scale), each range spanning the
# default. Left out, as on the other arms: the tier credits (kv_penalty_*) do nothing on
# engines without offload tiers.
TUNE_SPACE: dict[str, dict[str, tuple[float, float, str]]] = {
    "kv_aware": {"router_temperature": (0.0, 0.5, "lin")},
    "cache_aware": {
        "cache_threshold": (0.05, 0.9, "lin"),
        "balance_abs_threshold": (4.0, 1024.0, "log"),
        "balance_rel_threshold": (1.05, 4.0, "log"),
    },
}


class VllmRouterError(DynamoExtError):
    """vllm-router is missing, would not start, or is configured so it cannot see events."""


def binary() -> str | None:
    """The ``vllm-router`` launcher on PATH, or None (``pip install vllm-router==0.1.17``)."""
    return shutil.which("vllm-router")


def knob_args(policy: str, knobs: Mapping[str, float]) -> list[str]:
    """Flags for ``knobs`` (names of ``KNOB_FLAGS``); a knob of the other policy is refused."""
    own = DEFAULTS.get(policy)
    if own is None:
        raise ConfigError("vllm_router_policy", f"{policy!r} is not one of kv_aware/cache_aware")
    out: list[str] = []
    for k, v in knobs.items():
        if k not in own:
            raise ConfigError(
                "vllm_router_knobs", f"{k!r} is not a {policy} knob (one of {', '.join(own)})"
            )
        out += [KNOB_FLAGS[k], f"{v:g}" if k != "balance_abs_threshold" else str(int(v))]
    return out


def knobs_from_args(args: Any, name: str) -> dict[str, float]:
    """``--vllm-router-knobs`` (one JSON object for both arms): the knobs of arm ``name``'s
    policy. A name neither policy has is refused."""
    import json

    raw = getattr(args, "vllm_router_knobs", None)
    if not raw:
        return {}
    try:
        knobs = json.loads(raw)
    except ValueError as exc:
        raise ConfigError("vllm_router_knobs", f"not JSON: {exc}") from exc
    if not isinstance(knobs, dict):
        raise ConfigError("vllm_router_knobs", "must be a JSON object of knobs")
    known = {k for d in DEFAULTS.values() for k in d}
    bad = sorted(set(knobs) - known)
    if bad:
        raise ConfigError("vllm_router_knobs", f"unknown {bad} (one of {sorted(known)})")
    own = DEFAULTS[VLLM_ROUTER_POLICIES[name]]
    return {k: float(v) for k, v in knobs.items() if k in own}


def draw(space: Mapping[str, tuple[float, float, str]], rng: random.Random) -> dict[str, float]:
    """One setting from ``space``: log-uniform or uniform per knob."""
    import math

    out: dict[str, float] = {}
    for k, (lo, hi, scale) in space.items():
        if scale == "log":
            out[k] = round(math.exp(rng.uniform(math.log(lo), math.log(hi))), 4)
        else:
            out[k] = round(rng.uniform(lo, hi), 4)
    return out


class VllmRouterProc:
    """One ``vllm-router`` process over a started ``MockerFleet``: its HTTP proxy on a free
    port, Prometheus on another (its default 29000 would collide between runs), every
    worker's KV PUB and replay endpoints as static sources for kv_aware.

    ``strict`` refuses the two settings that leave kv_aware's index empty (a non-empty
    topic, a block size other than the engines'); off only to show what they do.
    """

    def __init__(
        self,
        fleet: MockerFleet,
        policy: str,
        *,
        knobs: Mapping[str, float] | None = None,
        block_size: int | None = None,
        log_path: Path | None = None,
        strict: bool = True,
        log_level: str = "info",
        extra_args: list[str] | None = None,
    ) -> None:
        if policy not in DEFAULTS:
            raise ConfigError(
                "vllm_router_policy", f"{policy!r} is not one of kv_aware/cache_aware"
            )
        self.fleet = fleet
        self.policy = policy
        self.knobs = dict(knobs or {})
        self.block_size = block_size or fleet.cfg.block_size
        if strict and policy == "kv_aware":
            if fleet.topic != VLLM_TOPIC:
                raise VllmRouterError(
                    f"fleet publishes KV events on topic {fleet.topic!r}: vllm-router's static "
                    "sources read vLLM's default empty topic only (MockerFleet(topic=''))"
                )
            if self.block_size != fleet.cfg.block_size:
                raise VllmRouterError(
                    f"--kv-event-block-size {self.block_size} differs from the engines' "
                    f"{fleet.cfg.block_size}: no request block would match an event's"
                )
        self.log_path = log_path
        self.log_level = log_level
        self.extra_args = list(extra_args or [])
        self.port = 0
        self.prometheus_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_urls(self) -> list[str]:
        return [f"{self.fleet.http_base}/{wid}" for wid in self.fleet.workers]

    def argv(self) -> list[str]:
        exe = binary()
        if exe is None:
            raise VllmRouterError("vllm-router not on PATH (pip install vllm-router==0.1.17)")
        argv = [exe, "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--prometheus-port", str(self.prometheus_port), "--policy", self.policy]
        argv += ["--worker-urls", *self.worker_urls()]
        if self.policy == "kv_aware":
            for w in self.fleet.workers.values():
                reg = self.fleet.registration(w)
                argv += ["--kv-event-source", f"{reg.http_endpoint}={reg.kv_events_endpoint}"]
                argv += ["--kv-event-replay-source", f"{reg.http_endpoint}={reg.replay_endpoint}"]
            argv += ["--kv-event-block-size", str(self.block_size)]
            argv += ["--kv-event-model", self.fleet.model]
        argv += knob_args(self.policy, self.knobs)
        # Its own retries would re-send a request elsewhere and count it twice on the engines.
        argv += ["--disable-retries", "--log-level", self.log_level, *self.extra_args]
        return argv

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start it and wait until its proxy answers and every KV subscriber is connected
        (they connect after it reports ready; events sent before that would be lost)."""
        from dynamo_ext.testing.ports import free_port

        self.port, self.prometheus_port = free_port(), free_port()
        if self.log_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vllm-router-")
            self.log_path = Path(self._tmp.name) / "vllm-router.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT)
        import aiohttp

        want = len(self.fleet.workers) if self.policy == "kv_aware" else 0
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while True:
                if self._proc.poll() is not None:
                    raise VllmRouterError(f"vllm-router exited: {self.log_tail()}")
                if time.monotonic() > deadline:
                    raise VllmRouterError(
                        f"vllm-router not ready in {timeout_s} s: {self.log_tail()}"
                    )
                try:
                    async with http.get(f"{self.url}/health") as r:
                        if (
                            r.status == 200
                            and self.log_text().count("kv_index subscriber for") >= want
                        ):
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        await asyncio.sleep(0.3)  # the SUB's connect completes after it is logged

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        # its log lines carry ANSI colours whatever the terminal
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))

    def log_tail(self, n: int = 2000) -> str:
        return self.log_text()[-n:]

    async def metrics(self) -> dict[str, float]:
        """Its Prometheus counters, ``name{labels}`` -> value."""
        import aiohttp

        out: dict[str, float] = {}
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.prometheus_port}/metrics") as r,
        ):
            for line in (await r.text()).splitlines():
                if line.startswith("#") or " " not in line:
                    continue
                k, _, v = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[k] = float(v)
        return out

    async def kv_lookups(self) -> dict[str, int]:
        """kv_aware's index lookups: ``{"hit": n, "miss": m}`` (a miss: no worker holds the
        request's first block)."""
        m = await self.metrics()
        return {
            res: int(m.get(f'vllm_router_kv_placement_lookups_total{{result="{res}"}}', 0))
            for res in ("hit", "miss")
        }

    def stop(self) -> None:
        p = self._proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class ServedBy:
    """Which worker served each request sent through the proxy: every worker's ``submit``
    is wrapped (the fleet's HTTP handler calls it with the prompt's token ids), and a
    request is matched to the oldest expected one with the same prompt. Two identical
    prompts in flight at once may swap; they have the same length, so only their output
    lengths can be booked on the wrong worker."""

    def __init__(self, fleet: MockerFleet) -> None:
        self._expected: dict[int, deque[str]] = {}
        self.served: dict[str, int] = {}
        self.unmatched = 0
        for i, w in enumerate(fleet.workers.values()):
            setattr(w, "submit", self._wrap(w.submit, i))  # noqa: B010 - instance hook

    def _wrap(self, submit: Any, i: int) -> Any:
        def hooked(tokens: list[int], max_tokens: int) -> tuple[SimRequest, Any]:
            q = self._expected.get(hash(tuple(tokens)))
            if q:
                self.served[q.popleft()] = i
            else:
                self.unmatched += 1
            return submit(tokens, max_tokens)  # type: ignore[no-any-return]

        return hooked

    def expect(self, rid: str, tokens: list[int]) -> None:
        self._expected.setdefault(hash(tuple(tokens)), deque()).append(rid)

    def pop(self, rid: str) -> int | None:
        return self.served.pop(rid, None)


class VllmRouterLive:
    """The replay's ``LiveRouter`` for vllm-router. Its decision is made inside its proxy,
    so ``route`` answers the proxy's URL and a provisional worker 0; ``finished`` books the
    request on the worker that served it (``run.recs`` and ``run.routed_tokens``)."""

    def __init__(self, url: str, run: PolicyRun, served: ServedBy) -> None:
        self.url = url
        self.run = run
        self.served = served
        self.lost = 0

    async def route(self, rid: str, tokens: list[int]) -> tuple[int, int, str]:
        self.served.expect(rid, tokens)
        return 0, 0, self.url

    async def prefill_done(self, rid: str) -> None:
        return None

    async def finished(self, rid: str) -> None:
        w = self.served.pop(rid)
        if w is None:  # never reached a worker (refused by the proxy)
            self.lost += 1
            return
        # The replay names request i f"{policy}-r{i}" (replay._live_request).
        i = int(rid.rsplit("-r", 1)[1])
        rec = self.run.recs[i]
        n = rec.input_length + rec.output_length
        self.run.routed_tokens[rec.worker] -= n
        self.run.routed_tokens[w] += n
        rec.worker = w


@contextlib.asynccontextmanager
async def live_arm(
    name: str,
    mcfg: MockerConfig,
    workers: int,
    run: PolicyRun,
    knobs: Mapping[str, float] | None = None,
    log_path: Path | None = None,
) -> AsyncIterator[VllmRouterLive]:
    """A fresh fleet (empty caches, vLLM's topic) and a fresh vllm-router for replay arm
    ``name`` (its log: ``log_path``, default ``out/vllm-router/NAME.log``). On exit
    ``run.cores`` holds the engines and ``run.extra["vllm_router"]`` its knobs and counters."""
    from dynamo_ext.sim.fleet import MockerFleet

    policy = VLLM_ROUTER_POLICIES.get(name)
    if policy is None:
        raise ConfigError("policies", f"{name!r} is not one of {', '.join(VLLM_ROUTER_POLICIES)}")
    fleet = MockerFleet(workers, mcfg, prefix=name, topic=VLLM_TOPIC)
    log_path = log_path or Path("out") / "vllm-router" / f"{name}.log"
    proc = VllmRouterProc(fleet, policy, knobs=knobs, log_path=log_path)
    try:
        await fleet.start()
        await proc.start()
        arm = VllmRouterLive(proc.url, run, ServedBy(fleet))
        yield arm
        run.cores = [w.core for w in fleet.workers.values()]
        info: dict[str, Any] = {
            "policy": policy,
            "knobs": {**DEFAULTS[policy], **proc.knobs},
            "unmatched": arm.served.unmatched,
            "lost": arm.lost,
        }
        if policy == "kv_aware":
            info["kv_lookups"] = await proc.kv_lookups()
        info["log"] = str(log_path)
        run.extra["vllm_router"] = info
    finally:
        proc.stop()
        await fleet.stop()


async def repeat_probe(
    *,
    topic: str = VLLM_TOPIC,
    router_block_size: int | None = None,
    block_size: int = 64,
    holder: int = 2,
    n: int = 8,
    workers: int = 4,
) -> dict[str, Any]:
    """The experiment behind kv_aware's configuration: one prompt of ten blocks is cached
    on worker ``holder`` directly (not through the router, so no tie-break can pass for a
    hit), then sent ``n`` times through vllm-router. Returns the workers that served the
    repeats, its index lookups and the engines' cached prompt tokens."""
    import aiohttp

    from dynamo_ext.sim.fleet import MockerFleet
    from dynamo_ext.sim.model import MockerConfig

    prompt = list(range(1000, 1000 + 10 * block_size))
    cfg = MockerConfig(block_size=block_size, num_gpu_blocks=2048, speedup=10.0)
    fleet = MockerFleet(workers, cfg, prefix="probe", topic=topic)
    await fleet.start()
    proc = VllmRouterProc(fleet, "kv_aware", block_size=router_block_size, strict=False)
    cores = [w.core for w in fleet.workers.values()]

    async def post(http: aiohttp.ClientSession, url: str) -> None:
        async with http.post(
            f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2}
        ) as r:
            if r.status != 200:
                raise VllmRouterError(f"{url}: HTTP {r.status}: {await r.text()}")
            await r.read()

    try:
        await proc.start()
        served: list[int] = []
        async with aiohttp.ClientSession() as http:
            await post(http, f"{fleet.http_base}/{list(fleet.workers)[holder]}")
            await asyncio.sleep(0.5)  # its BlockStored reaches the router's SUB
            for _ in range(n):
                before = [c.prefix_queries for c in cores]
                await post(http, proc.url)
                served += [i for i, c in enumerate(cores) if c.prefix_queries > before[i]]
        return {
            "topic": topic,
            "engine_block_size": block_size,
            "router_block_size": proc.block_size,
            "holder": holder,
            "served": served,
            "kv_lookups": await proc.kv_lookups(),
            "cached_prompt_tokens": sum(c.prefix_hits for c in cores),
        }
    finally:
        proc.stop()
        await fleet.stop()


async def diagnose() -> dict[str, Any]:
    """``repeat_probe`` as configured here and with each of the two blinding settings."""
    return {
        "as_configured": await repeat_probe(),
        "topic_kv": await repeat_probe(topic="kv"),
        "block_size_16": await repeat_probe(router_block_size=16),
    }
