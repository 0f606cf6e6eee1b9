"""The few exception classes of dynamo-ext."""

from __future__ import annotations


class DynamoExtError(Exception):
    """Base of every error we raise on purpose."""


class ConfigError(DynamoExtError, ValueError):
    """A configuration value is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid config field {field!r}: {message}")
        self.field = field


class ProtocolError(DynamoExtError):
    """A peer sent a message we cannot accept (malformed, wrong version, unknown type)."""


class RouterUnavailable(DynamoExtError):
    """The router did not answer in time."""


class NoWorkerAvailable(DynamoExtError):
    """The router has no live worker for the requested role."""


class DisaggError(DynamoExtError, ValueError):
    """A request cannot be disaggregated, or a prefill worker's answer carries no usable
    handshake for its decode worker (``dynamo_ext.frontend.handshake``)."""


class ApiError(DynamoExtError):
    """An error the HTTP API answers with as is: its status, and OpenAI's error fields
    (``{"error": {"message", "type", "param", "code"}}``); ``headers`` go on the response
    (``Retry-After`` on a 503)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers
