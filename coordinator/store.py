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
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, Literal, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    CursorResult,
    Engine,
    Integer,
    LargeBinary,
    String,
    case,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.dml import Update

from coordinator.engines import database_url
from coordinator.errors import (
    CoordinatorError,
    EnrollmentRefused,
    KeyNameTaken,
    UnknownKey,
    UnknownNode,
    UnknownToken,
)

KEY_PREFIX = "mg_"
SECRET_LEN = 32
BUSY_TIMEOUT_MS = 10_000
_BEGIN_OPTION = "meshgate_begin"
MAX_TOKEN_USES = 1_000_000
KEYS_GENERATION = "api_keys"
"""Bumped by every key revoke and rotate: a server that sees it move drops its key cache."""

UsageGroup = Literal["key", "node", "model"]


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- schema


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
    ingest_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    """Rows a node uploaded from its offline journal: one per (node, request id)."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class NodeRecord:
    did: str
    labels: dict[str, str]
    enrolled_at: float
    revoked_at: float | None
    last_seen: float | None
    models: list[str]
    last_ts_ms: int | None

    @classmethod
    def of(cls, row: NodeRow) -> NodeRecord:
        return cls(row.did, dict(row.labels), row.enrolled_at, row.revoked_at,
                   row.last_seen, list(row.models), row.last_ts_ms)


PREFER_VALUES = ("speed", "cost", "local", "quality")


@dataclass(frozen=True, slots=True)
class KeyScopes:
    """What one API key may do; every limit is optional (None: no limit).

    `models` are glob patterns (`llama-*`, matched case-sensitively against the
    requested model name); `prefer` is the route policy used when the request
    names none; `labels` are node labels every node serving the key must carry
    (data residency: `site=eu-1`); `rpm`/`tpm` are requests and tokens per
    minute; `budget_day`/`budget_month` are money per UTC day / calendar month,
    in the unit the cloud upstreams' prices are given in.
    """

    models: tuple[str, ...] | None = None
    prefer: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    rpm: int | None = None
    tpm: int | None = None
    budget_day: float | None = None
    budget_month: float | None = None

    def __post_init__(self) -> None:
        if self.models is not None:
            models = tuple(sorted({m.strip() for m in self.models if m.strip()}))
            object.__setattr__(self, "models", models or None)
        if self.prefer is not None and self.prefer not in PREFER_VALUES:
            raise CoordinatorError(f"bad prefer {self.prefer!r}: use one of "
                                   + ", ".join(PREFER_VALUES))
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise CoordinatorError(f"{name} must be a positive whole number, not {value!r}")
        for name in ("budget_day", "budget_month"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise CoordinatorError(f"{name} must be a positive amount, not {value!r}")
        object.__setattr__(self, "labels", dict(self.labels))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.models is not None:
            out["models"] = list(self.models)
        if self.labels:
            out["labels"] = dict(self.labels)
        for name in ("prefer", "rpm", "tpm", "budget_day", "budget_month"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyScopes:
        models = data.get("models")
        labels = data.get("labels")

        def num(name: str) -> float | None:
            value = data.get(name)
            return float(value) if isinstance(value, int | float) else None

        def whole(name: str) -> int | None:
            value = data.get(name)
            return int(value) if isinstance(value, int) and value > 0 else None

        prefer = data.get("prefer")
        return cls(
            models=tuple(str(m) for m in models) if isinstance(models, list) else None,
            prefer=prefer if prefer in PREFER_VALUES else None,
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict)
            else {},
            rpm=whole("rpm"), tpm=whole("tpm"),
            budget_day=num("budget_day"), budget_month=num("budget_month"),
        )

    def allows_model(self, model: str) -> bool:
        return self.models is None or any(fnmatchcase(model, p) for p in self.models)


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key_id: str
    name: str
    created_at: float
    revoked_at: float | None
    scopes: dict[str, Any]

    @property
    def scope(self) -> KeyScopes:
        return KeyScopes.from_json(self.scopes)

    @property
    def models(self) -> list[str] | None:
        """The model patterns this key may use; None means every model."""
        models = self.scope.models
        return list(models) if models is not None else None

    def allows_model(self, model: str) -> bool:
        return self.scope.allows_model(model)

    @classmethod
    def of(cls, row: ApiKeyRow) -> ApiKeyRecord:
        return cls(row.key_id, row.name, row.created_at, row.revoked_at, dict(row.scopes))


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """An enrollment token as an admin sees it (never its secret)."""

    token_id: str
    labels: dict[str, str]
    created_at: float
    expires_at: float
    max_uses: int
    uses: int
    used_at: float | None
    used_by: str | None
    revoked_at: float | None

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.uses >= self.max_uses:
            return "used"
        return "expired" if now >= self.expires_at else "active"

    @classmethod
    def of(cls, row: TokenRow) -> TokenRecord:
        return cls(row.token_id, dict(row.labels), row.created_at, row.expires_at,
                   row.max_uses, row.uses, row.used_at, row.used_by, row.revoked_at)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One ledger row: a request served by a node (node_did) or a cloud upstream (upstream)."""

    request_id: str
    key_id: str | None
    node_did: str | None
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    outcome: str
    created_at: float
    upstream: str | None = None
    cost: float = 0.0
    route: str | None = None  # the policy it ran under: "prefer=local", a qg:// route, "cache"
    status: int | None = None  # the HTTP status answered (None: rows from before it was kept)
    error: str | None = None  # the error's code or type when it was not a success
    joules: float | None = None  # None: not measured
    energy_estimated: bool | None = None
    energy_cost: float | None = None
    ingest_key: str | None = None  # set on rows uploaded from a node's offline journal


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """The ledger summed over one group (a key id, a node did or upstream, or a model)."""

    group: str
    requests: int
    ok: int
    prompt_tokens: int
    completion_tokens: int
    avg_latency_ms: float
    cost: float
    joules: float | None = None  # over the rows that measured energy; None: none did
    joules_tokens: int = 0  # prompt + completion tokens of those rows
    energy_cost: float | None = None

    @property
    def joules_per_1k_tokens(self) -> float | None:
        if self.joules is None or not self.joules_tokens:
            return None
        return self.joules / self.joules_tokens * 1000


# ----------------------------------------------------------------------------- the store


def _on_sqlite_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # Let SQLAlchemy, not pysqlite, emit BEGIN, so that writers can ask for IMMEDIATE.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_MS)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _on_sqlite_begin(conn: Any) -> None:
    immediate = conn.get_execution_options().get(_BEGIN_OPTION) == "IMMEDIATE"
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _rowcount(session: Session, stmt: Update) -> int:
    result = session.execute(stmt, execution_options={"synchronize_session": False})
    return cast("CursorResult[Any]", result).rowcount


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        url = database_url(url)  # a missing driver: one line naming the extra
        # a server restarted under us: test pooled connections before use, not on a request
        self.engine: Engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _on_sqlite_connect)
            event.listen(self.engine, "begin", _on_sqlite_begin)
        immediate = self.engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
        with immediate.begin() as conn:  # two first starts must not both create a table
            lock_schema(conn)
            Base.metadata.create_all(conn)
            _add_missing_columns(conn)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(immediate, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One transaction that holds the write lock from its first statement."""
        with self._writer.begin() as session:
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reader() as session:
            yield session

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """A session for modules that keep their own tables here (`admin_keys.py`);
        `write`: one transaction holding the write lock, committed at the end."""
        with self._write() if write else self._read() as session:
            yield session

    # -- enrollment tokens

    def create_token(
        self, ttl_s: int, labels: dict[str, str], now: float, *, uses: int = 1
    ) -> tuple[str, bytes]:
        """A new enrollment token good for `uses` enrollments; returns (token_id, secret).

        Only the secret's hash is kept."""
        if ttl_s <= 0:
            raise CoordinatorError(f"a token's lifetime must be positive, not {ttl_s} s")
        if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= MAX_TOKEN_USES:
            raise CoordinatorError(f"a token's uses must be 1 to {MAX_TOKEN_USES}, not {uses!r}")
        token_id = secrets.token_urlsafe(9)
        secret = secrets.token_bytes(SECRET_LEN)
        with self._write() as s:
            s.add(TokenRow(token_id=token_id, secret_hash=_sha256(secret), labels=dict(labels),
                           created_at=now, expires_at=now + ttl_s, used_at=None, used_by=None,
                           max_uses=uses, uses=0, revoked_at=None))
        return token_id, secret

    def redeem_token(self, token_id: str, secret: bytes, did: str, now: float) -> NodeRecord:
        """Spend one use of a token to enroll `did`; raises EnrollmentRefused with the reason."""
        with self._write() as s:
            token = s.scalars(
                select(TokenRow).where(TokenRow.token_id == token_id).with_for_update()
            ).one_or_none()
            if token is None:
                raise EnrollmentRefused("unknown enrollment token")
            if not hmac.compare_digest(token.secret_hash, _sha256(secret)):
                raise EnrollmentRefused("enrollment token secret does not match")
            if token.revoked_at is not None:
                raise EnrollmentRefused(f"enrollment token was revoked at {iso(token.revoked_at)}")
            if token.uses >= token.max_uses:
                raise EnrollmentRefused(_used_message(token))
            if now >= token.expires_at:
                raise EnrollmentRefused(f"enrollment token expired at {iso(token.expires_at)}")
            node = s.get(NodeRow, did, with_for_update=True)
            if node is not None and node.revoked_at is None:
                raise EnrollmentRefused(f"node already enrolled: {did}")
            spent = _rowcount(s, update(TokenRow)
                              .where(TokenRow.token_id == token_id,
                                     TokenRow.uses < TokenRow.max_uses)
                              .values(uses=TokenRow.uses + 1, used_at=now, used_by=did))
            if spent != 1:  # another transaction won the race for the last use
                s.refresh(token)
                raise EnrollmentRefused(_used_message(token))
            s.add(TokenUseRow(token_id=token_id, did=did, used_at=now))
            if node is None:
                node = NodeRow(did=did, models=[], last_seen=None, last_ts_ms=None)
                s.add(node)
            node.labels = dict(token.labels)
            node.enrolled_at = now
            node.token_id = token_id
            node.revoked_at = None
            node.models = []
            node.last_seen = None
            s.flush()
            return NodeRecord.of(node)

    def list_tokens(self) -> list[TokenRecord]:
        with self._read() as s:
            rows = s.scalars(select(TokenRow).order_by(TokenRow.created_at, TokenRow.token_id))
            return [TokenRecord.of(r) for r in rows]

    def token_uses(self, token_id: str) -> list[tuple[str, float]]:
        """(did, when) of each enrollment the token paid for, oldest first."""
        query = (select(TokenUseRow.did, TokenUseRow.used_at)
                 .where(TokenUseRow.token_id == token_id).order_by(TokenUseRow.id))
        with self._read() as s:
            return [(str(d), float(t)) for d, t in s.execute(query)]

    def revoke_token(self, token_id: str, now: float) -> bool:
        """Refuse a token's remaining uses; False if it was already revoked."""
        with self._write() as s:
            if s.get(TokenRow, token_id) is None:
                raise UnknownToken(token_id)
            return _rowcount(s, update(TokenRow)
                             .where(TokenRow.token_id == token_id, TokenRow.revoked_at.is_(None))
                             .values(revoked_at=now)) == 1

    # -- generations

    def generation(self, name: str) -> int:
        """The change counter `name` (0 if nothing ever bumped it); one primary-key read."""
        with self._read() as s:
            row = s.get(GenerationRow, name)
            return row.value if row is not None else 0

    # -- nodes

    def get_node(self, did: str) -> NodeRecord | None:
        with self._read() as s:
            row = s.get(NodeRow, did)
            return NodeRecord.of(row) if row else None

    def list_nodes(self) -> list[NodeRecord]:
        with self._read() as s:
            rows = s.scalars(select(NodeRow).order_by(NodeRow.enrolled_at, NodeRow.did))
            return [NodeRecord.of(r) for r in rows]

    def revoke_node(self, did: str, now: float) -> bool:
        """Revoke an enrolled node; False if it was already revoked. Unknown: UnknownNode."""
        with self._write() as s:
            if s.get(NodeRow, did) is None:
                raise UnknownNode(did)
            return _rowcount(s, update(NodeRow)
                             .where(NodeRow.did == did, NodeRow.revoked_at.is_(None))
                             .values(revoked_at=now)) == 1

    def touch_node(self, did: str, now: float, models: list[str] | None = None) -> None:
        """Record that the node was seen (and, if given, what it serves now)."""
        values: dict[str, Any] = {"last_seen": now}
        if models is not None:
            values["models"] = list(models)
        with self._write() as s:
            s.execute(update(NodeRow).where(NodeRow.did == did).values(**values),
                      execution_options={"synchronize_session": False})

    handshake_scope = ""
    """A cluster replica sets its member id: each replica keeps its own handshake timestamp
    per node (members.py), since a node dials every replica at once."""

    def advance_handshake_ts(self, did: str, ts_ms: int) -> bool:
        """Move the node's handshake timestamp forward; False if `ts_ms` is not newer."""
        if self.handshake_scope:
            from coordinator.members import advance_scoped

            return advance_scoped(self.engine, did, self.handshake_scope, ts_ms)
        with self._write() as s:
            newer = (NodeRow.last_ts_ms.is_(None)) | (NodeRow.last_ts_ms < ts_ms)
            return _rowcount(s, update(NodeRow)
                             .where(NodeRow.did == did, newer)
                             .values(last_ts_ms=ts_ms)) == 1

    # -- API keys

    def create_key(
        self, name: str, now: float, *, models: list[str] | None = None,
        scopes: KeyScopes | None = None,
    ) -> tuple[ApiKeyRecord, str]:
        """A new API key; returns its record and the plaintext, shown once and never stored.

        `models` is a shorthand for `KeyScopes(models=...)` (and wins over it)."""
        name = name.strip()
        if not name or len(name) > 200:
            raise CoordinatorError("an API key needs a name of 1 to 200 characters")
        scope = scopes or KeyScopes()
        if models:
            scope = KeyScopes(**{**_fields(scope), "models": tuple(models)})
        scopes_json = scope.to_json()
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(SECRET_LEN)
        with self._write() as s:
            live = s.scalars(select(ApiKeyRow.key_id).where(
                ApiKeyRow.name == name, ApiKeyRow.revoked_at.is_(None))).first()
            if live is not None:
                raise KeyNameTaken(name, live)
            row = ApiKeyRow(key_id=key_id, name=name, secret_hash=_sha256(secret.encode()),
                            scopes=scopes_json, created_at=now, revoked_at=None)
            s.add(row)
            s.flush()
            return ApiKeyRecord.of(row), f"{KEY_PREFIX}{key_id}_{secret}"

    def verify_key(self, plaintext: str) -> ApiKeyRecord | None:
        """The live key this plaintext proves, or None (malformed, unknown, wrong, revoked)."""
        if not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 256:
            return None
        key_id, sep, secret = plaintext[len(KEY_PREFIX):].partition("_")
        if not sep or not key_id or not secret:
            return None
        with self._read() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(row.secret_hash, _sha256(secret.encode())):
                return None
            return ApiKeyRecord.of(row)

    def list_keys(self) -> list[ApiKeyRecord]:
        with self._read() as s:
            rows = s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.key_id))
            return [ApiKeyRecord.of(r) for r in rows]

    def revoke_key(self, key_id_or_name: str, now: float | None = None) -> bool:
        """Revoke a key by id or name; False if it was already revoked. Unknown: UnknownKey."""
        with self._write() as s:
            row = _find_key(s, key_id_or_name)
            if row.revoked_at is not None:
                return False
            row.revoked_at = now if now is not None else time.time()
            _bump(s, KEYS_GENERATION)
            return True

    def rotate_key(self, key_id_or_name: str, now: float) -> str:
        """A new secret for a live key (same id, name and scopes); the old one stops working."""
        del now  # kept in the signature for a rotated_at column; nothing records it yet
        secret = secrets.token_urlsafe(SECRET_LEN)
        with self._write() as s:
            row = _find_key(s, key_id_or_name)
            if row.revoked_at is not None:
                raise CoordinatorError(f"API key {row.name!r} ({row.key_id}) is revoked; "
                                       "create a new one instead")
            row.secret_hash = _sha256(secret.encode())
            _bump(s, KEYS_GENERATION)
            return f"{KEY_PREFIX}{row.key_id}_{secret}"

    # -- usage ledger

    def record_usage(self, record: UsageRecord) -> None:
        """Append one row; client-chosen strings (request id, model) are cut to fit columns."""
        self.record_usages([record])

    def record_usages(self, records: list[UsageRecord]) -> None:
        """Append rows in one transaction: all or none (the ledger spool's replay)."""
        with self._write() as s:
            for record in records:
                s.add(_usage_row(record))


    def ingest_usage(self, records: list[UsageRecord]) -> list[UsageRecord]:
        """Append rows that carry an `ingest_key`, skipping keys the ledger already holds
        (a node sending its journal again); returns the rows that were new. One transaction."""
        dialect = self.engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise CoordinatorError(f"ingest needs SQLite or PostgreSQL, not {dialect}")
        new: list[UsageRecord] = []
        with self._write() as s:
            for r in records:
                if r.ingest_key is None:
                    raise CoordinatorError("an ingested usage row needs its ingest_key")
                values = dict(
                    request_id=r.request_id[:128], key_id=r.key_id, node_did=r.node_did,
                    upstream=None, model=r.model[:255], endpoint=r.endpoint[:64],
                    route=r.route and r.route[:200], prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens, latency_ms=r.latency_ms,
                    outcome=r.outcome[:64], cost=r.cost, created_at=r.created_at,
                    **_energy_values(r),
                )
                stmt = (
                    sqlite_insert(UsageRow).values(**values)
                    .on_conflict_do_nothing(index_elements=["ingest_key"])
                    .returning(UsageRow.id)
                    if dialect == "sqlite" else
                    postgresql_insert(UsageRow).values(**values)
                    .on_conflict_do_nothing(index_elements=["ingest_key"])
                    .returning(UsageRow.id)
                )
                if s.execute(stmt).first() is not None:  # None: the key was there already
                    new.append(r)
        return new

    def usage_rows(self, since: float | None = None) -> list[UsageRecord]:
        query = select(UsageRow).order_by(UsageRow.created_at, UsageRow.id)
        if since is not None:
            query = query.where(UsageRow.created_at >= since)
        with self._read() as s:
            return [_usage_record(r) for r in s.scalars(query)]

    def usage_totals(self, by: UsageGroup, since: float | None = None) -> list[UsageTotal]:
        """The ledger summed per key, node (or upstream) or model, in the database."""
        column = {
            "key": func.coalesce(UsageRow.key_id, "-"),
            "node": func.coalesce(UsageRow.node_did, UsageRow.upstream, "-"),
            "model": UsageRow.model,
        }[by]
        query = select(
            column,
            func.count(UsageRow.id),
            func.sum(case((UsageRow.outcome == "ok", 1), else_=0)),
            func.sum(UsageRow.prompt_tokens),
            func.sum(UsageRow.completion_tokens),
            func.avg(UsageRow.latency_ms),
            func.sum(UsageRow.cost),
            func.sum(UsageRow.joules),
            func.sum(case((UsageRow.joules.is_not(None),
                           UsageRow.prompt_tokens + UsageRow.completion_tokens), else_=0)),
            func.sum(UsageRow.energy_cost),
        ).group_by(column).order_by(column)
        if since is not None:
            query = query.where(UsageRow.created_at >= since)
        with self._read() as s:
            return [
                UsageTotal(str(g), int(n), int(ok or 0), int(p or 0), int(c or 0),
                           float(lat or 0.0), float(cost or 0.0),
                           None if j is None else float(j), int(jt or 0),
                           None if ec is None else float(ec))
                for g, n, ok, p, c, lat, cost, j, jt, ec in s.execute(query)
            ]


    def spend_by_key(self, day_start: float, month_start: float) -> dict[str, tuple[float, float]]:
        """key id -> (cost since `day_start`, cost since `month_start`), one grouped query."""
        start = min(day_start, month_start)
        today = func.sum(case((UsageRow.created_at >= day_start, UsageRow.cost), else_=0.0))
        month = func.sum(case((UsageRow.created_at >= month_start, UsageRow.cost), else_=0.0))
        query = (select(UsageRow.key_id, today, month)
                 .where(UsageRow.created_at >= start, UsageRow.key_id.is_not(None))
                 .group_by(UsageRow.key_id))
        with self._read() as s:
            return {str(k): (float(d or 0.0), float(m or 0.0)) for k, d, m in s.execute(query)}


def _fields(scope: KeyScopes) -> dict[str, Any]:
    return {name: getattr(scope, name) for name in KeyScopes.__dataclass_fields__}


def _add_missing_columns(conn: Any) -> None:
    """Columns added after a table was first created (create_all never alters a table)."""
    have = {c["name"] for c in inspect(conn).get_columns(UsageRow.__tablename__)}
    for name, sql_type in (("route", "VARCHAR(200)"), ("status", "INTEGER"),
                           ("error", "VARCHAR(64)"), ("joules", "FLOAT"),
                           ("energy_estimated", "BOOLEAN"), ("energy_cost", "FLOAT"),
                           ("ingest_key", "VARCHAR(64)")):
        if name not in have:
            conn.execute(text(f"ALTER TABLE {UsageRow.__tablename__} ADD COLUMN {name} {sql_type}"))
    if "ingest_key" not in have:
        conn.execute(text(f"CREATE UNIQUE INDEX IF NOT EXISTS ix_usage_ledger_ingest_key "
                          f"ON {UsageRow.__tablename__} (ingest_key)"))
    tokens = TokenRow.__tablename__
    have = {c["name"] for c in inspect(conn).get_columns(tokens)}
    if "max_uses" not in have:  # tokens from before reusable tokens: one use each
        conn.execute(text(f"ALTER TABLE {tokens} ADD COLUMN max_uses BIGINT NOT NULL DEFAULT 1"))
        conn.execute(text(f"ALTER TABLE {tokens} ADD COLUMN uses BIGINT NOT NULL DEFAULT 0"))
        conn.execute(update(TokenRow).where(TokenRow.used_at.is_not(None)).values(uses=1))
    if "revoked_at" not in have:
        conn.execute(text(f"ALTER TABLE {tokens} ADD COLUMN revoked_at FLOAT"))


def _bump(session: Session, name: str) -> None:
    """Count one more change of `name`, inside the caller's write transaction."""
    bumped = _rowcount(session, update(GenerationRow).where(GenerationRow.name == name)
                       .values(value=GenerationRow.value + 1))
    if bumped == 0:
        session.add(GenerationRow(name=name, value=1))


def _energy_values(record: UsageRecord) -> dict[str, Any]:
    return {"joules": record.joules, "energy_estimated": record.energy_estimated,
            "energy_cost": record.energy_cost, "ingest_key": record.ingest_key}


def _used_message(token: TokenRow) -> str:
    when = iso(token.used_at) if token.used_at is not None else "an unknown time"
    if token.max_uses > 1:
        return (f"enrollment token has been used all {token.max_uses} times "
                f"(last by {token.used_by} at {when})")
    return f"enrollment token was already used (by {token.used_by} at {when})"


def _find_key(session: Session, key_id_or_name: str) -> ApiKeyRow:
    """By id; else the live key of that name; else the latest revoked one of that name."""
    row = session.get(ApiKeyRow, key_id_or_name, with_for_update=True)
    if row is not None:
        return row
    by_name = session.scalars(
        select(ApiKeyRow).where(ApiKeyRow.name == key_id_or_name).with_for_update()
        .order_by(ApiKeyRow.revoked_at.is_not(None), ApiKeyRow.created_at.desc())
    ).first()
    if by_name is None:
        raise UnknownKey(key_id_or_name)
    return by_name


def _usage_record(row: UsageRow) -> UsageRecord:
    return UsageRecord(
        request_id=row.request_id, key_id=row.key_id, node_did=row.node_did, model=row.model,
        endpoint=row.endpoint, prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens, latency_ms=row.latency_ms,
        outcome=row.outcome, created_at=row.created_at, upstream=row.upstream, cost=row.cost,
        route=row.route, status=row.status, error=row.error, joules=row.joules,
        energy_estimated=row.energy_estimated, energy_cost=row.energy_cost,
        ingest_key=row.ingest_key,
    )


def _usage_row(record: UsageRecord) -> UsageRow:
    return UsageRow(
        request_id=record.request_id[:128], key_id=record.key_id,
        node_did=record.node_did, upstream=record.upstream and record.upstream[:200],
        model=record.model[:255], endpoint=record.endpoint[:64],
        route=record.route and record.route[:200],
        prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
        latency_ms=record.latency_ms, outcome=record.outcome[:64], cost=record.cost,
        created_at=record.created_at, status=record.status,
        error=record.error and record.error[:64], **_energy_values(record),
    )


SCHEMA_LOCK = 0x6D657368  # "mesh": PostgreSQL advisory lock id for schema changes


def lock_schema(conn: Any) -> None:
    """On PostgreSQL, hold an advisory lock until this transaction ends: replicas that start
    at once on a new database would otherwise race in CREATE TABLE (SQLite: BEGIN
    IMMEDIATE already serialises them)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": SCHEMA_LOCK})
