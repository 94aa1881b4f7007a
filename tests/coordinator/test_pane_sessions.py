"""The web pane's sessions live in the store: shared by replicas, kept over a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.store import Store
from coordinator.ui.sessions import MAX_SESSIONS, SESSION_TTL_S, Sessions


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Two replicas' stores on one database."""
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    one, two = Store(url), Store(url)
    yield one, two
    one.close()
    two.close()


def test_a_session_opened_on_one_replica_works_on_the_other_until_signed_out(
        stores: tuple[Store, Store]) -> None:
    clock = Clock()
    here, there = Sessions(stores[0], clock), Sessions(stores[1], clock)
    session = here.open("admin-1")
    assert there.get(session) == "admin-1"
    assert there.get("made-up") is None
    there.close(session)
    assert here.get(session) is None


def test_a_session_survives_a_restart_and_expires(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    clock = Clock()
    store = Store(url)
    session = Sessions(store, clock).open("admin-1")
    store.close()
    store = Store(url)  # the restarted coordinator
    again = Sessions(store, clock)
    assert again.get(session) == "admin-1"
    clock.now += SESSION_TTL_S
    assert again.get(session) is None
    store.close()


def test_only_a_hash_of_the_session_is_stored(stores: tuple[Store, Store]) -> None:
    session = Sessions(stores[0]).open("admin-1")
    with stores[0].engine.connect() as conn:
        dump = "\n".join(conn.connection.iterdump())
    assert session not in dump
    assert "admin_sessions" in dump


def test_sessions_stay_bounded_the_oldest_login_going_first(
        stores: tuple[Store, Store]) -> None:
    clock = Clock()
    sessions = Sessions(stores[0], clock)
    opened = []
    for _ in range(MAX_SESSIONS + 1):
        clock.now += 0.001
        opened.append(sessions.open("a"))
    assert sessions.get(opened[0]) is None
    assert sessions.get(opened[1]) == "a"
    assert sessions.get(opened[-1]) == "a"
