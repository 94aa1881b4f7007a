"""The store tests' backends and builders: a real SQLite file always, PostgreSQL when
MESHGATE_TEST_POSTGRES_URL names an empty database the tests may fill."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.store import (
    NodeRecord,
    Store,
    UsageRecord,
)

NOW = 1_800_000_000.0
DID_A = "did:key:z6MkAAAA"
DID_B = "did:key:z6MkBBBB"
POSTGRES_ENV = "MESHGATE_TEST_POSTGRES_URL"

Opener = Callable[[], Store]


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'coordinator.db'}"


def postgres_url(_: Path) -> str:
    return os.environ[POSTGRES_ENV]


BACKENDS = [pytest.param(sqlite_url, id="sqlite")]
if os.environ.get(POSTGRES_ENV):
    BACKENDS.append(pytest.param(postgres_url, id="postgresql"))


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
