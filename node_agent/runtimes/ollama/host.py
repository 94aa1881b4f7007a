"""A local Ollama server: its client, what it has, and its errors as OpenAI errors.

- :class:`OllamaHost` is one Ollama server: its client, :meth:`OllamaHost.discover`
  (``list()`` merged with ``ps()``: every model it has, and which are loaded,
  until when, in how much VRAM) and :meth:`OllamaHost.sync`, which adds a
  runtime to the model manager for each model it has not seen yet.
- :func:`ollama_error`: any failure of the client as an OpenAI error. A model
  Ollama does not have is a 404 ``model_not_found``, a request it refuses
  keeps its 4xx, an Ollama that cannot be reached is a 503 (``hop="node"``),
  anything that breaks after the answer started is a 502 (``hop="runner"``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import ollama
import pydantic

from meshgate.openai import OpenAIError

if TYPE_CHECKING:
    from node_agent.runtimes.ollama.runtime import OllamaRuntime

log = logging.getLogger(__name__)

KIND = "ollama"
TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None)


class _Manager(Protocol):
    def names(self) -> list[str]: ...

    def add_runtime(self, runtime: Any) -> None: ...

    async def remove(self, name: str) -> bool: ...


# --- discovery --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OllamaModel:
    """One model a local Ollama has (``list``), and whether it is loaded now (``ps``)."""

    name: str
    size_bytes: int | None = None
    digest: str | None = None
    modified_at: str | None = None
    format: str | None = None
    family: str | None = None
    parameter_size: str | None = None
    quantization: str | None = None
    loaded: bool = False
    expires_at: str | None = None
    size_vram: int | None = None
    context_length: int | None = None
    source: str = KIND

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _int(value: Any) -> int | None:
    return int(value) if value is not None else None


def merge_models(listed: ollama.ListResponse, running: ollama.ProcessResponse) -> list[OllamaModel]:
    """``list()`` and ``ps()`` as one list, sorted by name (pure)."""
    loaded = {n: m for m in running.models if (n := m.model or m.name)}
    out: dict[str, OllamaModel] = {}
    for m in listed.models:
        if not m.model:
            continue
        ps = loaded.get(m.model)
        details = m.details or (ps.details if ps else None)
        out[m.model] = OllamaModel(
            name=m.model,
            size_bytes=_int(m.size),
            digest=m.digest,
            modified_at=_iso(m.modified_at),
            format=details.format if details else None,
            family=details.family if details else None,
            parameter_size=details.parameter_size if details else None,
            quantization=details.quantization_level if details else None,
            loaded=ps is not None,
            expires_at=_iso(ps.expires_at) if ps else None,
            size_vram=_int(ps.size_vram) if ps else None,
            context_length=ps.context_length if ps else None,
        )
    for name, ps in loaded.items():  # running but not listed (a cloud or just-deleted model)
        if name not in out:
            d = ps.details
            out[name] = OllamaModel(
                name=name,
                size_bytes=_int(ps.size),
                digest=ps.digest,
                format=d.format if d else None,
                family=d.family if d else None,
                parameter_size=d.parameter_size if d else None,
                quantization=d.quantization_level if d else None,
                loaded=True,
                expires_at=_iso(ps.expires_at),
                size_vram=_int(ps.size_vram),
                context_length=ps.context_length,
            )
    return [out[n] for n in sorted(out)]


class OllamaHost:
    """One Ollama server (``http://127.0.0.1:11434`` by default) and its models."""

    def __init__(
        self, url: str = "http://127.0.0.1:11434", *, keep_alive: float | str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.keep_alive = keep_alive
        self.client = ollama.AsyncClient(host=self.url, timeout=TIMEOUT)
        self.models: list[OllamaModel] = []
        self._ours: set[str] = set()  # names this host added to a manager

    async def discover(self) -> list[OllamaModel]:
        """Every model Ollama has, with what ``ps`` says of the loaded ones."""
        try:
            listed = await self.client.list()
            running = await self.client.ps()
        except Exception as exc:  # noqa: BLE001 - any client failure is "cannot discover"
            raise ollama_error(exc, host=self.url, name=None, model=None) from None
        self.models = merge_models(listed, running)
        return self.models

    def runtime(self, name: str, model: str | None = None) -> OllamaRuntime:
        from node_agent.runtimes.ollama.runtime import OllamaRuntime

        return OllamaRuntime(name, self, model=model)

    async def sync(self, manager: _Manager) -> list[str]:
        """Discover, and add a runtime for each model the manager does not serve yet.

        Returns the names added. A model Ollama no longer has (deleted there) is
        removed from the manager: requests for it get a 404, and the coordinator
        stops sending them. An Ollama that cannot be reached changes nothing.
        """
        added = []
        served = set(manager.names())
        found = await self.discover()
        for model in found:
            if model.name not in served:
                manager.add_runtime(self.runtime(model.name))
                added.append(model.name)
                self._ours.add(model.name)
        for name in sorted(self._ours - {m.name for m in found}):
            self._ours.discard(name)
            if await manager.remove(name):
                log.info("ollama at %s: %s was deleted there; no longer serving it", self.url, name)
        return added

    async def watch(
        self,
        manager: _Manager,
        period: float = 30.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """:meth:`sync` every `period` seconds until cancelled; failures are logged, not fatal.

        `on_change` is called when a model appears or disappears, or is loaded or unloaded.
        """
        while True:
            await asyncio.sleep(period)
            before = self.state()
            try:
                added = await self.sync(manager)
            except OpenAIError as exc:
                log.warning("ollama at %s: discovery failed: %s", self.url, exc.message)
                continue
            if added:
                log.info("ollama at %s: now serving %s", self.url, added)
            if on_change is not None and self.state() != before:
                on_change()

    def state(self) -> frozenset[tuple[str, bool]]:
        """What :meth:`watch` compares: each model's name and whether it is loaded."""
        return frozenset((m.name, m.loaded) for m in self.models)

    async def aclose(self) -> None:
        await self.client.close()  # type: ignore[no-untyped-call]


# --- errors -----------------------------------------------------------------------------


def ollama_error(
    exc: BaseException, *, host: str, name: str | None, model: str | None
) -> OpenAIError:
    """Any failure of the Ollama client as an OpenAI error (pure)."""
    what = f" for {name}" if name else ""
    status, message, hop = 500, f"ollama runtime{what}: {exc!r}", "node"
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ollama.ResponseError):
        status, message, hop = exc.status_code, f"ollama: {exc.error}", "runner"
        if status == 404:
            return OpenAIError(
                404,
                f"ollama at {host} has no model '{model}' ({exc.error})",
                code="model_not_found",
                param="model",
                hop="runner",
            )
        if status == -1:  # an {"error": ...} line inside a stream
            status, message = 502, f"ollama failed mid-answer{what}: {exc.error}"
        elif not 400 <= status < 500:
            status, message = 502, f"{message} (status {status})"
    elif isinstance(exc, ConnectionError | httpx.ConnectError | httpx.ConnectTimeout):
        status, message = 503, f"ollama at {host} is unreachable{what}"
    elif isinstance(exc, httpx.TimeoutException):
        status, message, hop = 504, f"ollama at {host} timed out{what}", "runner"
    elif isinstance(exc, httpx.HTTPError | pydantic.ValidationError | ValueError):
        status, message, hop = 502, f"ollama at {host} failed{what}: {exc!r}", "runner"
    return OpenAIError(status, message[:500], hop=hop)
