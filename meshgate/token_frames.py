"""Compact token frames: a streamed answer's chunks as patches against the chunk before.

A node streams one JSON object per chunk (an OpenAI ``chat.completion.chunk`` or
``text_completion``); most of each is the same as the chunk before (id, object, created,
model, system_fingerprint, the choice's index, nulls). When the coordinator asks for it
(``"compact": 1`` in OPEN), the node sends each chunk as ``MAGIC`` + msgpack of a patch
against the previous chunk of the same stream (the first against an empty object), and
the coordinator rebuilds the chunk, key order included, and writes the JSON itself. A
node that does not know the flag sends plain JSON, which passes through untouched.

Patch forms (msgpack arrays): ``[0, value]`` replace; ``[1, {key: patch}, [deleted]]``
a map edited key by key; ``[2, {index: patch}]`` a list of the same length edited item
by item. One stream's state lives only in its own encoder and decoder: nothing is shared
across streams or tenants.

The decoder takes a node's bytes: anything malformed is a ValueError (the coordinator
ends the stream as a bad node answer).
"""

from __future__ import annotations

from typing import Any

import msgpack
import pydantic_core

from meshgate.bounds import load_json

MAGIC = b"\xc1"  # never valid msgpack nor a JSON text's first byte
MAX_DEPTH = 32
REPLACE, EDIT_MAP, EDIT_LIST = 0, 1, 2
_SAME = object()


def _patch(old: Any, new: Any) -> Any:
    """The patch turning `old` into `new`, or _SAME."""
    if type(old) is type(new) and old == new:
        return _SAME
    if isinstance(old, dict) and isinstance(new, dict):
        edits = {}
        for key, value in new.items():
            sub = _patch(old[key], value) if key in old else [REPLACE, value]
            if sub is not _SAME:
                edits[key] = sub
        return [EDIT_MAP, edits, [key for key in old if key not in new]]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        items = {}
        for index, (was, now) in enumerate(zip(old, new, strict=True)):
            sub = _patch(was, now)
            if sub is not _SAME:
                items[index] = sub
        return [EDIT_LIST, items]
    return [REPLACE, new]


def _apply(old: Any, patch: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH or not isinstance(patch, list) or not patch:
        raise ValueError("a compact chunk is malformed")
    tag = patch[0]
    if tag == REPLACE and len(patch) == 2:
        return patch[1]
    if tag == EDIT_MAP and len(patch) == 3 and isinstance(old, dict):
        edits, deleted = patch[1], patch[2]
        if not isinstance(edits, dict) or not isinstance(deleted, list):
            raise ValueError("a compact chunk is malformed")
        out = {}
        for key, value in old.items():
            if key in deleted:
                continue
            out[key] = _apply(value, edits[key], depth + 1) if key in edits else value
        for key, sub in edits.items():
            if key not in old:
                out[key] = _apply(None, sub, depth + 1)
        return out
    if tag == EDIT_LIST and len(patch) == 2 and isinstance(old, list):
        items = patch[1]
        if not isinstance(items, dict) or not all(
            isinstance(i, int) and 0 <= i < len(old) for i in items
        ):
            raise ValueError("a compact chunk is malformed")
        return [_apply(v, items[i], depth + 1) if i in items else v for i, v in enumerate(old)]
    raise ValueError("a compact chunk is malformed")


class ChunkEncoder:
    """The node's side, one per stream."""

    def __init__(self) -> None:
        self._previous: Any = {}

    def encode(self, chunk: bytes) -> bytes:
        try:
            value = load_json(chunk)
        except ValueError:
            return chunk  # not JSON: as it is (the coordinator judges it)
        if not isinstance(value, dict):
            return chunk
        patch = _patch(self._previous, value)
        self._previous = value
        if patch is _SAME:
            patch = [EDIT_MAP, {}, []]
        return MAGIC + msgpack.packb(patch, use_bin_type=True)


class ChunkDecoder:
    """The coordinator's side, one per stream: the JSON chunk a DATA body stands for."""

    def __init__(self) -> None:
        self._previous: Any = {}

    def decode(self, body: bytes) -> bytes:
        if body[:1] != MAGIC:
            return body  # plain JSON from a node that does not compact
        try:
            patch = msgpack.unpackb(body[1:], raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError):
            raise ValueError("a compact chunk is not msgpack") from None
        value = _apply(self._previous, patch)
        if not isinstance(value, dict):
            raise ValueError("a compact chunk is not a JSON object")
        self._previous = value
        try:
            return pydantic_core.to_json(value)
        except pydantic_core.PydanticSerializationError as exc:
            raise ValueError(f"a compact chunk cannot be JSON: {exc}") from None
