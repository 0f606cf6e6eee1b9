"""vLLM plugin: makes a stock vLLM process a dynamo-ext worker by flags alone.

Entry points (pyproject.toml):

* ``vllm.general_plugins`` -> :func:`register`: registers ``DynamoExtConnector`` with vLLM's
  ``KVConnectorFactory`` (lazily, by module path) in every vLLM process, so
  ``--kv-transfer-config '{"kv_connector":"DynamoExtConnector",...}'`` just works;
  it also registers the ``dynamo_ext_curve`` KV event publisher
  (:mod:`~dynamo_ext.plugins.vllm.kv_events`, vLLM's framing over CURVE) with vLLM's
  ``EventPublisherFactory``;
* ``vllm.stat_logger_plugins`` -> :class:`~dynamo_ext.plugins.vllm.stats.DynamoExtStatLogger`:
  publishes ``WorkerMetrics`` from the engine's scheduler stats and registers the worker with
  the router. It is inert unless the worker is configured for dynamo-ext (our connector, or
  ``DYNAMO_EXT_*`` environment variables).

No module here is imported by the core or the router; vLLM is imported only inside this
package.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CONNECTOR_NAME = "DynamoExtConnector"


def _setup_logging() -> None:
    """vLLM configures only its own logger: give ours a handler in vLLM processes."""
    root = logging.getLogger("dynamo_ext")
    if root.handlers or logging.getLogger().handlers:
        return
    h = logging.StreamHandler()
    h.setFormatter(
        logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S")
    )
    root.addHandler(h)
    root.setLevel(logging.INFO)
    root.propagate = False


def register() -> None:
    """``vllm.general_plugins`` hook: called once per vLLM process, before engines start."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from dynamo_ext.plugins.vllm import kv_events

    _setup_logging()
    kv_events.register()
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(
        CONNECTOR_NAME, "dynamo_ext.plugins.vllm.connector", CONNECTOR_NAME
    )
    log.debug("registered %s with vLLM's KVConnectorFactory", CONNECTOR_NAME)
