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


def _raws(steps: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(value).encode() for value in steps]


def _one_by_one(raws: list[bytes]) -> list[bytes]:
    encoder, decoder = ChunkEncoder(), ChunkDecoder()
    return [decoder.decode(encoder.encode(raw)) for raw in raws]


def test_a_batch_gives_the_chunks_of_one_frame_each_byte_for_byte() -> None:
    raws = _raws(STREAM)
    encoder, decoder = ChunkEncoder(), ChunkDecoder()
    out = [decoder.decode(encoder.encode(raws[0]))]  # the first chunk comes alone
    bodies = encoder.encode_batch(raws[1:])
    assert len(bodies) == 2  # 42 chunks, ~10 KiB: two bodies of up to MAX_BATCH_BYTES
    for body in bodies:
        out += decoder.decode_many(body)
    assert out == _one_by_one(raws)
    assert [json.loads(o) for o in out] == STREAM
    # the tokens went as runs of texts: a fraction of the bytes of one patch each
    one_each = ChunkEncoder()
    one_each.encode(raws[0])
    assert sum(map(len, bodies)) < 0.5 * sum(len(one_each.encode(r)) for r in raws[1:])


@settings(max_examples=200, deadline=None)
@given(st.lists(_STEP, min_size=1, max_size=16), st.lists(st.integers(1, 5), min_size=1,
                                                          max_size=16), st.booleans())
def test_any_chunk_sequence_in_any_batches_round_trips_exactly(
        steps: list[tuple[str, Any]], sizes: list[int], ascii_: bool) -> None:
    raws: list[bytes] = []
    current = chunk(1)
    for kind, arg in steps:
        current = json.loads(json.dumps(current))
        choices = current["choices"] or [{"index": 0, "delta": {}, "finish_reason": None}]
        current["choices"] = choices
        if kind in ("text", "role"):
            choices[0]["delta"]["content" if kind == "text" else "role"] = arg
        elif kind == "finish":
            choices[0]["finish_reason"] = arg
        elif kind == "extra":
            current[f"x{arg}"] = arg
        else:
            current["choices"] = []
        raws.append(json.dumps(current, ensure_ascii=ascii_).encode())
    raws = [raws[0], *raws]  # repeats: a patch that changes nothing
    encoder, decoder = ChunkEncoder(), ChunkDecoder()
    out = [decoder.decode(encoder.encode(raws[0]))]
    at, i = 1, 0
    while at < len(raws):
        group = raws[at:at + sizes[i % len(sizes)]]
        at, i = at + len(group), i + 1
        for body in encoder.encode_batch(group):
            out += decoder.decode_many(body)
    assert out == _one_by_one(raws)


def test_a_big_burst_is_split_and_what_is_no_object_goes_alone() -> None:
    encoder, decoder = ChunkEncoder(), ChunkDecoder()
    raws = _raws([chunk(i) for i in range(400)])
    decoder.decode(encoder.encode(raws[0]))
    bodies = encoder.encode_batch([*raws[1:], b"not json", raws[1]])
    assert bodies[-2] == b"not json"
    assert len(bodies) >= 4  # 399 chunks of ~230 bytes: several bodies of <= 8 KiB of chunks
    assert all(len(b) < 16 * 1024 for b in bodies)
    out: list[bytes] = []
    for body in bodies:
        if body != b"not json":
            out += decoder.decode_many(body)
    assert [json.loads(o) for o in out] == [*map(json.loads, raws[1:]), json.loads(raws[1])]


@pytest.mark.parametrize(
    "payload",
    [
        [3, []],  # an empty batch
        [3, [[3, [[0, {}]]]]],  # a batch in a batch
        [3, [[0, {"a": 1}]], 1],
        [4, [], ["x"]],  # a run without a path
        [4, ["a"], []],  # ... without texts
        [4, ["a"], [1]],  # ... with what is no text
        [4, [True], ["x"]],  # ... with a key that is no str or int
        [4, ["choices", 0, "delta", "content"], ["x"]],  # ... where there is no such string
        [4, ["a"] * 40, ["x"]],  # ... deeper than MAX_DEPTH
        [5, 1],
    ],
)
def test_a_malformed_batch_is_a_value_error(payload: Any) -> None:
    decoder = ChunkDecoder()
    decoder.decode(MAGIC + msgpack.packb([0, {"a": 1}]))
    with pytest.raises(ValueError, match="compact chunk"):
        decoder.decode_many(MAGIC + msgpack.packb(payload))


def test_a_batch_is_refused_where_one_chunk_goes() -> None:
    encoder, decoder = ChunkEncoder(), ChunkDecoder()
    raws = _raws(STREAM[:4])
    body = encoder.encode_batch(raws)[0]
    with pytest.raises(ValueError, match="a batch where one chunk goes"):
        decoder.decode(body)


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-1, 5) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner,
                                                                max_size=3),
    max_leaves=16,
))
def test_whatever_batch_a_node_sends_is_json_chunks_or_a_value_error(value: Any) -> None:
    decoder = ChunkDecoder()
    decoder.decode(MAGIC + msgpack.packb([0, {"a": [1, {"b": None}]}]))
    for payload in (value, [3, value], [4, ["a", 1, "b"], value], [3, [[4, ["a"], value]]]):
        try:
            out = decoder.decode_many(MAGIC + msgpack.packb(payload))
        except ValueError:
            continue
        assert out
        assert all(isinstance(json.loads(o), dict) for o in out)


def _json_text(literal: bytes) -> str | None:
    try:
        value = json.loads(literal)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=12).map(lambda b: b'"' + b + b'"'),
    st.text(max_size=6).map(lambda t: json.dumps(t, ensure_ascii=False).encode()),
    st.sampled_from([b'"\xed\xa0\x80"', b'"\xff"', b'"a\x7f"', b'"\\u00e9"', b'"a"b"', b'""',
                     b'"\t"', b"1", b"null"]),
))
def test_a_tokens_text_is_read_as_json_reads_it(literal: bytes) -> None:
    encoder = ChunkEncoder()
    for original in STREAM[:3]:
        encoder.encode(json.dumps(original).encode())
    assert encoder._template is not None
    prefix, suffix, _ = encoder._template
    assert encoder._fast_text(prefix + literal + suffix) == _json_text(literal)


_SEP = object()  # stands for the template's suffix + newline + prefix inside a literal


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=8).map(lambda b: b'"' + b + b'"'),
    st.text(max_size=5).map(lambda t: json.dumps(t, ensure_ascii=False).encode()),
    st.text(max_size=5).map(lambda t: json.dumps(t).encode()),
    st.sampled_from([b'"\xff"', b'"a\x00b"', b'"a\nb"', b'""', b'"a"b"', b"1", b"", _SEP]),
), min_size=2, max_size=7))
def test_a_run_of_token_chunks_in_one_read_encodes_as_chunk_by_chunk(literals: list[Any]
                                                                      ) -> None:
    """`encode_batch`'s few-pass way for a read of token chunks gives the bytes (and the
    state) of the chunk-by-chunk way, or leaves the read to it."""
    fast, slow = ChunkEncoder(), ChunkEncoder()
    for encoder in (fast, slow):
        for original in STREAM[:3]:
            encoder.encode(json.dumps(original).encode())
    slow._run_texts = lambda chunks: None  # type: ignore[method-assign]
    assert fast._template is not None
    prefix, suffix, _ = fast._template
    raws = [prefix + (b'"a"' + suffix + b"\n" + prefix + b'"b"' if lit is _SEP else lit)
            + suffix for lit in literals]
    assert fast.encode_batch(raws) == slow.encode_batch(raws)
    assert fast._previous == slow._previous
    assert fast._template == slow._template


def test_a_read_of_plain_token_chunks_takes_the_few_pass_way() -> None:
    encoder = ChunkEncoder()
    raws = _raws(STREAM[:12])
    encoder.encode(raws[0])
    encoder.encode_batch(raws[1:3])
    texts = encoder._run_texts(raws[3:])
    assert texts == [f" tok{i}" for i in range(3, 12)]
    assert encoder._run_texts([*raws[3:6], b"{}"]) is None
