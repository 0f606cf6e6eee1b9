"""router.idle_gc: cyclic garbage collected between the loop's callbacks, the automatic
collector off while a router runs and back after, and the router's counters."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from dynamo_ext.config import RouterConfig
from dynamo_ext.errors import ConfigError
from dynamo_ext.router.idle_gc import IdleGC, pick_generation
from dynamo_ext.router.server import RouterServer


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_pick_generation_is_the_oldest_past_its_threshold() -> None:
    t = (700, 10, 10)
    assert pick_generation((0, 0, 0), t) is None
    assert pick_generation((700, 10, 10), t) is None  # at the threshold: not yet
    assert pick_generation((701, 3, 0), t) == 0
    assert pick_generation((5, 11, 0), t) == 1
    assert pick_generation((701, 11, 11), t) == 2
    assert pick_generation((10**6, 0, 0), (0, 10, 10)) is None  # threshold 0: collector off


def test_idle_gc_frees_cycles_with_the_automatic_collector_off() -> None:
    assert gc.isenabled()

    async def main() -> tuple[bool, bool, list[int]]:
        seen: list[int] = []
        g = IdleGC(0.005, lambda gen, dt: seen.append(gen))
        g.start()
        off = not gc.isenabled()
        refs = []
        for _ in range(3000):  # past generation 0's threshold
            n = _Node()
            refs.append(weakref.ref(n))
            del n
        for _ in range(200):
            await asyncio.sleep(0.005)
            if all(r() is None for r in refs):
                break
        freed = all(r() is None for r in refs)
        await g.stop()
        return off, freed, seen

    off, freed, seen = asyncio.run(main())
    assert off, "the automatic collector ran beside IdleGC"
    assert freed, "cyclic garbage outlived a hundred intervals"
    assert seen and set(seen) <= {0, 1, 2}
    assert gc.isenabled(), "the automatic collector did not come back"


def test_a_loop_closed_without_stop_turns_the_collector_back_on() -> None:
    async def main() -> None:
        IdleGC(0.01).start()
        await asyncio.sleep(0.02)
        assert not gc.isenabled()

    asyncio.run(main())  # cancels the task left behind
    assert gc.isenabled()


def test_two_routers_share_the_switch_and_count_collections() -> None:
    async def main() -> tuple[bool, bool, float]:
        a = RouterServer(RouterConfig(bind="tcp://127.0.0.1:0", metrics_port=None, gc_interval_s=0.005))
        b = RouterServer(RouterConfig(bind="tcp://127.0.0.1:0", metrics_port=None, gc_interval_s=0.005))
        await a.start()
        await b.start()
        junk = [_Node() for _ in range(3000)]
        del junk
        await asyncio.sleep(0.1)
        await a.stop()
        still_off = not gc.isenabled()  # b still runs
        await b.stop()
        n = sum(
            s.value
            for r in (a, b)
            for m in r.metrics.gc_collections.collect()
            for s in m.samples
            if s.name.endswith("_total")
        )
        return still_off, gc.isenabled(), n

    still_off, back_on, n = asyncio.run(main())
    assert still_off and back_on
    assert n >= 1


def test_gc_interval_is_checked() -> None:
    with pytest.raises(ConfigError):
        RouterConfig(gc_interval_s=-1)
    assert RouterConfig(gc_interval_s=0).gc_interval_s == 0
