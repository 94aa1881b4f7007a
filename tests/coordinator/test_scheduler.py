"""The scheduler's estimate and its filters: one test per filter."""

from __future__ import annotations

import math

import pytest

from coordinator.scheduler import (
    Kind,
)
from coordinator.scheduler_rules import FALLBACK_DECODE_TPS, GIB
from tests.coordinator.scheduler_harness import (
    cloud,
    decide,
    model,
    node,
    order,
    reasons,
)

# --- the estimate --------------------------------------------------------------------


def test_a_loaded_idle_model_costs_prefill_plus_decode_plus_round_trip() -> None:
    best = decide(node("a")).best
    assert best is not None
    assert best.est_seconds == pytest.approx(1000 / 1000 + 100 / 50 + 0.010)
    assert best.est_cost == 0.0
    assert best.kind is Kind.NODE
    assert "loaded" in best.reasons


def test_an_unloaded_model_adds_its_load_time() -> None:
    best = decide(node("a", model(loaded=False, load_time_s=12.0))).best
    assert best is not None
    assert best.est_seconds == pytest.approx(12.0 + 1.0 + 2.0 + 0.010)
    assert "not loaded: +12.0s to load" in best.reasons


def test_each_queued_request_waits_one_request_time() -> None:
    best = decide(node("a", model(queue_depth=3))).best
    assert best is not None
    assert best.est_seconds == pytest.approx(4 * 3.0 + 0.010)
    assert "queue 3" in best.reasons


def test_a_zero_decode_rate_is_not_a_division_by_zero_but_a_conservative_guess() -> None:
    best = decide(node("a", model(decode_tps=0.0, prefill_tps=math.nan))).best
    assert best is not None
    assert math.isfinite(best.est_seconds)
    assert best.est_seconds == pytest.approx(1000 / 100 + 100 / FALLBACK_DECODE_TPS + 0.010)
    assert any("decode rate unknown" in r for r in best.reasons)
    assert any("prefill rate unknown" in r for r in best.reasons)


def test_a_cloud_costs_its_list_price_for_prompt_and_max_tokens() -> None:
    best = decide(cloud()).best
    assert best is not None
    assert best.kind is Kind.CLOUD
    assert best.est_cost == pytest.approx(1.0 * 0.001 + 0.1 * 0.002)
    assert best.est_seconds == pytest.approx(1000 / 5000 + 100 / 100 + 0.2)


def test_zero_tokens_asked_leaves_only_the_fixed_costs() -> None:
    best = decide(node("a", model(loaded=False)), prompt_tokens=0, max_tokens=0).best
    assert best is not None
    assert best.est_seconds == pytest.approx(10.0 + 0.010)


# --- filters -------------------------------------------------------------------------


def test_a_model_nobody_has_is_rejected_by_name() -> None:
    decision = decide(node("a"), models=("mistral-7b",))
    assert decision.candidates == []
    (rejection,) = decision.rejected
    assert rejection.kind is None
    assert rejection.reason == "no node or cloud has model 'mistral-7b'"


def test_a_disconnected_node_is_rejected() -> None:
    decision = decide(node("a", connected=False), node("b"))
    assert order(decision) == ["b"]
    assert reasons(decision) == {"a": "node not connected"}


def test_an_unloaded_model_that_does_not_fit_in_free_vram_is_rejected() -> None:
    big = model(loaded=False, memory_bytes=20 * GIB)
    decision = decide(node("a", big), node("b", big, vram_free_bytes=22 * GIB))
    assert order(decision) == ["b"]
    assert reasons(decision)["a"] == "does not fit: needs 20.0 GiB, 16.0 GiB VRAM free"


def test_a_loaded_model_is_never_rejected_for_memory() -> None:
    assert order(decide(node("a", model(memory_bytes=99 * GIB), vram_free_bytes=0))) == ["a"]


def test_a_cpu_only_node_fits_models_in_free_ram() -> None:
    big = model(loaded=False, memory_bytes=20 * GIB)
    decision = decide(
        node("a", big, gpu_count=0, vram_free_bytes=0, ram_free_bytes=24 * GIB),
        node("b", big, gpu_count=0, vram_free_bytes=0, ram_free_bytes=8 * GIB),
    )
    assert order(decision) == ["a"]
    assert reasons(decision)["b"] == "does not fit: needs 20.0 GiB, 8.0 GiB RAM free"


def test_prompt_plus_max_tokens_must_fit_the_context() -> None:
    decision = decide(node("a", model(context_length=1100)), node("b", model(context_length=1099)))
    assert order(decision) == ["a"]
    assert reasons(decision)["b"] == "context too small: needs 1100 tokens, model has 1099"


def test_a_cloud_with_a_known_context_is_held_to_it() -> None:
    decision = decide(cloud(context_length=512))
    assert reasons(decision)["openai"] == "context too small: needs 1100 tokens, model has 512"


def test_required_labels_must_all_match() -> None:
    decision = decide(
        node("a", labels={"tier": "gold", "site": "x"}),
        node("b", labels={"tier": "silver"}),
        node("c"),
        labels={"tier": "gold"},
    )
    assert order(decision) == ["a"]
    assert reasons(decision) == {
        "b": "label tier=gold required, has tier=silver",
        "c": "label tier=gold required, has tier=(none)",
    }


def test_residency_matches_the_site_or_residency_label() -> None:
    decision = decide(
        node("a", labels={"site": "site-a"}),
        node("b", labels={"residency": "site-a"}),
        node("c", labels={"site": "site-b"}),
        node("d"),
        residency="site-a",
    )
    assert order(decision) == ["a", "b"]
    assert reasons(decision) == {
        "c": "residency site-a required, is at site-b",
        "d": "residency site-a required, is at (none)",
    }


def test_residency_keeps_data_off_clouds_without_that_label() -> None:
    decision = decide(cloud("us"), cloud("eu", labels={"residency": "eu"}), residency="eu")
    assert order(decision) == ["eu"]
    assert reasons(decision) == {"us": "residency eu required, is at (none)"}


def test_the_first_failing_filter_is_the_reason_given() -> None:
    decision = decide(node("a", model(context_length=10), connected=False))
    assert reasons(decision) == {"a": "node not connected"}


# --- policies ------------------------------------------------------------------------
