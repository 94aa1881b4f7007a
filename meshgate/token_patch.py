"""The patch format of compact token frames (meshgate/token_frames.py): a chunk as the
edits that turn the chunk before it into it.

Patch forms (msgpack arrays): ``[0, value]`` replace; ``[1, {key: patch}, [deleted]]``
a map edited key by key; ``[2, {index: patch}]`` a list of the same length edited item
by item. A DATA body is ``MAGIC`` + msgpack of a patch against the previous chunk of the
same stream (the first against an empty object).

Batches (``"compact": 2`` in OPEN, `COMPACT_BATCHES`): ``[3, [item, ...]]`` where an item
is a patch as above or ``[4, path, [text, ...]]``, a run of token chunks that each differ
from the chunk before in the string at `path` only (``[4, ...]`` may also stand alone).
Each item is applied in turn, exactly as if it had come in its own frame.

Here: the constants, `diff` and `apply`, and the helpers for a patch that replaces one
string leaf (a token's text): `leaf_edit`, `same_leaf`, `chain`, `parent`, `with_leaf`.
All pure; `apply` refuses anything malformed with a ValueError.
"""

from __future__ import annotations

from typing import Any, cast

__all__ = [
    "BATCH", "COMPACT_BATCHES", "EDIT_LIST", "EDIT_MAP", "MAGIC", "MAX_BATCH_BYTES", "MAX_DEPTH",
    "REPLACE", "SAME", "TEXTS", "Path", "apply", "chain", "diff", "leaf_edit", "parent",
    "same_leaf", "with_leaf",
]

MAGIC = b"\xc1"  # never valid msgpack nor a JSON text's first byte
MAX_DEPTH = 32
REPLACE, EDIT_MAP, EDIT_LIST, BATCH, TEXTS = 0, 1, 2, 3, 4
#: the ``compact`` value in OPEN from a coordinator that reads batches (1: single chunks)
COMPACT_BATCHES = 2
#: A batch holds chunks up to this many raw bytes (a DATA body up to 16 KiB goes whole).
MAX_BATCH_BYTES = 8 * 1024
#: What `diff` returns for two equal values.
SAME = object()
Path = tuple[str | int, ...]


def diff(old: Any, new: Any) -> Any:
    """The patch turning `old` into `new`, or SAME."""
    if type(old) is type(new) and old == new:
        return SAME
    if isinstance(old, dict) and isinstance(new, dict):
        edits = {}
        for key, value in new.items():
            sub = diff(old[key], value) if key in old else [REPLACE, value]
            if sub is not SAME:
                edits[key] = sub
        return [EDIT_MAP, edits, [key for key in old if key not in new]]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        items = {}
        for index, (was, now) in enumerate(zip(old, new, strict=True)):
            sub = diff(was, now)
            if sub is not SAME:
                items[index] = sub
        return [EDIT_LIST, items]
    return [REPLACE, new]


def apply(old: Any, patch: Any, depth: int = 0) -> Any:
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
            out[key] = apply(value, edits[key], depth + 1) if key in edits else value
        for key, sub in edits.items():
            if key not in old:
                out[key] = apply(None, sub, depth + 1)
        return out
    if tag == EDIT_LIST and len(patch) == 2 and isinstance(old, list):
        items = patch[1]
        if not isinstance(items, dict) or not all(
            isinstance(i, int) and 0 <= i < len(old) for i in items
        ):
            raise ValueError("a compact chunk is malformed")
        return [apply(v, items[i], depth + 1) if i in items else v for i, v in enumerate(old)]
    raise ValueError("a compact chunk is malformed")


def leaf_edit(patch: Any) -> tuple[Path, str] | None:
    """(path, text) when `patch` only replaces one string leaf (a token's text), else None."""
    path: list[str | int] = []
    for _ in range(MAX_DEPTH):
        if not isinstance(patch, list) or not patch:
            return None
        tag = patch[0]
        if tag == REPLACE and len(patch) == 2:
            return (tuple(path), patch[1]) if isinstance(patch[1], str) else None
        # a map is edited by key (str), a list by index (int): the path's types say which
        if tag == EDIT_MAP and len(patch) == 3 and patch[2] == []:
            want: type = str
        elif tag == EDIT_LIST and len(patch) == 2:
            want = int
        else:
            return None
        edits = patch[1]
        if not isinstance(edits, dict) or len(edits) != 1:
            return None
        ((key, patch),) = edits.items()
        if type(key) is not want:
            return None
        path.append(cast("str | int", key))
    return None


def same_leaf(patch: Any, path: Path) -> str | None:
    """The text when `patch` replaces only the string at `path` (as `leaf_edit` would
    say, without building the path: the decoder's per-token check), else None."""
    for key in path:
        ok = type(patch) is list and (
            (len(patch) == 3 and patch[0] == EDIT_MAP and patch[2] == []) if type(key) is str
            else (len(patch) == 2 and patch[0] == EDIT_LIST))
        edits = patch[1] if ok else None
        if type(edits) is not dict or len(edits) != 1:
            return None
        ((got, patch),) = edits.items()
        if type(got) is not type(key) or got != key:
            return None
    if type(patch) is list and len(patch) == 2 and patch[0] == REPLACE and type(patch[1]) is str:
        return patch[1]
    return None


def chain(path: Path, text: str) -> Any:
    """The patch that replaces the string at `path` with `text` (what `diff` makes)."""
    patch: Any = [REPLACE, text]
    for key in reversed(path):
        patch = [EDIT_LIST, {key: patch}] if isinstance(key, int) else [EDIT_MAP, {key: patch}, []]
    return patch


def parent(value: Any, path: Path) -> Any:
    for key in path[:-1]:
        value = value[key]
    return value


def with_leaf(value: Any, path: Path, leaf: str) -> Any:
    """A copy of `value` (copied along `path` only) whose string at `path` is `leaf`."""
    if not path:
        return leaf
    head, rest = path[0], path[1:]
    copy = list(value) if isinstance(value, list) else dict(value)
    copy[head] = with_leaf(value[head], rest, leaf)  # type: ignore[index]
    return copy
