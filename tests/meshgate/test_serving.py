"""The daemons' event loop: the caller's default (the node asyncio's, the coordinator
uvloop's) unless MESHGATE_LOOP names one; the collector's thresholds raised while it runs
unless MESHGATE_GC=default."""

from __future__ import annotations

import asyncio
import gc

import pytest

from meshgate.serving import GC_THRESHOLD, loop_factory, run


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_the_daemon_loop_is_asyncios_unless_uvloop_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MESHGATE_LOOP", raising=False)
    assert loop_factory() is None
    assert run(_loop_type()).__module__.startswith("asyncio")
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.setenv("MESHGATE_LOOP", "uvloop")
    assert loop_factory() is uvloop.new_event_loop
    assert issubclass(run(_loop_type()), uvloop.Loop)


def test_a_daemon_may_default_to_uvloop_and_the_environment_turns_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.delenv("MESHGATE_LOOP", raising=False)
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert issubclass(run(_loop_type(), loop="uvloop"), uvloop.Loop)
    monkeypatch.setenv("MESHGATE_LOOP", "asyncio")
    assert loop_factory("uvloop") is None
    assert run(_loop_type(), loop="uvloop").__module__.startswith("asyncio")


async def _threshold() -> tuple[int, int, int]:
    return gc.get_threshold()


def test_the_daemon_runs_with_the_raised_gc_threshold_and_gives_it_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = gc.get_threshold()
    monkeypatch.delenv("MESHGATE_GC", raising=False)
    assert run(_threshold()) == GC_THRESHOLD != before
    assert gc.get_threshold() == before
    monkeypatch.setenv("MESHGATE_GC", "default")
    assert run(_threshold()) == before
