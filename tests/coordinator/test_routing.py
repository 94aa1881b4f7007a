"""Routing hints: the `model` field, the route header, key defaults, aliases and tasks."""

from __future__ import annotations

import pytest

from coordinator.routing import (
    Prefer,
    Route,
    RouteError,
    RoutingConfig,
    UnknownRouteError,
    parse_route,
)

CONFIG = RoutingConfig(
    aliases={"fast-chat": ["qwen-0.5b", "llama-8b"], "smart": ["llama-70b"]},
    tasks={"summarize": ["smart", "llama-8b"], "embed": ["nomic-embed"]},
)


def test_a_plain_model_name_is_a_model_route_with_default_policy() -> None:
    assert parse_route("llama-8b") == Route(model="llama-8b", prefer=Prefer.EDGE)


def test_a_capability_route_reads_every_key() -> None:
    route = parse_route("qg://task=summarize;prefer=cost;residency=site-a;model=x")
    assert route == Route(model="x", task="summarize", prefer=Prefer.COST, residency="site-a")


def test_route_syntax_tolerates_case_blanks_and_a_trailing_separator() -> None:
    route = parse_route("QG:// Task = summarize ; PREFER=Quality ;")
    assert route == Route(task="summarize", prefer=Prefer.QUALITY)


def test_the_header_overrides_the_model_field() -> None:
    route = parse_route("qg://task=summarize;prefer=speed", header="prefer=local;residency=eu")
    assert route == Route(task="summarize", prefer=Prefer.LOCAL, residency="eu")


def test_key_defaults_fill_in_only_what_the_request_left_out() -> None:
    defaults = {"prefer": "cost", "residency": "site-b"}
    route = parse_route("llama-8b", header="residency=site-a", defaults=defaults)
    assert route == Route(model="llama-8b", prefer=Prefer.COST, residency="site-a")


def test_a_header_may_name_the_model_of_a_task_route() -> None:
    assert parse_route("qg://task=embed", header="model=e5").model == "e5"


def test_the_canonical_form_round_trips() -> None:
    route = Route(model="m", task="t", prefer=Prefer.COST, residency="eu")
    assert str(route) == "qg://model=m;task=t;prefer=cost;residency=eu"
    assert parse_route(str(route)) == route


@pytest.mark.parametrize(
    ("model", "header", "message"),
    [
        ("", None, "must not be empty"),
        ("qg://", None, "empty route"),
        ("qg://task", None, "expected key=value"),
        ("qg://task=", None, "expected key=value"),
        ("qg://=x", None, "expected key=value"),
        ("qg://colour=red", None, "unknown key 'colour'"),
        ("qg://task=a;task=b", None, "given twice"),
        ("qg://task=a;prefer=fastest", None, "unknown policy 'fastest'"),
        ("m", "prefer=cheap", "unknown policy 'cheap'"),
        ("m", "nonsense", "X-Meshgate-Route: expected key=value"),
        ("qg://prefer=cost", None, "neither a model nor a task"),
    ],
)
def test_a_bad_hint_is_refused_with_a_message_that_says_why(
    model: str, header: str | None, message: str
) -> None:
    with pytest.raises(RouteError, match=message):
        parse_route(model, header=header)


def test_bad_key_defaults_are_refused_too() -> None:
    with pytest.raises(RouteError, match="key defaults: unknown key"):
        parse_route("m", defaults={"speed": "1"})


def test_a_route_error_is_a_value_error() -> None:
    assert issubclass(RouteError, ValueError)
    assert issubclass(UnknownRouteError, RouteError)


def test_a_model_name_resolves_to_itself() -> None:
    assert CONFIG.resolve(Route(model="llama-8b")) == ["llama-8b"]


def test_an_alias_resolves_to_its_models_in_order() -> None:
    assert CONFIG.resolve(parse_route("fast-chat")) == ["qwen-0.5b", "llama-8b"]


def test_a_task_resolves_to_its_models_with_aliases_expanded_in_place() -> None:
    assert CONFIG.resolve(parse_route("qg://task=summarize")) == ["llama-70b", "llama-8b"]


def test_a_named_model_wins_over_a_task() -> None:
    assert CONFIG.resolve(parse_route("qg://task=summarize;model=smart")) == ["llama-70b"]


def test_resolved_names_are_never_repeated() -> None:
    config = RoutingConfig(aliases={"a": ["x", "y", "x"]}, tasks={"t": ["a", "y", "z"]})
    assert config.resolve(Route(task="t")) == ["x", "y", "z"]


def test_an_unknown_task_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(UnknownRouteError, match=r"unknown task 'translate' \(known: embed"):
        CONFIG.resolve(Route(task="translate"))


def test_an_unknown_name_is_refused_when_the_known_models_are_given() -> None:
    config = RoutingConfig(aliases={"fast": ["a"]}, models=frozenset({"a", "b"}))
    assert config.resolve(Route(model="b")) == ["b"]
    assert config.resolve(Route(model="fast")) == ["a"]
    with pytest.raises(UnknownRouteError, match="unknown model or alias 'c'"):
        config.resolve(Route(model="c"))


def test_a_route_without_model_or_task_does_not_resolve() -> None:
    with pytest.raises(RouteError, match="neither"):
        CONFIG.resolve(Route())


def test_a_plain_model_name_is_taken_without_its_blanks_and_blanks_alone_are_refused() -> None:
    assert parse_route("  llama-8b \t") == Route(model="llama-8b")
    with pytest.raises(RouteError, match="must not be empty"):
        parse_route("   ")


def test_the_api_resolves_with_its_config_s_routing_made_once_per_config() -> None:
    from coordinator.api_plan import _routing
    from coordinator.config import CoordinatorConfig

    first = CoordinatorConfig(aliases={"fast": ["a", "b"]})
    assert _routing(first) is _routing(first)
    assert _routing(first).resolve(parse_route("fast")) == ["a", "b"]
    first.aliases["slow"] = ["c"]  # the same maps, not copies
    assert _routing(first).resolve(parse_route("slow")) == ["c"]
    second = CoordinatorConfig(aliases={"fast": ["z"]})  # a config reloaded
    assert _routing(second).resolve(parse_route("fast")) == ["z"]
