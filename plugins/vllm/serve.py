"""``dynamo-ext serve``: a whole local system from one command, supervised until Ctrl-C.

Starts a ``LocalFleet`` (router, frontend, vLLM workers: ``--workers N`` aggregated or
``--prefill N --decode M``) on the embedded tiny model unless ``--model DIR`` names another,
prints the OpenAI endpoint and a curl line, then supervises: a worker whose process exits is
started again with the same worker id (it registers anew, with a new instance id, and the
router drops its old index), as are a router or frontend that exit. On a terminal a status
line shows workers up, requests in flight, the prefix hit rate and TTFT p50, read from the
router's and the frontend's Prometheus endpoints. SIGINT/SIGTERM stop every process.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client.parser import text_string_to_metric_families

from dynamo_ext.plugins.vllm.fleet import LocalFleet, Worker

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # a worker that keeps dying waits longer
TICK_S = 0.5


class Stopped(Exception):
    """SIGINT/SIGTERM arrived while the fleet was starting."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "A whole local system from one command: router, frontend and vLLM workers (the tiny "
        "local model unless --model), supervised until Ctrl-C."
    )
    p.add_argument("--workers", type=int, help="aggregated workers (default 1)")
    p.add_argument("--prefill", type=int, default=0, help="prefill workers (P/D)")
    p.add_argument("--decode", type=int, default=0, help="decode workers (P/D)")
    p.add_argument("--model", type=Path, help="model folder (default: the tiny local Llama)")
    p.add_argument("--port", type=int, default=8080, help="frontend port")
    p.add_argument("--workdir", type=Path, default=Path("out/serve"), help="logs")
    p.add_argument("--served-model-name", default="tiny-llama")
    p.add_argument("--no-status", action="store_true", help="no live status line")


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile`` over cumulative ``(le, count)`` buckets: linear
    within the bucket the rank falls in; None without observations."""
    bs = sorted(buckets)
    if not bs or bs[-1][1] <= 0:
        return None
    rank = q * bs[-1][1]
    lo_le, lo_count = 0.0, 0.0
    for le, count in bs:
        if count >= rank:
            if math.isinf(le):
                return lo_le  # the highest finite bound, as Prometheus answers
            if count == lo_count:
                return le
            return lo_le + (le - lo_le) * (rank - lo_count) / (count - lo_count)
        lo_le, lo_count = le, count
    return lo_le


@dataclass
class Status:
    workers_up: int | None = None
    workers: int = 0
    inflight: float | None = None
    hit_rate: float | None = None
    ttft_p50_s: float | None = None

    def line(self) -> str:
        up = "?" if self.workers_up is None else str(self.workers_up)
        infl = "?" if self.inflight is None else f"{self.inflight:.0f}"
        hit = "-" if self.hit_rate is None else f"{self.hit_rate:.2f}"
        ttft = "-" if self.ttft_p50_s is None else f"{self.ttft_p50_s * 1000:.0f} ms"
        return (
            f"workers up {up}/{self.workers} | in flight {infl} | hit rate {hit} | TTFT p50 {ttft}"
        )


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return str(r.read().decode())
    except OSError:
        return None


def read_status(router_metrics: str | None, frontend_metrics: str | None, workers: int) -> Status:
    """The status line's figures from the two Prometheus texts (either may be missing)."""
    st = Status(workers=workers)
    if router_metrics:
        for fam in text_string_to_metric_families(router_metrics):
            if fam.name == "dynamo_ext_router_workers_up":
                st.workers_up = int(sum(s.value for s in fam.samples))
    if frontend_metrics:
        buckets: dict[float, float] = {}
        for fam in text_string_to_metric_families(frontend_metrics):
            if fam.name == "dynamo_frontend_inflight_requests":
                st.inflight = sum(s.value for s in fam.samples)
            elif fam.name == "dynamo_ext_frontend_prefix_hit_rate" and fam.samples:
                st.hit_rate = max(s.value for s in fam.samples)
            elif fam.name == "dynamo_frontend_time_to_first_token_seconds":
                for s in fam.samples:
                    if s.name.endswith("_bucket"):
                        le = float(s.labels["le"])
                        buckets[le] = buckets.get(le, 0.0) + s.value
        st.ttft_p50_s = histogram_quantile(0.5, buckets.items())
    return st


class Supervisor:
    """Keeps a started ``LocalFleet`` whole until ``stop`` is set."""

    def __init__(
        self, fleet: LocalFleet, status: bool, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.fleet = fleet
        self.status = status
        self.clock = clock
        self.stop = threading.Event()
        self._next_restart: dict[str, float] = {}
        self._dead_since: dict[str, float] = {}
        self._restarting: set[str] = set()
        self._last_line = 0.0

    def say(self, msg: str) -> None:
        if self.status:
            sys.stdout.write("\r\x1b[K")
        print(msg, flush=True)

    def check_workers(self) -> None:
        now = self.clock()
        for w in self.fleet.workers:
            wid = w.worker_id
            if w.server.is_alive():
                if wid in self._restarting and w.server.healthy(timeout=0.5):
                    self._restarting.discard(wid)
                    self.say(
                        f"worker {wid} is back (restart {w.restarts}, pid {w.server.pid}, "
                        f"{w.server.url})"
                    )
                continue
            if wid not in self._dead_since:
                rc = w.server.proc.returncode if w.server.proc else None
                self._dead_since[wid] = now
                self.say(f"worker {wid} exited (code {rc}): restarting it")
            if now >= self._next_restart.get(wid, 0.0):
                self._restart(w, now)

    def _restart(self, w: Worker, now: float) -> None:
        backoff = RESTART_BACKOFF_S[min(w.restarts, len(RESTART_BACKOFF_S) - 1)]
        # died again before it answered: maybe a port of its was taken; pick new ones
        fresh = w.worker_id in self._restarting
        self.fleet.restart_worker(w, wait=False, fresh_ports=fresh)
        self._next_restart[w.worker_id] = now + backoff
        self._dead_since.pop(w.worker_id, None)
        self._restarting.add(w.worker_id)

    def check_router_and_frontend(self) -> None:
        f = self.fleet
        if f.router is not None and f.router.proc is not None and f.router.proc.poll() is not None:
            self.say(f"router exited (code {f.router.proc.returncode}): restarting it")
            f.router.start()
        if f.frontend is not None and f.frontend.poll() is not None:
            self.say(f"frontend exited (code {f.frontend.returncode}): restarting it")
            f.restart_frontend()

    def show_status(self) -> None:
        now = time.monotonic()
        if not self.status or now - self._last_line < 1.0:
            return
        self._last_line = now
        f = self.fleet
        rm = _scrape(f"http://127.0.0.1:{f.router.metrics_port}/metrics") if f.router else None
        st = read_status(rm, _scrape(f.url + "/metrics"), len(f.workers))
        sys.stdout.write("\r\x1b[K" + st.line())
        sys.stdout.flush()

    def run(self) -> None:
        while not self.stop.wait(TICK_S):
            self.check_workers()
            self.check_router_and_frontend()
            self.show_status()


def banner(fleet: LocalFleet) -> str:
    assert fleet.router is not None
    name = fleet.served_model_name
    workers = "\n".join(
        f"  {w.worker_id:<10} {w.role:<8} {w.server.url}  log {w.server.log_path}"
        for w in fleet.workers
    )
    return (
        f"\nOpenAI endpoint: {fleet.url}/v1   (model {name!r})\n"
        f"router: {fleet.router.endpoint}  metrics: "
        f"http://127.0.0.1:{fleet.router.metrics_port}/metrics, {fleet.url}/metrics\n"
        f"workers:\n{workers}\n\n"
        f"curl {fleet.url}/v1/completions -H 'Content-Type: application/json' -d "
        f'\'{{"model": "{name}", "prompt": "Hello, my name is", "max_tokens": 16}}\'\n\n'
        "Ctrl-C stops everything."
    )


def main(args: argparse.Namespace) -> int:
    from dynamo_ext.testing.tiny_model import build_tiny_model, default_model_dir

    if args.workers is not None and (args.prefill or args.decode):
        print("dynamo-ext serve: --workers or --prefill/--decode, not both", file=sys.stderr)
        return 2
    if bool(args.prefill) != bool(args.decode):
        print("dynamo-ext serve: P/D needs --prefill N and --decode M", file=sys.stderr)
        return 2
    aggregated = args.workers if args.workers is not None else (0 if args.prefill else 1)
    starting = True
    sup: Supervisor | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if sup is not None:
            sup.stop.set()
        if starting:
            raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    fleet: LocalFleet | None = None
    rc = 0
    try:
        model = args.model or build_tiny_model(default_model_dir())
        fleet = LocalFleet(
            model,
            aggregated=aggregated,
            prefill=args.prefill,
            decode=args.decode,
            workdir=args.workdir,
            frontend_port=args.port,
            served_model_name=args.served_model_name,
        )
        print(
            f"starting router, {args.prefill} prefill, {args.decode} decode, {aggregated} "
            f"aggregated worker(s) and the frontend on {model} (logs in {args.workdir}/) ...",
            flush=True,
        )
        fleet.start()
        sup = Supervisor(fleet, status=sys.stdout.isatty() and not args.no_status)
        starting = False
        print(banner(fleet), flush=True)
        sup.run()
    except Stopped:
        pass
    except RuntimeError as exc:  # EngineStartError included: a process did not come up
        print(f"dynamo-ext serve: {exc}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        starting = False  # a second signal must not interrupt the stop
        if sup is not None and sup.status:
            sys.stdout.write("\n")
        print("stopping ...", flush=True)
        if fleet is not None:
            fleet.stop()
        print("stopped.", flush=True)
    return rc


__all__ = ["Status", "Supervisor", "add_arguments", "histogram_quantile", "main", "read_status"]
