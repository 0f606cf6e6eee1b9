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
