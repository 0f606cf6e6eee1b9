"""Worker metrics and registration, from vLLM's own scheduler stats.

``DynamoExtStatLogger`` is a ``vllm.stat_logger_plugins`` entry point: vLLM's ``AsyncLLM``
(the API server process) constructs it next to its own loggers and calls ``record`` with the
``SchedulerStats`` of every engine step. We keep the latest numbers and a daemon thread
publishes them as ``WorkerMetrics`` on a fixed period, so the router sees a heartbeat even
when the engine is idle and no step runs. A second daemon thread registers the worker with
the router and repeats the registration as a keep-alive, which heals a router restart; a
router that is down never blocks or fails the engine: metrics are dropped by the PUB socket
and registration retries with backoff (both counted, and logged once per outage).

With ``DYNAMO_EXT_WORKER_CURVE_SECRET_KEY`` (this worker's key file) and
``DYNAMO_EXT_WORKER_CURVE_SERVER_KEY`` (the router's public key) set, the metrics PUB is a
CURVE server that admits the router only, and the registrar is a CURVE client of the router.

It is inert unless the worker is configured for dynamo-ext: our connector in
``--kv-transfer-config`` or ``DYNAMO_EXT_WORKER_ROUTER`` / ``DYNAMO_EXT_WORKER_METRICS`` in the
environment.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

import msgspec
import zmq
from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase

from dynamo_ext.config import advertise
from dynamo_ext.plugins.vllm import CONNECTOR_NAME
from dynamo_ext.plugins.vllm.config import (
    WorkerPluginConfig,
    connector_configs,
    default_http_endpoint,
    default_worker_id,
    load_worker_config,
    prefetch_endpoint_of,
)
from dynamo_ext.plugins.vllm.kv_events import PUBLISHER_NAME as CURVE_PUBLISHER
from dynamo_ext.protocol import (
    PROTOCOL_HEADER,
    Ack,
    Role,
    WorkerMetrics,
    WorkerRegistration,
    dp_worker_id,
    encode,
    reply_decoder,
)
from dynamo_ext.publisher import MetricsPublisher
from dynamo_ext.security import Curve, CurveConfig, load_curve

log = logging.getLogger(__name__)

PREFILL_QUEUE_KEY = "dynamo_ext_prefill_queue_tokens"
KEEPALIVE_S = 5.0


def _role_of(vllm_config: VllmConfig, cfg: WorkerPluginConfig) -> Role:
    if cfg.role is not None:
        return cfg.role
    kvt = vllm_config.kv_transfer_config
    if kvt is not None and kvt.kv_connector is not None:
        if kvt.kv_role == "kv_producer":
            return "prefill"
        if kvt.kv_role == "kv_consumer":
            return "decode"
    return "both"


def worker_config_of(vllm_config: VllmConfig) -> WorkerPluginConfig:
    kvt = vllm_config.kv_transfer_config
    extra = None
    if kvt is not None:
        for c in connector_configs(kvt.kv_connector, kvt.kv_connector_extra_config):
            if c.get("kv_connector") == CONNECTOR_NAME:
                extra = c.get("kv_connector_extra_config") or {}
                break
    return load_worker_config(extra)


class Registrar:
    """Registers with the router and keeps the registration alive, off the engine's path."""

    def __init__(self, router: str, reg: WorkerRegistration, curve: Curve | None = None) -> None:
        self.router = router
        self.reg = reg
        self.curve = curve
        self.registered = False
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="dynamo-ext-reg")

    def start(self) -> None:
        self._thread.start()

    def _once(self, sock: zmq.Socket, corr: int) -> bool:
        sock.send_multipart([PROTOCOL_HEADER, corr.to_bytes(8, "big"), encode(self.reg)])
        if not sock.poll(2000):
            return False
        frames = sock.recv_multipart()
        if len(frames) != 3:
            return False
        try:
            reply = reply_decoder.decode(frames[2])
        except msgspec.DecodeError:
            return False
        if not isinstance(reply, Ack):
            log.error(
                "router %s refused registration of %s: %s", self.router, self.reg.worker_id, reply
            )
        return isinstance(reply, Ack) and reply.ok

    def _run(self) -> None:
        ctx: zmq.Context = zmq.Context.instance()
        corr = 0
        backoff = 0.5
        while not self._stop.is_set():
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                self.curve.client(sock)
            sock.connect(self.router)
            try:
                while not self._stop.is_set():
                    corr += 1
                    ok = self._once(sock, corr)
                    if ok and not self.registered:
                        log.info(
                            "registered worker %s (role %s) with router %s",
                            self.reg.worker_id,
                            self.reg.role,
                            self.router,
                        )
                    if not ok:
                        self.failures += 1
                        if self.registered or self.failures == 1:
                            log.warning(
                                "router %s unreachable; worker keeps serving, "
                                "retrying registration",
                                self.router,
                            )
                        self.registered = False
                        break  # a fresh socket: a DEALER may hold a stale reply
                    self.registered = True
                    backoff = 0.5
                    self._stop.wait(KEEPALIVE_S)
            finally:
                sock.close(0)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, KEEPALIVE_S)

    def stop(self) -> None:
        self._stop.set()


def _offset_port(endpoint: str | None, rank: int) -> str | None:
    """vLLM's own port offset of a DP rank's KV event sockets."""
    from vllm.distributed.kv_events import ZmqEventPublisher

    return ZmqEventPublisher.offset_endpoint_port(endpoint, rank)


class DynamoExtStatLogger(StatLoggerBase):
    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        self.vllm_config = vllm_config
        self.engine_index = engine_index
        self.cfg = worker_config_of(vllm_config)
        self.active = self.cfg.enabled
        if not self.active:
            return
        # Data parallel: vLLM gives each DP engine a stat logger, a KV publisher whose
        # ports are offset by the rank, and a cache of its own; each is its own worker.
        dp_size = vllm_config.parallel_config.data_parallel_size
        self.dp_rank: int | None = engine_index if dp_size > 1 else None
        self.worker_id = dp_worker_id(default_worker_id(self.cfg), self.dp_rank)
        self.role = _role_of(vllm_config, self.cfg)
        self._lock = threading.Lock()
        self._running = 0
        self._waiting = 0
        self._usage = 0.0
        self._prefill_queue = 0
        self._queries = 0
        self._hits = 0
        ep = self.cfg.metrics_endpoint or f"tcp://{self.cfg.advertise_host}:0"
        self.curve = load_curve(CurveConfig.from_env(), "DYNAMO_EXT_WORKER_CURVE")
        self.publisher = MetricsPublisher(ep, curve=self.curve)
        self.publisher.start(self.snapshot, self.cfg.metrics_period_s)
        self.registrar: Registrar | None = None
        if self.cfg.router is not None:
            self.registrar = Registrar(self.cfg.router, self.registration(), self.curve)
            self.registrar.start()
        log.info(
            "dynamo-ext worker %s (role %s): metrics on %s every %.2fs, router %s",
            self.worker_id,
            self.role,
            self.publisher.endpoint,
            self.cfg.metrics_period_s,
            self.cfg.router or "(none)",
        )

    def registration(self) -> WorkerRegistration:
        host = self.cfg.advertise_host
        kve = self.vllm_config.kv_events_config
        kv_ep = replay_ep = None
        topic = ""
        if (
            kve is not None
            and kve.enable_kv_cache_events
            and kve.publisher in ("zmq", CURVE_PUBLISHER)
        ):
            rank = self.dp_rank or 0
            kv_ep = advertise(_offset_port(kve.endpoint, rank), host)
            replay_ep = advertise(_offset_port(kve.replay_endpoint, rank), host)
            topic = kve.topic
            if self.curve is not None and kve.publisher == "zmq":
                log.warning(
                    "CURVE keys are set but --kv-events-config uses the plaintext 'zmq' "
                    "publisher: a router with keys cannot read it; use %r",
                    CURVE_PUBLISHER,
                )
        nixl_port = os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT")
        return WorkerRegistration(
            # the router adds "@dp<rank>" itself (dp_worker_id)
            worker_id=default_worker_id(self.cfg),
            data_parallel_rank=self.dp_rank,
            role=self.role,
            http_endpoint=default_http_endpoint(self.cfg),
            kv_events_endpoint=kv_ep,
            kv_events_topic=topic,
            replay_endpoint=replay_ep,
            metrics_endpoint=advertise(self.publisher.endpoint, host),
            nixl_endpoint=f"{host}:{nixl_port}" if nixl_port else None,
            prefetch_endpoint=self._prefetch_endpoint(host),
            block_size=self.vllm_config.cache_config.block_size,
            model=self.vllm_config.model_config.served_model_name
            if isinstance(self.vllm_config.model_config.served_model_name, str)
            else None,
            instance_id=uuid.uuid4().hex,
        )

    def _prefetch_endpoint(self, host: str) -> str | None:
        kvt = self.vllm_config.kv_transfer_config
        if kvt is None:
            return None
        return prefetch_endpoint_of(kvt.kv_connector, kvt.kv_connector_extra_config, host)

    def snapshot(self, heartbeat: int) -> WorkerMetrics:
        total = self.vllm_config.cache_config.num_gpu_blocks or 0
        with self._lock:
            return WorkerMetrics(
                worker_id=self.worker_id,
                heartbeat=heartbeat,
                ts=time.time(),
                role=self.role,
                # never negative: the router refuses a report with a negative count
                running=max(0, self._running),
                waiting=max(0, self._waiting),
                kv_used_blocks=max(0, round(self._usage * total)),
                kv_total_blocks=max(0, total),
                prefill_queue_tokens=max(0, self._prefill_queue),
                prefix_cache_queries=max(0, self._queries),
                prefix_cache_hits=max(0, self._hits),
            )

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if not self.active or scheduler_stats is None:
            return
        s = scheduler_stats
        with self._lock:
            self._running = s.num_running_reqs
            self._waiting = s.num_waiting_reqs + getattr(s, "num_skipped_waiting_reqs", 0)
            self._usage = s.kv_cache_usage
            self._prefill_queue = s.num_kv_fetch_reqs_by_stage.get(PREFILL_QUEUE_KEY, 0)
            pc = s.prefix_cache_stats
            if pc is not None:
                self._queries += pc.queries
                self._hits += pc.hits

    def log_engine_initialized(self) -> None:
        if self.active:
            log.info(
                "dynamo-ext worker %s: %s KV blocks of %d tokens",
                self.worker_id,
                self.vllm_config.cache_config.num_gpu_blocks,
                self.vllm_config.cache_config.block_size,
            )
