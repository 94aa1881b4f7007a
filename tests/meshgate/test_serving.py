"""The daemons' event loop: asyncio's unless MESHGATE_LOOP=uvloop (and uvloop is there)."""

from __future__ import annotations

import asyncio

import pytest

from meshgate.serving import loop_factory, run


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
