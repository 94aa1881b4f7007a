"""An unmeasured rate is a guess: the scheduler assumes it no faster than the slowest rate
measured for the same model among the slots it looks at (nor than the fallback), so an
idle loaded node is not passed over for a cold one on the strength of a guess. Found by a
clean-clone run under load: the loaded node's measured prefill rate on a tiny prompt (a
first token's fixed cost included) read slower than the fallback guessed for the cold
node, and a sequential request loaded the model cold."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.scheduler import ModelView, NodeView, Request, Snapshot, schedule
from coordinator.scheduler_rules import FALLBACK_DECODE_TPS, FALLBACK_PREFILL_TPS

MODEL = "smollm2"
PROMPT, OUTPUT = 9, 4


def mesh(loaded: dict[str, Any], cold: dict[str, Any] | None = None) -> Snapshot:
    warm = ModelView(MODEL, loaded=True, **loaded)
    on_disk = ModelView(MODEL, loaded=False, load_time_s=1.7, **(cold or {}))
    return Snapshot.build([NodeView("did:loaded", {MODEL: warm}, ram_free_bytes=1 << 34),
                           NodeView("did:on-disk", {MODEL: on_disk}, ram_free_bytes=1 << 34)])


def order(snapshot: Snapshot, limit: int | None = None) -> list[str]:
    request = Request(models=(MODEL,), prompt_tokens=PROMPT, max_tokens=OUTPUT)
    return [c.target for c in schedule(request, snapshot, limit=limit).candidates]


@pytest.mark.parametrize("limit", [None, 2])
def test_an_idle_loaded_node_measured_slower_than_the_fallback_still_beats_a_cold_guess(
        limit: int | None) -> None:
    slow = {"prefill_tps": 3.0, "decode_tps": 17.0}  # a first token's cost on 9 tokens
    assert slow["prefill_tps"] < FALLBACK_PREFILL_TPS
    assert order(mesh(slow), limit) == ["did:loaded", "did:on-disk"]


def test_the_cold_node_wins_once_the_loaded_queue_outweighs_the_load() -> None:
    busy = {"prefill_tps": 3.0, "decode_tps": 17.0, "queue_depth": 3, "in_flight": 1}
    assert order(mesh(busy)) == ["did:on-disk", "did:loaded"]


def test_a_measured_cold_node_is_judged_by_its_own_rates() -> None:
    fast_box = {"prefill_tps": 2000.0, "decode_tps": 200.0}  # measured before it unloaded
    slow = {"prefill_tps": 3.0, "decode_tps": 17.0}
    assert order(mesh(slow, fast_box)) == ["did:on-disk", "did:loaded"]


def test_with_nothing_measured_the_fallback_is_the_guess_and_says_so() -> None:
    snapshot = mesh({})
    request = Request(models=(MODEL,), prompt_tokens=PROMPT, max_tokens=OUTPUT)
    best, cold = schedule(request, snapshot).candidates
    assert best.target == "did:loaded"
    guessed = PROMPT / FALLBACK_PREFILL_TPS + OUTPUT / FALLBACK_DECODE_TPS
    assert best.est_seconds == pytest.approx(guessed)
    assert cold.est_seconds == pytest.approx(guessed + 1.7)
    assert not any("slowest measured" in note for note in best.reasons + cold.reasons)


def test_the_guess_that_was_raised_is_named_in_the_reasons() -> None:
    request = Request(models=(MODEL,), prompt_tokens=PROMPT, max_tokens=OUTPUT)
    loaded, cold = schedule(request, mesh({"prefill_tps": 3.0, "decode_tps": 2.0})).candidates
    assert cold.target == "did:on-disk"
    assert "prefill as the slowest measured: 3 tok/s" in cold.reasons
    assert "decode as the slowest measured: 2 tok/s" in cold.reasons
    assert cold.est_seconds == pytest.approx(loaded.est_seconds + 1.7)
