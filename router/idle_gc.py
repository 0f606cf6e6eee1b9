"""Python's cyclic garbage collector run between the event loop's callbacks, not inside them.

CPython starts a collection from whatever allocation crosses its threshold: in a router,
that is often the middle of a route, and the route waits for it (measured in
``bench route-cost``'s embedded child at 256 workers: route p99 about 300 us with the
automatic collector, about 245 us without it). ``IdleGC`` turns the automatic collector off
and collects from a task of the loop instead, every ``interval_s``, choosing the generation
as CPython would (a generation is collected once its count passes its threshold, the
oldest such first; CPython's extra condition on a full collection, long-lived objects grown
by a quarter, is left out: after ``gc.freeze()`` the oldest generation is small), so that garbage in cycles is still freed within one interval.

Reference-counted garbage, nearly all of it, is freed at once either way. Several routers
in one process (tests, a frontend with its embedded router) share one process-wide switch:
the automatic collector comes back when the last ``IdleGC`` stops, if it was on before the
first one started.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_active = 0  # IdleGCs started and not stopped, process-wide
_was_enabled = True  # the automatic collector's state before the first one started


def pick_generation(count: tuple[int, int, int], threshold: tuple[int, int, int]) -> int | None:
    """The generation CPython would collect now (None: none): the oldest whose count is past its
    threshold, where generation 0's count is the allocations since its last collection and
    an older one's the collections of the one below since its own."""
    for gen in (2, 1, 0):
        if threshold[gen] and count[gen] > threshold[gen]:
            return gen
    return None


class IdleGC:
    def __init__(
        self, interval_s: float = 0.01, on_collect: Callable[[int, float], None] | None = None
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self.on_collect = on_collect  # (generation, seconds) of each collection
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        global _active, _was_enabled
        if self._task is not None:
            return
        if _active == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _active += 1
        self._task = asyncio.get_running_loop().create_task(self._run(), name="idle-gc")

    async def stop(self) -> None:
        task = self._task
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        self._release()  # also where the task never ran

    def _release(self) -> None:
        global _active
        if self._task is None:
            return
        self._task = None
        _active -= 1
        if _active == 0 and _was_enabled:
            gc.enable()

    def step(self) -> int | None:
        """Collect the generation CPython would collect now, if any; returns it."""
        gen = pick_generation(gc.get_count(), gc.get_threshold())
        if gen is not None:
            t0 = time.perf_counter()
            gc.collect(gen)
            if self.on_collect is not None:
                self.on_collect(gen, time.perf_counter() - t0)
        return gen

    async def _run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                try:
                    self.step()
                except Exception:  # a finalizer that raises must not end collection for good
                    log.exception("idle gc: a collection raised")
        finally:
            # Cancelled by stop, or by a loop shut down without it (asyncio.run cancels what
            # is left): the automatic collector is not left off with no one collecting.
            self._release()
