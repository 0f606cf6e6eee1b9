"""The frontend's door: API keys, models per key, per-key limits, tenants, TLS.

``ApiKeyDoor`` is an ASGI middleware in front of every ``/v1/`` route (``/health`` and
``/metrics`` stay open for probes and scrapers). A request needs ``Authorization: Bearer
KEY`` with a key from the keys file (401 otherwise); a key may be limited to some models
(403 for another), to a request rate and to a token rate (429 with ``Retry-After``, token
buckets refilled continuously). The keys file is re-read when its mtime changes, so keys are
added and revoked without a restart::

    keys:
      - key: sk-live-...            # or key_sha256: <hex digest of the key>
        name: alice
        tenant: acme                # requests get vLLM's cache_salt for this tenant
        models: [tiny-llama]        # absent: every model
        requests_per_minute: 60
        tokens_per_minute: 100000   # prompt + max_tokens, charged on admission

A key's tenant becomes vLLM's per-request ``cache_salt`` (its first block's hash covers the
salt, so one tenant's cached prefixes never serve, or reveal by timing, another's). The door
puts the salt of the request being served in a context variable: the frontend adds it to the
body it sends the worker (:func:`tenant_fields`), and :class:`TenantRouterClient` sends it to
the router, which hashes the prompt with it as the engine does. A client cannot pick its own
salt: the frontend forwards only the sampling fields it knows.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import msgspec

from dynamo_ext.config import build, read_config_file
from dynamo_ext.errors import ConfigError
from dynamo_ext.router.client import RouterClient
from dynamo_ext.security import CurveConfig

log = logging.getLogger("dynamo_ext.frontend.auth")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The cache_salt of the request being served (None: no tenant).
current_salt: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dynamo_ext_cache_salt", default=None
)
_RELOAD_CHECK_S = 1.0
_MAX_BODY = 64 << 20


class ApiKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    key: str | None = None
    key_sha256: str | None = None
    name: str = ""
    tenant: str | None = None
    models: list[str] | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def __post_init__(self) -> None:
        if (self.key is None) == (self.key_sha256 is None):
            raise ConfigError("keys[].key", "give exactly one of key, key_sha256")
        for n in ("requests_per_minute", "tokens_per_minute"):
            v = getattr(self, n)
            if v is not None and v <= 0:
                raise ConfigError(f"keys[].{n}", "must be > 0")

    @property
    def digest(self) -> str:
        return self.key_sha256 or _digest(self.key or "")


class KeysFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[ApiKey] = []


class FrontendSecurity(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``api_keys_file``: None leaves the door open (a warning says so). ``ssl_certfile`` and
    ``ssl_keyfile``: serve HTTPS. ``router``: CURVE keys for the router's control socket."""

    api_keys_file: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    router: CurveConfig = msgspec.field(default_factory=CurveConfig)

    def __post_init__(self) -> None:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ConfigError("security.ssl_keyfile", "TLS needs both ssl_certfile and ssl_keyfile")


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def salt_of(tenant: str) -> str:
    """The cache_salt of a tenant (stable: a restart keeps the tenant's cache)."""
    return f"tenant:{tenant}"


@dataclass(slots=True)
class Bucket:
    """A token bucket: ``rate`` per second, holding at most ``capacity``."""

    rate: float
    capacity: float
    level: float = -1.0
    at: float = 0.0

    def take(self, n: float, now: float) -> float:
        """Take ``n`` if there; else 0 taken and the seconds until there would be."""
        if self.level < 0:  # first use: a full bucket
            self.level, self.at = self.capacity, now
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        n = min(n, self.capacity)  # a request larger than the bucket waits for a full one
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) / self.rate


class KeyStore:
    """The keys file, re-read when it changes; per-key buckets survive a reload."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.by_digest: dict[str, ApiKey] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self.reload(force=True)

    def reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < _RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as exc:
            if force:
                raise ConfigError(
                    "security.api_keys_file", f"cannot read {self.path}: {exc}"
                ) from exc
            log.error("API keys file %s unreadable (%s): keeping the keys loaded", self.path, exc)
            return
        if mtime == self._mtime:
            return
        try:
            keys = build(KeysFile, read_config_file(self.path)).keys
        except ConfigError as exc:
            if force:
                raise
            log.error("API keys file %s invalid (%s): keeping the keys loaded", self.path, exc)
            return
        self.by_digest = {k.digest: k for k in keys}
        self._mtime = mtime
        log.info("API keys loaded from %s: %d keys", self.path, len(keys))

    def lookup(self, presented: str) -> ApiKey | None:
        self.reload()
        return self.by_digest.get(_digest(presented))

    def bucket(self, k: ApiKey, kind: str, per_minute: float) -> Bucket:
        b = self._buckets.get((k.digest, kind))
        if b is None or b.capacity != per_minute:
            b = self._buckets[(k.digest, kind)] = Bucket(per_minute / 60.0, per_minute)
        return b


def _prompt_text(body: dict[str, Any]) -> str | list[int]:
    if "prompt" in body:
        p = body["prompt"]
        return p if isinstance(p, str | list) else str(p)
    parts = []
    for m in body.get("messages") or []:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts += [str(x.get("text", "")) for x in c if isinstance(x, dict)]
    return "\n".join(parts)


class ApiKeyDoor:
    """ASGI middleware: authenticate, authorize the model, apply limits, set the salt."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyStore,
        count_tokens: Callable[[str], int],
        on_refused: Callable[[int, str], None] | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.count_tokens = count_tokens
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        key = self.keys.lookup(_bearer(scope))
        if key is None:
            await self._refuse(send, 401, "Invalid or missing API key.", "invalid_api_key")
            return
        body_bytes = b""
        if scope["method"] == "POST":
            body_bytes, receive = await _buffer(receive)
        body: dict[str, Any] = {}
        if body_bytes:
            try:
                parsed = json.loads(body_bytes)
                body = parsed if isinstance(parsed, dict) else {}
            except ValueError:
                body = {}  # the route answers 400 for it
        model = body.get("model")
        if key.models is not None and isinstance(model, str) and model not in key.models:
            await self._refuse(
                send, 403, f"This API key may not use model `{model}`.", "model_not_allowed"
            )
            return
        now = time.monotonic()
        if key.requests_per_minute is not None:
            wait = self.keys.bucket(key, "requests", key.requests_per_minute).take(1, now)
            if wait:
                await self._refuse(send, 429, "Request rate limit reached.", "rate_limit", wait)
                return
        if key.tokens_per_minute is not None and body:
            n = self._estimate(body)
            wait = self.keys.bucket(key, "tokens", key.tokens_per_minute).take(n, now)
            if wait:
                await self._refuse(send, 429, "Token rate limit reached.", "token_limit", wait)
                return
        token = current_salt.set(salt_of(key.tenant) if key.tenant else None)
        try:
            await self.app(scope, receive, send)
        finally:
            current_salt.reset(token)

    def _estimate(self, body: dict[str, Any]) -> int:
        """Tokens a request may cost: its prompt plus the most it may generate."""
        p = _prompt_text(body)
        prompt = len(p) if isinstance(p, list) else self.count_tokens(p)
        out = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        return prompt + (int(out) if isinstance(out, int | float) else 16)

    async def _refuse(
        self, send: Send, status: int, message: str, code: str, retry_after: float = 0.0
    ) -> None:
        if self.on_refused is not None:
            self.on_refused(status, code)
        kind = {401: "authentication_error", 403: "permission_error"}.get(
            status, "rate_limit_error"
        )
        payload = json.dumps(
            {"error": {"message": message, "type": kind, "param": None, "code": code}}
        ).encode()
        headers = [(b"content-type", b"application/json")]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="dynamo-ext"'))
        if retry_after:
            headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _bearer(scope: Scope) -> str:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


async def _buffer(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole body; return it and a ``receive`` that replays it to the app."""
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            break
        chunks.append(chunk)
        more = msg.get("more_body", False)
    body = b"".join(chunks)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def install(app: Any, sec: FrontendSecurity, count_tokens: Callable[[str], int]) -> None:
    """Put the door in front of ``app`` (a FastAPI/Starlette app) when keys are configured."""
    if sec.api_keys_file is None:
        log.warning("no security.api_keys_file: the frontend serves anyone who reaches it")
        return
    app.add_middleware(ApiKeyDoor, keys=KeyStore(sec.api_keys_file), count_tokens=count_tokens)


def tenant_fields() -> dict[str, str]:
    """Fields to add to the worker's request body for the request being served."""
    salt = current_salt.get()
    return {"cache_salt": salt} if salt else {}


class TenantRouterClient(RouterClient):
    """A router client whose routes carry the salt of the request being served."""

    async def route(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if kwargs.get("cache_salt") is None:
            kwargs["cache_salt"] = current_salt.get()
        return await super().route(*args, **kwargs)
