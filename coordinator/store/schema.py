"""The store's tables, the columns added to them since, and the schema lock."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, LargeBinary, String, inspect, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads it as a class attribute
        dict[str, str]: JSON,
        dict[str, Any]: JSON,
        list[str]: JSON,
        bytes: LargeBinary(32),
        int: BigInteger,
    }


class TokenRow(Base):
    __tablename__ = "enrollment_tokens"
    token_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret_hash: Mapped[bytes]
    labels: Mapped[dict[str, str]]
    created_at: Mapped[float]
    expires_at: Mapped[float]
    used_at: Mapped[float | None]  # the latest use
    used_by: Mapped[str | None] = mapped_column(String(255))
    max_uses: Mapped[int] = mapped_column(default=1)
    uses: Mapped[int] = mapped_column(default=0)
    revoked_at: Mapped[float | None]


class TokenUseRow(Base):
    """Each enrollment a token paid for (a fleet token is used by many nodes)."""

    __tablename__ = "enrollment_token_uses"
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    token_id: Mapped[str] = mapped_column(String(64), index=True)
    did: Mapped[str] = mapped_column(String(255))
    used_at: Mapped[float]


class GenerationRow(Base):
    """A counter per kind of change other processes must notice (`api_keys`: a key was
    revoked or rotated), so a server polls one row instead of every key."""

    __tablename__ = "generations"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int]


class NodeRow(Base):
    __tablename__ = "nodes"
    did: Mapped[str] = mapped_column(String(255), primary_key=True)
    labels: Mapped[dict[str, str]]
    enrolled_at: Mapped[float]
    token_id: Mapped[str | None] = mapped_column(String(64))
    revoked_at: Mapped[float | None]
    last_seen: Mapped[float | None]
    models: Mapped[list[str]]
    last_ts_ms: Mapped[int | None]


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    secret_hash: Mapped[bytes]
    scopes: Mapped[dict[str, Any]]
    created_at: Mapped[float]
    revoked_at: Mapped[float | None]


class UsageRow(Base):
    __tablename__ = "usage_ledger"
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    request_id: Mapped[str] = mapped_column(String(128), index=True)
    key_id: Mapped[str | None] = mapped_column(String(64))
    node_did: Mapped[str | None] = mapped_column(String(255))
    upstream: Mapped[str | None] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(255))
    endpoint: Mapped[str] = mapped_column(String(64))
    route: Mapped[str | None] = mapped_column(String(200))
    prompt_tokens: Mapped[int]
    completion_tokens: Mapped[int]
    latency_ms: Mapped[float]
    outcome: Mapped[str] = mapped_column(String(64))
    cost: Mapped[float]
    created_at: Mapped[float] = mapped_column(index=True)
    status: Mapped[int | None] = mapped_column(Integer(), nullable=True)
    error: Mapped[str | None] = mapped_column(String(64), nullable=True)
    joules: Mapped[float | None]  # energy the node measured for it; NULL: not measured
    energy_estimated: Mapped[bool | None]  # from power x time, not an energy counter
    energy_cost: Mapped[float | None]  # joules at the node's electricity price
    ingest_key: Mapped[str | None] = mapped_column(String(64))
    """Rows a node uploaded from its offline journal: one per (node, request id), unique
    by the partial index below (NULL on the request path's rows: not in it)."""

    __table_args__ = (
        Index("ix_usage_ledger_ingest_key", "ingest_key", unique=True,
              sqlite_where=text("ingest_key IS NOT NULL"),
              postgresql_where=text("ingest_key IS NOT NULL")),
    )



def _add_missing_columns(conn: Any) -> None:
    """Columns added after a table was first created (create_all never alters a table)."""
    have = {c["name"] for c in inspect(conn).get_columns(UsageRow.__tablename__)}
    for name, sql_type in (("route", "VARCHAR(200)"), ("status", "INTEGER"),
                           ("error", "VARCHAR(64)"), ("joules", "FLOAT"),
                           ("energy_estimated", "BOOLEAN"), ("energy_cost", "FLOAT"),
                           ("ingest_key", "VARCHAR(64)")):
        if name not in have:
            conn.execute(text(f"ALTER TABLE {UsageRow.__tablename__} ADD COLUMN {name} {sql_type}"))
    tokens = TokenRow.__tablename__
    have = {c["name"] for c in inspect(conn).get_columns(tokens)}
    if "max_uses" not in have:  # tokens from before reusable tokens: one use each
        conn.execute(text(f"ALTER TABLE {tokens} ADD COLUMN max_uses BIGINT NOT NULL DEFAULT 1"))
        conn.execute(text(f"ALTER TABLE {tokens} ADD COLUMN uses BIGINT NOT NULL DEFAULT 0"))
        conn.execute(update(TokenRow).where(TokenRow.used_at.is_not(None)).values(uses=1))
    if "revoked_at" not in have:
        conn.execute(text(f"ALTER TABLE {tokens} ADD COLUMN revoked_at FLOAT"))



SCHEMA_LOCK = 0x6D657368  # "mesh": PostgreSQL advisory lock id for schema changes


def lock_schema(conn: Any) -> None:
    """On PostgreSQL, hold an advisory lock until this transaction ends: replicas that start
    at once on a new database would otherwise race in CREATE TABLE (SQLite: BEGIN
    IMMEDIATE already serialises them)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": SCHEMA_LOCK})
