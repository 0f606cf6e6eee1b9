"""Our router inside the frontend's process: the ``embedded`` routing backend.

Dynamo's frontend runs its KV router in its own process; so can ours. ``EmbeddedRouter``
starts a ``RouterServer`` on the frontend's event loop, bound where the workers register
(``FrontendConfig.router``): the workers, their KV and metrics streams and every other
router client see the same router as a standalone one. The frontend's own calls skip the
socket: a route hashes the prompt, matches and scores it in this process (``RouterService``
directly), with no encode, send, receive or decode on either side. A prompt longer than the
server's inline limit is hashed a chunk per event-loop turn, as the server does, so one huge
prompt never holds up the requests behind it.

What the router process would count it still counts (its Prometheus registry is appended to
the frontend's ``/metrics``); what it refuses it still refuses, with the same errors. One
router per frontend: in-flight load is what this frontend routed (Dynamo's frontend, without
replica sync, is the same).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import msgspec

from dynamo_ext.config import RouterConfig, build
from dynamo_ext.errors import ConfigError, RouterUnavailable
from dynamo_ext.frontend.auth import current_salt
from dynamo_ext.protocol import ErrorReply, ReplyMessage, RequestRole, RouteRequest, RouteResponse
from dynamo_ext.router.client import RouterClient
from dynamo_ext.router.server import INLINE_BLOCKS, RouterServer

log = logging.getLogger(__name__)

ORIGIN = "embedded"  # what the router's logs and counters name the frontend's calls


def router_config(bind: str, fields: dict[str, Any]) -> RouterConfig:
    """The embedded router's config: ``fields`` (``RouterConfig``'s), bound at ``bind``
    unless they say otherwise, its own Prometheus server off (the frontend serves it)."""
    data = {"bind": bind, "metrics_port": None, **fields}
    try:
        return build(RouterConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"embedded_router.{exc.field}", str(exc)) from exc


class EmbeddedRouter(RouterClient):
    """A router client whose router lives in this process (see the module's docstring)."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config.bind, timeout_s=1.0)
        self.server = RouterServer(config)
        self.service = self.server.service
        self._hashing = ""  # the service hashes token ids itself: never send hashes
        self._start: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle
    def connect(self) -> None:
        if self._start is None:
            self._start = asyncio.get_running_loop().create_task(
                self.server.start(), name="embedded-router-start"
            )

    async def started(self) -> None:
        """Once the server is bound and serving (raises what its start raised)."""
        self.connect()
        assert self._start is not None
        if not self._start.done():
            await self._start
        elif self._start.exception() is not None:
            raise RouterUnavailable(f"embedded router failed to start: {self._start.exception()}")

    @property
    def endpoint_bound(self) -> str | None:
        return self.server.bound_endpoint

    @property
    def reachable(self) -> bool:
        return self._start is not None and self._start.done() and not self._start.exception()

    async def close(self) -> None:
        if self._start is not None:
            if not self._start.done():
                self._start.cancel()
            try:
                await self._start
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing anyway
                pass
            # Also after a failed start: a socket it opened keeps the server's context
            # from terminating (measured: a hang in Context.__del__ at exit).
            await self.server.stop()
            self._start = None

    # ---------------------------------------------------------------- calls, in process
    async def call(self, msg: msgspec.Struct) -> ReplyMessage:
        await self.started()
        return self.service.dispatch(msg, ORIGIN)  # type: ignore[return-value]

    async def notify(self, msg: msgspec.Struct) -> bool:
        await self.started()
        self.service.dispatch(msg, ORIGIN)
        return True

    async def route(
        self,
        request_id: str,
        token_ids: Sequence[int] | None = None,
        *,
        block_hashes: Sequence[int] | None = None,
        num_tokens: int | None = None,
        role: RequestRole = "aggregated",
        exclude_workers: Sequence[str] = (),
        track: bool = True,
        explain: bool = False,
        cache_salt: str | None = None,
    ) -> RouteResponse:
        if cache_salt is None:
            cache_salt = current_salt.get()
        if self._start is None or not self._start.done() or self._start.exception():
            await self.started()
        # A struct, not a copy: msgspec does not validate at construction, and the
        # service reads the token ids where they are.
        req = RouteRequest(
            request_id=request_id,
            role=role,
            exclude_workers=list(exclude_workers),
            track=track,
            explain=explain,
            cache_salt=cache_salt,
            token_ids=token_ids if block_hashes is None else None,  # type: ignore[arg-type]
            block_hashes=list(block_hashes) if block_hashes is not None else None,
            num_tokens=num_tokens,
        )
        svc = self.service
        long = token_ids is not None and block_hashes is None
        long = long and len(token_ids) > INLINE_BLOCKS * svc.config.block_size  # type: ignore[arg-type]
        if not long:
            reply = svc.dispatch(req, ORIGIN)
        else:
            reply = svc.check_request(req) or await self._route_long(req, token_ids or ())
        self._expect(reply, RouteResponse)  # type: ignore[arg-type]
        return reply  # type: ignore[return-value]

    async def _route_long(self, req: RouteRequest, token_ids: Sequence[int]) -> msgspec.Struct:
        hashes: list[int] = []
        for chunk in self.service.hash_chunks(token_ids, req.cache_salt):
            hashes += chunk
            await asyncio.sleep(0)  # the requests behind this one go on meanwhile
        try:
            return self.service.route_hashed(req, hashes, len(token_ids))
        except Exception as exc:  # as dispatch answers: one bad request, not the frontend
            log.exception("error routing %s", req.request_id[:64])
            return ErrorReply("internal", f"{type(exc).__name__}: {exc}", req.request_id)
