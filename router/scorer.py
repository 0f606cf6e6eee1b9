"""Scorer: turn prefix matches and worker load into one cost per worker and pick one.

Policies (``ScorerConfig.mode``): ``kv`` our default cost (see ``ScorerConfig``), ``dynamo``
Dynamo's KV-router cost with softmax sampling, and the baselines ``round_robin``,
``random`` and ``least_loaded`` that the simulator compares against.

``dynamo`` is Dynamo's scheduler cost, ``overlap_weight * potential prefill blocks +
potential decode blocks``, with its active-sequence tracker's count of decode blocks: each
active block once per worker, plus the prompt's blocks not already active there. That needs
the prompt's hashes (``select(..., hashes=)``) and loads reserved with hashes
(``ActiveSequences.add(..., hashes=)``); without them every routed block counts, which
over-counts shared prefixes (issue 14). Dynamo's own core runs beside it in the simulator
(``sim.peers``) as the reference.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from dynamo_ext import native
from dynamo_ext.config import ScorerConfig
from dynamo_ext.protocol import MEDIUM_GPU, WorkerMetrics, WorkerScore
from dynamo_ext.router.indexer import PrefixMatches
from dynamo_ext.router.sequences import WorkerLoad, run_in


@dataclass(slots=True)
class Candidate:
    """A worker as the scorer sees it. The router's own ``WorkerEntry`` has the same fields.

    ``base``/``kv_full`` cache the request-independent part of the cost; whoever changes
    ``metrics`` or ``load`` sets ``dirty`` so the scorer recomputes them once.
    """

    worker_id: str
    metrics: WorkerMetrics | None
    load: WorkerLoad
    dirty: bool = True
    base: float = 0.0
    kv_full: bool = False
    queued: float = 0.0
    # Load the worker reported beyond what this router reserved there when its metrics
    # came (``Scorer.observe``): requests routed by someone else, or by an earlier life of
    # this router. None until observed: the metrics then count as they are.
    ext: tuple[int, int, int] | None = None


class CostCache:
    """The request-independent part of ``kv`` cost for one candidate list, kept current by
    ``touch`` (whoever sets a candidate's ``dirty`` also touches it here): a route then
    refreshes only the workers touched since the last route, not the whole fleet, and finds
    the workers whose prompts in flight may continue this prompt from ``first_holders`` (the
    first block of each request in flight -> its workers) instead of probing every worker.
    The scorer without a cache computes the same costs from the candidates alone (the
    reference, ``tests/router/test_scorer.py`` holds them equal)."""

    __slots__ = (
        "cands", "pos", "base", "full", "busy_flags", "busy", "stale", "first_holders", "order"
    )

    def __init__(
        self,
        cands: Sequence[Candidate],
        pos: dict[str, int],
        first_holders: dict[int, dict[str, int]] | None = None,
    ) -> None:
        n = len(cands)
        self.cands = cands
        self.pos = pos
        self.base = [0.0] * n
        self.full: set[int] = set()
        self.busy_flags = [False] * n
        self.busy = 0
        self.stale: set[int] = set(range(n))
        self.first_holders = first_holders
        # (base, index) of every candidate, ascending: the cheapest workers without a hit
        # are its first entries (``Scorer._kv_pick``); kept sorted by ``_refresh_cache``.
        self.order: list[tuple[float, int]] = []

    def touch(self, worker_id: str) -> None:
        i = self.pos.get(worker_id)
        if i is not None:
            self.stale.add(i)


class Scorer:
    def __init__(self, config: ScorerConfig, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self._rng = random.Random(config.seed)
        self._rr = 0

    def refresh(self, c: Candidate) -> None:
        """Recompute the load part of ``kv`` cost: queued prefill, decode blocks, requests."""
        cfg = self.config
        m = c.metrics
        ld = c.load
        if m is not None and c.ext is not None:
            # What this router reserved is exact and current; the metrics add only what it
            # did not reserve (as of their snapshot): they are up to a period old, and a
            # prefill queue they still show may have drained since.
            ext_prefill, ext_requests, ext_blocks = c.ext
            queued = (ld.prefill_tokens + ext_prefill) / self.block_size
            decode = ld.unique_blocks + ext_blocks
            running = ld.requests + ext_requests
            waiting = min(m.waiting, ext_requests)
            c.kv_full = bool(m.kv_total_blocks) and (
                m.kv_used_blocks / m.kv_total_blocks >= cfg.kv_high_watermark
            )
        elif m is not None:
            queued = max(ld.prefill_tokens, m.prefill_queue_tokens) / self.block_size
            decode = max(ld.active_blocks, m.kv_used_blocks)
            running = max(ld.requests, m.running)
            waiting = m.waiting
            c.kv_full = bool(m.kv_total_blocks) and (
                m.kv_used_blocks / m.kv_total_blocks >= cfg.kv_high_watermark
            )
        else:
            queued = ld.prefill_tokens / self.block_size
            decode = ld.active_blocks
            running = ld.requests
            waiting = 0
            c.kv_full = False
        c.queued = queued
        c.base = (
            cfg.overlap_weight * queued
            + cfg.decode_weight * decode
            + cfg.running_weight * running
            + cfg.waiting_weight * waiting
        )
        c.dirty = False

    def observe(self, c: Candidate, m: WorkerMetrics) -> None:
        """New metrics of a worker: keep the load they show beyond this router's own
        reservations there (requests it did not route), which ``refresh`` adds to them."""
        ld = c.load
        c.metrics = m
        c.ext = (
            max(0, m.prefill_queue_tokens - ld.prefill_tokens),
            max(0, m.running + m.waiting - ld.requests),
            max(0, m.kv_used_blocks - ld.unique_blocks),
        )
        c.dirty = True

    def _saved(self, off: dict[str, int] | None) -> float:
        if not off:
            return 0.0
        costs = self.config.tier_costs
        return sum(k * (1.0 - costs.get(tier, 1.0)) for tier, k in off.items())

    def _kv_costs(
        self,
        cands: Sequence[Candidate],
        matches: PrefixMatches,
        pos: dict[str, int],
        hashes: Sequence[int] | None = None,
        cache: CostCache | None = None,
    ) -> list[float]:
        cfg = self.config
        n = matches.num_blocks
        cached = cache is not None and cache.cands is cands
        if cached:
            assert cache is not None
            if cache.stale:
                self._refresh_cache(cache)
            busy = cache.busy
        else:
            for c in cands:
                if c.dirty:
                    self.refresh(c)
        # A prompt block to compute costs its time (overlap_weight) plus fleet work
        # (miss_weight); queued prefill (in ``base``) costs its time only.
        mw = cfg.miss_weight
        if mw:
            # Scaled by the share of workers with prefill queued: on an idle fleet a
            # recomputed block delays no one, on a saturated one it delays everyone after.
            if not cached:
                busy = sum(1 for c in cands if c.queued > 0)
            mw *= busy / len(cands)
        ow = cfg.overlap_weight + mw
        ow_n = ow * n
        full_n = ow_n + cfg.kv_full_penalty * n
        if cached:
            assert cache is not None
            base = cache.base
            costs = [b + ow_n for b in base]
            for f in cache.full:
                costs[f] = base[f] + full_n
        else:
            costs = [c.base + (full_n if c.kv_full else ow_n) for c in cands]
        gpu, off = matches.gpu, matches.offload
        # Only workers with a hit differ from their base: visit those, not the fleet.
        for wid, g in gpu.items():
            j = pos.get(wid)
            if j is not None:
                costs[j] -= ow * g
        for wid, o in off.items():
            j = pos.get(wid)
            if j is not None:
                costs[j] -= ow * self._saved(o)
        if hashes is not None and cfg.inflight_credit:
            # Prompts in flight: blocks that requests routed to a worker and not finished
            # will have computed by the time this one is scheduled there, although the
            # index has not heard of them yet. Credit the continuation of the cached prefix
            # through that worker's active blocks (one probe where there is none).
            visit: Sequence[int]
            if cached and cache.first_holders is not None:  # type: ignore[union-attr]
                # Only a worker with a hit, or one running a request that starts with this
                # prompt's first block (block hashes are chained: a first block is first
                # wherever it is), can have the continuation active.
                if not n:
                    return costs
                probe = set(gpu)
                probe.update(cache.first_holders.get(hashes[0], ()))  # type: ignore[union-attr]
                visit = [j for wid in probe if (j := pos.get(wid)) is not None]
            else:
                visit = range(len(cands))
            for j in visit:
                c = cands[j]
                refs = c.load.block_refs
                if not refs:
                    continue
                k = g = gpu.get(c.worker_id, 0)
                if k < n and hashes[k] in refs:  # the usual run ends here: no call
                    k = run_in(refs, hashes, k + 1, n)
                if k > g:
                    costs[j] -= ow * (k - g)
        return costs

    def _refresh_cache(self, cache: CostCache) -> None:
        cands, base, full, flags = cache.cands, cache.base, cache.full, cache.busy_flags
        order = cache.order
        # Few touched (the usual route): move each in the sorted order; many: sort anew.
        rebuild = not order or 8 * len(cache.stale) > len(cands)
        for i in cache.stale:
            c = cands[i]
            self.refresh(c)
            if not rebuild:
                old = (base[i], i)
                k = bisect.bisect_left(order, old)
                if k < len(order) and order[k] == old:
                    del order[k]
                    bisect.insort(order, (c.base, i))
                else:  # not where it should be (a NaN base): sort anew
                    rebuild = True
            base[i] = c.base
            if c.kv_full:
                full.add(i)
            else:
                full.discard(i)
            q = c.queued > 0
            if q != flags[i]:
                flags[i] = q
                cache.busy += 1 if q else -1
        cache.stale.clear()
        if rebuild:
            cache.order = sorted((b, i) for i, b in enumerate(base))

    def _dynamo_cost(
        self, c: Candidate, matches: PrefixMatches, n: int, hashes: Sequence[int] | None
    ) -> float:
        # Dynamo: potential prefill blocks (prompt minus device overlap, plus the prefill
        # tokens already queued on the worker) weighted, plus its potential decode blocks:
        # the worker's active blocks, each once, and the prompt's blocks new to them.
        ld = c.load
        gpu = matches.gpu.get(c.worker_id, 0)
        prefill = (n - gpu) + ld.prefill_tokens / self.block_size
        decode = ld.unique_blocks + (ld.new_blocks(hashes) if hashes is not None else n)
        return self.config.overlap_weight * prefill + decode

    def select(
        self,
        candidates: Sequence[Candidate],
        matches: PrefixMatches,
        explain: bool = False,
        pos: dict[str, int] | None = None,
        *,
        hashes: Sequence[int] | None = None,
        cache: CostCache | None = None,
    ) -> tuple[WorkerScore, list[WorkerScore]]:
        """Pick a worker. ``pos`` maps worker id to its index in ``candidates`` (cacheable);
        ``hashes`` are the prompt's block hashes (``dynamo`` mode uses them); ``cache`` the
        ``CostCache`` of this very candidate list (``kv`` mode; same costs, fewer visits)."""
        if not candidates:
            raise ValueError("no candidates")
        n = matches.num_blocks
        mode = self.config.mode
        costs: list[float]
        if mode == "kv":
            if pos is None:
                pos = {c.worker_id: i for i, c in enumerate(candidates)}
            if (
                not explain
                and cache is not None
                and cache.cands is candidates
                and (cache.first_holders is not None or hashes is None)
            ):
                best, cost = self._kv_pick(candidates, matches, pos, hashes, cache)
                return self._score(candidates[best], matches, cost), []
            costs = self._kv_costs(candidates, matches, pos, hashes, cache)
            best = self._argmin(costs, candidates)
        elif mode == "dynamo":
            costs = [self._dynamo_cost(c, matches, n, hashes) for c in candidates]
            best = self._softmax_sample(costs)
        elif mode == "round_robin":
            costs = [0.0] * len(candidates)
            best = self._rr % len(candidates)
            self._rr += 1
        elif mode == "random":
            costs = [0.0] * len(candidates)
            best = self._rng.randrange(len(candidates))
        else:  # least_loaded
            costs = [
                float(max(c.load.requests, c.metrics.running if c.metrics else 0))
                + (c.metrics.waiting if c.metrics else 0)
                for c in candidates
            ]
            best = self._argmin(costs, candidates)
        chosen = self._score(candidates[best], matches, costs[best])
        others = (
            [self._score(c, matches, cost) for c, cost in zip(candidates, costs, strict=True)]
            if explain
            else []
        )
        return chosen, others

    def _kv_pick(
        self,
        cands: Sequence[Candidate],
        matches: PrefixMatches,
        pos: dict[str, int],
        hashes: Sequence[int] | None,
        cache: CostCache,
    ) -> tuple[int, float]:
        """``_argmin(_kv_costs(...))`` and the chosen cost, without a cost per worker: only
        the workers whose cost differs from ``base + overlap * blocks`` (a hit, an offload
        hit, prompts in flight that continue this one, a full cache) get theirs computed,
        with the same operations in the same order as ``_kv_costs`` (the same floats); the
        cheapest of the rest are the first entries of ``cache.order``. Ties are broken as
        ``_argmin`` breaks them, drawing from the same generator (the test holds the two
        equal, random state included)."""
        cfg = self.config
        n = matches.num_blocks
        if cache.stale or not cache.order:
            self._refresh_cache(cache)
        mw = cfg.miss_weight
        if mw:
            mw *= cache.busy / len(cands)
        ow = cfg.overlap_weight + mw
        ow_n = ow * n
        base = cache.base
        gpu, off = matches.gpu, matches.offload
        impl = native.IMPL
        # The same loop in C (dynamo_ext._native.kv_pick) where no cache is full and no
        # offload tier hits (the usual route); it declines (None) what it does not take.
        hs = hashes if hashes is not None and cfg.inflight_credit and n else None
        if (
            impl is not None
            and not cache.full
            and not off
            and type(cands) is list
            and (hs is None or (type(hs) is list and len(hs) == n))
        ):
            holders = cache.first_holders.get(hs[0]) if hs is not None else None  # type: ignore[union-attr]
            got = impl.kv_pick(gpu, pos, base, cache.order, ow, ow_n, hs, holders, cands)
            if got is not None:
                return self._break_tie(cands, got[1], got[0])
        own: dict[int, float] = {}
        if cache.full:
            full_n = ow_n + cfg.kv_full_penalty * n
            for f in cache.full:
                own[f] = base[f] + full_n
        for wid, g in gpu.items():
            j = pos.get(wid)
            if j is not None:
                c = own.get(j)
                own[j] = (base[j] + ow_n if c is None else c) - ow * g
        for wid, o in off.items():
            j = pos.get(wid)
            if j is not None:
                c = own.get(j)
                own[j] = (base[j] + ow_n if c is None else c) - ow * self._saved(o)
        if hashes is not None and cfg.inflight_credit and n:
            assert cache.first_holders is not None
            probe = set(gpu)
            probe.update(cache.first_holders.get(hashes[0], ()))
            for wid in probe:
                j = pos.get(wid)
                if j is None:
                    continue
                refs = cands[j].load.block_refs
                if not refs:
                    continue
                k = g = gpu.get(wid, 0)
                if k < n and hashes[k] in refs:  # the usual run ends here: no call
                    k = run_in(refs, hashes, k + 1, n)
                if k > g:
                    c = own.get(j)
                    own[j] = (base[j] + ow_n if c is None else c) - ow * (k - g)
        lo = min(own.values()) if own else math.inf
        rest: list[int] = []
        for b, j in cache.order:  # ascending base: ascending cost among the rest
            if j in own:
                continue
            x = b + ow_n
            if x > lo:
                break
            if x < lo:
                lo = x
                rest = [j]
            else:
                rest.append(j)
        return self._break_tie(cands, [j for j, c in own.items() if c == lo] + rest, lo)

    def _break_tie(
        self, cands: Sequence[Candidate], ties: list[int], lo: float
    ) -> tuple[int, float]:
        if len(ties) == 1:
            return ties[0], lo
        ties.sort()
        fewest = min(cands[i].load.requests for i in ties)
        ties = [i for i in ties if cands[i].load.requests == fewest]
        return ties[self._rng.randrange(len(ties))], lo

    def _argmin(self, costs: list[float], candidates: Sequence[Candidate]) -> int:
        lo = min(costs)
        first = costs.index(lo)
        if costs.count(lo) == 1:
            return first
        ties = [i for i, c in enumerate(costs) if c == lo]
        # Equal cost: prefer fewer reserved requests, then spread at random.
        fewest = min(candidates[i].load.requests for i in ties)
        ties = [i for i in ties if candidates[i].load.requests == fewest]
        return ties[self._rng.randrange(len(ties))]

    def _softmax_sample(self, logits: list[float]) -> int:
        t = self.config.temperature
        lo, hi = min(logits), max(logits)
        if t == 0 or hi == lo:
            ties = [i for i, x in enumerate(logits) if x == lo]
            return ties[self._rng.randrange(len(ties))]
        # Dynamo normalizes the logits to [0, 1] and samples softmax(-x / T).
        weights = [math.exp(-((x - lo) / (hi - lo)) / t) for x in logits]
        return self._rng.choices(range(len(logits)), weights=weights)[0]

    def _score(self, c: Candidate, matches: PrefixMatches, cost: float) -> WorkerScore:
        saved = self._saved(matches.offload.get(c.worker_id))
        new_prefill = matches.num_blocks - matches.gpu.get(c.worker_id, 0) - saved
        m = c.metrics
        hits = matches.per_tier(c.worker_id)
        if not hits.get(MEDIUM_GPU):
            hits.pop(MEDIUM_GPU, None)
        return WorkerScore(
            worker_id=c.worker_id,
            prefix_hit_blocks=hits,
            offload_score=saved,
            new_prefill_blocks=new_prefill,
            running=m.running if m else 0,
            waiting=m.waiting if m else 0,
            kv_usage=(m.kv_used_blocks / m.kv_total_blocks) if m and m.kv_total_blocks else 0.0,
            predicted_prefill_tokens=c.load.prefill_tokens,
            predicted_active_blocks=c.load.active_blocks,
            cost=cost,
        )
