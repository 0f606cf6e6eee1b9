"""The prefill/decode handshake seam: one interface the dispatcher calls, one implementation
per engine, registered by engine name.

Each engine pairs a prefill (P) and a decode (D) worker its own way. vLLM's connectors
(NIXL, ours) are sequential: P gets the request with ``max_tokens`` 1 and answers with
``kv_transfer_params`` that D gets with the same request, then D reads the prompt's blocks from
P. SGLang's PD mode is concurrent: P and D get the same request at once, carrying P's
bootstrap address and one ``bootstrap_room`` where the two meet. The dispatcher
(:mod:`dynamo_ext.frontend.dispatch`) owns the policy (when a remote prefill pays, which
worker, retries, migration) and asks a :class:`Handshake` only for the bodies and whether a
prefill worker's answer is usable; it never names an engine.

Implementations live in the engine plugins (``plugins/vllm/disagg.py``,
``plugins/sglang/disagg.py``) and are registered here lazily, by module path, the way vLLM's
``KVConnectorFactory.register_connector`` does: the frontend imports a plugin module the
first time a worker of that engine is paired, and no engine package at all. A gateway with
another engine calls :func:`register_handshake` with its own class (or its path).
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from dynamo_ext.errors import DisaggError
from dynamo_ext.protocol import RouteResponse

__all__ = ["Handshake", "handshake_for", "register_handshake", "registered_engines"]


class Handshake(ABC):
    """How a gateway pairs one engine's prefill and decode workers.

    The dispatcher calls, for one request it decided to disaggregate (all on its event loop,
    none may block):

    1. :meth:`why_not` with the decode worker's request body: ``None`` or why this request
       cannot be prefilled remotely (it is then served by the decode worker alone, where the
       engine allows it);
    2. :meth:`why_not_prefill_worker` for each prefill candidate the router offers, until one
       fits;
    3. :meth:`prefill_request`: the body to POST to that prefill worker's ``/v1/completions``;
    4. :meth:`decode_request`: the body for the decode worker. Sequential engines
       (``concurrent`` False) get the prefill worker's JSON answer and must raise
       :class:`~dynamo_ext.errors.DisaggError` when it is not a usable handshake; concurrent
       ones get ``None`` (both requests are already on their way).
    """

    #: The engine name workers register with (``WorkerRegistration.engine``).
    engine: ClassVar[str]
    #: P and D get their requests at once (they meet on the engine's side), instead of
    #: P first and D with P's answer.
    concurrent: ClassVar[bool] = False
    #: A decode worker of this engine cannot prefill by itself: every request it serves
    #: must be paired, whatever the remote-prefill policy says.
    decode_needs_prefill: ClassVar[bool] = False

    def why_not(self, body: Mapping[str, Any]) -> str | None:
        """``None`` when ``body`` can be disaggregated, else the reason."""
        return None

    def why_not_prefill_worker(self, prefill: RouteResponse) -> str | None:
        """``None`` when the routed ``prefill`` worker can be this engine's partner."""
        if prefill.engine != self.engine:
            return f"{prefill.worker_id} runs {prefill.engine}, not {self.engine}"
        if prefill.worker_role != "prefill":
            return f"{prefill.worker_id} is a {prefill.worker_role} worker"
        if not prefill.http_endpoint:
            return f"{prefill.worker_id} has no HTTP endpoint"
        return None

    @abstractmethod
    def prefill_request(self, body: Mapping[str, Any], prefill: RouteResponse) -> dict[str, Any]:
        """The body for the prefill worker (a new dict; ``body`` is not changed)."""

    @abstractmethod
    def decode_request(
        self,
        body: Mapping[str, Any],
        prefill_body: Mapping[str, Any],
        prefill_answer: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """The body for the decode worker, from the client's ``body``, what the prefill
        worker was sent and (sequential engines) what it answered."""


_lock = threading.Lock()
_registry: dict[str, type[Handshake] | str] = {}
_instances: dict[str, Handshake] = {}


def register_handshake(engine: str, handshake: type[Handshake] | str) -> None:
    """Register ``engine``'s handshake: a :class:`Handshake` subclass, or its path
    ``"package.module:ClassName"``, imported on first use. Registering a name again
    replaces it (a gateway may override a built-in)."""
    if isinstance(handshake, str) and ":" not in handshake:
        raise ValueError(f"handshake path must be 'module:ClassName', got {handshake!r}")
    with _lock:
        _registry[engine] = handshake
        _instances.pop(engine, None)


def registered_engines() -> list[str]:
    with _lock:
        return sorted(_registry)


def handshake_for(engine: str) -> Handshake:
    """The handshake of ``engine``'s workers (one shared instance per engine).

    Raises :class:`~dynamo_ext.errors.DisaggError` for an engine nobody registered, or one
    whose plugin cannot be imported.
    """
    hs = _instances.get(engine)
    if hs is not None:
        return hs
    with _lock:
        target = _registry.get(engine)
        if target is None:
            raise DisaggError(
                f"no prefill/decode handshake registered for engine {engine!r} "
                f"(registered: {', '.join(sorted(_registry)) or 'none'})"
            )
        if isinstance(target, str):
            module, _, name = target.partition(":")
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as exc:
                raise DisaggError(
                    f"handshake {target} for engine {engine!r} cannot be loaded: {exc}"
                ) from exc
        else:
            cls = target
        if not (isinstance(cls, type) and issubclass(cls, Handshake)):
            raise DisaggError(f"handshake for engine {engine!r} is not a Handshake: {cls!r}")
        if getattr(cls, "engine", engine) != engine:
            raise DisaggError(f"handshake {cls.__name__} is for {cls.engine!r}, not {engine!r}")
        hs = _instances[engine] = cls()
        return hs


# The built-in plugins, by path only: importing this module imports no plugin and no engine.
register_handshake("vllm", "dynamo_ext.plugins.vllm.disagg:VllmHandshake")
register_handshake("sglang", "dynamo_ext.plugins.sglang.disagg:SglangHandshake")
