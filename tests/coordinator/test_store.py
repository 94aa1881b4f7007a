"""The store's contract for tokens and nodes, on every backend the `store` fixture yields.

SQLite (a real file, WAL) always; PostgreSQL too when MESHGATE_TEST_POSTGRES_URL
names an empty database the tests may fill.
"""

from __future__ import annotations

import hashlib
import threading

import pytest
from sqlalchemy import select

from coordinator.errors import CoordinatorError, EnrollmentRefused, UnknownNode
from coordinator.store import (
    NodeRecord,
    Store,
    TokenRow,
)
from tests.coordinator.store_harness import (
    DID_A,
    DID_B,
    NOW,
    Opener,
    enroll,
)

# ----------------------------------------------------------------------------- tokens


def test_a_token_enrolls_a_node_with_the_tokens_labels(store: Store) -> None:
    node = enroll(store, labels={"site": "lab-1"})
    assert node.did == DID_A
    assert node.labels == {"site": "lab-1"}
    assert node.enrolled_at == NOW + 1
    assert node.revoked_at is None
    assert node.last_seen is None
    assert store.get_node(DID_A) == node


def test_a_token_is_stored_only_as_a_hash_of_its_secret(store: Store) -> None:
    token_id, secret = store.create_token(60, {}, NOW)
    with store.engine.connect() as conn:
        dump = repr(conn.execute(select(TokenRow.__table__)).all())
        stored = conn.execute(select(TokenRow.secret_hash)).scalar_one()
    assert secret.hex() not in dump
    assert repr(secret) not in dump
    assert stored == hashlib.sha256(secret).digest()
    assert len(secret) == 32
    assert token_id


def test_a_used_token_is_refused_and_the_refusal_names_who_used_it(store: Store) -> None:
    token_id, secret = store.create_token(3600, {}, NOW)
    store.redeem_token(token_id, secret, DID_A, NOW)
    with pytest.raises(EnrollmentRefused, match=rf"already used \(by {DID_A} at 2027-"):
        store.redeem_token(token_id, secret, DID_B, NOW + 1)
    assert store.get_node(DID_B) is None


def test_an_unknown_token_is_refused(store: Store) -> None:
    with pytest.raises(EnrollmentRefused, match=r"^unknown enrollment token$"):
        store.redeem_token("nope", b"x" * 32, DID_A, NOW)


def test_a_wrong_secret_is_refused_and_leaves_the_token_usable(store: Store) -> None:
    token_id, secret = store.create_token(3600, {}, NOW)
    with pytest.raises(EnrollmentRefused, match="secret does not match"):
        store.redeem_token(token_id, b"\0" * 32, DID_A, NOW)
    assert store.redeem_token(token_id, secret, DID_A, NOW).did == DID_A


def test_an_expired_token_is_refused_with_its_expiry_time(store: Store) -> None:
    token_id, secret = store.create_token(60, {}, NOW)
    with pytest.raises(EnrollmentRefused, match="expired at 2027-01-15T08:01:00Z"):
        store.redeem_token(token_id, secret, DID_A, NOW + 60)


def test_a_token_needs_a_positive_lifetime(store: Store) -> None:
    with pytest.raises(CoordinatorError, match="positive"):
        store.create_token(0, {}, NOW)


def test_an_enrolled_node_is_refused_and_the_token_stays_unspent(store: Store) -> None:
    enroll(store)
    token_id, secret = store.create_token(3600, {}, NOW)
    with pytest.raises(EnrollmentRefused, match="node already enrolled"):
        store.redeem_token(token_id, secret, DID_A, NOW)
    assert store.redeem_token(token_id, secret, DID_B, NOW).did == DID_B


def test_a_revoked_node_can_enroll_again_and_keeps_its_handshake_clock(store: Store) -> None:
    enroll(store, labels={"site": "old"})
    assert store.advance_handshake_ts(DID_A, 5000)
    store.revoke_node(DID_A, NOW + 2)
    again = enroll(store, labels={"site": "new"})
    assert again.revoked_at is None
    assert again.labels == {"site": "new"}
    assert again.last_ts_ms == 5000
    assert not store.advance_handshake_ts(DID_A, 5000)


def test_two_concurrent_redeems_of_one_token_have_exactly_one_winner(open_store: Opener) -> None:
    """Two stores on one database, like the server and a second replica, racing in threads."""
    stores = [open_store(), open_store()]
    for round_ in range(8):
        token_id, secret = stores[0].create_token(3600, {}, NOW)
        barrier = threading.Barrier(2)
        outcomes: dict[str, object] = {}

        def redeem(store: Store, did: str, tid: str = token_id, sec: bytes = secret,
                   gate: threading.Barrier = barrier, out: dict[str, object] = outcomes) -> None:
            gate.wait()
            try:
                out[did] = store.redeem_token(tid, sec, did, NOW)
            except Exception as exc:  # reported by the asserts below, not lost in the thread
                out[did] = exc

        dids = [f"{DID_A}-{round_}", f"{DID_B}-{round_}"]
        threads = [threading.Thread(target=redeem, args=pair)
                   for pair in zip(stores, dids, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(outcomes) == sorted(dids), "a thread did not finish"
        winners = [d for d in dids if isinstance(outcomes[d], NodeRecord)]
        losers = [outcomes[d] for d in dids if isinstance(outcomes[d], EnrollmentRefused)]
        assert len(winners) == 1, outcomes
        assert len(losers) == 1, outcomes
        assert "already used" in str(losers[0])
        assert [n.did for n in stores[1].list_nodes() if n.did in dids] == winners


# ----------------------------------------------------------------------------- nodes


def test_an_unknown_node_is_none(store: Store) -> None:
    assert store.get_node(DID_A) is None


def test_list_nodes_returns_every_enrolled_node(store: Store) -> None:
    enroll(store, DID_A)
    enroll(store, DID_B)
    assert sorted(n.did for n in store.list_nodes()) == [DID_A, DID_B]


def test_revoking_a_node_is_recorded_and_reported_only_the_first_time(store: Store) -> None:
    enroll(store)
    assert store.revoke_node(DID_A, NOW + 5) is True
    assert store.revoke_node(DID_A, NOW + 6) is False
    node = store.get_node(DID_A)
    assert node is not None
    assert node.revoked_at == NOW + 5


def test_revoked_nodes_lists_exactly_the_revoked_ones(store: Store) -> None:
    enroll(store, DID_A)
    enroll(store, DID_B)
    assert store.revoked_nodes() == set()
    store.revoke_node(DID_B, NOW + 1)
    assert store.revoked_nodes() == {DID_B}


def test_revoking_an_unknown_node_raises_unknown_node(store: Store) -> None:
    with pytest.raises(UnknownNode, match=DID_A):
        store.revoke_node(DID_A, NOW)


def test_touching_a_node_records_when_it_was_seen_and_what_it_serves(store: Store) -> None:
    enroll(store)
    store.touch_node(DID_A, NOW + 10, ["smollm2", "qwen"])
    store.touch_node(DID_A, NOW + 20)
    node = store.get_node(DID_A)
    assert node is not None
    assert node.last_seen == NOW + 20
    assert node.models == ["smollm2", "qwen"]


def test_touching_many_nodes_at_once_records_each_ones_time_and_models(store: Store) -> None:
    enroll(store, DID_A)
    enroll(store, DID_B)
    store.touch_node(DID_B, NOW, ["old"])
    store.touch_nodes({DID_A: (NOW + 10, ["smollm2", "qwen"]), DID_B: (NOW + 11, None),
                       "did:key:z6MkUNKNOWN": (NOW + 12, ["m"])})
    a, b = store.get_node(DID_A), store.get_node(DID_B)
    assert a is not None
    assert b is not None
    assert (a.last_seen, a.models) == (NOW + 10, ["smollm2", "qwen"])
    assert (b.last_seen, b.models) == (NOW + 11, ["old"])  # None: its models stay
    assert sorted(n.did for n in store.list_nodes()) == [DID_A, DID_B]
    store.touch_nodes({})  # nothing to write is no error


def test_served_models_are_read_from_unrevoked_nodes_only(store: Store) -> None:
    enroll(store, DID_A)
    enroll(store, DID_B)
    store.touch_node(DID_A, NOW, ["smollm2"])
    store.touch_node(DID_B, NOW, ["qwen", "smollm2"])
    assert store.served_models() == {"smollm2", "qwen"}
    store.revoke_node(DID_B, NOW + 1)
    assert store.served_models() == {"smollm2"}


def test_touching_an_unknown_node_changes_nothing(store: Store) -> None:
    store.touch_node(DID_A, NOW, ["m"])
    assert store.list_nodes() == []


def test_handshake_timestamps_must_strictly_increase(store: Store) -> None:
    enroll(store)
    assert store.advance_handshake_ts(DID_A, 1000)
    assert not store.advance_handshake_ts(DID_A, 1000)
    assert not store.advance_handshake_ts(DID_A, 999)
    assert store.advance_handshake_ts(DID_A, 1001)


def test_handshake_timestamp_survives_reopening_the_store(open_store: Opener) -> None:
    first = open_store()
    enroll(first)
    assert first.advance_handshake_ts(DID_A, 1_700_000_000_000)
    first.close()
    assert not open_store().advance_handshake_ts(DID_A, 1_700_000_000_000)


def test_an_unknown_node_has_no_handshake_clock_to_advance(store: Store) -> None:
    assert not store.advance_handshake_ts(DID_A, 1)
