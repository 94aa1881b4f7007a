"""Bounds on peer-controlled values: usage claims, request ids, chunks, log fields."""

from __future__ import annotations

import math

import pytest

from coordinator.ledger_row import fit_row
from meshgate.bounds import (
    MAX_TOKENS_CLAIM,
    check_chunk,
    clamp_tokens,
    clamp_usage,
    clip,
    is_sane_request_id,
    load_json,
)
from meshgate.protocol import OpenRequest, ProtocolViolation


@pytest.mark.parametrize(("claim", "expected"), [
    (7, 7), (-1, 0), (2**63, MAX_TOKENS_CLAIM), (1e308, MAX_TOKENS_CLAIM), (3.9, 3),
    (-math.inf, 0), (math.inf, MAX_TOKENS_CLAIM), (math.nan, None), ("12", None),
    (True, None), (None, None), ({"a": 1}, None),
])
def test_token_claims_are_clamped(claim: object, expected: int | None) -> None:
    assert clamp_tokens(claim) == expected


def test_a_usage_claim_keeps_honest_counts_and_says_what_was_wrong() -> None:
    assert clamp_usage({"prompt_tokens": 3, "completion_tokens": 4}) == (
        {"prompt_tokens": 3, "completion_tokens": 4}, [])
    usage, problems = clamp_usage({"prompt_tokens": "x" * 10_000, "completion_tokens": -2,
                                   "total_tokens": 10**30, "evil": 1})
    assert usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert len(problems) == 2
    assert all(len(p) < 120 for p in problems)  # the claim is not echoed whole
    assert clamp_usage(None) == (None, [])
    assert clamp_usage([1])[0] is None


@pytest.mark.parametrize("rid", ["req_1", "a" * 128, "x.y:z-1"])
def test_sane_request_ids(rid: str) -> None:
    assert is_sane_request_id(rid)


@pytest.mark.parametrize("rid", ["", "a" * 129, "a b", "a\nb", 5, None, "é"])
def test_insane_request_ids(rid: object) -> None:
    assert not is_sane_request_id(rid)


def test_an_open_frame_with_a_huge_request_id_is_a_protocol_violation() -> None:
    wire = OpenRequest("ok", "chat/completions", "m", False, b"{}").to_wire()
    assert OpenRequest.from_wire(wire).request_id == "ok"
    with pytest.raises(ProtocolViolation, match="request_id") as info:
        OpenRequest.from_wire({**wire, "request_id": "x" * 1_000_000})
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("data", [
    b'{"a": 1}\n\ndata: [DONE]', b'{"a": 1}\r', b"[DONE]", b"[1, 2]", b"not json", b"\xff",
    b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "a str", None,
])
def test_stream_chunks_that_would_not_be_one_event_are_refused(data: object) -> None:
    with pytest.raises(ValueError, match=r"not one JSON object|must be bytes"):
        check_chunk(data, streaming=True)


def test_good_chunks_pass_unchanged() -> None:
    assert check_chunk(b'{"choices": []}', streaming=True) == b'{"choices": []}'
    assert check_chunk(b'{\n "pretty": 1\n}', streaming=False) == b'{\n "pretty": 1\n}'


def test_clip_says_how_much_it_cut() -> None:
    assert clip("short") == "short"
    assert clip("x" * 1000, 10) == "x" * 10 + "…(+990 chars)"


def test_a_ledger_row_always_fits_its_columns() -> None:
    row = fit_row({"request_id": "r" * 500, "model": "m" * 10_000, "route": None,
                   "prompt_tokens": 10**30, "completion_tokens": "lots",
                   "latency_ms": math.nan, "cost": -1.0, "outcome": "ok"})
    assert len(row["request_id"]) == 128
    assert len(row["model"]) == 255
    assert row["route"] is None
    assert (row["prompt_tokens"], row["completion_tokens"]) == (MAX_TOKENS_CLAIM, 0)
    assert (row["latency_ms"], row["cost"]) == (0.0, 0.0)


def test_an_honest_ledger_row_is_kept_and_odd_values_are_made_plain() -> None:
    class Name(str):
        pass

    honest = {"request_id": "r1", "model": "m", "prompt_tokens": 3, "completion_tokens": 0,
              "latency_ms": 2.5, "cost": 0.125, "outcome": "ok", "joules": None}
    assert fit_row(honest) == honest
    assert fit_row(honest) is not honest
    assert fit_row({"request_id": "r"}) == {"request_id": "r", "prompt_tokens": 0,
                                           "completion_tokens": 0, "latency_ms": 0.0,
                                           "cost": 0.0}
    odd = fit_row({"model": Name("m" * 300), "key_id": 7, "prompt_tokens": True,
                   "completion_tokens": MAX_TOKENS_CLAIM + 1, "latency_ms": math.inf,
                   "cost": 3})
    assert type(odd["model"]) is str
    assert odd["model"] == "m" * 255
    assert odd["key_id"] == "7"
    assert (odd["prompt_tokens"], odd["completion_tokens"]) == (0, MAX_TOKENS_CLAIM)
    assert (odd["latency_ms"], odd["cost"]) == (0.0, 3.0)
    assert type(odd["cost"]) is float


def test_deep_json_is_a_value_error_not_a_recursion_error() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        load_json(b"[" * 100_000 + b"]" * 100_000)
    assert load_json(b'{"a": [1]}') == {"a": [1]}
