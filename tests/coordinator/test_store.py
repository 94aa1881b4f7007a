"""The store's contract: every test runs on every backend the `store` fixture yields.

SQLite (a real file, WAL) always; PostgreSQL too when MESHGATE_TEST_POSTGRES_URL
names an empty database the tests may fill.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select, text

from coordinator.errors import CoordinatorError, EnrollmentRefused, UnknownKey, UnknownNode
from coordinator.store import (
    ApiKeyRow,
    KeyScopes,
    NodeRecord,
    Store,
    TokenRow,
    UsageRecord,
    UsageRow,
)

NOW = 1_800_000_000.0
DID_A = "did:key:z6MkAAAA"
DID_B = "did:key:z6MkBBBB"
POSTGRES_ENV = "MESHGATE_TEST_POSTGRES_URL"

Opener = Callable[[], Store]


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'coordinator.db'}"


def _postgres(_: Path) -> str:
    return os.environ[POSTGRES_ENV]


BACKENDS = [pytest.param(_sqlite, id="sqlite")]
if os.environ.get(POSTGRES_ENV):
    BACKENDS.append(pytest.param(_postgres, id="postgresql"))


@pytest.fixture(params=BACKENDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens stores on one fresh database; several may be open at once, like two processes."""
    url = request.param(tmp_path)
    opened: list[Store] = []

    def opener() -> Store:
        opened.append(Store(url))
        return opened[-1]

    yield opener
    if url.startswith("postgresql"):
        from coordinator.store import Base

        Base.metadata.drop_all(opened[0].engine)
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Opener) -> Store:
    return open_store()


def enroll(store: Store, did: str = DID_A, labels: dict[str, str] | None = None) -> NodeRecord:
    token_id, secret = store.create_token(3600, labels or {}, NOW)
    return store.redeem_token(token_id, secret, did, NOW + 1)


def usage(request_id: str, *, key: str | None = "k1", node: str | None = DID_A,
          model: str = "m", at: float = NOW, outcome: str = "ok") -> UsageRecord:
    return UsageRecord(request_id=request_id, key_id=key, node_did=node, model=model,
                       endpoint="/v1/chat/completions", prompt_tokens=10, completion_tokens=5,
                       latency_ms=100.0, outcome=outcome, created_at=at)


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


# ----------------------------------------------------------------------------- API keys


def test_a_created_key_verifies_and_carries_its_model_scope(store: Store) -> None:
    record, plaintext = store.create_key("app", NOW, models=["b", "a"])
    assert plaintext.startswith(f"mg_{record.key_id}_")
    assert store.verify_key(plaintext) == record
    assert record.models == ["a", "b"]
    assert record.allows_model("a")
    assert not record.allows_model("c")


def test_a_key_without_models_allows_every_model(store: Store) -> None:
    record, _ = store.create_key("app", NOW)
    assert record.models is None
    assert record.allows_model("anything")


def test_a_key_is_stored_only_as_a_hash_of_its_secret(store: Store) -> None:
    record, plaintext = store.create_key("app", NOW)
    secret = plaintext.removeprefix(f"mg_{record.key_id}_")
    with store.engine.connect() as conn:
        dump = repr(conn.execute(select(ApiKeyRow.__table__)).all())
    assert secret not in dump


@pytest.mark.parametrize("mangle", [
    lambda p: p[:-1] + ("A" if p[-1] != "A" else "B"),
    lambda p: p.replace("mg_", "xx_", 1),
    lambda p: p.split("_")[0] + "_" + p.split("_")[1],
    lambda p: "mg_unknownid_" + p.split("_", 2)[2],
    lambda p: "",
    lambda p: "mg__",
    lambda p: p + "x" * 300,
], ids=["wrong-secret", "wrong-prefix", "no-secret", "unknown-id", "empty", "empty-parts", "huge"])
def test_a_malformed_or_wrong_key_does_not_verify(
    store: Store, mangle: Callable[[str], str]
) -> None:
    _, plaintext = store.create_key("app", NOW)
    assert store.verify_key(mangle(plaintext)) is None


def test_a_revoked_key_no_longer_verifies(store: Store) -> None:
    _, plaintext = store.create_key("app", NOW)
    assert store.revoke_key("app") is True
    assert store.revoke_key("app") is False
    assert store.verify_key(plaintext) is None
    [listed] = store.list_keys()
    assert listed.revoked_at is not None


def test_keys_are_found_by_id_or_by_name(store: Store) -> None:
    record, _ = store.create_key("app", NOW)
    assert store.revoke_key(record.key_id, NOW) is True
    with pytest.raises(UnknownKey, match="nope"):
        store.revoke_key("nope", NOW)


def test_a_rotated_key_keeps_its_id_and_scope_and_the_old_secret_stops_working(
    store: Store,
) -> None:
    record, old = store.create_key("app", NOW, models=["m"])
    new = store.rotate_key("app", NOW + 1)
    assert new != old
    assert new.startswith(f"mg_{record.key_id}_")
    assert store.verify_key(old) is None
    assert store.verify_key(new) == record


def test_a_revoked_key_cannot_be_rotated(store: Store) -> None:
    store.create_key("app", NOW)
    store.revoke_key("app", NOW)
    with pytest.raises(CoordinatorError, match="revoked"):
        store.rotate_key("app", NOW)


def test_a_live_keys_name_cannot_be_reused_but_a_revoked_ones_can(store: Store) -> None:
    first, _ = store.create_key("app", NOW)
    with pytest.raises(CoordinatorError, match="already exists"):
        store.create_key("app", NOW + 1)
    store.revoke_key("app", NOW + 2)
    second, plaintext = store.create_key("app", NOW + 3)
    assert second.key_id != first.key_id
    assert store.rotate_key("app", NOW + 4) != plaintext  # the name now means the live key
    assert [k.key_id for k in store.list_keys()] == [first.key_id, second.key_id]


def test_a_key_needs_a_name(store: Store) -> None:
    with pytest.raises(CoordinatorError, match="name"):
        store.create_key("  ", NOW)


# ----------------------------------------------------------------------------- usage


def test_usage_accepts_the_row_shape_the_server_records(store: Store) -> None:
    row = {"request_id": "r1", "key_id": "k1", "node_did": DID_A, "model": "m",
           "endpoint": "/v1/completions", "prompt_tokens": 3, "completion_tokens": 4,
           "latency_ms": 12.5, "outcome": "ok"}
    store.record_usage(UsageRecord(**row, created_at=NOW))  # type: ignore[arg-type]
    [back] = store.usage_rows()
    assert back == UsageRecord(**row, created_at=NOW)  # type: ignore[arg-type]


def test_usage_cuts_an_overlong_client_request_id_to_fit_its_column(store: Store) -> None:
    store.record_usage(usage("r" * 1000))
    [back] = store.usage_rows()
    assert back.request_id == "r" * 128


def test_usage_rows_come_back_in_time_order_and_filter_by_since(store: Store) -> None:
    for i, at in enumerate([NOW + 20, NOW, NOW + 10]):
        store.record_usage(usage(f"r{i}", at=at))
    assert [r.request_id for r in store.usage_rows()] == ["r1", "r2", "r0"]
    assert [r.request_id for r in store.usage_rows(since=NOW + 10)] == ["r2", "r0"]


def test_usage_totals_sum_per_key_node_and_model(store: Store) -> None:
    store.record_usage(usage("r1", key="k1", model="a"))
    store.record_usage(usage("r2", key="k1", model="b", outcome="node_lost_mid_stream"))
    store.record_usage(usage("r3", key="k2", node=None, model="a"))
    by_key = {t.group: t for t in store.usage_totals("key")}
    assert (by_key["k1"].requests, by_key["k1"].ok, by_key["k1"].prompt_tokens) == (2, 1, 20)
    assert by_key["k2"].completion_tokens == 5
    assert {t.group: t.requests for t in store.usage_totals("node")} == {DID_A: 2, "-": 1}
    assert {t.group: t.requests for t in store.usage_totals("model")} == {"a": 2, "b": 1}
    assert store.usage_totals("model", since=NOW + 1) == []


def test_usage_by_node_names_the_cloud_upstream_when_no_node_served(store: Store) -> None:
    store.record_usage(replace(usage("r1", node=None), upstream="openai", cost=0.25))
    [total] = store.usage_totals("node")
    assert (total.group, total.cost) == ("openai", 0.25)


# ----------------------------------------------------------------------------- durability


def test_everything_survives_reopening_the_store(open_store: Opener) -> None:
    first = open_store()
    enroll(first, labels={"site": "x"})
    _, plaintext = first.create_key("app", NOW)
    first.record_usage(usage("r1"))
    first.close()
    again = open_store()
    assert [n.labels for n in again.list_nodes()] == [{"site": "x"}]
    assert again.verify_key(plaintext) is not None
    assert len(again.usage_rows()) == 1


def test_a_sqlite_store_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    store = Store(_sqlite(tmp_path))
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA busy_timeout")).scalar_one() >= 1000
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
    finally:
        store.close()


def test_usage_rows_have_their_own_ids(store: Store) -> None:
    store.record_usage(usage("same"))
    store.record_usage(usage("same"))
    with store.engine.connect() as conn:
        ids = conn.execute(select(UsageRow.id)).scalars().all()
    assert len(set(ids)) == 2


# ----------------------------------------------------------------------------- scopes, spend


def test_a_keys_scopes_round_trip_and_models_are_globs(store: Store) -> None:
    scopes = KeyScopes(models=("llama-*", "smollm2", "llama-*"), prefer="local",
                       labels={"site": "a"}, rpm=60, tpm=20000, budget_day=5.0, budget_month=50)
    record, plaintext = store.create_key("app", NOW, scopes=scopes)
    back = store.verify_key(plaintext)
    assert back == record
    assert back.scope == scopes
    assert back.models == ["llama-*", "smollm2"]
    assert back.allows_model("llama-3.1-8b")
    assert back.allows_model("smollm2")
    assert not back.allows_model("smollm2-360m")
    assert not back.allows_model("LLAMA-3")  # case matters
    store.rotate_key("app", NOW + 1)
    assert store.list_keys()[0].scope == scopes


@pytest.mark.parametrize("bad", [
    {"prefer": "fastest"}, {"rpm": 0}, {"tpm": -5}, {"budget_day": 0.0},
    {"budget_month": float("nan")},
])
def test_bad_scopes_are_refused_with_the_field_named(bad: dict[str, object]) -> None:
    with pytest.raises(CoordinatorError, match=next(iter(bad))):
        KeyScopes(**bad)  # type: ignore[arg-type]


def test_spend_by_key_sums_cost_since_the_day_and_the_month(store: Store) -> None:
    for key, cost, at in [("a", 1.0, NOW), ("a", 2.0, NOW - 5000), ("a", 4.0, NOW - 10**7),
                          ("b", 0.5, NOW), (None, 9.0, NOW)]:
        store.record_usage(replace(usage(f"r{cost}", key=key, at=at), cost=cost))
    assert store.spend_by_key(NOW - 100, NOW - 10_000) == {"a": (1.0, 3.0), "b": (0.5, 0.5)}


def test_usage_keeps_the_route_it_ran_under(store: Store) -> None:
    store.record_usage(replace(usage("r1"), route="qg://prefer=local"))
    assert store.usage_rows()[0].route == "qg://prefer=local"


def test_a_sqlite_ledger_from_before_the_route_column_gets_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE usage_ledger (id INTEGER PRIMARY KEY, request_id VARCHAR(128),"
                     " key_id VARCHAR(64), node_did VARCHAR(255), upstream VARCHAR(200),"
                     " model VARCHAR(255), endpoint VARCHAR(64), prompt_tokens BIGINT,"
                     " completion_tokens BIGINT, latency_ms FLOAT, outcome VARCHAR(64),"
                     " cost FLOAT, created_at FLOAT)")
        conn.execute("INSERT INTO usage_ledger VALUES (1, 'old', 'k', NULL, 'up', 'm', 'e',"
                     " 1, 2, 3.0, 'ok', 0.5, 1.0)")
    store = Store(f"sqlite:///{path}")
    try:
        [old] = store.usage_rows()
        assert (old.request_id, old.route) == ("old", None)
        store.record_usage(replace(usage("new"), route="cache"))
        assert [r.route for r in store.usage_rows()] == [None, "cache"]
    finally:
        store.close()


def test_ingested_rows_count_once_by_their_ingest_key(store: Store) -> None:
    """A node's journal sent again (or twice at once by two replicas) lands once."""
    def row(i: int, key: str | None) -> UsageRecord:
        return UsageRecord(
            request_id=f"off_{i}", key_id=None, node_did="did:key:z6MkA", model="m",
            endpoint="chat/completions", prompt_tokens=1, completion_tokens=1, latency_ms=1.0,
            outcome="ok", created_at=1.0 + i, route="offline", joules=2.5,
            energy_estimated=False, ingest_key=key)

    batch = [row(i, f"k{i}") for i in range(3)]
    assert len(store.ingest_usage(batch)) == 3
    assert [r.request_id for r in store.ingest_usage([*batch, row(3, "k3")])] == ["off_3"]
    store.record_usage(row(9, None))  # rows the coordinator writes have no key
    store.record_usage(row(9, None))
    rows = store.usage_rows()
    assert len(rows) == 6
    assert sum(r.joules or 0 for r in rows) == 15.0
    with pytest.raises(CoordinatorError):
        store.ingest_usage([row(5, None)])
