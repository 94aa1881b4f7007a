"""The model manager: which runtimes this node serves, and how busy each is.

A skeleton for now: models are declared before :meth:`ModelManager.start`
and served until :meth:`ModelManager.stop`. Loading, unloading and hot-swap
come later and will go through this class alone (one owner of what is
loaded). Callers borrow a runtime with ``async with manager.use(name)``, which
counts requests in flight and served.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshgate.openai import unknown_model
from node_agent.runtime import OpenAIHttpRuntime, Runtime
from node_agent.supervisor import LlamaRunner

log = logging.getLogger(__name__)

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


@dataclass
class _Model:
    runtime: Runtime
    runner: LlamaRunner | None = None
    in_flight: int = 0
    served: int = 0


class ModelManager:
    """Declares, starts, stops and lends out this node's runtimes."""

    def __init__(self, *, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._models: dict[str, _Model] = {}

    def _add(self, name: str, model: _Model) -> None:
        if name in self._models:
            raise ValueError(f"model {name!r} is declared twice")
        self._models[name] = model

    def add_llama(self, name: str, path: Path | str, **opts: Any) -> LlamaRunner:
        """Serve a GGUF file with a supervised llama.cpp runner (opts go to LlamaRunner)."""
        runner = LlamaRunner(name, path, run_dir=self.run_dir, **opts)
        self._add(name, _Model(runner.runtime, runner))
        return runner

    def add_upstream(self, name: str, base_url: str, upstream_model: str | None = None) -> None:
        """Serve `name` from an OpenAI-compatible server already on the box."""
        runtime = OpenAIHttpRuntime(name, "upstream", base_url, upstream_model=upstream_model)
        self._add(name, _Model(runtime))

    def add_runtime(self, runtime: Runtime) -> None:
        """Serve any runtime (tests, Ollama)."""
        self._add(runtime.name, _Model(runtime))

    async def start(self) -> None:
        """Start every runner at once; if one fails, stop the others and raise."""
        runners = [m.runner for m in self._models.values() if m.runner is not None]
        results = await asyncio.gather(*(r.start() for r in runners), return_exceptions=True)
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]

    async def stop(self) -> None:
        await asyncio.gather(*(self._stop(m) for m in self._models.values()))

    @staticmethod
    async def _stop(model: _Model) -> None:
        if model.runner is not None:
            await model.runner.stop()
        elif isinstance(model.runtime, OpenAIHttpRuntime):
            await model.runtime.aclose()

    def get(self, name: str) -> Runtime | None:
        model = self._models.get(name)
        return model.runtime if model else None

    def names(self) -> list[str]:
        return sorted(self._models)

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[Runtime]:
        """Lend `name`'s runtime for one request; 404 in OpenAI's shape if not served."""
        model = self._models.get(name)
        if model is None:
            raise unknown_model(name, hop="node")
        model.in_flight += 1
        try:
            yield model.runtime
            model.served += 1
        finally:
            model.in_flight -= 1

    def stats(self) -> dict[str, Any]:
        return {
            name: {
                "kind": m.runtime.kind,
                "in_flight": m.in_flight,
                "served": m.served,
                "crashes": m.runner.crashes if m.runner else 0,
            }
            for name, m in sorted(self._models.items())
        }
