"""Scorer: turn prefix matches and worker load into one cost per worker and pick one.

Policies (``ScorerConfig.mode``): ``kv`` our default cost (see ``ScorerConfig``), ``dynamo``
Dynamo's KV-router cost with softmax sampling, and the baselines ``round_robin``,
``random`` and ``least_loaded`` that the simulator compares against.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from dynamo_ext.config import ScorerConfig
from dynamo_ext.protocol import MEDIUM_GPU, WorkerMetrics, WorkerScore
from dynamo_ext.router.indexer import PrefixMatches
from dynamo_ext.router.sequences import WorkerLoad


@dataclass(slots=True)
class Candidate:
    worker_id: str
    metrics: WorkerMetrics | None
    load: WorkerLoad


class Scorer:
    def __init__(self, config: ScorerConfig, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self._rng = random.Random(config.seed)
        self._rr = 0

    def _kv_cost(
        self, c: Candidate, matches: PrefixMatches, n: int
    ) -> tuple[float, float, float, dict[str, int]]:
        cfg = self.config
        bs = self.block_size
        gpu = matches.gpu.get(c.worker_id, 0)
        off = matches.offload.get(c.worker_id)
        saved = 0.0
        off_hits = 0
        if off:
            costs = cfg.tier_costs
            for tier, k in off.items():
                off_hits += k
                saved += k * (1.0 - costs.get(tier, 1.0))
        new_prefill = n - gpu - saved
        m = c.metrics
        ld = c.load
        if m is not None:
            queued = max(ld.prefill_tokens, m.prefill_queue_tokens) / bs
            decode = max(ld.active_blocks, m.kv_used_blocks)
            running = max(ld.requests, m.running)
            waiting = m.waiting
            usage = m.kv_used_blocks / m.kv_total_blocks if m.kv_total_blocks else 0.0
        else:
            queued = ld.prefill_tokens / bs
            decode = ld.active_blocks
            running = ld.requests
            waiting = 0
            usage = 0.0
        cost = (
            cfg.overlap_weight * (new_prefill + queued)
            + decode
            + cfg.running_weight * running
            + cfg.waiting_weight * waiting
        )
        if usage >= cfg.kv_high_watermark:
            cost += cfg.kv_full_penalty * n
        return cost, saved, new_prefill, off or {}

    def _dynamo_cost(self, c: Candidate, matches: PrefixMatches, n: int) -> float:
        # Dynamo: potential prefill blocks (prompt minus device overlap, plus the prefill
        # tokens already queued on the worker) weighted, plus its decode blocks after
        # taking this request.
        gpu = matches.gpu.get(c.worker_id, 0)
        prefill = (n - gpu) + c.load.prefill_tokens / self.block_size
        decode = c.load.active_blocks + n
        return self.config.overlap_weight * prefill + decode

    def select(
        self,
        candidates: Sequence[Candidate],
        matches: PrefixMatches,
        explain: bool = False,
    ) -> tuple[WorkerScore, list[WorkerScore]]:
        if not candidates:
            raise ValueError("no candidates")
        n = matches.num_blocks
        mode = self.config.mode
        costs: list[float]
        if mode == "kv":
            parts = [self._kv_cost(c, matches, n) for c in candidates]
            costs = [p[0] for p in parts]
            best = self._argmin(costs, candidates)
        elif mode == "dynamo":
            costs = [self._dynamo_cost(c, matches, n) for c in candidates]
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

    def _argmin(self, costs: list[float], candidates: Sequence[Candidate]) -> int:
        lo = min(costs)
        ties = [i for i, c in enumerate(costs) if c == lo]
        if len(ties) == 1:
            return ties[0]
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
        n = matches.num_blocks
        _, saved, new_prefill, _ = self._kv_cost(c, matches, n)
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
