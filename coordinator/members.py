"""The members table: which coordinator replicas are alive, and where nodes dial them.

Each replica upserts its row (member id = the tunnel URL it advertises) every
`HEARTBEAT_S`; a member whose heartbeat is older than `MEMBER_TTL_S` is gone. A replica
stopping cleanly deletes its row, so nodes drop it at once; one killed ages out. The
table lives in the shared store (PostgreSQL), next to nodes, keys and the ledger, and is
created on first use by every replica (`CREATE TABLE IF NOT EXISTS`). Heartbeats use each
replica's wall clock: keep the replicas' clocks in step (NTP), as for the ledger.

`advance_scoped` is the handshake replay guard of a replica: a timestamp per (node,
member), since a node opens its tunnels to every replica at about the same moment and
a shared per-node timestamp would refuse whichever arrived second.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import BigInteger, Engine, Float, String, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from coordinator.store import Base, lock_schema

HEARTBEAT_S = 1.0
MEMBER_TTL_S = 5.0
MAX_MEMBERS = 5
"""Nodes keep at most this many tunnels; the oldest members first."""


class MemberRow(Base):
    __tablename__ = "cluster_members"
    member_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    tunnel_url: Mapped[str] = mapped_column(String(255))
    api_url: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float, index=True)


class HandshakeMarkRow(Base):
    __tablename__ = "handshake_marks"
    did: Mapped[str] = mapped_column(String(255), primary_key=True)
    scope: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_ts_ms: Mapped[int] = mapped_column(BigInteger)


_TABLES = [MemberRow.__table__, HandshakeMarkRow.__table__]


def create_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        lock_schema(conn)
        Base.metadata.create_all(conn, tables=_TABLES)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Member:
    member_id: str
    tunnel_url: str
    api_url: str
    started_at: float
    heartbeat_at: float


def heartbeat(engine: Engine, member: Member) -> None:
    """Insert or refresh this replica's row."""
    with Session(engine) as s, s.begin():
        row = s.get(MemberRow, member.member_id, with_for_update=True)
        if row is None:
            s.add(MemberRow(member_id=member.member_id, tunnel_url=member.tunnel_url,
                            api_url=member.api_url, started_at=member.started_at,
                            heartbeat_at=member.heartbeat_at))
        else:
            row.tunnel_url = member.tunnel_url
            row.api_url = member.api_url
            row.started_at = member.started_at
            row.heartbeat_at = member.heartbeat_at


def leave(engine: Engine, member_id: str) -> None:
    with Session(engine) as s, s.begin():
        s.execute(delete(MemberRow).where(MemberRow.member_id == member_id))


def live_members(engine: Engine, now: float, ttl_s: float = MEMBER_TTL_S) -> list[Member]:
    """Members heard from within `ttl_s`, oldest first (the first `MAX_MEMBERS` are dialed)."""
    with Session(engine) as s:
        rows = s.scalars(select(MemberRow).where(MemberRow.heartbeat_at >= now - ttl_s)
                         .order_by(MemberRow.started_at, MemberRow.member_id))
        return [Member(r.member_id, r.tunnel_url, r.api_url, r.started_at, r.heartbeat_at)
                for r in rows]


def advance_scoped(engine: Engine, did: str, scope: str, ts_ms: int) -> bool:
    """Move the node's handshake timestamp at this member forward; False if not newer."""
    try:
        with Session(engine) as s, s.begin():
            row = s.get(HandshakeMarkRow, (did, scope), with_for_update=True)
            if row is None:
                s.add(HandshakeMarkRow(did=did, scope=scope, last_ts_ms=ts_ms))
                return True
            if row.last_ts_ms >= ts_ms:
                return False
            row.last_ts_ms = ts_ms
            return True
    except IntegrityError:  # a second handshake of the same node raced this one in
        return False
