"""The node's local port (127.0.0.1:11438 by default): one Starlette app, two APIs.

:func:`build_app` puts together the OpenAI routes (:mod:`node_agent.openai_routes`),
Ollama's routes (:mod:`node_agent.ollama_routes`), both over one
:class:`~node_agent.pipeline.Pipeline`, and the node's own routes: health,
telemetry, inventory, Prometheus metrics and the manager's commands
(``/meshgate/{swap,load,unload}``, for clients on this box only).

The daemon wraps the app in :mod:`meshgate.logs`' request-id and access-log
middleware (an ``X-Request-Id`` on every response) and the local guard. Every
error leaves as an OpenAI error object, unknown paths (404) and wrong methods
(405) included; the Ollama routes answer in Ollama's shape.
Plain Starlette routes, not FastAPI: no dependency injection or response
models on the hot path (``scripts/bench/overhead.py`` measures the port).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from meshgate.bounds import load_json
from meshgate.logs import AccessLogMiddleware, RequestIdMiddleware
from meshgate.openai import OpenAIError
from node_agent.guard import guard_from_env
from node_agent.hot_routes import HotRoutes
from node_agent.http import json_response, read_body
from node_agent.metrics import CONTENT_TYPE_LATEST, NodeMetrics
from node_agent.models import ModelManager
from node_agent.ollama_routes import ollama_routes
from node_agent.openai_routes import openai_routes
from node_agent.pipeline import MeshLookup, Pipeline

__all__ = ["MeshLookup", "build_app", "read_body", "served_app"]



async def _openai_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    exc.hop = exc.hop or "node"
    return json_response(exc.body(), exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    # the coordinator's words and codes (meshgate/http_errors.py), without importing FastAPI
    where = f"{request.method} {request.url.path}"
    code = None
    if exc.status_code == 404:
        message = (f"Invalid URL ({where}): no such route. The OpenAI API is under /v1/: "
                   "chat/completions, completions, embeddings, models.")
        code = "unknown_url"
    elif exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        message = f"Invalid method ({where})" + (f"; this route takes {allow}" if allow else "")
        code = "method_not_allowed"
    else:
        message = str(exc.detail)
    error = OpenAIError(exc.status_code, message, code=code, hop="node")
    response = json_response(error.body(), exc.status_code)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _server_error(_: Request, exc: Exception) -> Response:
    error = OpenAIError(500, f"the node failed to answer: {exc!r}"[:300], hop="node")
    return json_response(error.body(), 500)


def build_app(
    manager: ModelManager,
    *,
    telemetry: Callable[[], dict[str, Any] | None] | None = None,
    metrics: NodeMetrics | None = None,
    inventory: Callable[[], dict[str, Any]] | None = None,
    mesh: MeshLookup | None = None,
    pipeline: Pipeline | None = None,
) -> Starlette:
    pipe = pipeline or Pipeline(manager, metrics=metrics, mesh=mesh)

    async def healthz(_: Request) -> Response:
        return json_response({"status": "ok", "models": manager.names()})

    async def read_telemetry(_: Request) -> Response:
        sample = telemetry() if telemetry is not None else None
        if sample is None:
            raise OpenAIError(503 if telemetry else 404, "no telemetry sample yet", hop="node")
        return json_response(sample)

    async def read_inventory(_: Request) -> Response:
        if inventory is None:
            raise OpenAIError(404, "this node serves no inventory here", hop="node")
        return json_response(inventory())

    async def read_metrics(_: Request) -> Response:
        if metrics is None:
            raise OpenAIError(404, "this node serves no metrics here", hop="node")
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes: list[BaseRoute] = [
        *openai_routes(pipe),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/meshgate/telemetry", read_telemetry, methods=["GET"]),
        Route("/meshgate/inventory", read_inventory, methods=["GET"]),
        Route("/metrics", read_metrics, methods=["GET"]),
        *_admin_routes(manager),
        *ollama_routes(pipe),  # /api/chat, /api/generate, /api/tags... and GET /
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            OpenAIError: _openai_error, HTTPException: _http_error, Exception: _server_error
        },
    )
    app.state.pipeline = pipe
    return app


def served_app(app: Starlette, *, hot: bool = True) -> ASGIApp:
    """`app` (from :func:`build_app`) as the daemon serves it: behind the local guard
    (node_agent/guard.py), with an ``X-Request-Id`` on every answer and one access line
    each (meshgate/logs.py), and with `hot` the OpenAI POST routes of programs answered
    in one raw ASGI layer in front of all that (node_agent/hot_routes.py)."""
    guard = guard_from_env(app)
    stack = RequestIdMiddleware(AccessLogMiddleware(guard))
    return HotRoutes(stack, app.state.pipeline, guard) if hot else stack


def _admin_routes(manager: ModelManager) -> list[BaseRoute]:
    """``POST /meshgate/{swap,load,unload}``: the manager's commands on the local port.

    Bodies: swap ``{"model": OLD, "to": NAME=PATH.gguf | inventory name, "n_ctx"?,
    "n_gpu_layers"?}``; load ``{"model", "from"?, "n_ctx"?, "n_gpu_layers"?, "keep_alive"?}``;
    unload ``{"model"}``. The answer is what the manager reports; errors are OpenAI errors.
    Only clients on this box may ask (403 otherwise, even when the port listens wider).
    """

    def admin(op: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            host = request.client.host if request.client else ""
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise OpenAIError(403, f"/meshgate/{op} is for clients on this box only",
                                  hop="node")
            try:
                body = load_json(await read_body(request) or b"{}")
            except ValueError as exc:
                raise OpenAIError(400, f"the body must be a JSON object: {exc}",
                                  hop="node") from None
            if not isinstance(body, dict):
                raise OpenAIError(400, "the body must be a JSON object", hop="node")
            return json_response(await manager.command({**body, "op": op}))

        return handler

    ops = ("swap", "load", "unload")
    return [Route(f"/meshgate/{op}", admin(op), methods=["POST"]) for op in ops]
