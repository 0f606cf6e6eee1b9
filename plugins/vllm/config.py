"""The worker-side configuration of the vLLM plugin, from one place.

Read from ``kv_transfer_config.kv_connector_extra_config`` when the worker runs our
connector, else from ``DYNAMO_EXT_WORKER_*`` environment variables (extra config wins).
Validated once at start: a bad value stops vLLM with a ``ConfigError`` naming the field.

=====================  ====================================  =================================
extra config key       environment variable                  meaning
=====================  ====================================  =================================
``router``             ``DYNAMO_EXT_WORKER_ROUTER``          router control socket to register
``worker_id``          ``DYNAMO_EXT_WORKER_ID``              id in the router (host:port)
``role``               ``DYNAMO_EXT_WORKER_ROLE``            prefill | decode | both
``metrics_endpoint``   ``DYNAMO_EXT_WORKER_METRICS``         PUB for WorkerMetrics
``metrics_period_s``   ``DYNAMO_EXT_WORKER_METRICS_PERIOD``  seconds between metrics (0.5)
``http_endpoint``      ``DYNAMO_EXT_WORKER_HTTP``            URL the router hands to gateways
``advertise_host``     ``DYNAMO_EXT_WORKER_HOST``            host for tcp://* in endpoints
=====================  ====================================  =================================

The variables were ``DYNAMO_EXT_ROUTER``, ``DYNAMO_EXT_ROLE``, ... before the
``DYNAMO_EXT_WORKER_`` prefix (``dynamo_ext.worker_env``); the old names still work, with a
deprecation warning.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from dynamo_ext.config import advertise, build
from dynamo_ext.errors import ConfigError
from dynamo_ext.worker_env import worker_env

_ENV = {
    "router": "DYNAMO_EXT_WORKER_ROUTER",
    "worker_id": "DYNAMO_EXT_WORKER_ID",
    "role": "DYNAMO_EXT_WORKER_ROLE",
    "metrics_endpoint": "DYNAMO_EXT_WORKER_METRICS",
    "metrics_period_s": "DYNAMO_EXT_WORKER_METRICS_PERIOD",
    "http_endpoint": "DYNAMO_EXT_WORKER_HTTP",
    "advertise_host": "DYNAMO_EXT_WORKER_HOST",
}

# Keys of kv_connector_extra_config that belong to other code (vLLM's NixlConnector,
# composed offload connectors, batch prefill), accepted and passed through.
PASSTHROUGH_KEYS = {
    "backends",
    "connectors",
    "batch_prefill",
    "enforce_handshake_compat",
    # read by vLLM 0.32's NIXL connector (nixl/base_scheduler.py, base_worker.py)
    "bidirectional_kv_xfer",
    "decoder_kv_blocks_ttl",
    "engine_ttl",
    "kv_lease_duration",
    "kv_recompute_threshold",
    "num_threads",
    "push_registration_timeout",
}


class WorkerPluginConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    router: str | None = None
    worker_id: str | None = None
    role: Literal["prefill", "decode", "both"] | None = None
    metrics_endpoint: str | None = None
    metrics_period_s: float = 0.5
    http_endpoint: str | None = None
    advertise_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name in ("router", "metrics_endpoint"):
            v = getattr(self, name)
            if v is not None and not v.startswith(("tcp://", "ipc://", "inproc://")):
                raise ConfigError(name, f"must be a ZMQ endpoint like tcp://host:port, got {v!r}")
        if self.metrics_period_s <= 0:
            raise ConfigError("metrics_period_s", "must be > 0")

    @property
    def enabled(self) -> bool:
        return self.router is not None or self.metrics_endpoint is not None


def _argv_value(flag: str) -> str | None:
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def load_worker_config(
    extra: dict[str, Any] | None, env: dict[str, str] | None = None
) -> WorkerPluginConfig:
    env = dict(os.environ) if env is None else env
    data: dict[str, Any] = {}
    for key, var in _ENV.items():
        value = worker_env(env, var)
        if value is not None:
            data[key] = value
    for key, value in (extra or {}).items():
        if key in PASSTHROUGH_KEYS:
            continue
        data[key] = value
    unknown = sorted(set(data) - set(WorkerPluginConfig.__struct_fields__))
    if unknown:
        raise ConfigError(
            f"kv_connector_extra_config.{unknown[0]}",
            f"unknown key; known: {sorted([*_ENV, *PASSTHROUGH_KEYS])}",
        )
    try:
        cfg = build(WorkerPluginConfig, data)
    except ConfigError as exc:
        field, message = exc.field, str(exc)
        # A check in __post_init__ reaches us wrapped by msgspec: name its own field.
        inner = exc.__cause__.__cause__ if exc.__cause__ is not None else None
        if isinstance(inner, ConfigError):
            field, message = inner.field, str(inner)
        message = message.removeprefix(f"invalid config field {field!r}: ")
        raise ConfigError(f"kv_connector_extra_config.{field}", message) from exc
    return cfg


def default_http_endpoint(cfg: WorkerPluginConfig) -> str:
    """The OpenAI server's URL: explicit, else from this process's --host/--port flags."""
    if cfg.http_endpoint:
        return cfg.http_endpoint
    host = _argv_value("--host") or cfg.advertise_host
    if host in ("0.0.0.0", "::", ""):
        host = cfg.advertise_host
    port = _argv_value("--port") or "8000"
    return f"http://{host}:{port}"


def default_worker_id(cfg: WorkerPluginConfig) -> str:
    if cfg.worker_id:
        return cfg.worker_id
    return f"{socket.gethostname()}:{_argv_value('--port') or '8000'}"


# --- the connector's start-up check (kept free of vLLM imports) ---------------------------

KV_ROLES: tuple[str, ...] = ("kv_producer", "kv_consumer", "kv_both")
# which worker roles each kv_role can play
_ROLES_OF: dict[str, tuple[str, ...]] = {
    "kv_producer": ("prefill", "both"),
    "kv_consumer": ("decode", "both"),
    "kv_both": ("prefill", "decode", "both"),
}
DEFAULT_ROLE: dict[str, str] = {
    "kv_producer": "prefill",
    "kv_consumer": "decode",
    "kv_both": "both",
}


def validate_connector_config(
    kv_role: str | None,
    extra: Mapping[str, Any] | None,
    env: dict[str, str] | None = None,
) -> WorkerPluginConfig:
    """Check ``kv_role`` and our part of ``kv_connector_extra_config``; return the worker
    config with ``role`` filled in from ``kv_role`` when not given.

    Raises ``ConfigError`` naming the field (``kv_role``, ``kv_connector_extra_config.X``).
    """
    if kv_role not in KV_ROLES:
        raise ConfigError("kv_role", f"must be one of {list(KV_ROLES)}, got {kv_role!r}")
    if extra is not None and not isinstance(extra, Mapping):
        raise ConfigError(
            "kv_connector_extra_config", f"must be a JSON object, got {type(extra).__name__}"
        )
    if extra and extra.get("offload") is not None:
        raise ConfigError(
            "kv_connector_extra_config.offload",
            "offload is composed with vLLM's MultiConnector: DynamoExtConnector and "
            "OffloadingConnector as children; dynamo_ext.plugins.vllm.offload."
            "offload_transfer_config(..., nixl={...}) builds that config",
        )
    cfg = load_worker_config(dict(extra or {}), env)
    if cfg.role is None:
        return msgspec.structs.replace(cfg, role=DEFAULT_ROLE[kv_role])
    if cfg.role not in _ROLES_OF[kv_role]:
        raise ConfigError(
            "kv_connector_extra_config.role",
            f"role {cfg.role!r} needs kv_role "
            f"{'kv_producer' if cfg.role == 'prefill' else 'kv_consumer'} (or kv_both), "
            f"got kv_role {kv_role!r}",
        )
    return cfg


def connector_configs(kv_connector: str | None, extra: Mapping[str, Any] | None) -> list[dict]:
    """The flat list of connector configs in a kv-transfer config: itself, or the children
    of a ``MultiConnector`` (``{"kv_connector": ..., "kv_connector_extra_config": ...}``)."""
    extra = dict(extra or {})
    if kv_connector == "MultiConnector":
        return [dict(c) for c in extra.get("connectors", []) if isinstance(c, Mapping)]
    return [{"kv_connector": kv_connector, "kv_connector_extra_config": extra}]


def prefetch_endpoint_of(
    kv_connector: str | None, extra: Mapping[str, Any] | None, host: str
) -> str | None:
    """The prefetch socket of the worker's pool tier, as the router should dial it."""
    for c in connector_configs(kv_connector, extra):
        if c.get("kv_connector") != "OffloadingConnector":
            continue
        for tier in (c.get("kv_connector_extra_config") or {}).get("secondary_tiers", []):
            if isinstance(tier, Mapping) and tier.get("type") == "PoolTier":
                ep = tier.get("prefetch_endpoint")
                if ep:
                    return advertise(str(ep), host)
    return None
