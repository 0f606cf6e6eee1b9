"""vLLM's KV event publisher over CURVE: ``--kv-events-config '{"publisher":"dynamo_ext_curve"}'``.

``CurveEventPublisher`` is vLLM's own ``ZmqEventPublisher`` (its thread, queue, replay
buffer and framing: ``[topic, seq, KVEventBatch]`` on PUB, a ROUTER replay socket answering
``[b"", seq]`` with the buffered batches and an end marker), with both sockets made CURVE
servers before they bind. Reusing vLLM's class is what keeps the bytes identical; only the
socket setup differs. The sockets live in a context of their own, whose ZAP handler admits the
router's key (and any allow-listed one): a subscriber without a key, or with another key,
never completes the handshake and receives nothing.

Keys come from the environment of the vLLM process (vLLM's ``KVEventsConfig`` forbids extra
fields): ``DYNAMO_EXT_WORKER_CURVE_SECRET_KEY`` (this worker's key file),
``DYNAMO_EXT_WORKER_CURVE_SERVER_KEY`` (the router's public key or .pub file), optionally
``DYNAMO_EXT_WORKER_CURVE_ALLOW_DIR``.

vLLM 0.32 types ``KVEventsConfig.publisher`` as ``Literal["null", "zmq"]``, so a registered
publisher name would fail validation of the flag: :func:`register` widens that Literal by
the one name it registers (plugins load before vLLM parses its arguments).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import zmq
from vllm.distributed.kv_events import EventPublisherFactory, ZmqEventPublisher

from dynamo_ext.errors import ConfigError
from dynamo_ext.security import Curve, CurveConfig, load_curve, start_authenticator

log = logging.getLogger(__name__)

PUBLISHER_NAME = "dynamo_ext_curve"


class CurveEventPublisher(ZmqEventPublisher):
    """``ZmqEventPublisher`` whose PUB and replay ROUTER are CURVE servers."""

    def __init__(
        self, data_parallel_rank: int, *args: Any, curve: Curve | None = None, **kwargs: Any
    ) -> None:
        loaded = curve or load_curve(CurveConfig.from_env(), "DYNAMO_EXT_WORKER_CURVE")
        if loaded is None:
            raise ConfigError(
                "DYNAMO_EXT_WORKER_CURVE_SECRET_KEY",
                f"publisher {PUBLISHER_NAME!r} needs this worker's key file",
            )
        self._curve = loaded
        self._own_ctx: zmq.Context | None = None
        self._auth: Any = None
        super().__init__(data_parallel_rank, *args, **kwargs)
        self._publisher_config.publisher = PUBLISHER_NAME  # type: ignore[assignment]
        log.info(
            "KV events over CURVE on %s (replay %s), %d allowed subscriber keys",
            self._endpoint,
            self._replay_endpoint,
            len(self._curve.allowlist),
        )

    def _socket_setup(self) -> None:
        if self._own_ctx is None:
            # One ZAP handler per context: vLLM's shared Context.instance() is not ours to
            # put one on.
            self._own_ctx = zmq.Context()
            self._auth = start_authenticator(self._own_ctx, self._curve)
            self._ctx = self._own_ctx
        # vLLM's _socket_setup with the CURVE server options set before bind/connect.
        assert self._endpoint is not None
        if self._pub is None:
            self._pub = self._ctx.socket(zmq.PUB)
            self._curve.server(self._pub)
            self._pub.set_hwm(self._hwm)
            if self._is_bind_endpoint(self._endpoint):
                self._endpoint = self._bind(self._pub, self._endpoint)
            else:
                self._pub.connect(self._endpoint)
        if self._replay_endpoint is not None and self._replay is None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._curve.server(self._replay)
            self._replay_endpoint = self._bind(self._replay, self._replay_endpoint)

    def shutdown(self) -> None:
        super().shutdown()
        if self._auth is not None:
            self._auth.stop()
        if self._own_ctx is not None:
            self._own_ctx.term()


def _admit_publisher_name(name: str) -> None:
    """Let vLLM's ``KVEventsConfig`` accept ``publisher: name`` (its Literal is closed)."""
    import pydantic
    from vllm.config.kv_events import KVEventsConfig

    fields = KVEventsConfig.__pydantic_fields__  # type: ignore[attr-defined]
    current = getattr(fields["publisher"].annotation, "__args__", ("null", "zmq"))
    if name in current:
        return
    widened = Literal[(*current, name)]  # type: ignore[valid-type]
    KVEventsConfig.__dataclass_fields__["publisher"].type = widened
    KVEventsConfig.__annotations__["publisher"] = widened
    fields["publisher"].annotation = widened
    pydantic.dataclasses.rebuild_dataclass(KVEventsConfig, force=True)  # type: ignore[arg-type]


def register() -> None:
    """Register ``dynamo_ext_curve`` with vLLM's ``EventPublisherFactory`` (idempotent)."""
    if PUBLISHER_NAME not in EventPublisherFactory._registry:
        EventPublisherFactory.register_publisher(PUBLISHER_NAME, CurveEventPublisher)
    _admit_publisher_name(PUBLISHER_NAME)
