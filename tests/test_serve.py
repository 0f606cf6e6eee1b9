"""``dynamo-ext serve``: one command serves the openai client; a worker whose vLLM process is
SIGKILLed comes back under the same worker id as a new instance and serves again; SIGTERM
stops every process it started. The status line's figures come from Prometheus texts."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from dynamo_ext.plugins.vllm.serve import histogram_quantile, read_status
from dynamo_ext.testing import free_port

API = "vllm.entrypoints.openai.api_server"
ROOT = Path(__file__).resolve().parents[1]


def readme_first_section() -> tuple[str, str]:
    """The README's first command and the Python snippet after it."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    bash = section.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    return bash, snippet


def test_readme_first_command_is_serve() -> None:
    bash, snippet = readme_first_section()
    assert bash == "scripts/install.sh && dynamo-ext serve"
    assert "http://127.0.0.1:8080/v1" in snippet and "tiny-llama" in snippet


def test_histogram_quantile_as_prometheus() -> None:
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(0.1, 0), (float("inf"), 0)]) is None
    # 10 observations: 4 under 0.1, 10 under 0.5 -> rank 5 is 1/6 into (0.1, 0.5]
    b = [(0.1, 4.0), (0.5, 10.0), (float("inf"), 10.0)]
    assert histogram_quantile(0.5, b) == pytest.approx(0.1 + 0.4 / 6)
    assert histogram_quantile(0.99, [(0.1, 1.0), (float("inf"), 2.0)]) == 0.1


def test_status_from_metrics_texts() -> None:
    router = "# TYPE dynamo_ext_router_workers_up gauge\ndynamo_ext_router_workers_up 2.0\n"
    frontend = "\n".join(
        [
            "# TYPE dynamo_frontend_inflight_requests gauge",
            'dynamo_frontend_inflight_requests{model="m"} 3.0',
            "# TYPE dynamo_ext_frontend_prefix_hit_rate gauge",
            'dynamo_ext_frontend_prefix_hit_rate{model="m"} 0.25',
            "# TYPE dynamo_frontend_time_to_first_token_seconds histogram",
            'dynamo_frontend_time_to_first_token_seconds_bucket{le="0.05",model="m"} 0.0',
            'dynamo_frontend_time_to_first_token_seconds_bucket{le="0.1",model="m"} 2.0',
            'dynamo_frontend_time_to_first_token_seconds_bucket{le="+Inf",model="m"} 2.0',
            'dynamo_frontend_time_to_first_token_seconds_count{model="m"} 2.0',
            'dynamo_frontend_time_to_first_token_seconds_sum{model="m"} 0.15',
            "",
        ]
    )
    st = read_status(router, frontend, workers=3)
    assert (st.workers_up, st.inflight, st.hit_rate) == (2, 3.0, 0.25)
    assert st.ttft_p50_s == pytest.approx(0.075)
    assert st.line() == "workers up 2/3 | in flight 3 | hit rate 0.25 | TTFT p50 75 ms"
    assert read_status(None, None, 1).line().startswith("workers up ?/1")


class FakeServer:
    def __init__(self, n: int) -> None:
        self.n, self.alive, self.ok, self.pid = n, True, True, 1000 + n
        self.url = f"http://h:{n}"
        self.proc = None

    def is_alive(self) -> bool:
        return self.alive

    def healthy(self, timeout: float = 0.0) -> bool:
        return self.ok


class FakeFleet:
    """What the supervisor uses of a LocalFleet, with servers that die on command."""

    def __init__(self) -> None:
        from dynamo_ext.plugins.vllm.fleet import Worker

        self.router = None
        self.frontend = None
        self.workers = [Worker("w0", "both", FakeServer(0))]  # type: ignore[arg-type]
        self.restarted: list[bool] = []

    def restart_worker(self, w, wait: bool = False, fresh_ports: bool = False):
        self.restarted.append(fresh_ports)
        w.restarts += 1
        w.server = FakeServer(len(self.restarted))
        w.server.ok = False  # starting
        return w


def test_supervisor_restarts_with_backoff_and_fresh_ports_after_a_failed_start(capsys) -> None:
    from dynamo_ext.plugins.vllm import serve

    fleet = FakeFleet()
    now = [0.0]
    sup = serve.Supervisor(fleet, status=False, clock=lambda: now[0])  # type: ignore[arg-type]
    w = fleet.workers[0]
    sup.check_workers()
    assert fleet.restarted == []
    w.server.alive = False
    sup.check_workers()  # dead: restarted at once, same ports
    assert fleet.restarted == [False]
    w.server.alive = False  # dies again before it ever answered
    sup.check_workers()
    assert fleet.restarted == [False]  # waits out the backoff first
    now[0] += serve.RESTART_BACKOFF_S[0]
    sup.check_workers()
    assert fleet.restarted == [False, True]  # new ports: one may have been taken
    w.server.ok = True
    sup.check_workers()
    out = capsys.readouterr().out
    assert "worker w0 exited" in out and "worker w0 is back (restart 2, pid 1002" in out


class Lines:
    """The serve process's stdout, read on a thread; ``wait(text)`` until a line has it."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._t = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._t.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()

    def wait(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for ln in self.lines:
                    if text in ln:
                        return ln
                left = deadline - time.monotonic()
                assert left > 0, f"no line with {text!r} in:\n{''.join(self.lines)}"
                self._cv.wait(min(left, 1.0))


def _api_servers(root: psutil.Process) -> list[psutil.Process]:
    """vLLM API servers serve started itself (its engine core may share the command line)."""
    return [p for p in root.children() if API in " ".join(p.cmdline())]


def _tree(pid: int) -> list[psutil.Process]:
    """Every process serve started (its children are session leaders: follow the tree)."""
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.engine
def test_serve_restarts_a_killed_worker_and_stops_on_sigterm(tiny_model: Path, tmp_path) -> None:
    import openai

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "dynamo_ext.cli", "serve", "--workers", "1",
            "--model", str(tiny_model), "--port", str(port), "--workdir", str(tmp_path),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out = Lines(proc)
    started: list[psutil.Process] = []
    try:
        out.wait("Ctrl-C stops everything", 400)
        text = "".join(out.lines)
        assert f"OpenAI endpoint: http://127.0.0.1:{port}/v1" in text, text
        assert f"curl http://127.0.0.1:{port}/v1/completions" in text
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120
        )
        r = client.completions.create(model="tiny-llama", prompt="Hello, my name is", max_tokens=4)
        assert r.usage is not None and r.usage.completion_tokens == 4
        # the README's snippet, as written but for the port
        snippet = readme_first_section()[1].replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True)
        assert ran.returncode == 0 and "completion_tokens=" in ran.stdout, ran.stderr
        started = _tree(proc.pid)
        (victim,) = _api_servers(psutil.Process(proc.pid))
        t_kill = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        out.wait("worker worker-0 exited", 30)
        out.wait("worker worker-0 is back (restart 1", 300)
        # the router dropped the old instance and took the new one under the same id
        router_log = next(tmp_path.glob("router-*.log"))
        deadline = time.monotonic() + 60
        while "worker worker-0 re-registered (new instance)" not in router_log.read_text():
            assert time.monotonic() < deadline, router_log.read_text()[-3000:]
            time.sleep(0.5)
        while True:  # until the frontend's next route lands on the registered newcomer
            try:
                r = client.completions.create(model="tiny-llama", prompt="Hi again", max_tokens=3)
                break
            except openai.APIStatusError as exc:
                assert time.monotonic() < deadline, exc
                time.sleep(0.5)
        assert r.usage is not None and r.usage.completion_tokens == 3
        print(f"killed worker serving again after {time.monotonic() - t_kill:.1f} s")
        (new,) = _api_servers(psutil.Process(proc.pid))
        assert new.pid != victim.pid
        started += _tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        time.sleep(1)
        alive = [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], [(p.pid, p.cmdline()) for p in started if p.pid in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in started:
            try:
                p.kill()
            except psutil.Error:
                pass
