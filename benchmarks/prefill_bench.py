"""``dynamo-ext bench prefill``: the batch prefill scheduler vs vLLM's stock scheduler.

Starts two real vLLM OpenAI servers one after the other with the tiny local model (built
first if missing): the stock scheduler, then
``dynamo_ext.plugins.vllm.scheduler.BatchPrefillScheduler``. Each gets a short warm-up, then
``--rounds`` rounds of ``--requests`` distinct prompts of ``--prompt-words`` words (~1 token
per word), ``max_tokens`` 1 like a prefill worker's, from ``--concurrency`` clients at once.
Both schedulers get the same prompts; no prompt repeats, so the prefix cache never hits.
Several short rounds per server damp the noise of a shared machine.

Measured per scheduler (per round, over all rounds):

* ``steps``: engine steps that produced outputs, from vLLM's own Prometheus histogram
  ``vllm:iteration_tokens_total`` (its ``_count``; one sample per such step). With
  ``max_tokens`` 1 and prompts shorter than the step token budget every step that runs the
  model produces outputs, so this is the number of forward passes;
* ``prefill_tokens_per_step``: (``_sum`` of that histogram - generated tokens) / steps;
* ``ttft_p50_s`` / ``ttft_p90_s``: client-side time to the first streamed token, pooled;
* ``queue_time_mean_s``: ``vllm:request_queue_time_seconds`` mean (includes the hold-off);
* ``wall_s``: first request sent to last response of a round (median over rounds).

Metrics are taken as differences around the measured run, so the warm-up is excluded.
``ratios`` are batch / stock. The module imports only the standard library and dynamo-ext's
light modules at top level: the CLI imports it to build its parser.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dynamo_ext.stats import percentile

SCHEDULER_CLS = "dynamo_ext.plugins.vllm.scheduler.BatchPrefillScheduler"
MAX_MODEL_LEN = 2048  # from CPU_FAST_ARGS

_COUNTERS = {
    "iter_count": "vllm:iteration_tokens_total_count",
    "iter_sum": "vllm:iteration_tokens_total_sum",
    "gen_tokens": "vllm:generation_tokens_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "queue_sum": "vllm:request_queue_time_seconds_sum",
    "queue_count": "vllm:request_queue_time_seconds_count",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=64, help="prompts per scheduler (64)")
    p.add_argument("--prompt-words", type=int, default=100, help="words per prompt (100)")
    p.add_argument("--concurrency", type=int, default=64, help="clients sending at once (64)")
    p.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help="batch scheduler token budget (default: the scheduler's max_num_batched_tokens)",
    )
    p.add_argument("--max-wait-ms", type=float, default=20.0, help="batch scheduler max wait (20)")
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=32,
        help="request slots per engine step (32; the tests' fast flags use 8)",
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="load rounds per server, fresh prompts each (3)"
    )
    p.add_argument("--model", default=None, help="model folder (default: the tiny model)")
    p.add_argument("--log-dir", default=None, help="where server logs go (a temp folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = dict.fromkeys(_COUNTERS, 0.0)
    names = {v: k for k, v in _COUNTERS.items()}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            out[names[name]] += float(line.rsplit(" ", 1)[1])
    return out


def _first_token_s(url: str, model: str, prompt: str) -> float:
    """Send one streaming completion (max_tokens 1); seconds to its first token."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    ttft: float | None = None
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.strip()
            if ttft is None and line.startswith(b"data: ") and line != b"data: [DONE]":
                ttft = time.perf_counter() - t0
    if ttft is None:
        raise RuntimeError("stream ended without a token")
    return ttft


def _load(url: str, model: str, prompts: list[str], concurrency: int) -> list[float]:
    with ThreadPoolExecutor(concurrency) as ex:
        return list(ex.map(lambda p: _first_token_s(url, model, p), prompts))


def _run_one(
    name: str,
    args: argparse.Namespace,
    model_dir: Path,
    rounds: list[list[str]],
    warmup: list[str],
    log_dir: Path,
) -> dict[str, Any]:
    from dynamo_ext.plugins.vllm.launcher import CPU_FAST_ARGS, CPU_FAST_ENV, VllmServer
    from dynamo_ext.testing import free_port

    extra = [*CPU_FAST_ARGS, "--max-num-seqs", str(args.max_num_seqs)]
    env = dict(CPU_FAST_ENV)
    if name == "batch":
        extra += ["--scheduler-cls", SCHEDULER_CLS]
        env["DYNAMO_EXT_BATCH_PREFILL_WAIT_MS"] = str(args.max_wait_ms)
        if args.token_budget is not None:
            env["DYNAMO_EXT_BATCH_PREFILL_TOKENS"] = str(args.token_budget)
    port = free_port()
    srv = VllmServer(model_dir, port, extra, env, log_dir / f"vllm-{name}-{port}.log")
    _progress(args, f"{name}: starting vLLM on port {port} (log {srv.log_path})")
    with srv:
        model = str(model_dir)
        _load(srv.url, model, warmup, len(warmup))
        before = _scrape(srv.url)
        ttfts: list[float] = []
        walls: list[float] = []
        for i, prompts in enumerate(rounds):
            _progress(
                args,
                f"{name}: round {i + 1}/{len(rounds)}: {len(prompts)} requests, "
                f"concurrency {args.concurrency}",
            )
            t0 = time.perf_counter()
            ttfts += _load(srv.url, model, prompts, args.concurrency)
            walls.append(time.perf_counter() - t0)
        after = _scrape(srv.url)
    d = {k: after[k] - before[k] for k in _COUNTERS}
    steps = d["iter_count"] / len(rounds)
    prefill_tokens = (d["iter_sum"] - d["gen_tokens"]) / len(rounds)
    wall = percentile(walls, 50)
    return {
        "steps": round(steps, 1),
        "prefill_tokens": round(prefill_tokens),
        "prefill_tokens_per_step": round(prefill_tokens / steps, 1) if steps else None,
        "ttft_p50_s": round(percentile(ttfts, 50), 4),
        "ttft_p90_s": round(percentile(ttfts, 90), 4),
        "ttft_mean_s": round(statistics.fmean(ttfts), 4),
        "queue_time_mean_s": round(d["queue_sum"] / d["queue_count"], 4)
        if d["queue_count"]
        else None,
        "wall_s": round(wall, 3),
        "wall_s_rounds": [round(w, 3) for w in walls],
        "requests_per_s": round(len(rounds[0]) / wall, 2),
        "server_startup_s": round(srv.startup_seconds or 0.0, 1),
    }


def _progress(args: argparse.Namespace, msg: str) -> None:
    print(f"[bench prefill] {msg}", file=sys.stderr, flush=True)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def main(args: argparse.Namespace) -> int:
    from dynamo_ext.testing.tiny_model import build_tiny_model, default_model_dir, english_like_text

    if min(args.requests, args.concurrency, args.max_num_seqs, args.rounds) < 1:
        print("--requests, --concurrency, --max-num-seqs, --rounds must be >= 1", file=sys.stderr)
        return 2
    if not 1 <= args.prompt_words <= MAX_MODEL_LEN - 200:
        print(f"--prompt-words must be within [1, {MAX_MODEL_LEN - 200}]", file=sys.stderr)
        return 2
    model_dir = Path(args.model) if args.model else build_tiny_model(default_model_dir())
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="dynamo-ext-prefill-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # Distinct prompts (no prefix-cache hits), the same ones for both schedulers.
    rounds = [
        [english_like_text(args.prompt_words, seed=10_000 * (r + 1) + i) for i in range(n)]
        for r, n in enumerate([args.requests] * args.rounds)
    ]
    warmup = [english_like_text(args.prompt_words, seed=i) for i in range(4)]

    results: dict[str, Any] = {}
    for name in ("stock", "batch"):  # one server at a time: the CPU is shared
        results[name] = _run_one(name, args, model_dir, rounds, warmup, log_dir)

    stock, batch = results["stock"], results["batch"]
    report = {
        "config": {
            "requests": args.requests,
            "prompt_words": args.prompt_words,
            "concurrency": args.concurrency,
            "max_num_seqs": args.max_num_seqs,
            "rounds": args.rounds,
            "token_budget": args.token_budget,
            "max_wait_ms": args.max_wait_ms,
            "model": str(model_dir),
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "stock": stock,
        "batch": batch,
        "ratios_batch_over_stock": {
            k: _ratio(batch[k], stock[k])
            for k in ("steps", "prefill_tokens_per_step", "ttft_p50_s", "ttft_p90_s", "wall_s")
        },
        "logs": str(log_dir),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'':28}{'stock':>12}{'batch':>12}{'batch/stock':>14}")
    for k in ("steps", "prefill_tokens_per_step", "ttft_p50_s", "ttft_p90_s", "wall_s"):
        r = report["ratios_batch_over_stock"][k]
        print(f"{k:28}{stock[k]!s:>12}{batch[k]!s:>12}{r!s:>14}")
    print(
        f"queue_time_mean_s           {stock['queue_time_mean_s']!s:>12}"
        f"{batch['queue_time_mean_s']!s:>12}"
    )
    print(f"logs: {log_dir}")
    return 0


__all__ = ["add_arguments", "main"]
