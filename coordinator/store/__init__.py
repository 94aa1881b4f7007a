"""The coordinator's durable state: enrollment tokens, nodes, API keys, the usage ledger.

SQLAlchemy 2.0 on a SQLite file by default (WAL, synchronous=NORMAL, a busy
timeout), or PostgreSQL by URL; the queries are plain SQLAlchemy, nothing
dialect-specific. The API is synchronous: async callers wrap each call in
`asyncio.to_thread`. Several processes may open one store at once (the server
and the admin CLI), so every read-modify-write runs in one transaction that
takes the write lock up front (`BEGIN IMMEDIATE` on SQLite, `SELECT ... FOR
UPDATE` on PostgreSQL), and the writes that must happen once are conditional
UPDATEs whose row count is checked.

Secrets are never stored: tokens and API keys keep only a SHA-256 of their
secret, compared in constant time.

One package, a module per job: `schema` (tables, added columns, the schema lock), `records`
(what the store hands out), `core` (engine, transactions, generations), `tokens`, `nodes`,
`keys` and `ledger`; `Store` joins the per-job parts.
"""

from __future__ import annotations

from coordinator.store.core import (
    BUSY_TIMEOUT_MS,
    KEY_PREFIX,
    KEYS_GENERATION,
    MAX_TOKEN_USES,
    SECRET_LEN,
    StoreCore,
    iso,
)
from coordinator.store.keys import KeyStore
from coordinator.store.ledger import LedgerStore
from coordinator.store.nodes import NodeStore
from coordinator.store.records import (
    PREFER_VALUES,
    ApiKeyRecord,
    KeyScopes,
    NodeRecord,
    TokenRecord,
    UsageGroup,
    UsageRecord,
    UsageTotal,
)
from coordinator.store.schema import (
    SCHEMA_LOCK,
    ApiKeyRow,
    Base,
    GenerationRow,
    NodeRow,
    TokenRow,
    TokenUseRow,
    UsageRow,
    lock_schema,
)
from coordinator.store.tokens import TokenStore

__all__ = [
    "BUSY_TIMEOUT_MS",
    "KEYS_GENERATION",
    "KEY_PREFIX",
    "MAX_TOKEN_USES",
    "PREFER_VALUES",
    "SCHEMA_LOCK",
    "SECRET_LEN",
    "ApiKeyRecord",
    "ApiKeyRow",
    "Base",
    "GenerationRow",
    "KeyScopes",
    "NodeRecord",
    "NodeRow",
    "Store",
    "StoreCore",
    "TokenRecord",
    "TokenRow",
    "TokenUseRow",
    "UsageGroup",
    "UsageRecord",
    "UsageRow",
    "UsageTotal",
    "iso",
    "lock_schema",
]


class Store(TokenStore, NodeStore, KeyStore, LedgerStore):
    """The coordinator's durable state; `Store(url)` creates or upgrades the schema."""
