"""vLLM's remote-prefill handshake, the one implementation the frontend and the tests use:
request bodies for a prefill (P) and a decode (D) worker built from an OpenAI
``/v1/completions`` request, and the check of P's answer. Plain dicts, no vLLM import;
:class:`VllmHandshake` is the frontend's ``Handshake`` for ``engine="vllm"`` workers
(registered by path in :mod:`dynamo_ext.frontend.handshake`).

The format is vLLM's own (``NixlConnector`` and our ``DynamoExtConnector``, which is one):

1. P gets the client's request with ``max_tokens: 1``, ``stream: false`` and
   ``kv_transfer_params: {"do_remote_decode": true}`` (:func:`prefill_request`). P computes
   the prompt, keeps its KV blocks for D to read and answers with the one token and, beside
   ``choices``, a ``kv_transfer_params`` object:
   ``{"do_remote_prefill": true, "do_remote_decode": false, "remote_engine_id": ...,
   "remote_request_id": ..., "remote_block_ids": [[...]], "remote_host": ...,
   "remote_port": ..., "tp_size": ..., "remote_num_tokens": ..., ...}``.
2. D gets the client's request unchanged plus those ``kv_transfer_params``
   (:func:`decode_request`). D's connector reads the prompt blocks from P over NIXL
   (``remote_host:remote_port`` is P's NIXL side channel, ``VLLM_NIXL_SIDE_CHANNEL_PORT``),
   recomputes only the last prompt token and decodes. P frees the blocks once D has read
   them (or after its lease, when no D ever comes).

The prompt must be the same on both (send token ids to be sure both tokenize alike). A request
without ``kv_transfer_params`` is served locally by any worker, P or D (conditional
disaggregation): the frontend decides per request whether a remote prefill pays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dynamo_ext.errors import DisaggError
from dynamo_ext.frontend.handshake import Handshake
from dynamo_ext.protocol import RouteResponse

# kv_transfer_params keys D needs (vLLM 0.32, nixl/pull_scheduler.py); P sends more, which
# are passed through untouched.
REQUIRED_DECODE_KEYS: tuple[str, ...] = (
    "remote_engine_id",
    "remote_request_id",
    "remote_block_ids",
    "remote_host",
    "remote_port",
)

# Request fields that must not reach P: P returns exactly one token, without a stream.
_DROP_ON_PREFILL: tuple[str, ...] = ("stream_options", "min_tokens", "suffix")


def why_not_disaggregable(body: Mapping[str, Any]) -> str | None:
    """``None`` when ``body`` (an OpenAI completion request) can be prefilled remotely, else
    the reason: one prompt (a string or a list of token ids), one sequence, no prompt
    logprobs (D never computes the prompt) and no ``kv_transfer_params`` of its own."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt):
        return "batched prompts are not disaggregated"
    if not isinstance(prompt, str | list) or not prompt:
        return "prompt must be a non-empty string or list of token ids"
    if int(body.get("n") or 1) != 1 or int(body.get("best_of") or 1) != 1:
        return "n/best_of > 1 is not disaggregated"
    if body.get("echo") or body.get("prompt_logprobs"):
        return "prompt logprobs need the prompt computed on the decode worker"
    if body.get("kv_transfer_params"):
        return "request already carries kv_transfer_params"
    return None


def prefill_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body to POST to P's ``/v1/completions``: the same prompt and sampling settings,
    ``max_tokens`` 1, not streamed, ``kv_transfer_params: {"do_remote_decode": true}``.

    Raises ``DisaggError`` when the request cannot be disaggregated
    (:func:`why_not_disaggregable`).
    """
    reason = why_not_disaggregable(body)
    if reason is not None:
        raise DisaggError(reason)
    out = {k: v for k, v in body.items() if k not in _DROP_ON_PREFILL}
    out["max_tokens"] = 1
    out["stream"] = False
    out["kv_transfer_params"] = {"do_remote_decode": True}
    return out


def decode_params(prefill_response: Mapping[str, Any]) -> dict[str, Any]:
    """The ``kv_transfer_params`` for D from P's ``/v1/completions`` response (a copy).

    Raises ``DisaggError`` naming what is wrong when P returned none (e.g. it was not started
    with a KV connector), they are not a remote-prefill handshake, or a field D needs is
    missing or malformed: D would otherwise prefill the prompt itself without a word, or
    fail to reach P.
    """
    if not isinstance(prefill_response, Mapping):
        raise DisaggError(f"prefill response is not a JSON object: {type(prefill_response)}")
    params = prefill_response.get("kv_transfer_params")
    if not isinstance(params, Mapping):
        raise DisaggError("prefill response carries no kv_transfer_params")
    if params.get("do_remote_prefill") is not True:
        raise DisaggError("prefill response's kv_transfer_params lack do_remote_prefill")
    missing = [k for k in REQUIRED_DECODE_KEYS if params.get(k) is None]
    if missing:
        raise DisaggError(f"prefill response's kv_transfer_params lack {missing}")
    bad = [k for k, ok in _CHECKS.items() if k in params and not ok(params[k])]
    if bad:
        shown = ", ".join(f"{k}={params[k]!r:.80}" for k in bad)
        raise DisaggError(f"prefill response's kv_transfer_params are malformed: {shown}")
    return dict(params)


def _nonempty_str(v: object) -> bool:
    return isinstance(v, str) and bool(v)


def _count(v: object, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _block_ids(v: object) -> bool:
    """One list of block ids per KV cache group (vLLM 0.32), or one flat list (older):
    ids are non-negative ints and there is at least one, or D has nothing to read."""
    if not isinstance(v, list) or not v:
        return False
    groups = v if all(isinstance(g, list) for g in v) else [v]
    return any(groups) and all(_count(b) for g in groups for b in g)


_CHECKS = {
    "remote_engine_id": _nonempty_str,
    "remote_request_id": _nonempty_str,
    "remote_host": _nonempty_str,
    "remote_port": lambda v: _count(v, 1) and int(v) < 65536,  # type: ignore[call-overload]
    "remote_block_ids": _block_ids,
    "tp_size": lambda v: v is None or _count(v, 1),
    "remote_num_tokens": lambda v: v is None or _count(v),
}


def decode_request(body: Mapping[str, Any], prefill_response: Mapping[str, Any]) -> dict[str, Any]:
    """The body to POST to D's ``/v1/completions``: the client's request as it was (streamed
    or not, its own ``max_tokens``) plus P's ``kv_transfer_params``."""
    return {**body, "kv_transfer_params": decode_params(prefill_response)}


class VllmHandshake(Handshake):
    """The frontend's handshake for vLLM workers with a NIXL-style connector (ours or
    ``NixlConnector``): sequential, P's ``kv_transfer_params`` checked before D sees them."""

    engine = "vllm"

    def why_not(self, body: Mapping[str, Any]) -> str | None:
        return why_not_disaggregable(body)

    def prefill_request(self, body: Mapping[str, Any], prefill: RouteResponse) -> dict[str, Any]:
        return prefill_request(body)

    def decode_request(
        self,
        body: Mapping[str, Any],
        prefill_body: Mapping[str, Any],
        prefill_answer: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        if prefill_answer is None:
            raise DisaggError("vLLM's handshake needs the prefill worker's answer")
        return decode_request(body, prefill_answer)


__all__ = [
    "VllmHandshake",
    "REQUIRED_DECODE_KEYS",
    "DisaggError",
    "decode_params",
    "decode_request",
    "prefill_request",
    "why_not_disaggregable",
]
