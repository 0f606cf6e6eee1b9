"""Frontend configuration (file, ``DYNAMO_EXT_FRONTEND__*`` env, flags; see dynamo_ext.config).

Conditional disaggregation defaults: a request is prefilled on a remote prefill worker only
when the decode worker would have to compute at least ``min_remote_prefill_tokens`` prompt
tokens itself (what is not already in its cache) and the chosen prefill worker's queue holds
at most ``max_prefill_queue_tokens``; otherwise the decode worker prefills locally, which
avoids a transfer that costs more than it saves on short or mostly cached prompts.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from dynamo_ext.errors import ConfigError
from dynamo_ext.frontend.auth import FrontendSecurity


class FrontendConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str  # model folder: its tokenizer and chat template are used here
    served_model_name: str | None = None  # name clients use (default: ``model``)
    host: str = "127.0.0.1"
    port: int = 8080
    router: str = "tcp://127.0.0.1:5600"
    # Deadline of every router call, send included: a router that is down or hung costs a
    # request at most this before its 503 (the client then fails fast while it stays down).
    router_timeout_s: float = 1.0
    # default: what the workers' /v1/models report (their --max-model-len), else the
    # model's max_position_embeddings
    max_model_len: int | None = None
    # conditional disaggregation
    disaggregation: bool = True
    min_remote_prefill_tokens: int = 256
    max_prefill_queue_tokens: int = 16384
    # fault tolerance
    migration_limit: int = 3
    upstream_connect_timeout_s: float = 2.0
    request_timeout_s: float = 600.0  # upstream read timeout, and the default deadline
    # Whole-request deadline (queue, routing, generation); a client may ask for less with
    # the X-Request-Timeout header (seconds). Past it: 504, or an error event mid-stream.
    request_deadline_s: float = 600.0
    # Admission: requests served at once; beyond it they wait in a queue of at most
    # max_queued_requests (then 429) for at most queue_timeout_s (then 503), Retry-After set.
    max_concurrent_requests: int = 256
    max_queued_requests: int = 1024
    queue_timeout_s: float = 30.0
    tokenizer_threads: int = 2  # tokenization runs in this pool, off the event loop
    # Who chooses the worker: our router ("router"), or Dynamo's own selection core
    # (ai-dynamo-runtime's SelectionService, in this process) over the fleet our router
    # registers, mirrored every dynamo_core_refresh_s (dynamo_ext.frontend.dynamo_core).
    # dynamo_core serves aggregated vLLM workers only: no disaggregation, no tenants.
    # "embedded": our router in this process (dynamo_ext.frontend.embedded), bound at
    # ``router`` for the workers to register with, configured by ``embedded_router``
    # (RouterConfig's fields); the frontend's routes skip the socket, as Dynamo's frontend
    # calls its KV router in process.
    routing_backend: Literal["router", "dynamo_core", "embedded"] = "router"
    embedded_router: dict[str, Any] = {}
    dynamo_core_refresh_s: float = 1.0
    # KvRouterConfig knobs of Dynamo's core (dynamo_core.DYNAMO_KNOBS); its defaults if empty
    dynamo_core_knobs: dict[str, float] = {}
    # what the core's prefill load model assumes of each worker (None: its default)
    dynamo_core_max_num_batched_tokens: int | None = None
    # API keys, TLS, CURVE keys for the router (dynamo_ext.frontend.auth)
    security: FrontendSecurity = msgspec.field(default_factory=FrontendSecurity)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError("port", f"not a port: {self.port}")
        if not self.router_timeout_s > 0:
            raise ConfigError("router_timeout_s", f"must be > 0, got {self.router_timeout_s}")
        if self.migration_limit < 0:
            raise ConfigError("migration_limit", "must be >= 0")
        for name in ("max_concurrent_requests", "tokenizer_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_queued_requests < 0:
            raise ConfigError("max_queued_requests", "must be >= 0")
        for name in ("request_deadline_s", "queue_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.min_remote_prefill_tokens < 0:
            raise ConfigError("min_remote_prefill_tokens", "must be >= 0")
        if not self.router.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError("router", f"must be a ZMQ endpoint, got {self.router!r}")
        if self.routing_backend == "dynamo_core":
            self._check_dynamo_core()
        if self.routing_backend == "embedded":
            self.embedded_router_config()  # its errors now, at load, not at the first request

    def embedded_router_config(self) -> Any:
        """The embedded router's ``RouterConfig`` (``embedded_router`` bound at ``router``)."""
        from dynamo_ext.frontend.embedded import router_config

        return router_config(self.router, self.embedded_router)

    def _check_dynamo_core(self) -> None:
        from dynamo_ext.frontend import dynamo_core

        if not dynamo_core.dynamo_available():
            raise ConfigError(
                "routing_backend",
                "dynamo_core needs Dynamo's selection core: pip install ai-dynamo-runtime "
                "(import dynamo._core failed)",
            )
        if self.disaggregation:
            raise ConfigError(
                "routing_backend",
                "dynamo_core selects among aggregated workers only: set disaggregation: false "
                "(--no-disaggregation)",
            )
        if self.security.router.secret_key_file or self.security.router.server_public_key:
            raise ConfigError(
                "routing_backend",
                "dynamo_core subscribes to the workers' KV streams in plaintext: a fleet "
                "secured with CURVE keys cannot be routed by it",
            )
        bad = sorted(set(self.dynamo_core_knobs) - set(dynamo_core.DYNAMO_KNOBS))
        if bad:
            raise ConfigError(
                "dynamo_core_knobs", f"unknown {bad}; one of {sorted(dynamo_core.DYNAMO_KNOBS)}"
            )
        if not self.dynamo_core_refresh_s > 0:
            raise ConfigError(
                "dynamo_core_refresh_s", f"must be > 0, got {self.dynamo_core_refresh_s}"
            )

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
