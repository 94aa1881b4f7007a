"""Compact token frames (meshgate/token_frames.py): what the node encodes, the coordinator
rebuilds exactly (values and key order), in a fraction of the bytes."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.token_frames import MAGIC, ChunkDecoder, ChunkEncoder


def chunk(index: int, **extra: Any) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": f" tok{index}"}
    if index == 0:
        delta = {"role": "assistant", "content": ""}
    return {
        "id": "chatcmpl-7f3c2a9e4b1d4e0f9a8b6c5d",
        "object": "chat.completion.chunk",
        "created": 1732400000,
        "model": "SmolLM2-135M-Instruct-Q4_1",
        "system_fingerprint": "b4154-1f922254",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
        **extra,
    }


STREAM: list[dict[str, Any]] = [
    chunk(0),
    *(chunk(i) for i in range(1, 40)),
    {**chunk(40), "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                "finish_reason": "stop"}]},
    {**chunk(41), "choices": [{"index": 0, "delta": {"content": "é\n\"x\""},
                                "logprobs": {"content": [{"token": "x", "logprob": -0.25}]},
                                "finish_reason": None}]},
    {**chunk(42), "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 41,
                                           "total_tokens": 50}},
]


def test_a_stream_round_trips_exactly_in_a_fraction_of_the_bytes() -> None:
    encoder, decoder = ChunkEncoder(), ChunkDecoder()
    plain = compact = 0
    for original in STREAM:
        raw = json.dumps(original).encode()
        body = encoder.encode(raw)
        assert body.startswith(MAGIC)
        out = decoder.decode(body)
        assert b"\n" not in out
        assert b"\r" not in out  # one event when the coordinator frames it (SSE injection)
        rebuilt = json.loads(out)
        assert rebuilt == original
        assert list(rebuilt) == list(original)  # key order too
        for got, sent in zip(rebuilt["choices"], original["choices"], strict=True):
            assert list(got) == list(sent)
        plain += len(raw)
        compact += len(body)
    assert compact < 0.3 * plain


def test_what_is_not_a_json_object_passes_through_as_it_is() -> None:
    encoder, decoder = ChunkEncoder(), ChunkDecoder()
    for raw in (b"not json", b"[1, 2]"):
        assert encoder.encode(raw) == raw
        assert decoder.decode(raw) == raw


@pytest.mark.parametrize(
    "patch",
    [
        "nonsense",
        [],
        [9, 1],
        [1, {"a": [0, 1]}],  # edit-map without its deleted list
        [2, {5: [0, 1]}],  # list edit past the end
        [1, {"a": [2, {}]}, []],  # list edit of what is no list
        [0, [1, 2]],  # a chunk that is no JSON object
    ],
)
def test_a_malformed_compact_chunk_is_a_value_error(patch: Any) -> None:
    decoder = ChunkDecoder()
    body = MAGIC + (msgpack.packb(patch) if patch != "nonsense" else b"\xc1\xc1")
    with pytest.raises(ValueError, match="compact chunk"):
        decoder.decode(body)


def test_deep_nesting_from_a_node_is_refused() -> None:
    deep: Any = [0, 1]
    for _ in range(40):
        deep = [1, {"a": deep}, []]
    encoder_side: dict[str, Any] = {}
    node = encoder_side
    for _ in range(41):
        node["a"] = {}
        node = node["a"]
    decoder = ChunkDecoder()
    decoder._previous = encoder_side
    with pytest.raises(ValueError, match="malformed"):
        decoder.decode(MAGIC + msgpack.packb(deep))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner,
                                                                max_size=3),
    max_leaves=12,
))
def test_whatever_a_node_sends_is_a_json_chunk_or_a_value_error(raw: bytes, value: Any) -> None:
    decoder = ChunkDecoder()
    decoder.decode(MAGIC + msgpack.packb([0, {"a": [1, {"b": None}]}]))  # some state
    for body in (MAGIC + raw, MAGIC + msgpack.packb(value)):
        try:
            out = decoder.decode(body)
        except ValueError:
            continue
        assert isinstance(json.loads(out), dict)


def _generic(decoder: ChunkDecoder) -> ChunkDecoder:
    """`decoder` with its token template off: every chunk the general way."""
    decoder._template = None
    return decoder


def test_token_chunks_take_the_template_way_with_the_same_bytes_out() -> None:
    encoder, decoder, reference = ChunkEncoder(), ChunkDecoder(), ChunkDecoder()
    fast = 0
    for original in STREAM:
        raw = json.dumps(original).encode()
        fast += encoder._template is not None and decoder._template is not None
        body = encoder.encode(raw)
        out = decoder.decode(body)
        assert out == _generic(reference).decode(body)  # byte for byte
        assert json.loads(out) == original
    assert fast >= 35  # the tokens after the second: no parse, no diff, no rebuild


_TEXT = st.sampled_from(["", " ", "a", "\"", "\\", "é", "\n", "\u2028", "\ue000meshgate\ue001",
                         "\"content\":\"", " tok1"]) | st.text(max_size=4)
_STEP = st.one_of(
    st.tuples(st.just("text"), _TEXT),
    st.tuples(st.just("finish"), st.sampled_from([None, "stop", "length"])),
    st.tuples(st.just("role"), _TEXT),
    st.tuples(st.just("extra"), st.integers(0, 3)),
    st.tuples(st.just("no_choices"), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_STEP, min_size=1, max_size=12), st.booleans(), st.booleans())
def test_any_chunk_sequence_round_trips_exactly(steps: list[tuple[str, Any]], ascii_: bool,
                                               compact_separators: bool) -> None:
    encoder, decoder, reference = ChunkEncoder(), ChunkDecoder(), ChunkDecoder()
    current = chunk(1)
    for kind, arg in steps:
        current = json.loads(json.dumps(current))
        choices = current["choices"] or [{"index": 0, "delta": {}, "finish_reason": None}]
        current["choices"] = choices
        if kind == "text":
            choices[0]["delta"]["content"] = arg
        elif kind == "finish":
            choices[0]["finish_reason"] = arg
        elif kind == "role":
            choices[0]["delta"]["role"] = arg
        elif kind == "extra":
            current[f"x{arg}"] = arg
        else:
            current["choices"] = []
        raw = json.dumps(current, ensure_ascii=ascii_,
                         separators=(",", ":") if compact_separators else None).encode()
        body = encoder.encode(raw)
        out = decoder.decode(body)
        assert out == _generic(reference).decode(body)
        rebuilt = json.loads(out)
        assert rebuilt == current
        assert list(rebuilt) == list(current)


def test_a_token_patch_with_the_wrong_kind_of_edit_is_refused() -> None:
    encoder, decoder = ChunkEncoder(), ChunkDecoder()
    for original in STREAM[:5]:
        decoder.decode(encoder.encode(json.dumps(original).encode()))
    assert decoder._template is not None
    # the template's path, but the list edited as a map (key 0): malformed, as without one
    bad = [1, {"choices": [1, {0: [1, {"delta": [1, {"content": [0, "x"]}, []]}, []]}, []]}, []]
    with pytest.raises(ValueError, match="malformed"):
        decoder.decode(MAGIC + msgpack.packb(bad))
