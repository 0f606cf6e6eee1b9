"""Typed configuration, loaded from a YAML/TOML file, then ``DYNAMO_EXT_*`` env vars, then flags.

One msgspec Struct per component. ``load_config`` merges the three sources in that order
and validates once at start: a wrong value fails with a ``ConfigError`` naming the field
path (``scorer.overlap_weight``), never later inside the hot path.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import msgspec
import yaml

from dynamo_ext.errors import ConfigError
from dynamo_ext.protocol import WorkerRegistration
from dynamo_ext.security import CurveConfig, check_bind

ScorerMode = Literal["kv", "dynamo", "round_robin", "random", "least_loaded"]


class ScorerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Cost of sending a request to a worker; the lowest cost wins.

    ``kv`` (default), in blocks of work:

        cost = overlap_weight * (new_prefill_blocks + queued_prefill_blocks)
             + miss_weight * busy_share * new_prefill_blocks
             + decode_weight * active_decode_blocks
             + running_weight * running + waiting_weight * waiting
             + kv_full_penalty * prompt_blocks   (only when kv_usage >= kv_high_watermark)

    where ``new_prefill_blocks = prompt_blocks - gpu_hits - sum(offload_hits)
    + sum(offload_hits[t] * tier_costs[t])``: an offload-tier hit costs a fraction of a
    recompute (``offload_score`` = blocks saved); ``busy_share`` is the share of workers
    with prefill queued. Queued prefill, active decode blocks (each shared block once) and
    requests are the router's own reservations plus what the worker's last metrics showed
    beyond them (load someone else routed); before any metrics, the reservations alone.

    ``dynamo`` reproduces Dynamo's KV router: ``overlap_weight * potential_prefill_blocks +
    potential_decode_blocks`` with GPU overlap only, softmax sampling at ``temperature``.
    """

    mode: ScorerMode = "kv"
    overlap_weight: float = 1.0
    # A block still to prefill costs the next token ~2 ms of GPU time; a block held by a
    # running request slows each of its decode steps far less. The defaults weigh them
    # 16:1; `dynamo-ext bench tune` sweeps these knobs and Dynamo's with the same budget.
    decode_weight: float = 0.0625
    tier_costs: dict[str, float] = msgspec.field(
        default_factory=lambda: {"CPU": 0.1, "DISK": 0.3, "STORAGE": 0.3, "REMOTE": 0.5}
    )
    running_weight: float = 0.0625
    waiting_weight: float = 0.5
    kv_high_watermark: float = 0.95
    kv_full_penalty: float = 1.0
    temperature: float = 0.0
    # ``kv``: credit a prompt's blocks that requests routed to a worker and not finished
    # hold there (in flight: computed by the time it runs, unknown to the index yet). Needs
    # the router to reserve requests with their hashes (``ActiveSequences.add(hashes=)``).
    inflight_credit: bool = True
    # ``kv``: extra cost per prompt block the worker would compute, beyond its time there
    # (which ``overlap_weight`` prices), scaled by the share of workers with prefill queued:
    # on a busy fleet every recomputed block is work that delays the requests after it,
    # on an idle one it delays no one. Chosen on the sample trace (`dynamo-ext bench tune`).
    miss_weight: float = 2.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.overlap_weight < 0:
            raise ConfigError("scorer.overlap_weight", "must be >= 0")
        if self.decode_weight < 0:
            raise ConfigError("scorer.decode_weight", "must be >= 0")
        if self.miss_weight < 0:
            raise ConfigError("scorer.miss_weight", "must be >= 0")
        if self.temperature < 0:
            raise ConfigError("scorer.temperature", "must be >= 0")
        for tier, c in self.tier_costs.items():
            if not 0.0 <= c <= 1.0:
                raise ConfigError(f"scorer.tier_costs.{tier}", "must be within [0, 1]")


@overload
def advertise(endpoint: str, host: str, *, any_host: bool = False) -> str: ...
@overload
def advertise(endpoint: str | None, host: str, *, any_host: bool = False) -> str | None: ...
def advertise(endpoint: str | None, host: str, *, any_host: bool = False) -> str | None:
    """``tcp://*:5557`` is where a publisher binds; subscribers connect to ``tcp://host:5557``.

    ``any_host``: replace whatever host the endpoint names, not only a wildcard (a process
    bound to one interface that peers reach under another name, as the mocker's
    ``--advertise-host``).
    """
    if endpoint is None:
        return None
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            return f"tcp://{host}:{endpoint[len(wildcard) :]}"
    if any_host:
        scheme, _, rest = endpoint.partition("://")
        return f"{scheme}://{host}:{rest.rpartition(':')[2]}"
    return endpoint


class RouterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    bind: str = "tcp://127.0.0.1:5600"  # ROUTER socket: route, register, report
    metrics_port: int | None = 9091  # Prometheus HTTP; 0: any free port; None: off
    metrics_host: str = "127.0.0.1"
    block_size: int = 16
    hash_mode: Literal["engine", "tokens"] = "engine"
    hash_algo: str = "sha256"
    hash_seed: str | None = None
    worker_timeout_s: float = 5.0  # no metrics for this long: worker down
    failure_holdoff_s: float = 5.0  # after a WorkerFailed report, ignore metrics this long
    request_ttl_s: float = 600.0  # forget predicted load of requests never reported done
    replay_timeout_s: float = 2.0
    initial_replay: bool = True  # on start, fetch each publisher's buffered history
    # A stream silent this long is asked for anything newer than its last seq: a batch
    # published while our SUB was still joining (ZMQ drops it) is then not lost for good
    # when the worker goes idle after it. 0: never.
    resync_interval_s: float = 5.0
    # 0: unbounded (engines bound their own caches); else the least recently stored blocks
    # of a worker's tier are evicted from the index past this many.
    max_blocks_per_worker: int = 0
    # A dynamic worker with no sign of life (metrics, keep-alive, KV batch) this long is
    # removed with its index and sockets (pods that restart under new names). 0: never.
    worker_expiry_s: float = 60.0
    max_message_bytes: int = 16 << 20  # every socket's ZMQ_MAXMSGSIZE
    max_route_tokens: int = 1 << 20  # a longer prompt gets a bad_request reply
    sub_hwm: int = 100_000  # receive high-water mark of the KV and metrics SUBs
    kv_buffer_batches: int = 10_000  # live batches a stream holds while a replay runs
    max_replays_in_flight: int = 8
    replay_attempts: int = 4  # rounds per replay when the publisher skips seqs
    reconnect_ivl_max_ms: int = 10_000  # reconnects to a dead endpoint back off to this
    log_decisions: bool = False
    # Python's cyclic GC from a task of the loop every this many seconds instead of from
    # whatever allocation crosses its threshold, often mid-route (router.idle_gc). 0: off.
    gc_interval_s: float = 0.01
    # Router-driven prefetch: when the chosen worker's memory tiers (GPU, CPU) miss a
    # prefix that its disk tier or the global pool (REMOTE tier, any writer) holds, tell
    # its pool tier to stage those chunks in CPU memory before the request lands. Tracked
    # routes only; engine hash mode only.
    prefetch: bool = True
    prefetch_min_blocks: int = 1
    workers: list[WorkerRegistration] = []
    scorer: ScorerConfig = msgspec.field(default_factory=ScorerConfig)
    # CURVE on every socket (dynamo_ext.security): the router's key, the allow-list of worker
    # and frontend keys. Without a key the router binds loopback only, unless ``insecure``.
    security: CurveConfig = msgspec.field(default_factory=CurveConfig)
    insecure: bool = False

    def __post_init__(self) -> None:
        check_bind(self.bind, "bind", self.security.enabled, self.insecure)
        if self.block_size <= 0:
            raise ConfigError("block_size", f"must be > 0, got {self.block_size}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port", f"not a port: {self.metrics_port}")
        for name in ("worker_timeout_s", "request_ttl_s", "replay_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be > 0")
        for name in (
            "max_message_bytes",
            "max_route_tokens",
            "sub_hwm",
            "kv_buffer_batches",
            "max_replays_in_flight",
            "replay_attempts",
            "reconnect_ivl_max_ms",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be > 0")
        if self.worker_expiry_s < 0 or self.max_blocks_per_worker < 0:
            raise ConfigError("worker_expiry_s", "must be >= 0 (0: off)")
        if self.resync_interval_s < 0:
            raise ConfigError("resync_interval_s", "must be >= 0 (0: off)")
        if not 0 <= self.gc_interval_s <= 60:
            raise ConfigError("gc_interval_s", "must be in [0, 60] (0: Python's own collector)")
        ids = [w.worker_id for w in self.workers]
        dup = {w for w in ids if ids.count(w) > 1}
        if dup:
            raise ConfigError("workers", f"duplicate worker_id {sorted(dup)}")


T = TypeVar("T", bound=msgspec.Struct)


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {p}: {exc}") from exc
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError("config", f"{p} is not valid {p.suffix or 'YAML'}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{p} must hold a mapping at top level")
    return data


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(dotted, f"{part!r} is not a mapping")
        cur = nxt
    cur[parts[-1]] = value


def env_overrides(prefix: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``DYNAMO_EXT_ROUTER__SCORER__OVERLAP_WEIGHT=2`` -> ``{"scorer": {"overlap_weight": 2}}``.

    Values are parsed as YAML scalars so numbers and booleans keep their type.
    """
    out: dict[str, Any] = {}
    env = os.environ if environ is None else environ
    for key, raw in env.items():
        if not key.startswith(prefix):
            continue
        dotted = key[len(prefix) :].lower().replace("__", ".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_path(out, dotted, value)
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def build(cls: type[T], data: dict[str, Any]) -> T:
    try:
        return msgspec.convert(data, cls, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `float`, got `str` - at `$.scorer.overlap_weight`".
        msg = str(exc)
        field = msg.rsplit("at `$.", 1)[1].rstrip("`") if "at `$." in msg else cls.__name__
        raise ConfigError(field, msg) from exc


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    env_prefix: str = "DYNAMO_EXT_ROUTER__",
    environ: dict[str, str] | None = None,
) -> T:
    data: dict[str, Any] = read_config_file(path) if path else {}
    data = _merge(data, env_overrides(env_prefix, environ))
    data = _merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    return build(cls, data)
