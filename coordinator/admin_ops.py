"""The admin operations: tokens, keys, nodes, usage, as plain JSON-ready dicts.

One implementation serves both ways in: the admin API (`admin_api.py`) calls it
inside the running server, and the CLI calls it on a local state directory
when no `--url` is given. Over `--url` the CLI gets the very same dicts back
from the API (`admin_client.py`), so it renders one shape whichever way it went.
Every call is blocking (the store is synchronous); the API runs them in a thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from coordinator.errors import CoordinatorError
from coordinator.store import (
    PREFER_VALUES,
    ApiKeyRecord,
    KeyScopes,
    NodeRecord,
    Store,
    TokenRecord,
    UsageGroup,
    UsageTotal,
    iso,
)
from tunnel.token import EnrollmentToken

LiveNodes = Callable[[], "dict[str, dict[str, Any]] | None"]
"""did -> live summary of the connected nodes; None when no server is running."""

SCOPE_FIELDS = ("models", "prefer", "labels", "rpm", "tpm", "budget_day", "budget_month")
NO_TUNNEL = "no tunnel address known: start the coordinator first or pass --tunnel-url"


class Admin(Protocol):
    """What the CLI asks of a coordinator, locally or over `--url`."""

    def create_token(self, *, ttl_s: int, uses: int, labels: dict[str, str],
                     tunnel_url: str | None) -> dict[str, Any]: ...
    def list_tokens(self) -> list[dict[str, Any]]: ...
    def revoke_token(self, token_id: str) -> dict[str, Any]: ...
    def create_key(self, name: str, scopes: dict[str, Any]) -> dict[str, Any]: ...
    def list_keys(self) -> list[dict[str, Any]]: ...
    def revoke_key(self, key: str) -> dict[str, Any]: ...
    def rotate_key(self, key: str) -> dict[str, Any]: ...
    def list_nodes(self) -> dict[str, Any]: ...
    def revoke_node(self, did: str) -> dict[str, Any]: ...
    def usage(self, by: str, since: float | None) -> dict[str, Any]: ...


def key_json(key: ApiKeyRecord) -> dict[str, Any]:
    scope = key.scope
    return {"key_id": key.key_id, "name": key.name, "created_at": key.created_at,
            "revoked_at": key.revoked_at, "models": key.models,
            "state": "revoked" if key.revoked_at is not None else "active",
            "prefer": scope.prefer, "labels": dict(scope.labels), "rpm": scope.rpm,
            "tpm": scope.tpm, "budget_day": scope.budget_day, "budget_month": scope.budget_month}


def token_json(token: TokenRecord, now: float) -> dict[str, Any]:
    return {**asdict(token), "state": token.state(now)}


def node_state(node: NodeRecord, live: Mapping[str, Any] | None) -> str:
    if node.revoked_at is not None:
        return "revoked"
    if live is not None and node.did in live:
        return "connected"
    return "enrolled"


class BadField(CoordinatorError):
    """A request field with a wrong type or value; `param` names it (OpenAI's `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check_scope(name: str, value: Any) -> None:
    if name == "models" and not (isinstance(value, list)
                                 and all(isinstance(m, str) for m in value)):
        raise BadField(name, "models must be a list of model names or globs")
    if name == "labels" and not (isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
        raise BadField(name, 'labels must be an object of strings, such as {"site": "a"}')
    if name in ("rpm", "tpm") and (isinstance(value, bool) or not isinstance(value, int)
                                   or value <= 0):
        raise BadField(name, f"{name} must be a positive whole number, not {value!r}")
    if name in ("budget_day", "budget_month") and (
            isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value <= 0):
        raise BadField(name, f"{name} must be a positive amount, not {value!r}")
    if name == "prefer" and value not in PREFER_VALUES:
        raise BadField(name, f"bad prefer {value!r}: use one of " + ", ".join(PREFER_VALUES))


def scopes_from(data: Mapping[str, Any]) -> KeyScopes:
    """KeyScopes from a JSON object; a wrong name, type or value raises BadField."""
    for name, value in data.items():
        if name not in SCOPE_FIELDS:
            raise BadField(name, f"unknown key scope {name!r}: use " + ", ".join(SCOPE_FIELDS))
        if value is not None:
            _check_scope(name, value)
    models, budget_day, budget_month = (data.get("models"), data.get("budget_day"),
                                        data.get("budget_month"))
    return KeyScopes(
        models=tuple(models) if models else None, prefer=data.get("prefer"),
        labels=data.get("labels") or {}, rpm=data.get("rpm"), tpm=data.get("tpm"),
        budget_day=float(budget_day) if budget_day is not None else None,
        budget_month=float(budget_month) if budget_month is not None else None)


def usage_total(totals: list[UsageTotal]) -> dict[str, Any]:
    requests = sum(t.requests for t in totals)
    return {
        "requests": requests, "ok": sum(t.ok for t in totals),
        "prompt_tokens": sum(t.prompt_tokens for t in totals),
        "completion_tokens": sum(t.completion_tokens for t in totals),
        "avg_latency_ms": (sum(t.avg_latency_ms * t.requests for t in totals) / requests
                           if requests else 0.0),
        "cost": sum(t.cost for t in totals),
        **energy_total(totals),
    }


def energy_total(totals: list[UsageTotal]) -> dict[str, Any]:
    """Joules over the rows that measured energy (None: none did), and J per 1k tokens."""
    measured = [t for t in totals if t.joules is not None]
    joules = sum(t.joules or 0.0 for t in measured) if measured else None
    tokens = sum(t.joules_tokens for t in measured)
    costs = [t.energy_cost for t in totals if t.energy_cost is not None]
    return {"joules": joules,
            "joules_per_1k_tokens": joules / tokens * 1000 if joules is not None and tokens
            else None,
            "energy_cost": sum(costs) if costs else None}


@dataclass
class AdminOps:
    """The admin operations on one store. `tunnel_url` is what tokens point nodes at
    (None: unknown); `live` gives the connected nodes' summaries."""

    store: Store
    static_public: Callable[[], bytes]
    tunnel_url: Callable[[], str | None]
    live: LiveNodes
    journals: tuple[Path, ...] = ()
    """Ledger journal directories to count in `usage` (another process than the server's:
    rows the server journaled and has not committed yet; the server's own reads flush)."""

    def create_token(self, *, ttl_s: int, uses: int, labels: dict[str, str],
                     tunnel_url: str | None) -> dict[str, Any]:
        if tunnel_url is not None and not tunnel_url.startswith(("ws://", "wss://")):
            raise CoordinatorError(
                f"tunnel_url must start with ws:// or wss://, not {tunnel_url!r}")
        url = tunnel_url or self.tunnel_url()
        if url is None:
            raise CoordinatorError(NO_TUNNEL)
        now = time.time()
        token_id, secret = self.store.create_token(ttl_s, labels, now, uses=uses)
        token = EnrollmentToken(url=url, coordinator_key=self.static_public(),
                                token_id=token_id, secret=secret, expires_at=int(now + ttl_s))
        return {"token": token.encode(), "token_id": token_id, "url": url, "uses": uses,
                "labels": labels, "expires_at": now + ttl_s}

    def list_tokens(self) -> list[dict[str, Any]]:
        now = time.time()
        return [token_json(t, now) for t in self.store.list_tokens()]

    def token_uses(self, token_id: str) -> list[dict[str, Any]]:
        return [{"did": did, "used_at": at} for did, at in self.store.token_uses(token_id)]

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return {"token_id": token_id, "revoked": self.store.revoke_token(token_id, time.time())}

    def create_key(self, name: str, scopes: dict[str, Any]) -> dict[str, Any]:
        record, plaintext = self.store.create_key(name, time.time(), scopes=scopes_from(scopes))
        return {**key_json(record), "key": plaintext}

    def list_keys(self) -> list[dict[str, Any]]:
        return [key_json(k) for k in self.store.list_keys()]

    def revoke_key(self, key: str) -> dict[str, Any]:
        return {"key": key, "revoked": self.store.revoke_key(key, time.time())}

    def rotate_key(self, key: str) -> dict[str, Any]:
        plaintext = self.store.rotate_key(key, time.time())
        key_id = plaintext.split("_", 2)[1]
        [record] = [k for k in self.store.list_keys() if k.key_id == key_id]
        return {**key_json(record), "key": plaintext}

    def list_nodes(self) -> dict[str, Any]:
        """{"serving": is a server running, "nodes": [...]} (live summary under "live")."""
        live = self.live()
        return {"serving": live is not None, "nodes": [
            {**asdict(n), "state": node_state(n, live),
             "connected": node_state(n, live) == "connected",
             "live": (live or {}).get(n.did)}
            for n in self.store.list_nodes()]}

    def revoke_node(self, did: str) -> dict[str, Any]:
        return {"did": did, "revoked": self.store.revoke_node(did, time.time())}

    def usage(self, by: str, since: float | None) -> dict[str, Any]:
        if by not in ("key", "node", "model"):
            raise CoordinatorError(f"bad --by {by!r}: use key, node or model")
        group: UsageGroup = "key" if by == "key" else "node" if by == "node" else "model"
        totals = self.store.usage_totals(group, since, self.journals)
        names = {k.key_id: k.name for k in self.store.list_keys()} if group == "key" else {}
        rows = [{by: t.group, **({"name": names.get(t.group, "-")} if names else {}),
                 **{k: v for k, v in asdict(t).items() if k not in ("group", "joules_tokens")},
                 "joules_per_1k_tokens": t.joules_per_1k_tokens} for t in totals]
        return {"by": by, "since": iso(since) if since is not None else None,
                "groups": rows, "total": usage_total(totals)}
