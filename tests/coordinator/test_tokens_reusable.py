"""Reusable enrollment tokens in the store: `token create --uses N` for a fleet rollout."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from coordinator.errors import CoordinatorError, EnrollmentRefused, UnknownToken
from coordinator.store import Store

NOW = 1_800_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'c.db'}")
    yield s  # type: ignore[misc]
    s.close()


def test_a_token_for_three_uses_enrolls_three_nodes_and_refuses_the_fourth(store: Store) -> None:
    token_id, secret = store.create_token(3600, {"site": "rack-7"}, NOW, uses=3)
    for i in range(3):
        node = store.redeem_token(token_id, secret, f"did:key:z{i}", NOW + i)
        assert node.labels == {"site": "rack-7"}
    with pytest.raises(EnrollmentRefused, match="used all 3 times"):
        store.redeem_token(token_id, secret, "did:key:z3", NOW + 5)
    [token] = store.list_tokens()
    assert (token.uses, token.max_uses, token.state(NOW)) == (3, 3, "used")
    assert token.used_by == "did:key:z2"


def test_each_use_is_recorded_with_the_node_and_the_time(store: Store) -> None:
    token_id, secret = store.create_token(3600, {}, NOW, uses=5)
    store.redeem_token(token_id, secret, "did:key:za", NOW + 1)
    store.redeem_token(token_id, secret, "did:key:zb", NOW + 2)
    assert store.token_uses(token_id) == [("did:key:za", NOW + 1), ("did:key:zb", NOW + 2)]
    assert store.list_tokens()[0].state(NOW + 3) == "active"


def test_a_reusable_token_past_its_ttl_is_refused_with_uses_left(store: Store) -> None:
    token_id, secret = store.create_token(60, {}, NOW, uses=100)
    store.redeem_token(token_id, secret, "did:key:za", NOW + 59)
    with pytest.raises(EnrollmentRefused, match="expired"):
        store.redeem_token(token_id, secret, "did:key:zb", NOW + 60)
    assert store.list_tokens()[0].state(NOW + 60) == "expired"


def test_a_revoked_token_refuses_its_remaining_uses(store: Store) -> None:
    token_id, secret = store.create_token(3600, {}, NOW, uses=10)
    store.redeem_token(token_id, secret, "did:key:za", NOW)
    assert store.revoke_token(token_id, NOW + 1) is True
    assert store.revoke_token(token_id, NOW + 2) is False
    with pytest.raises(EnrollmentRefused, match="revoked"):
        store.redeem_token(token_id, secret, "did:key:zb", NOW + 3)
    assert store.get_node("did:key:za") is not None  # what it enrolled stays enrolled
    with pytest.raises(UnknownToken):
        store.revoke_token("nope", NOW)


@pytest.mark.parametrize("uses", [0, -1, 10**7, True])
def test_a_token_needs_a_sane_number_of_uses(store: Store, uses: int) -> None:
    with pytest.raises(CoordinatorError, match="uses"):
        store.create_token(60, {}, NOW, uses=uses)


def test_concurrent_enrollments_never_spend_more_than_the_uses(tmp_path: Path) -> None:
    """Ten nodes race for four uses through separate stores (separate processes' view)."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    stores = [Store(url) for _ in range(10)]
    token_id, secret = stores[0].create_token(3600, {}, NOW, uses=4)
    won: list[str] = []
    refused: list[str] = []
    start = threading.Barrier(10)

    def enroll(i: int) -> None:
        start.wait()
        try:
            stores[i].redeem_token(token_id, secret, f"did:key:z{i}", NOW)
            won.append(f"did:key:z{i}")
        except EnrollmentRefused:
            refused.append(f"did:key:z{i}")

    threads = [threading.Thread(target=enroll, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(won) == 4
        assert len(refused) == 6
        assert sorted(d for d, _ in stores[0].token_uses(token_id)) == sorted(won)
    finally:
        for s in stores:
            s.close()


def test_an_old_database_gains_uses_and_keeps_a_spent_token_spent(tmp_path: Path) -> None:
    """A store made before reusable tokens: its tokens become one-use tokens."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE enrollment_tokens (token_id VARCHAR(64) PRIMARY KEY, "
                   "secret_hash BLOB, labels JSON, created_at FLOAT, expires_at FLOAT, "
                   "used_at FLOAT, used_by VARCHAR(255))")
        db.execute("INSERT INTO enrollment_tokens VALUES ('spent', x'00', '{}', 1, 9e9, 2, 'd')")
        db.execute("INSERT INTO enrollment_tokens VALUES ('fresh', x'00', '{}', 1, 9e9, NULL, "
                   "NULL)")
    store = Store(f"sqlite:///{path}")
    try:
        tokens = {t.token_id: t for t in store.list_tokens()}
    finally:
        store.close()
    assert (tokens["spent"].uses, tokens["spent"].max_uses) == (1, 1)
    assert tokens["spent"].state(NOW) == "used"
    assert (tokens["fresh"].uses, tokens["fresh"].max_uses) == (0, 1)
    assert tokens["fresh"].revoked_at is None
