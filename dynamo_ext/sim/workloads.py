"""Generated workloads in the Mooncake trace format, for reporting on traffic the router's
defaults were not tuned on.

Every generator returns ``TraceRow``s (``timestamp`` ms, ``input_length``,
``output_length``, ``hash_ids`` of 512-token blocks: equal leading ids are an equal cached
prefix), so the replay, Dynamo's own simulator and the physical-limit hit rate read them
as they read the sample trace. Kinds:

* ``chat``: multi-turn chat. Conversations start as a Poisson process; each turn's prompt is
  the previous turn's plus one or two new blocks (the reply and the next user message), the
  next turn arriving after a think time. Reuse: across turns of one conversation only.
* ``tenants``: shared system prompts. A few tenants, each with a 2-4k-token system prompt,
  picked by a Zipf law; single-turn requests of system prompt plus a short unique question.
* ``agentic``: agent loops with a long shared prefix (a 8-12k-token tool and context
  preamble per agent type) and short turns: each step appends one block (a tool result),
  answers briefly and comes back quickly.
* ``noreuse``: the control, every block unique.

``dynamo-ext bench workload KIND --out FILE`` writes one as a trace file. The offered load
is set by ``rate`` (new requests a second, or new conversations and loops
for ``chat`` and ``agentic``, whose later turns follow their own clocks).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dynamo_ext.errors import ConfigError
from dynamo_ext.sim.trace import TraceRow

TRACE_BLOCK = 512
KINDS = ("chat", "tenants", "agentic", "noreuse")


@dataclass(slots=True)
class _Ids:
    """Fresh hash ids, never reused across generated requests unless on purpose."""

    next: int = 0

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _row(ts_s: float, ids: list[int], cut: int, out_len: int) -> TraceRow:
    n_in = max(1, len(ids) * TRACE_BLOCK - cut)
    d = {"timestamp": round(ts_s * 1e3, 3), "input_length": n_in, "output_length": out_len}
    d["hash_ids"] = ids  # type: ignore[assignment]
    return TraceRow(d["timestamp"], n_in, out_len, list(ids), json.dumps(d))  # type: ignore[arg-type]


def _sessions(
    n: int,
    rate: float,
    rng: random.Random,
    session: Callable[[float, _Ids, random.Random], list[tuple[float, list[int], int, int]]],
) -> list[TraceRow]:
    """Sessions start as a Poisson process at ``rate``; rows in arrival order, ``n`` of them."""
    ids = _Ids()
    heap: list[tuple[float, int, list[int], int, int]] = []
    t = 0.0
    k = 0
    while True:
        # Until no later-starting session could still put a row among the first n.
        if len(heap) >= n and t >= heapq.nsmallest(n, heap)[-1][0]:
            break
        t += rng.expovariate(rate)
        for ts, hs, cut, out_len in session(t, ids, rng):
            heapq.heappush(heap, (ts, k, hs, cut, out_len))
            k += 1
    rows = [heapq.heappop(heap) for _ in range(n)]
    return [_row(ts, hs, cut, out_len) for ts, _, hs, cut, out_len in rows]


def chat(n: int, rate: float, seed: int = 0) -> list[TraceRow]:
    rng = random.Random(seed)

    def conv(t: float, ids: _Ids, r: random.Random) -> list[tuple[float, list[int], int, int]]:
        hs = ids.take(r.randint(1, 2))  # the conversation's own opening context
        out = []
        for _ in range(r.randint(2, 8)):
            hs = hs + ids.take(r.randint(1, 2))
            out.append((t, list(hs), r.randint(0, 300), r.randint(50, 300)))
            t += 2.0 + r.expovariate(1 / 8.0)  # reading the answer, typing the next
        return out

    return _sessions(n, rate, rng, conv)


def tenants(n: int, rate: float, seed: int = 0, num_tenants: int = 8) -> list[TraceRow]:
    rng = random.Random(seed)
    ids = _Ids()
    systems = [ids.take(rng.randint(4, 8)) for _ in range(num_tenants)]
    weights = [1 / (i + 1) for i in range(num_tenants)]  # Zipf: a few big tenants
    rows = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        sys_ids = rng.choices(systems, weights)[0]
        hs = sys_ids + ids.take(rng.randint(1, 3))
        rows.append(_row(t, hs, rng.randint(0, 400), rng.randint(30, 250)))
    return rows


def agentic(n: int, rate: float, seed: int = 0, num_agents: int = 4) -> list[TraceRow]:
    rng = random.Random(seed)
    base = _Ids(next=1 << 40)
    preambles = [base.take(rng.randint(16, 24)) for _ in range(num_agents)]

    def loop(t: float, ids: _Ids, r: random.Random) -> list[tuple[float, list[int], int, int]]:
        hs = list(r.choice(preambles)) + ids.take(1)  # the task
        out = []
        for _ in range(r.randint(10, 30)):
            hs = hs + ids.take(1)  # the last tool call's result
            out.append((t, list(hs), r.randint(0, 200), r.randint(20, 80)))
            t += 0.3 + r.expovariate(1 / 0.7)  # the tool runs, the agent comes back
        return out

    return _sessions(n, rate, rng, loop)


def noreuse(n: int, rate: float, seed: int = 0) -> list[TraceRow]:
    rng = random.Random(seed)
    ids = _Ids()
    rows = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        rows.append(_row(t, ids.take(rng.randint(1, 8)), rng.randint(0, 400), rng.randint(30, 250)))
    return rows


def generate(kind: str, n: int, rate: float, seed: int = 0) -> list[TraceRow]:
    """``n`` requests of workload ``kind`` (``KINDS``) at ``rate`` (module doc)."""
    if n <= 0 or rate <= 0:
        raise ConfigError("workload", f"requests and rate must be > 0, got {n}, {rate}")
    gen = {"chat": chat, "tenants": tenants, "agentic": agentic, "noreuse": noreuse}.get(kind)
    if gen is None:
        raise ConfigError("workload", f"unknown workload {kind!r} (one of {', '.join(KINDS)})")
    return gen(n, rate, seed)


def prefix_hits(rows: Sequence[TraceRow], block_size: int, capacity_blocks: int = 0) -> list[int]:
    """Per request, the prompt tokens one cache that sees every request in arrival order
    would hold (``physical_limit_hit_rate``'s walk)."""
    from collections import OrderedDict

    seen: OrderedDict[tuple[int, int], None] = OrderedDict()
    out: list[int] = []
    for row in rows:
        chain: list[int] = []
        key = 0
        for hid in row.hash_ids:
            key = hash((key, hid))
            chain.append(key)
        k = 0
        matched = True
        hittable = (row.input_length - 1) // block_size
        for b in range(row.input_length // block_size):  # every full block is cached after
            end = (b + 1) * block_size
            tb = -(-end // TRACE_BLOCK)  # trace blocks the block's prefix spans
            if tb > len(chain):
                break
            name = (chain[tb - 1], end - (tb - 1) * TRACE_BLOCK)
            if matched and b < hittable and name in seen:
                k += 1
                seen.move_to_end(name)
            else:
                matched = False
                if name in seen:
                    seen.move_to_end(name)
                else:
                    seen[name] = None
                    if capacity_blocks and len(seen) > capacity_blocks:
                        seen.popitem(last=False)
        out.append(k * block_size)
    return out


def physical_limit_hit_rate(
    rows: Sequence[TraceRow], block_size: int, capacity_blocks: int = 0
) -> float:
    """The hit rate of one infinite cache that sees every request in arrival order: the
    share of prompt tokens in blocks whose whole prefix an earlier prompt held, counted as
    an engine counts hits (full blocks only, the last prompt token always computed, the
    first miss ends the prefix).

    ``capacity_blocks`` > 0: one LRU cache of that many blocks instead (the fleet's whole
    KV capacity as if it were one engine): what no router of a fleet that size can beat
    by much, since it must also split the work.

    A block's prefix is named by the trace blocks it spans (a chained key over their ids)
    and its end offset in the last one, so no token ids are needed; tokens past the ids
    are unique to their request and never hit."""
    total = sum(r.input_length for r in rows)
    return sum(prefix_hits(rows, block_size, capacity_blocks)) / total if total else 0.0


def ttft_floor_ms(
    rows: Sequence[TraceRow],
    block_size: int,
    step_seconds: Callable[[int, float, int], float],
    max_batched_tokens: int,
) -> list[float]:
    """Per request, its TTFT alone on an idle engine holding every block an infinite cache
    would (``prefix_hits``): its own chunked prefill and nothing else, the floor no router
    goes under. ``step_seconds(tokens, prefill_pairs, decode_ctx)`` is the engine's step
    model (``TimingModel.step_seconds``)."""
    out: list[float] = []
    for row, hit in zip(rows, prefix_hits(rows, block_size), strict=True):
        done, s = hit, 0.0
        while done < row.input_length:
            c = min(max_batched_tokens, row.input_length - done)
            s += step_seconds(c, c * (c + 1) / 2 + c * done, 0)
            done += c
        out.append(s * 1e3)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--rate", type=float, default=1.0, help="new requests (sessions) a second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=64, help="for the physical limit")
    p.add_argument("--out", required=True, help="Mooncake JSON lines to write")


def main(args: argparse.Namespace) -> int:
    rows = generate(args.kind, args.requests, args.rate, args.seed)
    with open(args.out, "w") as f:
        f.writelines(r.raw + "\n" for r in rows)
    limit = physical_limit_hit_rate(rows, args.block_size)
    span = (rows[-1].arrival_ms - rows[0].arrival_ms) / 1e3
    info = {"out": args.out, "requests": len(rows), "span_s": round(span, 1)}
    print(json.dumps({**info, "physical_limit_hit_rate": round(limit, 4)}))
    return 0
