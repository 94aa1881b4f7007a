"""Routing hints: what a request asks for, parsed from its `model` field and header.

A client names what it wants in three ways, all in the OpenAI `model` field:

    llama-3.1-8b                          a model name
    fast-chat                             an alias from the coordinator config
    qg://task=summarize;prefer=speed      a capability route

and may add an `X-Meshgate-Route: k=v;k=v` header with the same keys. Keys are
`task`, `prefer` (edge | speed | cost | local | quality; edge, the default, ranks
every node first and keeps clouds as the fallback), `residency` and `model`.
Precedence, highest first: the header, the `model` field, the API key's
defaults. Parsing is pure and strict: a bad hint is a `RouteError` whose
message says what was wrong, never a silent fallback.

`RoutingConfig.resolve` turns a route into candidate model names in preference
order (an alias or a task expands to its list), for the scheduler to place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

ROUTE_SCHEME = "qg://"
ROUTE_HEADER = "X-Meshgate-Route"
ROUTE_KEYS = ("model", "task", "prefer", "residency")


class Prefer(StrEnum):
    EDGE = "edge"  # the default: nodes first, a cloud only when no node can serve or all failed
    SPEED = "speed"
    COST = "cost"
    LOCAL = "local"
    QUALITY = "quality"


class RouteError(ValueError):
    """A routing hint that cannot be parsed (HTTP 400)."""


class UnknownRouteError(RouteError):
    """A well-formed hint naming an alias, task or model nobody configured (HTTP 404)."""


@dataclass(frozen=True, slots=True)
class Route:
    model: str | None = None
    task: str | None = None
    prefer: Prefer = Prefer.EDGE
    residency: str | None = None

    def __str__(self) -> str:
        """The canonical `qg://` form, for logs and the usage ledger."""
        pairs = [(k, getattr(self, k)) for k in ROUTE_KEYS]
        return ROUTE_SCHEME + ";".join(f"{k}={v}" for k, v in pairs if v is not None)


def _put(pairs: dict[str, str], key: str, value: str, *, where: str) -> None:
    key, value = key.strip().lower(), value.strip()
    if not key or not value:
        raise RouteError(f"{where}: expected key=value, got {key!r}={value!r}")
    if key not in ROUTE_KEYS:
        raise RouteError(f"{where}: unknown key {key!r} (known: {', '.join(ROUTE_KEYS)})")
    if key in pairs:
        raise RouteError(f"{where}: key {key!r} given twice")
    pairs[key] = value


def parse_pairs(text: str, *, where: str) -> dict[str, str]:
    """Parse `k=v;k=v` (keys case-insensitive, blanks and a trailing `;` allowed)."""
    pairs: dict[str, str] = {}
    for raw in text.split(";"):
        part = raw.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise RouteError(f"{where}: expected key=value, got {part!r}")
        _put(pairs, key, value, where=where)
    return pairs


def _model_field_pairs(model: str) -> dict[str, str]:
    text = model.strip()
    if not text:
        raise RouteError("model: must not be empty")
    if text[: len(ROUTE_SCHEME)].lower() != ROUTE_SCHEME:
        return {"model": text}
    pairs = parse_pairs(text[len(ROUTE_SCHEME) :], where="model")
    if not pairs:
        raise RouteError(f"model: empty route {text!r}")
    return pairs


def _prefer(value: str) -> Prefer:
    try:
        return Prefer(value.lower())
    except ValueError:
        known = ", ".join(p.value for p in Prefer)
        raise RouteError(f"prefer: unknown policy {value!r} (known: {known})") from None


def parse_route(
    model: str,
    header: str | None = None,
    defaults: Mapping[str, str] | None = None,
) -> Route:
    """Merge the `model` field, the route header and the key's defaults into a Route."""
    if header is None and not defaults:  # the usual request: a plain model name
        text = model.strip()
        if text and text[: len(ROUTE_SCHEME)].lower() != ROUTE_SCHEME:
            return Route(model=text)
    merged: dict[str, str] = {}
    for key, value in (defaults or {}).items():
        _put(merged, key, value, where="key defaults")
    merged.update(_model_field_pairs(model))
    if header is not None:
        merged.update(parse_pairs(header, where=ROUTE_HEADER))
    if "model" not in merged and "task" not in merged:
        raise RouteError("route: names neither a model nor a task")
    return Route(
        model=merged.get("model"),
        task=merged.get("task"),
        prefer=_prefer(merged["prefer"]) if "prefer" in merged else Prefer.EDGE,
        residency=merged.get("residency"),
    )


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class RoutingConfig:
    """Aliases and task routes from the coordinator config.

    `aliases`: alias -> model names in preference order. `tasks`: task -> model
    names or aliases in preference order. `models`, when given, is every model
    name the fleet or a cloud knows; a name outside it and outside `aliases`
    is then an `UnknownRouteError` instead of a name passed through.
    """

    aliases: dict[str, list[str]] = field(default_factory=dict)
    tasks: dict[str, list[str]] = field(default_factory=dict)
    models: frozenset[str] | None = None

    def expand(self, name: str) -> list[str]:
        """One model name or alias -> model names (aliases expand one level)."""
        if name in self.aliases:
            return list(self.aliases[name])
        if self.models is not None and name not in self.models:
            raise UnknownRouteError(f"model: unknown model or alias {name!r}")
        return [name]

    def resolve(self, route: Route) -> list[str]:
        """Candidate model names, best first, without repeats.

        A named model (or alias) wins over a task; with only a task, the task's
        list is used, its aliases expanded in place.
        """
        if route.model is not None:
            return _unique(self.expand(route.model))
        if route.task is None:
            raise RouteError("route: names neither a model nor a task")
        if route.task not in self.tasks:
            known = ", ".join(sorted(self.tasks)) or "none configured"
            raise UnknownRouteError(f"task: unknown task {route.task!r} (known: {known})")
        return _unique(m for name in self.tasks[route.task] for m in self.expand(name))
