"""Both daemons' logs: JSON or text lines, an access line per request, the id on every answer."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshgate.logs import (
    AccessLogMiddleware,
    RequestIdMiddleware,
    quick_info,
    request_id_var,
    setup_logging,
)
from meshgate.version import version as version_of


class Opaque:
    """Stands for a library's object attached to a record (websockets attaches its connection)."""


@pytest.fixture
def captured(restored_logging: None) -> io.StringIO:
    return io.StringIO()


def test_json_lines_leave_out_objects_instead_of_writing_their_repr(captured: io.StringIO) -> None:
    setup_logging("json", "info", captured)
    logging.getLogger("websockets.server").warning("closed", extra={"websocket": Opaque(),
                                                                     "code": 1006})
    line = json.loads(captured.getvalue())
    assert line["message"] == "closed"
    assert line["code"] == 1006
    assert "websocket" not in line
    assert "object at 0x" not in captured.getvalue()


def test_text_lines_carry_the_fields_and_no_reprs(captured: io.StringIO) -> None:
    setup_logging("text", "info", captured)
    logging.getLogger("x").info("hello", extra={"model": "m", "conn": Opaque()})
    text = captured.getvalue()
    assert " INFO x: hello model=m" in text
    assert "object at 0x" not in text


def test_per_request_lines_of_http_clients_are_quieted(captured: io.StringIO) -> None:
    setup_logging("json", "info", captured)
    logging.getLogger("httpx").info('HTTP Request: POST http://runner/v1/chat "200 OK"')
    assert captured.getvalue() == ""


def test_a_quick_line_is_a_whole_line_and_only_when_info_is_on(captured: io.StringIO) -> None:
    setup_logging("json", "info", captured)
    token = request_id_var.set("req_quick")
    try:
        quick_info(logging.getLogger("node_agent.link"), "request %s: %s", "req_quick",
                   "chat/completions", extra={"model": "m"})
    finally:
        request_id_var.reset(token)
    (line,) = [json.loads(x) for x in captured.getvalue().splitlines()]
    assert (line["level"], line["logger"], line["message"]) == (
        "info", "node_agent.link", "request req_quick: chat/completions")
    assert (line["request_id"], line["model"]) == ("req_quick", "m")
    setup_logging("json", "warning", captured)
    quick_info(logging.getLogger("node_agent.link"), "not written")
    assert "not written" not in captured.getvalue()


def test_a_bad_format_is_refused() -> None:
    with pytest.raises(ValueError, match="json or text"):
        setup_logging("xml")


async def test_every_request_gets_an_id_and_one_access_line(captured: io.StringIO) -> None:
    setup_logging("json", "info", captured)

    async def chat(request: Request) -> Response:
        request.state.model = "smollm2"
        request.state.usage = {"prompt_tokens": 7, "completion_tokens": 3}
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    wrapped = RequestIdMiddleware(AccessLogMiddleware(app))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped),
                                 base_url="http://node") as client:
        given = await client.post("/v1/chat/completions", headers={"x-request-id": "req_abc"})
        fresh = await client.get("/nope")
    assert given.headers["x-request-id"] == "req_abc"
    assert fresh.headers["x-request-id"].startswith("req_")
    lines = [json.loads(x) for x in captured.getvalue().splitlines()]
    access = [x for x in lines if x["logger"] == "meshgate.access"]
    assert len(access) == 2
    first, second = access
    assert first["request_id"] == "req_abc"
    assert (first["status"], first["model"], first["route"]) == (200, "smollm2",
                                                                "/v1/chat/completions")
    assert (first["prompt_tokens"], first["completion_tokens"]) == (7, 3)
    assert first["latency_ms"] >= 0
    assert (second["status"], second["request_id"]) == (404, fresh.headers["x-request-id"])


@pytest.mark.parametrize(("command", "prog"), [("node_agent.cli", "meshgate-node"),
                                             ("coordinator.cli", "meshgate-coordinator")])
def test_both_commands_say_their_version_and_help_has_no_type_noise(command: str,
                                                                     prog: str) -> None:
    run = [sys.executable, "-c", f"from {command} import app; app()"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.split() == [prog, version_of()]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True)
    assert "--version" in helped.stdout
    assert "<bool>" not in helped.stdout


def test_a_lines_time_is_what_datetime_writes_to_the_millisecond() -> None:
    """`_iso` makes each second's text once; what it writes is datetime's own, rounding
    included (a fraction that rounds up to the next second too)."""
    from datetime import UTC, datetime

    from meshgate.logs import _iso

    for created in (0.0, 1.9995, 1482165825.8189995, 1700000000.0004, 1700000000.9999996,
                    1700000000.9994999, 1700000001.5, 1700000000.25):
        assert _iso(created) == datetime.fromtimestamp(created, UTC).isoformat(
            timespec="milliseconds")
