"""Python's cyclic garbage collector and a fleet-sized heap.

A coordinator holding 10,000 node connections keeps ~1.5 million tracked
objects alive (links, sessions, tasks, each node's last telemetry), and every
telemetry frame replaces a few of them. Those replacements outlive the young
generations, so CPython's full collection keeps being triggered, and each one
walks the whole heap: with `scripts/bench/ingest.py --nodes 10000` (1,000
frames/s) on the shared 2-core box, full collections took ~2 s each (one
run: 3 of them, 6.1 s of 14.9 s CPU; with this policy, interleaved rounds
of one run: no full collection, and the CPU per frame within the noise of
the box, 455-552 us against 462-481 us without).

So every FREEZE_EVERY_S the server moves what is alive into the permanent
generation (`gc.freeze()`, O(1)), which the collector no longer walks; new
objects are collected as usual. Cyclic garbage among frozen objects (a node
that disconnected after its connection was frozen) is reclaimed by a sweep
every SWEEP_EVERY_S: `gc.unfreeze()`, one full `gc.collect()`, freeze again —
one pause of the old kind every ten minutes instead of every few seconds.
Reference counting frees everything that is not in a cycle at once, frozen or
not, so the memory of replaced telemetry is not held.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

__all__ = ["FREEZE_EVERY_S", "SWEEP_EVERY_S", "gc_loop", "gc_step"]

log = logging.getLogger(__name__)

FREEZE_EVERY_S = 10.0
SWEEP_EVERY_S = 600.0


def gc_step(now: float, last_sweep: float, sweep_every: float = SWEEP_EVERY_S) -> float:
    """Freeze what is alive; first sweep the frozen heap if `sweep_every` passed since
    `last_sweep`. Returns when the last sweep was."""
    if now - last_sweep >= sweep_every:
        began = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        log.debug("gc sweep: %d unreachable object(s) in %.3f s", found,
                  time.perf_counter() - began)
        last_sweep = now
    gc.freeze()
    return last_sweep


async def gc_loop(freeze_every: float = FREEZE_EVERY_S,
                  sweep_every: float = SWEEP_EVERY_S) -> None:
    """Until cancelled: `gc_step` every `freeze_every` seconds; unfrozen when stopped."""
    last_sweep = time.monotonic()
    try:
        while True:
            await asyncio.sleep(freeze_every)
            last_sweep = gc_step(time.monotonic(), last_sweep, sweep_every)
    finally:
        gc.unfreeze()
