"""The names models are served under: ``NAME=PATH.gguf`` specs and GGUF file stems."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["model_name", "parse_model_spec", "scan_model_dirs"]

_SHARD = re.compile(r"-(\d{5})-of-(\d{5})$")


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """``NAME=PATH.gguf`` (or just ``PATH.gguf``, named by its stem) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    name, path = name.strip(), path.strip()
    if not path.endswith(".gguf"):
        raise ValueError(f"model spec {spec!r}: expected NAME=PATH.gguf")
    return name or model_name(Path(path)), Path(path).expanduser()


def model_name(path: Path) -> str:
    """The name a GGUF file is served under: its stem, without a shard suffix."""
    return _SHARD.sub("", path.stem)


def scan_model_dirs(dirs: Iterable[Path]) -> list[tuple[str, Path]]:
    """Every ``*.gguf`` under `dirs` as (name, path); the first of a name wins.

    Of a split model only the first shard is listed (llama.cpp finds the rest).
    """
    found: dict[str, Path] = {}
    for directory in dirs:
        for path in sorted(Path(directory).expanduser().rglob("*.gguf")):
            shard = _SHARD.search(path.stem)
            if shard and int(shard.group(1)) != 1:
                continue
            found.setdefault(model_name(path), path)
    return list(found.items())
