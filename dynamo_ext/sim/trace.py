"""Traces for the simulator: Mooncake rows (``timestamp`` ms, ``input_length``,
``output_length``, ``hash_ids`` of 512-token blocks) and the prompts they stand for.

Token ids are synthesized from ``hash_ids`` (the same id always gives the same 512 tokens,
the last block cut to ``input_length``) and hashed with the router's own block hash
(``BlockHasher.chain``: vLLM's sha256 chain at the replay's block size, which must divide
the trace's block or the cache of hashed trace blocks is bypassed), so equal ``hash_ids``
prefixes are equal cached prefixes.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dynamo_ext.errors import ConfigError
from dynamo_ext.hashing import BlockHasher


@dataclass(slots=True)
class TraceRow:
    arrival_ms: float
    input_length: int
    output_length: int
    hash_ids: list[int]
    raw: str  # the line as read, to hand the same requests to Dynamo's replayer


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRow]:
    """Mooncake JSON lines; a bad line fails with its number. Sorted by arrival."""
    rows: list[TraceRow] = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
                row = TraceRow(
                    float(d["timestamp"]),
                    int(d["input_length"]),
                    int(d["output_length"]),
                    [int(h) for h in d["hash_ids"]],
                    line,
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError("trace", f"{path}:{n}: not a Mooncake row: {exc}") from exc
            if row.input_length <= 0:
                raise ConfigError("trace", f"{path}:{n}: input_length must be > 0")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise ConfigError("trace", f"{path} holds no request")
    rows.sort(key=lambda r: r.arrival_ms)
    return rows


class TracePrompts:
    """Token ids and router block hashes of a trace's prompts, computed once for all
    policies. A trace block's hashes depend only on (parent digest, hash id, length), so
    each distinct one is hashed once."""

    def __init__(
        self,
        rows: Sequence[TraceRow],
        block_size: int,
        trace_block_size: int = 512,
        hash_algo: str = "sha256",
        seed: str = "dynamo-ext-replay",
    ) -> None:
        self.rows = rows
        self.block_size = block_size
        self.trace_block_size = trace_block_size
        self._seed = seed.encode()
        self.hasher = BlockHasher(block_size, "engine", hash_algo)
        self.hashes: list[array[int]] = []
        self.digests: list[bytes | None] = []
        cache: dict[tuple[bytes | None, int, int], tuple[list[int], bytes | None]] = {}
        aligned = trace_block_size % block_size == 0
        for i, row in enumerate(rows):
            if not aligned:
                hs, dg = self.hasher.chain(None, self.tokens(i))
                self.hashes.append(array("Q", hs))
                self.digests.append(dg)
                continue
            out = array("Q")
            parent: bytes | None = None
            left = row.input_length
            for hid in row.hash_ids:
                if left <= 0:
                    break
                cut = min(trace_block_size, left)
                key = (parent, hid, cut)
                hit = cache.get(key)
                if hit is None:
                    hit = cache[key] = self.hasher.chain(parent, self._block(hid)[:cut])
                out.extend(hit[0])
                parent = hit[1]
                left -= cut
            if left > 0:
                # The ids cover less than input_length: every trace block was full, so the
                # unique tail starts on a block boundary and continues the chain.
                hs, parent = self.hasher.chain(parent, self.tokens(i)[len(out) * block_size :])
                out.extend(hs)
            self.hashes.append(out)
            self.digests.append(parent)

    def _block(self, hid: int) -> list[int]:
        # 512 pseudo-random 16-bit token ids per hash id, from a seeded XOF: fast, stable
        # across processes and platforms.
        raw = hashlib.shake_128(self._seed + hid.to_bytes(8, "big", signed=True)).digest(
            2 * self.trace_block_size
        )
        return array("H", raw).tolist()

    def _tail(self, i: int, n: int) -> list[int]:
        raw = hashlib.shake_128(self._seed + b"tail" + i.to_bytes(8, "big")).digest(2 * n)
        return array("H", raw).tolist()

    def tokens(self, i: int) -> list[int]:
        row = self.rows[i]
        toks: list[int] = []
        left = row.input_length
        for hid in row.hash_ids:
            if left <= 0:
                break
            b = self._block(hid)
            toks.extend(b[:left] if left < len(b) else b)
            left -= min(left, len(b))
        if left > 0:
            toks.extend(self._tail(i, left))
        return toks
