"""Every refusal of the coordinator's API: OpenAI's error shape, a metric and a ledger row.

FastAPI answers an unknown path, a wrong method or a body it could not
read with its own ``{"detail": ...}``; here each becomes an OpenAI error
object (with ``hop: coordinator``) like every other error, so the SDKs raise
their usual exceptions with a message that says what to fix.

Each request under ``/v1/`` that ends in an error before it ran (400, 401,
402, 403, 404, 405, 413, 429, 503, 504, or a node's own refusal such as
``context_length_exceeded``) is counted in ``/metrics`` and written as one
ledger row: its status, error code, key when known, model and endpoint. A
request that ran writes its row where it ends (``api.py``), with the status
its outcome implies (:func:`with_status`). So the ledger and ``/metrics``
count the same requests.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from meshgate.http_errors import from_http, from_validation
from meshgate.openai import OpenAIError

__all__ = ["OUTCOME_BY_STATUS", "install_refusals", "refusal_row", "with_status"]

log = logging.getLogger(__name__)

#: The ledger's outcome for a request refused with this status.
OUTCOME_BY_STATUS = {
    400: "bad_request", 401: "unauthenticated", 402: "budget_exceeded", 403: "forbidden",
    404: "not_found", 405: "method_not_allowed", 413: "too_large", 429: "queue_full",
    499: "client_cancelled", 503: "no_capacity", 504: "deadline",
}
#: The status of a request that ran, by its ledger outcome.
STATUS_BY_OUTCOME = {
    "ok": 200, "cache_hit": 200, "client_cancelled": 499, "streaming": 499,
    "deadline": 504, "idle_timeout": 504, "node_lost_mid_stream": 502,
    "error_after_start": 502,
}
ENDPOINT_OF = {"/v1/chat/completions": "chat/completions", "/v1/completions": "completions",
               "/v1/embeddings": "embeddings"}


def with_status(row: dict[str, Any], status: int | None = None) -> dict[str, Any]:
    """`row` with ``status`` (given, or what its outcome implies) and ``error`` set."""
    if "status" not in row:
        row["status"] = status or STATUS_BY_OUTCOME.get(str(row.get("outcome")), 500)
    row.setdefault("error", None if row["status"] == 200 else row.get("outcome"))
    return row


def refusal_row(exc: OpenAIError, *, request_id: str, key_id: str | None, model: str,
                endpoint: str, route: str | None) -> dict[str, Any]:
    """The ledger row of a request refused before it ran."""
    outcome = OUTCOME_BY_STATUS.get(exc.status, "error")
    if exc.status == 429 and exc.code == "rate_limit_exceeded":
        outcome = "rate_limited"
    elif exc.code == "relay_quota":
        outcome = "relay_quota"
    return {
        "request_id": request_id, "key_id": key_id, "node_did": None, "upstream": None,
        "model": model, "endpoint": endpoint, "prompt_tokens": 0, "completion_tokens": 0,
        "latency_ms": 0.0, "outcome": outcome, "cost": 0.0, "route": route,
        "status": exc.status, "error": exc.code or exc.type,
    }


def _row_of(request: Request, exc: OpenAIError) -> dict[str, Any]:
    state = request.state
    return refusal_row(
        exc, request_id=str(getattr(state, "request_id", "") or "-"),
        key_id=getattr(state, "key_id", None), model=str(getattr(state, "model", "-") or "-"),
        endpoint=ENDPOINT_OF.get(request.url.path, request.url.path[:64]),
        route=getattr(state, "route", None))


def install_refusals(
    app: FastAPI,
    *,
    record: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    count: Callable[[int, str, str | None], None] | None = None,
) -> None:
    """Answer every error on `app` in OpenAI's shape; `record` a ledger row (stored before
    the answer leaves) and `count` a metric (status, model, code) for each one under /v1/."""

    async def answer(request: Request, exc: OpenAIError) -> Response:
        exc.hop = exc.hop or "coordinator"
        if request.url.path.startswith("/v1/") and not getattr(request.state, "recorded", False):
            # (recorded: the request ran, and its own row, counted with it, is stored)
            if count is not None:
                count(exc.status, str(getattr(request.state, "model", "-") or "-"), exc.code)
            if record is not None:
                request.state.recorded = True
                await record(_row_of(request, exc))
        return JSONResponse(exc.body(), status_code=exc.status,
                            headers=getattr(exc, "headers", None))

    async def openai_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OpenAIError)
        return await answer(request, exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return await answer(request, from_http(request, exc, hop="coordinator"))

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return await answer(request, from_validation(exc, hop="coordinator"))

    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
