"""Batch prefill scheduler: a vLLM v1 ``Scheduler`` that gathers queued prefills into fuller
batches, for prefill-role workers.

Use it with ``--scheduler-cls dynamo_ext.plugins.vllm.scheduler.BatchPrefillScheduler``.

A prefill worker in a disaggregated fleet sees bursts of short requests (``max_tokens`` 1)
arriving one by one from the API process. vLLM's stock scheduler admits whatever is waiting
at each step, so a burst becomes many small forward passes. This scheduler holds off
admitting *new* prefills for a step while all of these hold:

* requests are waiting in the queue,
* their remaining prompt tokens are below ``token_budget``,
* they would not already fill every free request slot (``max_num_seqs``),
* the oldest of them has waited less than ``max_wait_ms`` in this engine.

Everything else is scheduled exactly as vLLM does: running requests (decodes, prefill
chunks), requests that hold KV blocks (preempted ones, finished async KV loads), and, once
the budget is reached or the wait is over, all waiting requests. The wait is therefore
bounded by ``max_wait_ms`` (plus one engine step) and nothing starves.

How the hold-off is done: for the duration of ``super().schedule()`` the scheduler's pause
state is set to ``PAUSED_NEW``, vLLM's own "admit no new requests, keep serving the rest"
mode (used by ``pause_generation(mode="wait")``), and restored before returning. Only the
admission from the waiting queue reads that state inside ``schedule()``; restoring it before
the engine loop looks at ``has_requests()`` keeps held requests counted as unfinished work.

Engine loop interaction: a held step with nothing running schedules zero tokens. EngineCore
then runs an empty model step (returns at once), and because ``has_requests()`` is still true
it neither blocks on its input queue (no deadlock: the deadline is noticed on a later step
without any new request arriving) nor spins hot: ``_process_engine_step`` sleeps 1 ms after
a step that ran no model. We add at most 1 ms more sleep per empty held step (never past the
deadline), which halves the polling rate and leaves CPU to the API process that is still
handing over the burst, and we do not send scheduler stats for such steps unless the prefill
queue changed, so a hold does not flood the API process with identical stats messages.

Configuration (validated at engine start; a bad value stops vLLM with a ``ConfigError``
naming the field), from ``kv_transfer_config.kv_connector_extra_config["batch_prefill"]``
or the environment:

===========================  ====================================  ==========================
``batch_prefill`` key        environment variable                  default
===========================  ====================================  ==========================
``token_budget``             ``DYNAMO_EXT_BATCH_PREFILL_TOKENS``   ``max_num_batched_tokens``
``max_wait_ms``              ``DYNAMO_EXT_BATCH_PREFILL_WAIT_MS``  20
===========================  ====================================  ==========================

A key in the extra config wins over the environment variable. ``max_wait_ms`` 0 disables
the hold-off (the scheduler then behaves like vLLM's, plus the stats below). A
``token_budget`` above the step's token budget is clamped to it: a step cannot take more.

Stats: every ``SchedulerStats`` this scheduler makes carries the exact prefill queue, the
remaining prompt tokens of waiting requests (for a preempted request: everything it must
recompute) plus the unfinished prefill of running requests, in
``num_kv_fetch_reqs_by_stage["dynamo_ext_prefill_queue_tokens"]``. That dict crosses to the
API process with the stats; our stat logger plugin publishes it as
``WorkerMetrics.prefill_queue_tokens``. vLLM's Prometheus logger reads only its own stage
keys from it; its periodic log line prints its "KV fetch: ..." part whenever any value in
the dict is non-zero, so a non-empty queue shows there as all-zero KV fetch counts.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
from vllm.config import VllmConfig
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.request import Request

from dynamo_ext.errors import ConfigError

log = logging.getLogger(__name__)

PREFILL_QUEUE_KEY = "dynamo_ext_prefill_queue_tokens"
EXTRA_CONFIG_KEY = "batch_prefill"
ENV_TOKENS = "DYNAMO_EXT_BATCH_PREFILL_TOKENS"
ENV_WAIT_MS = "DYNAMO_EXT_BATCH_PREFILL_WAIT_MS"
DEFAULT_MAX_WAIT_MS = 20.0

# Extra sleep per empty held step, on top of EngineCore's own 1 ms: an empty held step then
# recurs every ~3 ms (measured) instead of ~1 ms, and the release is at most ~1 ms late.
HOLD_POLL_S = 0.001


class BatchPrefillConfig(msgspec.Struct, frozen=True):
    """The two knobs, after defaults and validation (``load_batch_prefill_config``: extra
    config, then environment; a bad value is a ``ConfigError`` naming the field)."""

    token_budget: int
    max_wait_ms: float

    @property
    def enabled(self) -> bool:
        return self.max_wait_ms > 0


def _parse_budget(value: Any, field: str) -> int:
    # bool is an int in Python; "true" is never a token count.
    if isinstance(value, bool):
        raise ConfigError(field, f"must be an integer >= 1, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(field, f"must be an integer >= 1, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < 1:
        raise ConfigError(field, f"must be an integer >= 1, got {value!r}")
    return value


def _parse_wait_ms(value: Any, field: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(field, f"must be a number of milliseconds >= 0, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(
                field, f"must be a number of milliseconds >= 0, got {value!r}"
            ) from None
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(field, f"must be a number of milliseconds >= 0, got {value!r}")
    return float(value)


def load_batch_prefill_config(
    extra: Mapping[str, Any] | None,
    max_num_batched_tokens: int,
    env: Mapping[str, str] | None = None,
) -> BatchPrefillConfig:
    """The batch prefill knobs from ``kv_connector_extra_config`` (``extra``), else ``env``.

    Raises ``ConfigError`` naming the offending field: the extra-config path
    (``kv_connector_extra_config.batch_prefill.token_budget``) or the environment variable.
    """
    env = os.environ if env is None else env
    section: Any = (extra or {}).get(EXTRA_CONFIG_KEY)
    prefix = f"kv_connector_extra_config.{EXTRA_CONFIG_KEY}"
    if section is None:
        section = {}
    elif not isinstance(section, Mapping):
        raise ConfigError(prefix, f"must be an object, got {section!r}")
    unknown = set(section) - {"token_budget", "max_wait_ms"}
    if unknown:
        raise ConfigError(
            f"{prefix}.{sorted(unknown)[0]}", "unknown key (known: token_budget, max_wait_ms)"
        )

    if "token_budget" in section:
        budget = _parse_budget(section["token_budget"], f"{prefix}.token_budget")
    elif env.get(ENV_TOKENS, "") != "":
        budget = _parse_budget(env[ENV_TOKENS], ENV_TOKENS)
    else:
        budget = max_num_batched_tokens

    if "max_wait_ms" in section:
        wait_ms = _parse_wait_ms(section["max_wait_ms"], f"{prefix}.max_wait_ms")
    elif env.get(ENV_WAIT_MS, "") != "":
        wait_ms = _parse_wait_ms(env[ENV_WAIT_MS], ENV_WAIT_MS)
    else:
        wait_ms = DEFAULT_MAX_WAIT_MS

    # A step never schedules more than max_num_batched_tokens: waiting for more is useless.
    return BatchPrefillConfig(min(budget, max_num_batched_tokens), wait_ms)


def config_from_vllm(vllm_config: VllmConfig) -> BatchPrefillConfig:
    kvt = vllm_config.kv_transfer_config
    extra = kvt.kv_connector_extra_config if kvt is not None else None
    sc = vllm_config.scheduler_config
    step_tokens = sc.max_num_scheduled_tokens or sc.max_num_batched_tokens
    return load_batch_prefill_config(extra, step_tokens)


def _remaining_tokens(request: Request) -> int:
    """Tokens a waiting request still has to compute before it can decode."""
    return max(0, request.num_tokens - request.num_computed_tokens)


class BatchPrefillScheduler(Scheduler):
    """vLLM's v1 scheduler plus a bounded hold-off that batches new prefills."""

    def __init__(self, vllm_config: VllmConfig, *args: Any, **kwargs: Any) -> None:
        # Validate before vLLM builds connectors and cache managers: fail fast and clearly.
        self.batch_config = config_from_vllm(vllm_config)
        super().__init__(vllm_config, *args, **kwargs)
        self._max_wait_s = self.batch_config.max_wait_ms / 1000.0
        # request id -> time.monotonic() when it entered this engine. Engine-side and
        # monotonic: immune to clock skew with the API process and to its queueing.
        self._enqueued_at: dict[str, float] = {}
        self._hold_started: float | None = None
        # Set by schedule() for an empty held step; read by make_stats() to skip repeats.
        self._quiet_step = False
        self._last_reported: tuple[int, ...] | None = None
        # Counters, for logs and tests that drive the scheduler in-process.
        self.num_held_steps = 0
        self.num_releases = 0
        log.info(
            "batch prefill scheduler: token_budget=%d max_wait_ms=%g%s",
            self.batch_config.token_budget,
            self.batch_config.max_wait_ms,
            "" if self.batch_config.enabled else " (hold-off disabled)",
        )

    # --- queue accounting -----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        # setdefault: a streaming-input update reuses the id and must not reset the clock.
        self._enqueued_at.setdefault(request.request_id, time.monotonic())
        super().add_request(request)

    def prefill_queue_tokens(self) -> int:
        """Exact prefill backlog: remaining prompt tokens of every waiting request plus the
        unfinished prefill of running ones (``is_prefill_chunk``: scheduled but not done)."""
        total = 0
        for queue in (self.waiting, self.kv_holding_waiting):
            for request in queue:
                total += _remaining_tokens(request)
        for request in self.running:
            if request.is_prefill_chunk:
                total += max(
                    0,
                    request.num_tokens
                    + request.num_output_placeholders
                    - request.num_computed_tokens,
                )
        return total

    def _hold_reason(self, now: float) -> str | None:
        """Why new prefills are held this step (a string for the log), or None to admit."""
        if not self.batch_config.enabled or not self.waiting:
            return None
        if self._pause_state != PauseState.UNPAUSED:
            return None  # an external pause already decides; never override it
        free_slots = (
            self.max_num_active_reqs - len(self.running) - self.num_waiting_for_streaming_input
        )
        if len(self.waiting) >= free_slots:
            return None  # the queue already fills every free slot: waiting cannot grow the batch
        tokens = 0
        oldest = now
        for request in self.waiting:
            tokens += _remaining_tokens(request)
            # No entry: a preempted or otherwise re-queued request, which has waited already.
            oldest = min(oldest, self._enqueued_at.get(request.request_id, -math.inf))
        if tokens >= self.batch_config.token_budget:
            return None
        if now - oldest >= self._max_wait_s:
            return None
        return f"{len(self.waiting)} reqs, {tokens} tokens < {self.batch_config.token_budget}"

    def _deadline(self, now: float) -> float:
        oldest = min(
            (self._enqueued_at.get(r.request_id, -math.inf) for r in self.waiting), default=now
        )
        return oldest + self._max_wait_s

    # --- scheduling -----------------------------------------------------------------------

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        now = time.monotonic()
        reason = self._hold_reason(now)
        if reason is None:
            output = super().schedule(throttle_prefills)
            if self._hold_started is not None and output.scheduled_new_reqs:
                self.num_releases += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "batch prefill: released %d new reqs, %d tokens after %.1f ms",
                        len(output.scheduled_new_reqs),
                        output.total_num_scheduled_tokens,
                        (now - self._hold_started) * 1000.0,
                    )
                self._hold_started = None
            self._quiet_step = False
        else:
            if self._hold_started is None:
                self._hold_started = now
                log.debug("batch prefill: holding new prefills (%s)", reason)
            self.num_held_steps += 1
            # vLLM's own "admit nothing new, serve the rest" mode, for this call only.
            self._pause_state = PauseState.PAUSED_NEW
            try:
                output = super().schedule(throttle_prefills)
            finally:
                self._pause_state = PauseState.UNPAUSED
            self._quiet_step = output.total_num_scheduled_tokens == 0
            if self._quiet_step:
                # Nothing to run: yield the CPU briefly, never past the release deadline.
                pause = min(HOLD_POLL_S, self._deadline(now) - time.monotonic())
                if pause > 0:
                    time.sleep(pause)
        for new_req in output.scheduled_new_reqs:
            self._enqueued_at.pop(new_req.req_id, None)
        if len(self._enqueued_at) > len(self.requests):
            # Requests aborted while waiting left their entries behind.
            self._enqueued_at = {k: v for k, v in self._enqueued_at.items() if k in self.requests}
        return output

    # --- stats ----------------------------------------------------------------------------

    def make_stats(self, *args: Any, **kwargs: Any) -> SchedulerStats | None:
        if not self.log_stats:
            return None
        queue = self.prefill_queue_tokens()
        shown = (queue, *self.get_request_counts(), len(self.deferred_waiting))
        if (
            self._quiet_step
            and shown == self._last_reported
            and not any(a is not None for a in _all_args(args, kwargs))
        ):
            # An empty held step changed nothing the API process could show: skip it.
            # (Only when no connector/spec/perf stats ride along, which would be lost.)
            return None
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            stats.num_kv_fetch_reqs_by_stage[PREFILL_QUEUE_KEY] = queue
            self._last_reported = shown
        return stats


def _all_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterable[Any]:
    yield from args
    yield from kwargs.values()


__all__ = [
    "ENV_TOKENS",
    "ENV_WAIT_MS",
    "PREFILL_QUEUE_KEY",
    "BatchPrefillConfig",
    "BatchPrefillScheduler",
    "load_batch_prefill_config",
]
