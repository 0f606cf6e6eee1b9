"""A worker's environment variables, one table for both engines' plugins.

A worker (a vLLM server with our plugin, an SGLang launcher) reads its settings from
``DYNAMO_EXT_WORKER_*`` variables, so that one prefix never means two things: the router's
own nested config is ``DYNAMO_EXT_ROUTER__A__B`` (``dynamo_ext.config``), and the router's
address for a worker is ``DYNAMO_EXT_WORKER_ROUTER``. The names before that split
(``DYNAMO_EXT_ROUTER``, ``DYNAMO_EXT_HOST``, ...) still work, with a ``DeprecationWarning``
and one log warning per name.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping

log = logging.getLogger(__name__)

PREFIX = "DYNAMO_EXT_WORKER_"

# current name -> the name it had before (read when the current one is unset)
RENAMED: dict[str, str] = {
    "DYNAMO_EXT_WORKER_ROUTER": "DYNAMO_EXT_ROUTER",
    "DYNAMO_EXT_WORKER_ROLE": "DYNAMO_EXT_ROLE",
    "DYNAMO_EXT_WORKER_HOST": "DYNAMO_EXT_HOST",
    "DYNAMO_EXT_WORKER_HTTP": "DYNAMO_EXT_HTTP",
    "DYNAMO_EXT_WORKER_METRICS": "DYNAMO_EXT_METRICS",
    "DYNAMO_EXT_WORKER_METRICS_PERIOD": "DYNAMO_EXT_METRICS_PERIOD",
    # the SGLang launcher's own
    "DYNAMO_EXT_WORKER_KV_ENDPOINT": "DYNAMO_EXT_KV_ENDPOINT",
    "DYNAMO_EXT_WORKER_REPLAY_ENDPOINT": "DYNAMO_EXT_REPLAY_ENDPOINT",
    "DYNAMO_EXT_WORKER_RESYNC_S": "DYNAMO_EXT_RESYNC_S",
    "DYNAMO_EXT_WORKER_BLOCK_SIZE": "DYNAMO_EXT_BLOCK_SIZE",
    "DYNAMO_EXT_WORKER_HASH_ALGO": "DYNAMO_EXT_HASH_ALGO",
    "DYNAMO_EXT_WORKER_HASH_SEED": "DYNAMO_EXT_HASH_SEED",
    "DYNAMO_EXT_WORKER_TRANSFER_BACKEND": "DYNAMO_EXT_TRANSFER_BACKEND",
    "DYNAMO_EXT_WORKER_BOOTSTRAP_PORT": "DYNAMO_EXT_BOOTSTRAP_PORT",
}

_warned: set[str] = set()


def worker_env(env: Mapping[str, str], name: str) -> str | None:
    """The value of ``name`` in ``env`` (empty counts as unset), else of its old name."""
    value = env.get(name)
    if value:
        return value
    old = RENAMED.get(name)
    if old is None or not env.get(old):
        return None
    message = f"environment variable {old} is deprecated: use {name}"
    warnings.warn(message, DeprecationWarning, stacklevel=2)
    if old not in _warned:
        _warned.add(old)
        log.warning("%s", message)
    return env[old]
