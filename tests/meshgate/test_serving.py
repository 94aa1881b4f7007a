"""The daemons' event loop: uvloop unless MESHGATE_LOOP=asyncio."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from meshgate.serving import loop_factory, run


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_the_daemon_loop_is_uvloop_unless_asked_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MESHGATE_LOOP", raising=False)
    assert loop_factory() is uvloop.new_event_loop
    assert issubclass(run(_loop_type()), uvloop.Loop)
    monkeypatch.setenv("MESHGATE_LOOP", "asyncio")
    assert loop_factory() is None
    assert not issubclass(run(_loop_type()), uvloop.Loop)
