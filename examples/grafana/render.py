"""Renders the dashboard's main panels to a PNG from a live Prometheus (``query_range``),
with matplotlib: the picture in the README is drawn from a real fleet's data.

``python examples/grafana/render.py live [SECONDS]`` starts a 1P:1D fleet of the tiny model
and Prometheus, drives chat traffic and writes ``dashboard.png`` beside this file (how the
README's picture was made); ``python examples/grafana/render.py URL out.png`` renders from
a Prometheus you run. The Prometheus test (tests/frontend/test_openai_surface.py) starts
its server with :func:`start_prometheus`.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

MAIN = (
    "Requests per second by status",
    "Time to first token",
    "Inter-token latency",
    "End-to-end request latency",
    "Prefix hit rate per worker (router)",
    "P/D split: where prompts were prefilled",
    "Migrations and decode fallbacks",
    "Router decision latency",
    "Predicted vs actual hit error (tokens)",
    "KV cache usage per worker",
    "Hit blocks per worker and tier",
    "Tokens per second",
)


def _range(base: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    args = {"query": expr, "start": start, "end": end, "step": step}
    url = base + "/api/v1/query_range?" + urllib.parse.urlencode(args)
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())["data"]["result"]


def _legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out.replace("{{", "").replace("}}", "")


def render(base: str, dashboard: Path, out: Path, minutes: float = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(dashboard.read_text())
    panels = {p["title"]: p for p in dash["panels"] if p.get("type") != "row"}
    end = time.time()
    start = end - minutes * 60
    fig, axes = plt.subplots(3, 4, figsize=(20, 11))
    for ax, title in zip(axes.flat, MAIN, strict=True):
        for t in panels[title]["targets"]:
            for series in _range(base, t["expr"], start, end, 2):
                xs = [float(v[0]) - end for v in series["values"]]
                ys = [float(v[1]) for v in series["values"]]
                ax.plot(xs, ys, label=_legend(t["legendFormat"], series["metric"])[:40])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds before now", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("dynamo-ext: 1 prefill + 1 decode vLLM worker (tiny model, CPU), live data")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70)


def start_prometheus(binary: str, targets: list[str], workdir: Path) -> tuple[Any, str]:
    """Debian's ``prometheus`` run by hand (no daemon): a temp config scraping ``targets``
    every second, its HTTP API on a free loopback port. ``(process, base URL)`` once it
    listens."""
    import socket
    import subprocess

    from dynamo_ext.testing import free_port

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: dynamo-ext\n"
        f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=open(workdir / "prometheus.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError((workdir / "prometheus.log").read_text()[-3000:])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("prometheus did not listen within 60 s") from None
            time.sleep(0.2)


def live(out: Path, seconds: float = 150) -> None:
    """The README's picture: a 1P:1D fleet of the tiny model, Prometheus scraping it, chat
    traffic with shared prefixes (short prompts served by the decode worker, long ones
    prefilled remotely) for ``seconds``, then :func:`render`."""
    import random
    import shutil
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from dynamo_ext.plugins.vllm.fleet import LocalFleet
    from dynamo_ext.testing.tiny_model import (
        build_tiny_model,
        default_model_dir,
        english_like_text,
    )

    prom = shutil.which("prometheus")
    if prom is None:
        raise SystemExit("prometheus is not installed (apt-get install prometheus)")
    tmp = Path(tempfile.mkdtemp(prefix="dynamo-ext-dashboard-"))
    fleet = LocalFleet(build_tiny_model(default_model_dir()), 0, 1, 1, workdir=tmp / "fleet")
    fleet.start()
    proc = None
    try:
        assert fleet.router is not None
        targets = [
            fleet.url.removeprefix("http://"),
            f"127.0.0.1:{fleet.router.metrics_port}",
            *(w.server.url.removeprefix("http://") for w in fleet.workers),
        ]
        proc, base = start_prometheus(prom, targets, tmp / "prometheus")
        c = openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0, timeout=300)
        systems = [english_like_text(n, seed=s) for s, n in ((1, 40), (2, 300), (3, 90))]
        rng = random.Random(0)
        t_end = time.monotonic() + seconds

        def user(i: int) -> None:
            while time.monotonic() < t_end:
                msgs = [
                    {"role": "system", "content": rng.choice(systems)},
                    {"role": "user", "content": english_like_text(20, seed=rng.randrange(50))},
                ]
                list(
                    c.chat.completions.create(
                        model=fleet.served_model_name, messages=msgs, max_tokens=24, stream=True
                    )
                )

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(user, range(3)))
        time.sleep(2)
        render(base, Path(__file__).with_name("dynamo-ext.json"), out, minutes=seconds / 60 + 0.2)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        fleet.stop()


if __name__ == "__main__":
    if sys.argv[1] == "live":
        live(Path(__file__).with_name("dashboard.png"), float(sys.argv[2]) if sys.argv[2:] else 150)
    else:
        render(sys.argv[1], Path(__file__).with_name("dynamo-ext.json"), Path(sys.argv[2]))
