"""What the store hands out: frozen records of its rows, and a key's scopes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

from coordinator.errors import CoordinatorError
from coordinator.store.schema import ApiKeyRow, NodeRow, TokenRow

UsageGroup = Literal["key", "node", "model"]


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


PREFER_VALUES = ("edge", "speed", "cost", "local", "quality")


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

