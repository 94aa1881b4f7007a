"""Starlette's and FastAPI's own errors as OpenAI error objects, for both daemons.

An unknown path, a wrong method or a body FastAPI could not read would come
back as ``{"detail": ...}``; these turn them into :class:`OpenAIError` so that
every answer of both daemons has OpenAI's shape and says what to fix.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from meshgate.openai import OpenAIError

__all__ = ["from_http", "from_validation"]


def from_http(request: Request, exc: HTTPException, *, hop: str) -> OpenAIError:
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return OpenAIError(404, f"Invalid URL ({where}): no such route. The OpenAI API is "
                           "under /v1/: chat/completions, completions, embeddings, models.",
                           code="unknown_url", hop=hop)
    if exc.status_code == 405:
        headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
        hint = f"; this route takes {headers['allow']}" if headers.get("allow") else ""
        return OpenAIError(405, f"Invalid method ({where}){hint}", code="method_not_allowed",
                           hop=hop)
    return OpenAIError(exc.status_code, str(exc.detail), hop=hop)


def from_validation(exc: RequestValidationError, *, hop: str) -> OpenAIError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    return OpenAIError(400, f"Invalid '{param or 'request'}': {first.get('msg', '')}",
                       param=param, hop=hop)
