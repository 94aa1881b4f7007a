"""One request's accounting on the node, and what a runtime's failure becomes.

:class:`Meter` reads each chunk's usage once, notes the first token, and finishes the
request once: the node's metrics, the model's measured rates (``manager.record``) and
every hook added with :meth:`~node_agent.pipeline.Pipeline.on_finish`, which sees a
:class:`Finished`. :func:`map_error` turns whatever a runtime raised into an
:class:`~meshgate.openai.OpenAIError` (llama.cpp's "exceed context window" becomes 400
``context_length_exceeded`` with its numbers).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshgate.openai import OpenAIError, context_exceeded
from node_agent.metrics import RequestTrack
from node_agent.runtimes.base import Usage, usage_of

if TYPE_CHECKING:
    from node_agent.pipeline import Pipeline

__all__ = ["FinishHook", "Finished", "Meter", "map_error"]

log = logging.getLogger(__name__)

_OVER_CONTEXT = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


@dataclass(slots=True)
class Finished:
    """What the metering hooks see of one request, once it has ended."""

    model: str
    endpoint: str
    via: str  # "proxy" (either API on the local port) | "tunnel"
    where: str  # "local" | "mesh"
    status: int
    usage: Usage | None
    started: float  # time.monotonic()
    first_at: float | None
    ended: float
    extra: dict[str, object] = field(default_factory=dict)


FinishHook = Callable[[Finished], None]


def map_error(exc: BaseException, model: str) -> OpenAIError:
    """Any failure of a runtime as an OpenAI error (OpenAI errors pass, refined)."""
    if isinstance(exc, OpenAIError):
        found = _OVER_CONTEXT.search(exc.message) if exc.status == 400 else None
        if found is not None and exc.code != "context_length_exceeded":
            asked, window = int(found.group(1)), int(found.group(2))
            return context_exceeded(
                window, asked, None, param=exc.param or "messages", hop=exc.hop or "runner"
            )
        return exc
    return OpenAIError(502, f"runtime for {model} failed: {exc!r}"[:500], hop="node")


class Meter:
    """One request's accounting: usage (read once per chunk), first token, finish once."""

    def __init__(
        self, pipeline: Pipeline, model: str, endpoint: str, via: str, where: str, *,
        track_soon: bool = False,
    ) -> None:
        """`track_soon`: the request's track (its metrics' and energy's start, the
        accounting's row: `NodeMetrics.track`) is made in a loop callback, once the request
        has gone to its runtime and waits, not before, with the times noted here (made at
        once, if first needed sooner)."""
        self._pipeline = pipeline
        self.model, self.endpoint, self.via, self.where = model, endpoint, via, where
        self.started = time.monotonic()
        self.first_at: float | None = None
        self.usage: Usage | None = None
        self.done = False
        self._streamed = False
        self._track: RequestTrack | None = None
        self._wall: float | None = None  # time.time() at the start, while the track is to make
        metrics = pipeline.metrics
        if metrics is not None:
            if track_soon:
                self._wall = time.time()
                asyncio.get_running_loop().call_soon(self._tracked)
            else:
                self._track = metrics.track(model, via, endpoint)

    def _tracked(self) -> RequestTrack | None:
        """The request's track; made now if `track_soon` left it for later."""
        if self._wall is not None:
            wall, self._wall = self._wall, None
            metrics = self._pipeline.metrics
            assert metrics is not None
            self._track = metrics.track(self.model, self.via, self.endpoint,
                                        began=(self.started, wall))
        return self._track

    def energy_report(self) -> dict[str, object]:
        """Energy fields for the tunnel's END frame (node_agent/accounting.py); settles the
        request's energy now. {} when there are no metrics."""
        track = self._tracked()
        return track.energy_report() if track is not None else {}

    def chunk(self, data: bytes) -> Usage | None:
        """A chunk (or a whole answer) went out: note the first, read its usage once."""
        if self.first_at is None:
            self.first_at = time.monotonic()
            track = self._tracked()
            if track is not None:
                track.first_token()
        usage = usage_of(data)
        if usage:
            self.usage = usage
        return usage

    def answered(self) -> None:
        """A whole answer is made and about to leave: what must be durable before the
        client can read it (the offline journal's row) is written now."""
        track = self._tracked()
        if track is not None:
            track.answered(dict(self.usage) if self.usage else None)

    def finish(self, status: int) -> None:
        """The request ended with `status` (499: the client or the coordinator left). Once."""
        if self.done:
            return
        self.done = True
        track = self._tracked()
        if track is not None:
            track.usage = self.usage
            track.finish(status)
        ended = time.monotonic()
        if self.where == "local" and status == 200 and self.usage:
            streamed = self.first_at is not None and self.first_at > self.started and self._streamed
            prefill = self.first_at - self.started if streamed and self.first_at else None
            decode = ended - self.first_at if streamed and self.first_at else ended - self.started
            self._pipeline.manager.record(self.model, self.usage, prefill, decode)
        finished = Finished(
            self.model, self.endpoint, self.via, self.where, status, self.usage,
            self.started, self.first_at, ended,
        )
        for hook in self._pipeline.hooks:
            try:
                hook(finished)
            except Exception:
                log.exception("metering hook %r failed", hook)
