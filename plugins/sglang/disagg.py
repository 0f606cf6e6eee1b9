"""SGLang's prefill/decode pairing as the frontend's ``Handshake`` for ``engine="sglang"``
workers (registered by path in :mod:`dynamo_ext.frontend.handshake`). No SGLang import.

The way SGLang's own PD router pairs them (``sglang_router``'s PD mode): the same request
goes to the prefill worker (P) and the decode worker (D) at once, both carrying P's
``bootstrap_host`` / ``bootstrap_port`` (its ``--disaggregation-bootstrap-port``, registered
as ``bootstrap_endpoint``) and one random ``bootstrap_room``. D meets P in that room, pulls the
KV cache (NIXL or Mooncake) and streams the tokens; P's own answer is drained. An SGLang decode
worker (``--disaggregation-mode decode``) cannot prefill by itself, so every request it serves
is paired.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from dynamo_ext.frontend.handshake import Handshake
from dynamo_ext.protocol import RouteResponse

_BOOTSTRAP_KEYS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
# P's answer is drained, never streamed: stream options would be refused without a stream.
_DROP_ON_PREFILL = ("stream_options",)


class SglangHandshake(Handshake):
    engine = "sglang"
    concurrent = True
    decode_needs_prefill = True

    def why_not_prefill_worker(self, prefill: RouteResponse) -> str | None:
        why = super().why_not_prefill_worker(prefill)
        if why is None and not prefill.bootstrap_endpoint:
            why = f"{prefill.worker_id} registered no bootstrap endpoint"
        return why

    def prefill_request(self, body: Mapping[str, Any], prefill: RouteResponse) -> dict[str, Any]:
        assert prefill.bootstrap_endpoint  # why_not_prefill_worker checked it
        host, _, port = prefill.bootstrap_endpoint.rpartition(":")
        out = {k: v for k, v in body.items() if k not in _DROP_ON_PREFILL}
        out["bootstrap_host"] = host
        out["bootstrap_port"] = int(port)
        out["bootstrap_room"] = random.getrandbits(63)  # SGLang's rooms are non-negative i64
        out["stream"] = False
        return out

    def decode_request(
        self,
        body: Mapping[str, Any],
        prefill_body: Mapping[str, Any],
        prefill_answer: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        return {**body, **{k: prefill_body[k] for k in _BOOTSTRAP_KEYS}}


__all__ = ["SglangHandshake"]
