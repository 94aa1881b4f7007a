"""Cloud fallback: an OpenAI-compatible upstream called with the coordinator's key.

The upstream's key goes only into the `Authorization` header of requests to
that upstream: never into a log line, a frame to a node, or a response. Any
text from the upstream that reaches a log or a client is scrubbed of it first,
in case the upstream echoes it back.

Streaming passes through chunk by chunk. Usage comes from the upstream's own
`usage` (asked for with `stream_options.include_usage`); an upstream that
sends none while streaming gets its completion tokens counted as the chunks
that carried text and its prompt tokens estimated from the request size.
Cost is the configured list price per 1k prompt and completion tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from coordinator.config import Upstream
from coordinator.dispatch import CLIENT_ERRORS, Failed, Served, now
from coordinator.scheduler import CloudView
from meshgate.openai import OpenAIError
from meshgate.protocol import OpenRequest

log = logging.getLogger(__name__)

BYTES_PER_TOKEN = 4
_TEXT = re.compile(r'"(?:content|text)"\s*:\s*"(?!")')  # a chunk that carries some text


class CloudClient:
    def __init__(self, upstream: Upstream, *, transport: httpx.AsyncBaseTransport | None = None,
                 ) -> None:
        self.upstream = upstream
        self._http = httpx.AsyncClient(
            base_url=upstream.base_url + "/",
            headers={"Authorization": f"Bearer {upstream.api_key}"},
            timeout=httpx.Timeout(upstream.timeout_s, connect=10.0),
            transport=transport,
        )

    @property
    def name(self) -> str:
        return self.upstream.name

    def view(self) -> CloudView:
        u = self.upstream
        return CloudView(
            name=u.name, models=frozenset(u.models), price_prompt_per_1k=u.price_per_1k_prompt,
            price_completion_per_1k=u.price_per_1k_completion, context_length=u.context_length,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def scrub(self, text: str) -> str:
        """`text` with the upstream key cut out (an upstream may echo what it was sent)."""
        key = self.upstream.api_key
        return text.replace(key, "[redacted]") if key else text

    def cost(self, usage: dict[str, int] | None) -> float:
        usage = usage or {}
        return (int(usage.get("prompt_tokens", 0) or 0) * self.upstream.price_per_1k_prompt
                + int(usage.get("completion_tokens", 0) or 0)
                * self.upstream.price_per_1k_completion) / 1000.0

    def _body(self, request: OpenRequest, model: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(request.body)
        data["model"] = self.upstream.models[model]
        if request.stream and request.endpoint != "embeddings":
            data["stream_options"] = {"include_usage": True}
        return data

    async def start(self, request: OpenRequest, model: str, *, tries: int, deadline: float,
                    idle_timeout: float) -> CloudAttempt:
        """Send `request` upstream and wait for its first chunk; Failed if it cannot serve."""
        started = time.perf_counter()
        body = self._body(request, model)
        left = deadline - now()
        if left <= 0:
            raise OpenAIError(504, "request deadline passed before the cloud was tried",
                              code="deadline_exceeded", hop="coordinator")
        # no x-request-id upstream: some servers (llama-cpp-python's) refuse one not a UUID
        http_request = self._http.build_request("POST", request.endpoint, json=body)
        try:
            response = await asyncio.wait_for(
                self._http.send(http_request, stream=True), min(left, self.upstream.timeout_s))
        except TimeoutError:
            if deadline - now() <= 0:
                raise OpenAIError(504, "request deadline passed waiting for the cloud",
                                  code="deadline_exceeded", hop="coordinator") from None
            raise Failed("upstream did not answer in time") from None
        except httpx.HTTPError as exc:
            raise Failed(self.scrub(f"cannot reach upstream: {type(exc).__name__}: {exc}")
                         ) from None
        try:
            if response.status_code >= 400:
                await self._refuse(response)
            attempt = CloudAttempt(self, response, request, model, first=b"", started=started,
                                   tries=tries, deadline=deadline, idle_timeout=idle_timeout)
            await attempt.read_first()
            return attempt
        except BaseException:
            await response.aclose()
            raise

    async def _refuse(self, response: httpx.Response) -> None:
        raw = await response.aread()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode("utf-8", "replace")[:300]
        error = OpenAIError.from_body(response.status_code, parsed, hop="upstream")
        message = self.scrub(error.message)
        status = response.status_code
        if status in CLIENT_ERRORS:
            raise OpenAIError(413 if status == 413 else 400, message, code=error.code,
                              hop="upstream")
        if status in (401, 403):
            raise Failed(f"upstream refused the coordinator's credentials (HTTP {status})")
        raise Failed(f"upstream answered HTTP {status}: {message}")


class CloudAttempt(Served):
    """A request an upstream is answering."""

    def __init__(self, client: CloudClient, response: httpx.Response, request: OpenRequest,
                 model: str, **timing: Any) -> None:
        super().__init__(request, model, **timing)
        self.client = client
        self.upstream = client.name
        self.response = response
        self._lines = response.aiter_lines()
        self._text_chunks = 0

    async def _next_line(self) -> str | None:
        try:
            return await asyncio.wait_for(anext(self._lines), self._wait())
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise self._timed_out() from None
        except httpx.HTTPError as exc:
            raise OpenAIError(502, self.client.scrub(
                f"upstream {self.upstream} connection failed mid-response: {exc}"),
                hop="upstream") from None

    async def _next_event(self) -> bytes | None:
        """The next SSE data payload, None at [DONE] or the end of the body."""
        while True:
            line = await self._next_line()
            if line is None:
                return None
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return None
            self._note(data)
            return data.encode()

    def _note(self, data: str) -> None:
        """Watch a chunk for usage, an error, and text (parsed only when it may matter)."""
        if _TEXT.search(data):
            self._text_chunks += 1
        if '"usage"' not in data and '"error"' not in data:
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            return
        if not isinstance(chunk, dict):
            return
        if isinstance(chunk.get("error"), dict):
            error = OpenAIError.from_body(502, chunk, hop="upstream")
            raise OpenAIError(502, self.client.scrub(error.message), hop="upstream")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = {k: int(v) for k, v in usage.items() if isinstance(v, int)}

    async def read_first(self) -> None:
        """Read up to the first chunk (or the whole body when not streaming); Failed if none."""
        try:
            if not self.request.stream:
                raw = await asyncio.wait_for(self.response.aread(), self._wait())
                data = json.loads(raw)
                usage = data.get("usage") if isinstance(data, dict) else None
                if isinstance(usage, dict):
                    self.usage = {k: int(v) for k, v in usage.items() if isinstance(v, int)}
                self.first = raw
                return
            first = await self._next_event()
        except (TimeoutError, OpenAIError, ValueError, httpx.HTTPError) as exc:
            message = exc.message if isinstance(exc, OpenAIError) else str(exc) or "timed out"
            raise Failed(self.client.scrub(f"upstream failed before its first chunk: {message}")
                         ) from None
        if first is None:
            raise Failed("upstream ended the stream without a chunk")
        self.first = first

    async def rest(self) -> AsyncIterator[bytes]:
        try:
            if self.request.stream:
                while True:
                    event = await self._next_event()
                    if event is None:
                        break
                    self.chunks += 1
                    yield event
            self.done = True
            self.outcome = "ok"
        except OpenAIError:
            if self.outcome == "streaming":
                self.outcome = "error_after_start"
            raise
        finally:
            await self.close()

    async def close(self) -> None:
        if self._released:
            return
        self._released = True
        if not self.done and self.outcome == "streaming":
            self.outcome = "client_cancelled"
        if self.usage is None and self.request.stream:
            self.usage = {
                "prompt_tokens": len(self.request.body) // BYTES_PER_TOKEN,
                "completion_tokens": self._text_chunks,
            }
        self.cost = self.client.cost(self.usage)
        with contextlib.suppress(httpx.HTTPError):
            await self.response.aclose()
