"""What the node serves, in Ollama's shapes: ``/api/tags``, ``/api/ps`` and ``/api/show``.

Each served model is described from the manager's stats, the GGUF file's own
metadata (read once per file) and, where its runtime knows more (Ollama's
``list``/``ps`` entry, from :meth:`Runtime.describe`), from that.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from node_agent.inventory import read_model_file
from node_agent.models import ModelManager
from node_agent.ollama_ndjson import now_iso

__all__ = ["Catalog"]

FOREVER = datetime(2318, 1, 1, tzinfo=UTC)


class Catalog:
    """Describes `manager`'s models as Ollama does."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self._files: dict[str, dict[str, Any]] = {}

    def _file_info(self, path: str | None) -> dict[str, Any]:
        if not path:
            return {}
        if path not in self._files:
            try:
                f = read_model_file(Path(path))
            except OSError:
                return {}
            params = f.parameter_count
            self._files[path] = {
                "size": f.size_bytes,
                "family": f.architecture,
                "quantization": f.quantization,
                "parameter_size": _parameter_size(params) if params else "",
                "context_length": f.context_length,
                "block_count": f.block_count,
                "parameter_count": params,
                "modified_at": datetime.fromtimestamp(f.mtime_ns / 1e9, UTC)
                .isoformat()
                .replace("+00:00", "Z"),
            }
        return self._files[path]

    def describe(self, name: str) -> dict[str, Any]:
        """One served model in the shape of an ``/api/tags`` entry (plus ``_stats``)."""
        stats = self.manager.stats().get(name, {})
        runtime = self.manager.get(name)
        info = _Info(runtime.describe() if runtime is not None else None)
        file = self._file_info(stats.get("file") or stats.get("source"))
        family = (info.family if info else file.get("family")) or ""
        return {
            "name": name,
            "model": name,
            "modified_at": (info.modified_at if info else file.get("modified_at")) or now_iso(),
            "size": (info.size_bytes if info else file.get("size")) or 0,
            "digest": (info.digest if info else None) or "",
            "details": {
                "parent_model": "",
                "format": (info.format if info else None) or "gguf",
                "family": family,
                "families": [family] if family else None,
                "parameter_size": (info.parameter_size if info else file.get("parameter_size"))
                or "",
                "quantization_level": (
                    info.quantization
                    if info
                    else stats.get("quantization") or file.get("quantization")
                )
                or "",
            },
            "_stats": stats,
            "_file": file,
            "_ollama": info,
        }

    def tags(self) -> dict[str, Any]:
        models = [self.describe(n) for n in self.manager.names()]
        return {"models": [{k: v for k, v in m.items() if not k.startswith("_")} for m in models]}

    def ps(self) -> dict[str, Any]:
        out = []
        for name in self.manager.names():
            m = self.describe(name)
            stats, info = m["_stats"], m["_ollama"]
            if info:
                if not info.loaded:
                    continue
                expires, vram = info.expires_at, info.size_vram or 0
                context = info.context_length
            else:
                if stats.get("state", "loaded") != "loaded":
                    continue
                keep, idle = stats.get("keep_alive_s"), stats.get("idle_s")
                when = (
                    FOREVER
                    if keep is None
                    else datetime.now(UTC)
                    + timedelta(seconds=max(0.0, float(keep) - float(idle or 0.0)))
                )
                expires = when.isoformat().replace("+00:00", "Z")
                vram = int(stats.get("vram_estimate_bytes") or 0)
                context = stats.get("n_ctx") or m["_file"].get("context_length")
            size = int(stats.get("memory_estimate_bytes") or 0) + vram or m["size"]
            out.append(
                {
                    "name": name,
                    "model": name,
                    "size": size,
                    "digest": m["digest"],
                    "details": m["details"],
                    "expires_at": expires,
                    "size_vram": vram,
                    "context_length": context,
                }
            )
        return {"models": out}

    def show(self, name: str) -> dict[str, Any]:
        m = self.describe(name)
        family, file = m["details"]["family"], m["_file"]
        info: dict[str, Any] = {"general.architecture": family}
        if file.get("parameter_count"):
            info["general.parameter_count"] = file["parameter_count"]
        if family and file.get("context_length"):
            info[f"{family}.context_length"] = file["context_length"]
        if family and file.get("block_count"):
            info[f"{family}.block_count"] = file["block_count"]
        return {
            "license": "",
            "modelfile": f"# served by meshgate\nFROM {name}\n",
            "parameters": "",
            "template": "",
            "details": m["details"],
            "model_info": info,
            "capabilities": ["completion"],
            "modified_at": m["modified_at"],
        }


class _Info:
    """A runtime's own description of its model (Ollama's list/ps entry), by attribute."""

    def __init__(self, entry: dict[str, Any] | None) -> None:
        self._entry = entry or {}

    def __bool__(self) -> bool:
        return bool(self._entry)

    def __getattr__(self, key: str) -> Any:
        return self._entry.get(key)


def _parameter_size(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}".replace(".0", "")
    return str(count)
