"""The vLLM process launcher: a real vLLM OpenAI server in a subprocess (tests, examples, fleets).

``VllmServer`` runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script is not relied on) in its own process group with its output in a log file, waits for
``/health`` to answer, and on ``stop`` sends SIGTERM then SIGKILL to the whole group, so the
engine-core and worker children die with it. A start that fails raises ``EngineStartError``
carrying the last lines of the log.

Standard library only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from dynamo_ext.errors import DynamoExtError

LOG_TAIL_LINES = 50

# Flags that make a small model start fast on CPU; callers add them to ``extra_args``.
# ``--distributed-executor-backend uni`` only takes effect on CPU together with
# ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (in CPU_FAST_ENV): the model then runs inside the
# engine-core process instead of a third worker process, which saves ~20 s of imports.
# The engine core remains a separate process of the server's group.
CPU_FAST_ARGS: tuple[str, ...] = (
    "--max-model-len",
    "2048",
    "--enforce-eager",
    "--dtype",
    "float32",
    "--distributed-executor-backend",
    "uni",
    "--max-num-seqs",
    "8",
    "--disable-uvicorn-access-log",
)
CPU_FAST_ENV: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def engine_threads_env(engines: int, cpus: int | None = None) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for one of ``engines`` CPU engines sharing this machine: its
    share of the cores, at least one. Left alone, each engine's torch runs a thread per
    core, so two engines on two cores run four spinning OpenMP threads on two cores and a
    step waits for a descheduled one: measured here (``sim.calibrate``, two engines at
    once), 8-token decode steps of 5.5-79 ms and a 256-token prefill slower than a 768-token
    one, a step-model fit 45% off; with one thread each, 4.3-7.4 ms, monotone, 6% off.
    An ``OMP_NUM_THREADS`` already in the environment wins."""
    if cpus is None and os.environ.get("OMP_NUM_THREADS"):
        return {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]}
    n = cpus if cpus is not None else (len(os.sched_getaffinity(0)) or os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, n // max(1, engines)))}


class EngineStartError(DynamoExtError, RuntimeError):
    """The engine process exited or did not become ready in time; the message ends with the
    tail of its log."""


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file ('' when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class VllmServer:
    """One vLLM OpenAI API server subprocess.

    ``env`` entries are added to (and override) the current environment. Use as a context
    manager (``with VllmServer(...) as srv:``: starts, waits ``ready_timeout`` seconds,
    stops on exit) or call ``start``/``wait_ready``/``stop`` yourself.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        port: int,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        python: str = sys.executable,
        ready_timeout: float = 300.0,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.port = int(port)
        self.host = host
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/vllm-server-{self.port}.log")
        self.python = python
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._started_at = 0.0

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000`` (append ``/v1/...``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.extra_args,
        ]

    def start(self) -> VllmServer:
        """Spawn the server (does not wait); returns ``self``."""
        if self.proc is not None and self.proc.poll() is None:
            raise EngineStartError(f"server on port {self.port} already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: stop() kills all of it
            )
        self._started_at = time.monotonic()
        return self

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 2.0) -> bool:
        """True when ``GET /health`` answers 200."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout: float | None = None) -> float:
        """Poll ``/health`` then ``/v1/models`` until both answer; return seconds since start.

        Raises ``EngineStartError`` (with the log tail) if the process exits or time runs out;
        on time-out the process group is stopped first.
        """
        if self.proc is None:
            raise EngineStartError("wait_ready() before start()")
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self._kill_group()  # the engine core may outlive a crashed front end
                raise EngineStartError(self._failure(f"exited with code {rc} during start-up"))
            if self.healthy() and self._models_ok():
                self.startup_seconds = time.monotonic() - self._started_at
                return self.startup_seconds
            if time.monotonic() > deadline:
                self.stop()
                raise EngineStartError(self._failure(f"not ready after {timeout:.0f} s"))
            time.sleep(0.5)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop the server and every process of its group; return its exit code (None if it
        was never started).

        SIGTERM goes to the API server first, which shuts its engine core down in order
        (signalling the whole group at once makes the front end log a spurious
        ``EngineDeadError``); after ``timeout`` s, or once it has exited, the rest of the
        group gets SIGTERM, and whatever is still alive 2 s later gets SIGKILL.
        """
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self._group_alive():
            self._signal_group(signal.SIGTERM)
        self._kill_group(grace=2.0)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL'd, cannot linger
            pass
        return proc.returncode

    # --- context manager ------------------------------------------------------------------

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- internals ------------------------------------------------------------------------

    def _models_ok(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=2.0) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _failure(self, what: str) -> str:
        return (
            f"vLLM server on port {self.port} {what}; last {LOG_TAIL_LINES} lines of "
            f"{self.log_path}:\n{log_tail(self.log_path)}"
        )

    def _signal_group(self, sig: signal.Signals) -> bool:
        """Signal the process group; False once no process is left in it."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - group leader pid reused by another user
            return False

    def _kill_group(self, grace: float = 2.0) -> None:
        """Wait up to ``grace`` s for the group to empty after SIGTERM, then SIGKILL it."""
        assert self.proc is not None
        deadline = time.monotonic() + grace
        while self._group_alive() and time.monotonic() < deadline:
            self.proc.poll()  # reap the leader so it does not count as alive
            time.sleep(0.1)
        if self._group_alive():
            self._signal_group(signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while self._group_alive() and time.monotonic() < deadline:
                self.proc.poll()
                time.sleep(0.05)

    def _group_alive(self) -> bool:
        assert self.proc is not None
        self.proc.poll()
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False


__all__ = [
    "CPU_FAST_ARGS",
    "CPU_FAST_ENV",
    "EngineStartError",
    "VllmServer",
    "log_tail",
]
