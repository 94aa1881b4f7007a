"""The server's GC policy (coordinator/gcpolicy.py): freeze what is alive, sweep rarely."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from coordinator.gcpolicy import gc_step


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_a_step_freezes_what_is_alive_so_collections_stop_walking_it() -> None:
    kept = [Cycle() for _ in range(1000)]
    before = gc.get_freeze_count()
    assert gc_step(100.0, last_sweep=50.0, sweep_every=600.0) == 50.0  # no sweep due
    assert gc.get_freeze_count() >= before + len(kept)
    assert all(not gc.is_finalized(c) for c in kept)


def test_cycles_that_died_frozen_are_reclaimed_by_the_next_sweep() -> None:
    import weakref

    cycle = Cycle()
    ref = weakref.ref(cycle)
    gc_step(0.0, last_sweep=0.0, sweep_every=600.0)  # frozen while alive
    del cycle
    gc.collect()
    assert ref() is not None  # frozen: the collector does not look at it
    assert gc_step(700.0, last_sweep=0.0, sweep_every=600.0) == 700.0  # a sweep
    assert ref() is None
