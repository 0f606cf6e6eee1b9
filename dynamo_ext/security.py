"""CURVE keys and authenticated ZeroMQ sockets: who may speak on the planes we own.

Every ZeroMQ socket of dynamo-ext can run CurveZMQ (encrypted, and each peer proves it holds
the secret half of a public key). A key file is ZeroMQ's own certificate format
(``zmq.auth.load_certificate`` reads it): ``NAME.key`` holds both halves and is mode 0600,
``NAME.key.pub`` the public half only, for whoever must trust it. ``dynamo-ext keys gen`` makes
them, ``dynamo-ext keys show`` prints a public key and its short id.

A binding socket is the CURVE server: it knows its own secret key, and a ZAP handler
(``zmq.auth``) checks each connecting client's public key against an allow-list with roles
(``worker``, ``frontend``, ``router``). The handler sets the ZMQ ``User-Id`` of every message
from a client to the client's Z85 public key, so the receiver can tell who spoke
(:func:`peer_key`). A connecting socket is the CURVE client and must know the server's
public key beforehand: that is what stops an impostor from standing in for a peer.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec
import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils import z85

from dynamo_ext.errors import ConfigError

log = logging.getLogger("dynamo_ext.security")

KeyRole = Literal["worker", "frontend", "router"]
ROLES: tuple[KeyRole, ...] = ("worker", "frontend", "router")
ZAP_DOMAIN = "dynamo-ext"
SECRET_SUFFIX = ".key"
PUBLIC_SUFFIX = ".key.pub"

# Environment of a worker process (vLLM plugin, SGLang sidecar, publishers): its key file
# and the router's public key; the router is then the only subscriber its sockets admit.
ENV_SECRET = "DYNAMO_EXT_WORKER_CURVE_SECRET_KEY"
ENV_SERVER = "DYNAMO_EXT_WORKER_CURVE_SERVER_KEY"
ENV_ALLOW_DIR = "DYNAMO_EXT_WORKER_CURVE_ALLOW_DIR"


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes | None  # Z85, 40 bytes; None for a public-only file


def key_id(public: bytes | str) -> str:
    """A short, stable name of a public key for logs and metrics (never the key itself)."""
    raw = public.encode() if isinstance(public, str) else public
    return hashlib.sha256(raw).hexdigest()[:12]


def _write_cert(path: Path, public: bytes, secret: bytes | None, mode: int) -> None:
    lines = [
        f"#   dynamo-ext CURVE {'secret' if secret else 'public'} key, {time.ctime()}",
        "#   ZeroMQ certificate format (zmq.auth.load_certificate reads it)",
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    # Created with its final mode: a secret is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, mode)


def generate_keys(directory: str | Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (both halves, 0600) and ``NAME.key.pub``; return (secret, public)."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError("name", f"not a key name: {name!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sec, pub = d / f"{name}{SECRET_SUFFIX}", d / f"{name}{PUBLIC_SUFFIX}"
    for p in (sec, pub):
        if p.exists():
            if not force:
                raise ConfigError("name", f"{p} exists (use --force to replace it)")
            p.unlink()
    public, secret = zmq.curve_keypair()
    _write_cert(sec, public, secret, 0o600)
    _write_cert(pub, public, None, 0o644)
    return sec, pub


def _is_z85_key(s: str) -> bool:
    # Z85's alphabet has "/" and ".": a 40-character path is a path only if it exists.
    return len(s) == 40 and not os.path.exists(s)


def load_keypair(path: str | Path, field_name: str = "secret_key_file") -> KeyPair:
    """Read a secret key file; refuse one that others may read."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise ConfigError(field_name, f"cannot read {p}: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            field_name, f"{p} is readable by others (mode {mode & 0o777:o}): chmod 600"
        )
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise ConfigError(field_name, f"{p} is not a key file: {exc}") from exc
    if secret is None:
        raise ConfigError(field_name, f"{p} holds no secret key (a .pub file?)")
    return KeyPair(public, secret)


def load_public(spec: str, field_name: str = "server_public_key") -> bytes:
    """A public key given inline (40 Z85 characters) or as a key file (.pub or secret)."""
    if _is_z85_key(spec):
        try:
            z85.decode(spec)
        except ValueError as exc:
            raise ConfigError(field_name, f"not a Z85 key: {exc}") from exc
        return spec.encode()
    try:
        public, _ = zmq.auth.load_certificate(spec)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            field_name, f"{spec!r} is neither a Z85 key nor a key file: {exc}"
        ) from exc
    return public


class AllowedKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    key: str  # Z85 public key or a path to its key file
    role: KeyRole = "worker"
    name: str = ""
    # Worker ids this key may register (fnmatch patterns, "prefill-*"); None: any id not yet
    # bound to another key. Patterns close the window after a router restart, when the first
    # registrant of an id would otherwise win it.
    workers: list[str] | None = None


class CurveConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The CURVE settings of one process.

    ``secret_key_file``: this process's key (server role on what it binds, client role on
    what it connects). ``server_public_key``: the router's key, for sockets that connect to
    it (workers, frontends); a worker's own sockets admit it as a subscriber. ``allow``: client
    keys by role; ``allow_dir``: a folder whose ``worker/``, ``frontend/`` and ``router/``
    subfolders hold ``.pub`` files, re-read on start (add a worker: drop its .pub in, restart).
    """

    secret_key_file: str | None = None
    server_public_key: str | None = None
    allow: list[AllowedKey] = []
    allow_dir: str | None = None

    @property
    def enabled(self) -> bool:
        return self.secret_key_file is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CurveConfig:
        env = os.environ if environ is None else environ
        return cls(
            secret_key_file=env.get(ENV_SECRET) or None,
            server_public_key=env.get(ENV_SERVER) or None,
            allow_dir=env.get(ENV_ALLOW_DIR) or None,
        )


@dataclass(slots=True)
class Allowlist:
    """Client public keys (Z85 bytes) and their roles."""

    roles: dict[bytes, KeyRole] = field(default_factory=dict)
    names: dict[bytes, str] = field(default_factory=dict)
    workers: dict[bytes, list[str]] = field(default_factory=dict)

    def add(
        self, public: bytes, role: KeyRole, name: str = "", workers: list[str] | None = None
    ) -> None:
        self.roles[public] = role
        self.names[public] = name or key_id(public)
        if workers is not None:
            self.workers[public] = workers

    def may_own(self, public: bytes | str, worker_id: str) -> bool:
        """Whether the key may register ``worker_id`` (its ``workers`` patterns, if any)."""
        pats = self.workers.get(public.encode() if isinstance(public, str) else public)
        return pats is None or any(fnmatch.fnmatchcase(worker_id, p) for p in pats)

    def role_of(self, public: bytes | str | None) -> KeyRole | None:
        if public is None:
            return None
        return self.roles.get(public.encode() if isinstance(public, str) else public)

    def __len__(self) -> int:
        return len(self.roles)


@dataclass(frozen=True, slots=True)
class Curve:
    """A loaded :class:`CurveConfig`: keys in memory, ready to put on sockets."""

    keys: KeyPair
    server_public: bytes | None
    allowlist: Allowlist

    def server(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (before bind); its context needs an authenticator."""
        assert self.keys.secret is not None
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()

    def client(self, sock: zmq.Socket, server_public: bytes | None = None) -> None:
        """Make ``sock`` a CURVE client of ``server_public`` (default: the configured
        server's key); applies to the next ``connect``."""
        server = server_public or self.server_public
        if server is None:
            raise ConfigError("server_public_key", "needed to connect a CURVE client socket")
        assert self.keys.secret is not None
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_serverkey = server


def load_curve(cfg: CurveConfig, prefix: str = "security") -> Curve | None:
    """Load the keys of ``cfg``; None when CURVE is off (no secret key file)."""
    if cfg.secret_key_file is None:
        if cfg.allow or cfg.allow_dir or cfg.server_public_key:
            raise ConfigError(f"{prefix}.secret_key_file", "CURVE settings given without a key")
        return None
    keys = load_keypair(cfg.secret_key_file, f"{prefix}.secret_key_file")
    server = (
        load_public(cfg.server_public_key, f"{prefix}.server_public_key")
        if cfg.server_public_key
        else None
    )
    allow = Allowlist()
    for i, a in enumerate(cfg.allow):
        allow.add(load_public(a.key, f"{prefix}.allow[{i}].key"), a.role, a.name, a.workers)
    if cfg.allow_dir is not None:
        root = Path(cfg.allow_dir)
        if not root.is_dir():
            raise ConfigError(f"{prefix}.allow_dir", f"{root} is not a directory")
        for role in ROLES:
            for p in sorted((root / role).glob("*.pub")):
                allow.add(load_public(str(p), f"{prefix}.allow_dir"), role, p.name[:-4])
    if server is not None and allow.role_of(server) is None:
        allow.add(server, "router", "router")  # a worker's sockets admit the router
    return Curve(keys, server, allow)


class _Provider:
    """ZAP credentials callback: admit allow-listed keys, tell the caller of each refusal."""

    def __init__(self, allow: Allowlist, on_denied: Callable[[str], None] | None) -> None:
        self.allow = allow
        self.on_denied = on_denied

    def callback(self, domain: str, key: bytes) -> bool:
        if self.allow.role_of(key) is not None:
            return True
        kid = key_id(key)
        if self.on_denied is not None:
            self.on_denied(kid)
        else:
            log.warning("CURVE handshake refused: key %s is not allow-listed", kid)
        return False


def start_authenticator(
    ctx: zmq.Context, curve: Curve, on_denied: Callable[[str], None] | None = None
) -> zmq.auth.Authenticator:
    """Run a ZAP handler for every CURVE server socket of ``ctx`` (one per context).

    An asyncio context gets ``AsyncioAuthenticator`` (call from its running loop), a plain
    one a ``ThreadAuthenticator``. ``on_denied(key_id)`` hears of each refused key.
    """
    auth: zmq.auth.Authenticator
    if isinstance(ctx, zmq.asyncio.Context):
        from zmq.auth.asyncio import AsyncioAuthenticator

        auth = AsyncioAuthenticator(ctx)
    else:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(ZAP_DOMAIN, _Provider(curve.allowlist, on_denied))
    return auth


def peer_key(frame: zmq.Frame) -> str | None:
    """The Z85 public key of the client that sent ``frame`` (CURVE server sockets only)."""
    try:
        return frame.get("User-Id")  # type: ignore[return-value]
    except zmq.ZMQError:
        return None


_LOOPBACK = ("tcp://127.", "tcp://localhost:", "tcp://[::1]:", "ipc://", "inproc://")


def is_loopback(endpoint: str) -> bool:
    return endpoint.startswith(_LOOPBACK)


def check_bind(endpoint: str, field_name: str, secured: bool, insecure: bool) -> None:
    """Without keys only loopback binds, unless ``insecure`` says the operator means it."""
    if secured or insecure or is_loopback(endpoint):
        return
    raise ConfigError(
        field_name,
        f"{endpoint} is reachable from other hosts and no CURVE keys are set: configure "
        "security.secret_key_file (dynamo-ext keys gen) or pass --insecure",
    )


__all__ = [
    "Allowlist",
    "AllowedKey",
    "Curve",
    "CurveConfig",
    "KeyPair",
    "check_bind",
    "generate_keys",
    "is_loopback",
    "key_id",
    "load_curve",
    "load_keypair",
    "load_public",
    "peer_key",
    "start_authenticator",
]
