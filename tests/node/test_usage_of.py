"""`usage_of` reads what the general JSON reading read before it had a fast path.

`reference` is `usage_of` as it was before its strict msgspec reading of a usage object of
integers (node_agent/runtimes/base.py, `_COUNTS`): every chunk must give the same answer.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from node_agent.runtimes.base import usage_of

_DECODER = json.JSONDecoder()
_KEY = b'"usage"'
_SPACE = b" \t\r\n"


def reference(chunk: bytes) -> dict[str, int] | None:
    end = len(chunk)
    while (at := chunk.rfind(_KEY, 0, end)) >= 0:
        end = at
        pos = at + len(_KEY)
        while pos < len(chunk) and chunk[pos] in _SPACE:
            pos += 1
        if pos >= len(chunk) or chunk[pos] != 0x3A:
            continue
        try:
            usage, _ = _DECODER.raw_decode(chunk[pos + 1:].decode().lstrip())
        except ValueError:
            return None
        if not isinstance(usage, dict):
            return None
        return {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}
    return None


def test_the_usual_answers_and_their_edges_read_as_before() -> None:
    chunks = [
        b'{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":16,"total_tokens":23}}',
        b'{"usage": {"prompt_tokens": 7} }\n',  # spaces and a newline after it
        b'{"usage":{"a":1,"a":2}}',  # a key twice: the last counts
        b'{"usage":{"a":-0,"b":99999999999999999999999999}}',
        b'{"usage":{"a":1.0,"b":1e2,"c":true,"d":null,"e":"1","f":2}}',  # only ints count
        b'{"usage":{"a":1,"d":{"cached_tokens":1}}}',  # nested details: skipped
        b'{"usage":{"a":NaN,"b":3}}',  # JSON's json reads NaN; msgspec does not
        b'{"usage":{"a":1e400,"b":3}}',
        b'{"usage":{"\\ud800":3}}',  # a lone surrogate escape
        b'{"usage":{"\xff":3}}',  # not UTF-8
        b'{"usage":{"a":3}',  # no closing brace of the answer
        b'{"usage":{"a":3}},"x":1}',  # more after the usage
        b'{"usage":{"a":3}}}}',
        b'{"usage":\x1c{"a":3}}',  # a separator str.lstrip takes for space
        b'{"usage":7}',
        b'{"usage":{}}',
        b'{"usage":}',
        b'"usage":}',
        b'"usage":{"a":1}}',
    ]
    for chunk in chunks:
        assert usage_of(chunk) == reference(chunk), chunk


_values = st.one_of(
    st.integers(-2**70, 2**70), st.booleans(), st.none(), st.floats(allow_nan=False),
    st.text(max_size=4), st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2))


def _dumps(value: Any, spaced: bool) -> str:
    return json.dumps(value, separators=(", ", ": ") if spaced else (",", ":"))


@settings(max_examples=400, deadline=None)
@given(usage=st.one_of(st.dictionaries(st.text(max_size=6), _values, max_size=5), _values),
       spaced=st.booleans(), after=st.sampled_from(["", ' ,"id":"x"', ',"usage2":1']),
       tail=st.sampled_from(["", "\n", " \r\n", "}"]), cut=st.integers(0, 3),
       noise=st.binary(max_size=3))
def test_any_usage_in_any_answer_reads_as_before(usage: Any, spaced: bool, after: str,
                                                 tail: str, cut: int, noise: bytes) -> None:
    text = '{"choices":[],"usage":' + _dumps(usage, spaced) + after + "}" + tail
    chunk = text.encode()
    for variant in (chunk, chunk[:len(chunk) - cut], chunk + noise, noise + chunk):
        assert usage_of(variant) == reference(variant), variant
