"""GGUF model inventory: files under the model directories, read from their own metadata.

- :class:`Inventory` walks each directory recursively for ``*.gguf``.
  :meth:`Inventory.scan` parses only files whose (path, size, mtime) is new;
  :meth:`Inventory.changed` only stats, so the daemon can poll it cheaply and
  resend the inventory when it returns True.
- :func:`read_model_file` never raises on a bad file: a truncated or foreign
  file is a :class:`ModelFile` with ``usable=False`` and the ``reason``.
- Metadata comes from ``gguf.GGUFReader`` (memory-mapped). The stock reader
  turns every element of every array into its own numpy view, which costs
  ~2 s on SmolLM2's 49k-token vocabulary (longer on 128k vocabularies);
  :class:`~node_agent.gguf_header.HeaderReader` skips over array *values* (tokens, merges) while
  keeping their length, which is all the inventory needs.
- sha256 is computed only when asked, and cached by (path, size, mtime_ns) in
  ``sha256.json`` under a cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node_agent.runtimes.ollama.host import OllamaModel

log = logging.getLogger(__name__)

FileKey = tuple[str, int, int]  # (path, size, mtime_ns)

_BAD_FILE = (ValueError, IndexError, KeyError, OverflowError, struct.error, OSError, TypeError)


@dataclass(frozen=True, slots=True)
class ModelFile:
    """One ``.gguf`` file; metadata fields are None when the file says nothing (or is broken)."""

    path: str
    name: str
    size_bytes: int
    mtime_ns: int
    usable: bool
    reason: str | None = None
    architecture: str | None = None
    parameter_count: int | None = None
    quantization: str | None = None
    tensor_bytes: int | None = None
    context_length: int | None = None
    block_count: int | None = None
    embedding_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    vocab_size: int | None = None

    @property
    def key(self) -> FileKey:
        return (self.path, self.size_bytes, self.mtime_ns)

    @property
    def bits_per_weight(self) -> float | None:
        if not self.tensor_bytes or not self.parameter_count:
            return None
        return self.tensor_bytes * 8 / self.parameter_count

    def sha256(self, cache_dir: Path) -> str:
        """The file's sha256, read once and cached by (path, size, mtime) in ``cache_dir``."""
        return Sha256Cache(cache_dir).digest(self.key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sha256Cache:
    """``sha256.json`` in a cache directory: ``{path: {"size", "mtime_ns", "sha256"}}``."""

    def __init__(self, cache_dir: Path) -> None:
        self.file = Path(cache_dir) / "sha256.json"

    def digest(self, key: FileKey) -> str:
        path, size, mtime_ns = key
        entries = self._load()
        hit = entries.get(path)
        if hit and hit.get("size") == size and hit.get("mtime_ns") == mtime_ns:
            return str(hit["sha256"])
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        entries[path] = {"size": size, "mtime_ns": mtime_ns, "sha256": h.hexdigest()}
        self._save(entries)
        return h.hexdigest()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, entries: dict[str, dict[str, Any]]) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(self.file)


# --- reading one file ----------------------------------------------------------------


def _scalar(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return field.contents()


def _int(reader: Any, key: str) -> int | None:
    value = _scalar(reader, key)
    if isinstance(value, int | float):
        return int(value)
    return int(value.__index__()) if hasattr(value, "__index__") else None  # numpy integers


def quantization_name(file_type: int | None, tensor_bytes_by_type: Counter[str]) -> str | None:
    """``general.file_type`` as a name (3 -> "Q4_1"), else the type holding most weight bytes."""
    if file_type is not None:
        import gguf  # deferred: gguf and numpy weigh ~20 MB, and only a scan needs them

        try:
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    quantized = Counter({t: b for t, b in tensor_bytes_by_type.items() if t not in ("F32",)})
    top = (quantized or tensor_bytes_by_type).most_common(1)
    return top[0][0] if top else None


def read_model_file(path: Path, stat: os.stat_result | None = None) -> ModelFile:
    """Read one GGUF file's metadata; any defect gives ``usable=False`` with the reason."""
    st = stat or path.stat()
    base: dict[str, Any] = {
        "path": str(path), "name": path.stem, "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns
    }
    from node_agent.gguf_header import HeaderReader  # deferred with gguf and numpy

    try:
        reader = HeaderReader(path)
        meta = _metadata(reader)
    except _BAD_FILE as exc:
        why = f"unreadable GGUF: {type(exc).__name__}: {exc}"
        return ModelFile(**base, usable=False, reason=why)
    reason = _defect(meta)
    return ModelFile(**base, usable=reason is None, reason=reason, **meta)


def _metadata(reader: Any) -> dict[str, Any]:
    arch = _scalar(reader, "general.architecture")
    by_type: Counter[str] = Counter()
    for t in reader.tensors:
        by_type[t.tensor_type.name] += int(t.n_bytes)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _int(reader, f"{arch}.vocab_size") or (
        int(tokens.parts[-1][0]) if tokens is not None else None
    ) or (int(embd.shape[-1]) if embd is not None and len(embd.shape) > 1 else None)
    return {
        "architecture": str(arch) if arch is not None else None,
        "parameter_count": sum(int(t.n_elements) for t in reader.tensors),
        "quantization": quantization_name(_int(reader, "general.file_type"), by_type),
        "tensor_bytes": sum(by_type.values()),
        "context_length": _int(reader, f"{arch}.context_length"),
        "block_count": _int(reader, f"{arch}.block_count"),
        "embedding_length": _int(reader, f"{arch}.embedding_length"),
        "head_count": _int(reader, f"{arch}.attention.head_count"),
        "head_count_kv": _int(reader, f"{arch}.attention.head_count_kv"),
        "key_length": _int(reader, f"{arch}.attention.key_length"),
        "value_length": _int(reader, f"{arch}.attention.value_length"),
        "vocab_size": vocab,
    }


def _defect(meta: dict[str, Any]) -> str | None:
    if meta["architecture"] is None:
        return "no general.architecture in the GGUF metadata"
    if not meta["parameter_count"]:
        return "no tensors (a vocabulary-only or split-shard file?)"
    if not meta["block_count"]:
        return f"no {meta['architecture']}.block_count in the GGUF metadata"
    return None


# --- the inventory --------------------------------------------------------------------


def _walk(dirs: Sequence[Path]) -> Iterator[tuple[Path, os.stat_result]]:
    for d in dirs:
        for root, _subdirs, files in os.walk(d):
            for f in sorted(files):
                if f.lower().endswith(".gguf"):
                    p = Path(root) / f
                    try:
                        yield p, p.stat()
                    except OSError:  # vanished between listing and stat
                        continue


class Inventory:
    """The GGUF files under ``model_dirs``; rescans parse only new or changed files."""

    def __init__(self, model_dirs: Sequence[Path]) -> None:
        self.model_dirs = [Path(d) for d in model_dirs]
        self._known: dict[FileKey, ModelFile] = {}
        self._last: frozenset[FileKey] | None = None

    def _keys(self) -> dict[FileKey, tuple[Path, os.stat_result]]:
        return {(str(p), st.st_size, st.st_mtime_ns): (p, st) for p, st in _walk(self.model_dirs)}

    def scan(self) -> list[ModelFile]:
        found = self._keys()
        self._known = {
            k: self._known.get(k) or read_model_file(p, st) for k, (p, st) in found.items()
        }
        self._last = frozenset(found)
        return sorted(self._known.values(), key=lambda m: m.path)

    def changed(self) -> bool:
        """True when a file was added, removed or rewritten since the last :meth:`scan`."""
        return self._last is None or frozenset(self._keys()) != self._last


# --- models of a local Ollama ---------------------------------------------------------


def ollama_entry(model: OllamaModel) -> dict[str, Any]:
    """An Ollama model (from its ``list`` and ``ps``) in the inventory's terms, ``source`` "ollama".

    ``loaded``, ``context_length`` and ``size_bytes`` are what the coordinator
    reads of any inventory entry; the rest is Ollama's own description.
    """
    return {
        "name": model.name,
        "source": "ollama",
        "loaded": model.loaded,
        "size_bytes": model.size_bytes,
        "architecture": model.family,
        "quantization": model.quantization,
        "parameter_size": model.parameter_size,
        "context_length": model.context_length,
        "digest": model.digest,
        "expires_at": model.expires_at,
        "size_vram": model.size_vram,
    }
