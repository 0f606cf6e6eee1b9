"""Who may say what to the router: identity is the CURVE key (no sockets here).

With security on, every control message reaches the service with the Z85 public key of the
peer that sent it (ZMQ's ``User-Id``, set by the router's ZAP handler), and every metrics
message with the key of the publisher it came from. ``IdentityGuard`` decides:

* a worker id is bound to the key that first registered it; no other key can re-register,
  deregister or report it failed, or publish metrics for it. The same key registering it
  again (a restarted worker with a new instance id) replaces its old self;
* ``worker`` keys register, deregister and report only their own workers; ``frontend`` keys
  route, report finishes and failures (of any worker), but never register one;
* a static worker (from the router's config) belongs to no key: nobody re-registers it;
* an allow-list entry with ``workers`` patterns may register only ids matching them, which
  holds across router restarts (the first-registrant binding lives in memory).

Each refusal is counted (``dynamo_ext_router_auth_rejected_total{reason}``) and logged with
the peer's key id, the first time for each (reason, key, worker).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

import msgspec
from prometheus_client import CollectorRegistry, Counter

from dynamo_ext.protocol import (
    ErrorReply,
    PrefillFinished,
    RequestFinished,
    RouteRequest,
    RouterQuery,
    WorkerDeregistration,
    WorkerFailed,
    WorkerRegistration,
    dp_worker_id,
)
from dynamo_ext.security import Allowlist, KeyRole, key_id

log = logging.getLogger(__name__)

# What each role may send (WorkerFailed and the worker messages are checked further).
_MAY_SEND: dict[KeyRole, frozenset[type]] = {
    "worker": frozenset({WorkerRegistration, WorkerDeregistration, WorkerFailed, RouterQuery}),
    "frontend": frozenset(
        {RouteRequest, RequestFinished, PrefillFinished, WorkerFailed, RouterQuery}
    ),
    "router": frozenset({RouterQuery}),
}
REASONS = (
    "unknown_key",
    "role",
    "not_owner",
    "id_not_allowed",
    "static",
    "metrics_not_owner",
    "handshake",
)


class _Static(Protocol):
    static: bool


class IdentityGuard:
    def __init__(self, allowlist: Allowlist, registry: CollectorRegistry) -> None:
        self.allowlist = allowlist
        self.owners: dict[str, str] = {}  # worker id -> Z85 key of its first registrant
        self.rejected = Counter(
            "dynamo_ext_router_auth_rejected",
            "Messages and handshakes refused for their peer's key, by reason",
            ["reason"],
            registry=registry,
        )
        for r in REASONS:
            self.rejected.labels(r)
        self._logged: set[tuple[str, str, str]] = set()
        # Static workers (the router's config) have no key: their metrics come in plaintext
        # from the endpoint the operator configured.
        self.static: set[str] = set()

    def refuse(self, reason: str, key: str | None, what: str, worker: str = "") -> ErrorReply:
        self.rejected.labels(reason).inc()
        kid = key_id(key) if key else "none"
        mark = (reason, kid, worker)
        if mark not in self._logged and len(self._logged) < 10_000:
            self._logged.add(mark)
            log.warning(
                "refused %s%s from key %s: %s",
                what,
                f" for worker {worker[:64]!r}" if worker else "",
                kid,
                reason,
            )
        return ErrorReply("forbidden", f"{what} refused: {reason}")

    def owner_of(self, worker_id: str) -> str | None:
        return self.owners.get(worker_id)

    def check(
        self, msg: msgspec.Struct, key: str | None, workers: Mapping[str, _Static]
    ) -> ErrorReply | None:
        """None if ``key`` may send ``msg``; a registration binds its worker id to ``key``."""
        t = type(msg)
        role = self.allowlist.role_of(key)
        if role is None:
            return self.refuse("unknown_key", key, t.__name__)
        if t not in _MAY_SEND[role]:
            return self.refuse("role", key, t.__name__)
        assert key is not None
        if t is WorkerRegistration:
            wid = dp_worker_id(msg.worker_id, msg.data_parallel_rank)  # type: ignore[attr-defined]
            w = workers.get(wid)
            if (w is not None and w.static) or wid in self.static:
                return self.refuse("static", key, "registration", wid)
            if not self.allowlist.may_own(key, wid):
                return self.refuse("id_not_allowed", key, "registration", wid)
            owner = self.owners.setdefault(wid, key)
            if owner != key:
                return self.refuse("not_owner", key, "registration", wid)
            return None
        if t is WorkerDeregistration or (t is WorkerFailed and role == "worker"):
            wid = msg.worker_id  # type: ignore[attr-defined]
            if self.owners.get(wid) != key:
                return self.refuse("not_owner", key, t.__name__, wid)
        return None

    def may_publish(self, worker_id: str, key: str | None) -> bool:
        """Metrics naming ``worker_id`` arrived from the publisher holding ``key``."""
        owner = self.owners.get(worker_id)
        if owner == key and (owner is not None or worker_id in self.static):
            return True
        self.refuse("metrics_not_owner", key, "metrics", worker_id)
        return False

    def handshake_refused(self, kid: str) -> None:
        """A CURVE handshake failed (unknown key, or a peer without CURVE)."""
        self.rejected.labels("handshake").inc()
        mark = ("handshake", kid, "")
        if mark not in self._logged and len(self._logged) < 10_000:
            self._logged.add(mark)
            log.warning("refused CURVE handshake from key %s", kid)
