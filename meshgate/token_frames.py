"""Compact token frames: a streamed answer's chunks as patches against the chunk before.

A node streams one JSON object per chunk (an OpenAI ``chat.completion.chunk`` or
``text_completion``); most of each is the same as the chunk before (id, object, created,
model, system_fingerprint, the choice's index, nulls). When the coordinator asks for it
(``"compact": 1`` in OPEN), the node sends each chunk as ``MAGIC`` + msgpack of a patch
against the previous chunk of the same stream (the first against an empty object), and
the coordinator rebuilds the chunk, key order included, and writes the JSON itself. A
node that does not know the flag sends plain JSON, which passes through untouched.

The decoder takes a node's bytes: anything malformed is a ValueError (the coordinator
ends the stream as a bad node answer).

Batches (``"compact": 2`` in OPEN): the chunks a node read from its runtime together leave
in one DATA frame (`ChunkEncoder.encode_batch`), one tunnel frame and one msgpack pass for
the lot; a stream's first chunk always comes alone (`ChunkDecoder.decode`). The patch
and batch forms: meshgate/token_patch.py.

Per token, both sides take a template way when the chunk differs from the last one in one
string only (the token's text): the encoder keeps the bytes around that string and reads
just the new string; the decoder keeps its last output around it and splices the new
string's JSON in. Templates are made only when proven, are dropped by any other patch, and
give the same bytes as the general way (tests compare byte for byte).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import msgpack

from meshgate.bounds import load_json
from meshgate.token_patch import (
    BATCH,
    COMPACT_BATCHES,
    EDIT_MAP,
    MAGIC,
    MAX_BATCH_BYTES,
    MAX_DEPTH,
    SAME,
    TEXTS,
    Path,
    apply,
    chain,
    diff,
    leaf_edit,
    parent,
    same_leaf,
    with_leaf,
)

if TYPE_CHECKING:  # imported by the first ChunkDecoder: a node only encodes (issue 10's idle RSS)
    import pydantic_core

__all__ = ["COMPACT_BATCHES", "MAGIC", "ChunkDecoder", "ChunkEncoder"]

_MARK = "\ue000meshgate\ue001"  # a private-use string: stands for the leaf in a template
#: A JSON string with nothing escaped: its text is the bytes between the quotes (json.loads
#: is ~5x slower for a token's few bytes)
_PLAIN_STRING = re.compile(rb'"[^"\\\x00-\x1f]*"').fullmatch
#: Such strings joined with NUL bytes (`ChunkEncoder._run_texts`)
_PLAIN_RUN = re.compile(rb'"[^"\\\x00-\x1f]*"(?:\x00"[^"\\\x00-\x1f]*")*').fullmatch


class ChunkEncoder:
    """The node's side, one per stream.

    A token's chunk usually differs from the one before in one string (the text): once
    a chunk showed that, its bytes around that string are kept as a template, and a
    chunk with the same bytes around a new string is encoded without parsing the chunk
    or diffing it (the string alone is read). Anything else takes the general way."""

    def __init__(self) -> None:
        global pydantic_core  # noqa: PLW0603 (bound once, read per chunk as a module global)
        import pydantic_core

        self._previous: Any = {}
        self._template: tuple[bytes, bytes, Path] | None = None

    def encode(self, chunk: bytes) -> bytes:
        """One chunk's body (MAGIC + its patch; a chunk that is no JSON object, as it is)."""
        text = self._fast_text(chunk)
        if text is not None:
            assert self._template is not None
            path = self._template[2]
            parent(self._previous, path)[path[-1]] = text
            return MAGIC + msgpack.packb(chain(path, text), use_bin_type=True)
        patch = self._patch_of(chunk)
        return chunk if patch is None else MAGIC + msgpack.packb(patch, use_bin_type=True)

    def encode_batch(self, chunks: list[bytes]) -> list[bytes]:
        """Bodies for `chunks` that arrived together, in order: as few as can be (one
        holds up to MAX_BATCH_BYTES of raw chunks; token chunks as runs of their texts).
        A chunk that is no JSON object goes alone, as it is. One chunk: `encode`'s body."""
        if len(chunks) == 1:  # one token (one read of a runner at model pace): a run of one,
            # as cheap to write and to read as its text alone (a chained patch: 3x the calls)
            text = self._fast_text(chunks[0])
            if text is None:
                return [self.encode(chunks[0])]
            return [MAGIC + msgpack.packb(self._texts_item([text]), use_bin_type=True)]
        texts = self._run_texts(chunks)
        if texts is not None:
            return [MAGIC + msgpack.packb(self._texts_item(texts), use_bin_type=True)]
        bodies: list[bytes] = []
        items: list[Any] = []
        run: list[str] = []
        size = 0
        for chunk in chunks:
            if size + len(chunk) > MAX_BATCH_BYTES and (items or run):
                bodies.append(self._batch_body(items, run))
                items, run, size = [], [], 0
            text = self._fast_text(chunk)
            if text is not None:
                run.append(text)  # at the template's path: it only changes below
            else:
                if run:
                    items.append(self._texts_item(run))
                    run = []
                patch = self._patch_of(chunk)
                if patch is None:  # no JSON object: alone, as `encode` sends it
                    if items:
                        bodies.append(self._batch_body(items, run))
                        items, size = [], 0
                    bodies.append(chunk)
                    continue
                items.append(patch)
            size += len(chunk)
        if items or run:
            bodies.append(self._batch_body(items, run))
        return bodies

    def _texts_item(self, run: list[str]) -> list[Any]:
        """The run as an item; the chunk before the next is the run's last."""
        assert self._template is not None
        path = self._template[2]
        parent(self._previous, path)[path[-1]] = run[-1]
        return [TEXTS, path, run]  # msgpack writes the tuple as an array

    def _batch_body(self, items: list[Any], run: list[str]) -> bytes:
        if run:
            items.append(self._texts_item(run))
        payload = items[0] if len(items) == 1 else [BATCH, items]
        return MAGIC + msgpack.packb(payload, use_bin_type=True)

    def _patch_of(self, chunk: bytes) -> Any:
        """The general way: `chunk`'s patch against the chunk before (a template made when
        it shows a token's text); None for what is no JSON object (state unchanged)."""
        try:
            value = load_json(chunk)
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        patch = diff(self._previous, value)
        self._previous = value
        self._template = None
        if patch is SAME:
            return [EDIT_MAP, {}, []]
        edit = leaf_edit(patch)
        if edit is not None:
            self._template = _source_template(chunk, value, *edit)
        return patch

    def _run_texts(self, chunks: list[bytes]) -> list[str] | None:
        """The texts when every chunk is the template's bytes around a plain JSON string
        (no escapes) and they fit one body, read in a few passes over all of them rather
        than `_fast_text`'s calls per chunk; else None (the caller goes chunk by chunk).

        Joined with newlines, such chunks are the prefix, the string literals separated by
        suffix + newline + prefix, and the suffix: split there, they must give one literal
        a chunk, each ``"..."`` with no quote, backslash or control byte inside (checked
        at once, joined with NUL bytes, which no literal holds); a chunk holding a newline
        or a literal that is not plain gives another count or fails that check."""
        template = self._template
        if template is None:
            return None
        prefix, suffix, _ = template
        joined = b"\n".join(chunks)
        if (len(joined) > MAX_BATCH_BYTES or not joined.startswith(prefix)
                or not joined.endswith(suffix) or b"\n" in prefix or b"\n" in suffix):
            return None
        literals = joined[len(prefix):len(joined) - len(suffix)].split(suffix + b"\n" + prefix)
        if len(literals) != len(chunks):
            return None
        run = b"\x00".join(literals)
        if _PLAIN_RUN(run) is None:
            return None
        try:
            return run[1:-1].decode().split('"\x00"')
        except UnicodeDecodeError:
            return None  # json's own decoding judges it, chunk by chunk

    def _fast_text(self, chunk: bytes) -> str | None:
        """The token's text when `chunk` is the template's bytes around one new JSON
        string, else None (the caller sets it as the chunk before's leaf)."""
        template = self._template
        if template is None:
            return None
        prefix, suffix, _ = template
        if not chunk.startswith(prefix) or not chunk.endswith(suffix):
            return None
        # empty when prefix and suffix overlap in a short chunk: no string, None below
        literal = chunk[len(prefix):len(chunk) - len(suffix)]
        if _PLAIN_STRING(literal) is not None:  # no escapes: the text is its UTF-8
            try:
                return literal[1:-1].decode()
            except UnicodeDecodeError:
                pass  # json's own decoding judges it
        try:  # one JSON string and nothing else (the bytes around it are the template's)
            text = json.loads(literal)
        except ValueError:
            return None
        return text if isinstance(text, str) else None


def _source_template(chunk: bytes, value: Any, path: Path, text: str
                     ) -> tuple[bytes, bytes, Path] | None:
    """The bytes of `chunk` before and after the string at `path`, if they can be told
    for sure: the string's JSON appears once, and parsing the bytes around a marker gives
    `value` with the marker at `path`."""
    if not path:
        return None
    for literal in {json.dumps(text).encode(), json.dumps(text, ensure_ascii=False).encode()}:
        if chunk.count(literal) != 1:
            continue
        at = chunk.index(literal)
        prefix, suffix = chunk[:at], chunk[at + len(literal):]
        try:
            marked = load_json(prefix + json.dumps(_MARK).encode() + suffix)
        except ValueError:
            continue
        if marked == with_leaf(value, path, _MARK):
            return prefix, suffix, path
    return None


class ChunkDecoder:
    """The coordinator's side, one per stream: the JSON chunk a DATA body stands for.

    When a patch only replaces the string that the patch before it replaced too (a
    token's text), the chunk is the last one's JSON with that string swapped: its bytes
    around the string are kept as a template, so the chunk is neither rebuilt nor
    serialized whole."""

    def __init__(self) -> None:
        global pydantic_core  # noqa: PLW0603 (bound once, read per chunk as a module global)
        import pydantic_core

        self._previous: Any = {}
        self._template: tuple[bytes, bytes, Path] | None = None

    def decode(self, body: bytes) -> bytes:
        """One chunk (a stream's first; a batch is malformed here)."""
        out = self.decode_many(body)
        if len(out) != 1:
            raise ValueError("a compact chunk is malformed: a batch where one chunk goes")
        return out[0]

    def decode_many(self, body: bytes) -> list[bytes]:
        """The chunks a DATA body stands for, in order (one, or a batch's)."""
        if body[:1] != MAGIC:
            return [body]  # plain JSON from a node that does not compact
        try:
            patch = msgpack.unpackb(body[1:], raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError):
            raise ValueError("a compact chunk is not msgpack") from None
        tag = patch[0] if type(patch) is list and patch else None
        if type(tag) is not int or tag < BATCH:
            return [self._one(patch)]
        out: list[bytes] = []
        if tag == TEXTS:
            self._texts(patch, out)
            return out
        if tag != BATCH or len(patch) != 2 or type(patch[1]) is not list or not patch[1]:
            raise ValueError("a compact chunk is malformed")
        for item in patch[1]:
            if type(item) is list and item and type(item[0]) is int and item[0] == TEXTS:
                self._texts(item, out)
            else:
                out.append(self._one(item))  # a batch inside is malformed there
        return out

    def _texts(self, item: list[Any], out: list[bytes]) -> None:
        """A run of token texts at one path: each the chunk before with that string swapped."""
        if len(item) != 3 or type(item[1]) is not list or type(item[2]) is not list:
            raise ValueError("a compact chunk is malformed")
        path: Path = tuple(item[1])
        texts: list[Any] = item[2]
        template = self._template
        if template is not None and template[2] == path and texts:  # the usual run: its path
            # is the template's (checked when the template was made); each text is checked
            prefix, suffix = template[0], template[1]
            for text in texts:
                if type(text) is not str:
                    raise ValueError("a compact chunk is malformed")
                try:
                    out.append(prefix + pydantic_core.to_json(text) + suffix)
                except pydantic_core.PydanticSerializationError as exc:
                    raise ValueError(f"a compact chunk cannot be JSON: {exc}") from None
            parent(self._previous, path)[path[-1]] = texts[-1]
            return
        if (not path or len(path) > MAX_DEPTH or not texts
                or not all(type(key) is str or type(key) is int for key in path)
                or not all(type(text) is str for text in texts)):
            raise ValueError("a compact chunk is malformed")
        for text in texts:  # the general way, as if each had come alone
            out.append(self._one(chain(path, text)))

    def _one(self, patch: Any) -> bytes:
        """The chunk one patch stands for."""
        template = self._template
        text = same_leaf(patch, template[2]) if template is not None else None
        if text is not None and template is not None:
            path = template[2]
            try:
                literal = pydantic_core.to_json(text)
            except pydantic_core.PydanticSerializationError as exc:
                raise ValueError(f"a compact chunk cannot be JSON: {exc}") from None
            parent(self._previous, path)[path[-1]] = text
            return template[0] + literal + template[1]
        edit = leaf_edit(patch)
        value = apply(self._previous, patch)
        if not isinstance(value, dict):
            raise ValueError("a compact chunk is not a JSON object")
        self._previous = value
        self._template = None
        try:
            out: bytes = pydantic_core.to_json(value)
            if edit is not None and edit[0] and isinstance(_leaf_or_none(value, edit[0]), str):
                self._template = _output_template(value, edit[0])
        except pydantic_core.PydanticSerializationError as exc:
            raise ValueError(f"a compact chunk cannot be JSON: {exc}") from None
        return out


def _leaf_or_none(value: Any, path: Path) -> Any:
    try:
        for key in path:
            if isinstance(value, dict) == isinstance(key, int) or isinstance(value, str):
                return None
            value = value[key]
    except (KeyError, IndexError, TypeError):
        return None
    return value


def _output_template(value: Any, path: Path) -> tuple[bytes, bytes, Path] | None:
    marker = pydantic_core.to_json(_MARK)
    out = pydantic_core.to_json(with_leaf(value, path, _MARK))
    if out.count(marker) != 1:
        return None
    at = out.index(marker)
    return out[:at], out[at + len(marker):], path
