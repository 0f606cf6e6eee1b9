"""The remote-prefill handshake as plain dicts: request bodies for a prefill (P) and a decode (D)
worker, built from an OpenAI ``/v1/completions`` request. Engine-neutral: no vLLM import.

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


class DisaggError(ValueError):
    """A request cannot be disaggregated, or P's answer carries no usable handshake."""


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

    Raises ``DisaggError`` when P returned none (e.g. it was not started with a KV
    connector), or they are not a remote-prefill handshake.
    """
    params = prefill_response.get("kv_transfer_params")
    if not isinstance(params, Mapping):
        raise DisaggError("prefill response carries no kv_transfer_params")
    if not params.get("do_remote_prefill"):
        raise DisaggError("prefill response's kv_transfer_params lack do_remote_prefill")
    missing = [k for k in REQUIRED_DECODE_KEYS if params.get(k) is None]
    if missing:
        raise DisaggError(f"prefill response's kv_transfer_params lack {missing}")
    return dict(params)


def decode_request(body: Mapping[str, Any], prefill_response: Mapping[str, Any]) -> dict[str, Any]:
    """The body to POST to D's ``/v1/completions``: the client's request as it was (streamed
    or not, its own ``max_tokens``) plus P's ``kv_transfer_params``."""
    return {**body, "kv_transfer_params": decode_params(prefill_response)}


__all__ = [
    "REQUIRED_DECODE_KEYS",
    "DisaggError",
    "decode_params",
    "decode_request",
    "prefill_request",
    "why_not_disaggregable",
]
