"""The store's contract for API keys, their scopes and spend, on every backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from sqlalchemy import select

from coordinator.errors import CoordinatorError, UnknownKey
from coordinator.store import (
    ApiKeyRow,
    KeyScopes,
    Store,
)
from tests.coordinator.store_harness import (
    NOW,
    usage,
)

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
