"""``DynamoExtConnector``: vLLM's own NIXL connector plus dynamo-ext's start-up checks.

What it is. A subclass of vLLM's ``NixlConnector`` (``NixlPullConnector``: D reads P's blocks
over NIXL/UCX). It adds no data path of its own: it validates our part of
``kv_connector_extra_config`` and the ``kv_role`` when vLLM builds it, so a bad value stops
the worker at start with one ``ConfigError`` naming the field, and logs one line per
construction (``DynamoExtConnector created ...``) that shows the plugin is in use.

Who calls what, in which process:

* every vLLM process loads the ``vllm.general_plugins`` entry point, whose
  :func:`dynamo_ext.plugins.vllm.register` registers the name ``DynamoExtConnector`` with
  ``KVConnectorFactory`` (lazily, by module path): no ``kv_connector_module_path`` needed;
* API server process: vLLM imports the class for its class methods only (NIXL's Prometheus
  metrics and ``KVConnectorStats``); it is not constructed there;
* engine-core process: vLLM's ``Scheduler`` constructs it with ``KVConnectorRole.SCHEDULER``
  and calls the scheduler-side methods (``get_num_new_matched_tokens``,
  ``update_state_after_alloc``, ``build_connector_meta``, ``request_finished``; the latter
  returns the ``kv_transfer_params`` that P's HTTP response carries);
* worker process (on CPU with ``--distributed-executor-backend uni`` and
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine-core process itself): vLLM's worker
  constructs it with ``KVConnectorRole.WORKER`` after the KV cache is sized and calls the
  worker-side methods (``register_kv_caches``, ``start_load_kv``, ``get_finished``,
  ``get_transfer_results``); NIXL's handshake listener runs there on
  ``VLLM_NIXL_SIDE_CHANNEL_HOST:VLLM_NIXL_SIDE_CHANNEL_PORT``.

Roles (``kv_role``, vLLM 0.32 accepts ``kv_producer``, ``kv_consumer``, ``kv_both``):

* ``kv_producer`` (P, worker role ``prefill``): serves ``do_remote_decode`` requests by
  computing the prompt and keeping its blocks for D; a plain request is served locally;
* ``kv_consumer`` (D, worker role ``decode``): a request with ``do_remote_prefill`` params
  reads the prompt blocks from P and recomputes only the last prompt token; a plain request
  (no ``kv_transfer_params``) is prefilled locally (conditional disaggregation);
* ``kv_both``: accepted (vLLM logs that it is deprecated for NIXL).

The extra config's ``role`` (default from ``kv_role``) must agree: ``prefill`` needs a
producer, ``decode`` a consumer.

The handshake (vLLM's format, unchanged; :mod:`dynamo_ext.plugins.vllm.disagg` builds the
bodies):

* to P: the request with ``max_tokens: 1``, ``stream: false`` and
  ``"kv_transfer_params": {"do_remote_decode": true}``; P's response carries
  ``"kv_transfer_params": {"do_remote_prefill": true, "do_remote_decode": false,
  "remote_engine_id", "remote_request_id", "remote_block_ids", "remote_host",
  "remote_port", "tp_size", "remote_num_tokens", ...}``;
* to D: the same prompt, the client's own ``max_tokens``/sampling, and those params.

Offload composition: an ``offload`` key is reserved; it is refused with a ``ConfigError``
until the LMCache issue lands. Meanwhile vLLM's ``MultiConnector`` with this connector and
an offload connector as children works as for any connector.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import vllm.envs as envs
from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector

from dynamo_ext.errors import ConfigError
from dynamo_ext.plugins.vllm.config import (
    DEFAULT_ROLE,
    KV_ROLES,
    validate_connector_config,
)

if TYPE_CHECKING:
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger(__name__)


class DynamoExtConnector(NixlConnector):
    """vLLM's ``NixlConnector`` with dynamo-ext's config validation (see the module doc)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        kvt = vllm_config.kv_transfer_config
        if kvt is None:  # the factory never does this; a direct call might
            raise ConfigError("kv_transfer_config", "DynamoExtConnector needs one")
        try:
            self.dynamo_config = validate_connector_config(
                kvt.kv_role, kvt.kv_connector_extra_config
            )
        except ConfigError as exc:
            # vLLM's engine-start failure message ends with "see root cause above": log it.
            log.error("DynamoExtConnector: %s", exc)
            raise
        super().__init__(vllm_config, role, kv_cache_config)
        log.info(
            "DynamoExtConnector created (%s side, pid %d): kv_role=%s, worker role=%s, "
            "engine_id=%s, NIXL side channel %s:%s",
            role.name.lower(),
            os.getpid(),
            kvt.kv_role,
            self.dynamo_config.role,
            self.engine_id,
            envs.VLLM_NIXL_SIDE_CHANNEL_HOST,
            envs.VLLM_NIXL_SIDE_CHANNEL_PORT,
        )


__all__ = ["DEFAULT_ROLE", "KV_ROLES", "DynamoExtConnector", "validate_connector_config"]
