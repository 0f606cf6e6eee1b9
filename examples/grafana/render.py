"""Renders the dashboard's main panels to a PNG from a live Prometheus (``query_range``),
with matplotlib: the picture in the README is drawn from a real fleet's data.

``python examples/grafana/render.py http://127.0.0.1:9090 out.png``; the Prometheus test
(tests/frontend/test_openai_surface.py) calls :func:`render` when
``DYNAMO_EXT_DASHBOARD_PNG`` names the output file.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

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


if __name__ == "__main__":
    render(sys.argv[1], Path(__file__).with_name("dynamo-ext.json"), Path(sys.argv[2]))
