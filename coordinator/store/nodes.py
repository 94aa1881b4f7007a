"""Enrolled nodes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import bindparam, select, update

from coordinator.errors import UnknownNode
from coordinator.store.core import StoreCore, _rowcount
from coordinator.store.records import NodeRecord
from coordinator.store.schema import NodeRow


class NodeStore(StoreCore):
    """Enrolled nodes: look-up, revoke, last seen, the handshake replay guard."""

    def get_node(self, did: str) -> NodeRecord | None:
        with self._read() as s:
            row = s.get(NodeRow, did)
            return NodeRecord.of(row) if row else None

    def list_nodes(self) -> list[NodeRecord]:
        with self._read() as s:
            rows = s.scalars(select(NodeRow).order_by(NodeRow.enrolled_at, NodeRow.did))
            return [NodeRecord.of(r) for r in rows]

    def revoked_nodes(self) -> set[str]:
        """The DIDs of revoked nodes: what the revocation watcher reads every second,
        without loading every enrolled node."""
        with self._read() as s:
            return set(s.scalars(select(NodeRow.did).where(NodeRow.revoked_at.is_not(None))))

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

    def touch_nodes(self, seen: Mapping[str, tuple[float, list[str] | None]]) -> None:
        """`touch_node` for many nodes in one transaction: did -> (when, models or None).

        The gateway gathers what it heard and writes it here every fraction of a second,
        so a fleet's telemetry costs one write a period, not one per node."""
        plain = [{"b_did": did, "b_seen": when} for did, (when, models) in seen.items()
                 if models is None]
        listed = [{"b_did": did, "b_seen": when, "b_models": list(models)}
                  for did, (when, models) in seen.items() if models is not None]
        if not plain and not listed:
            return
        with self._write() as s:
            conn = s.connection()
            if plain:
                conn.execute(update(NodeRow).where(NodeRow.did == bindparam("b_did"))
                             .values(last_seen=bindparam("b_seen")), plain)
            if listed:
                conn.execute(update(NodeRow).where(NodeRow.did == bindparam("b_did"))
                             .values(last_seen=bindparam("b_seen"),
                                     models=bindparam("b_models", type_=NodeRow.models.type)),
                             listed)

    def served_models(self) -> set[str]:
        """Every model an unrevoked enrolled node last said it serves (one column)."""
        with self._read() as s:
            rows = s.scalars(select(NodeRow.models).where(NodeRow.revoked_at.is_(None)))
            return {m for models in rows for m in (models or ())}

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

