"""The coordinator's access log: a line for every request answered, however many a second
(the flood filter limits every other kind of line, meshgate/logflood.py), or none with
``--no-access-log`` / ``[log] access = false``."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from coordinator import server
from coordinator.api import ApiContext, build_app
from coordinator.cli import app as cli
from coordinator.config import ConfigError, load_config
from coordinator.registry import Registry
from coordinator.state import ServeOptions
from meshgate.logflood import FloodFilter
from meshgate.logs import set_access_log, setup_logging

KEY = "mg_test_key"
HELLO = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
BURST = 20  # lines of one kind the flood filter lets through at once (its clock stands still)


@pytest.fixture
def captured(restored_logging: None) -> tuple[io.StringIO, FloodFilter]:
    out = io.StringIO()
    flood = FloodFilter(rate=10, burst=BURST, clock=lambda: 0.0)
    setup_logging("json", "info", out).addFilter(flood)
    return out, flood


async def _requests(n: int) -> list[int]:
    ctx = ApiContext(Registry(), verify_key=lambda k: "key1" if k == KEY else None,
                     known_models=set, record_usage=lambda row: None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(ctx)),
                                 base_url="http://coord") as client:
        return [(await client.post("/v1/chat/completions", json=HELLO, headers={
            "authorization": f"Bearer {KEY}", "x-request-id": f"req_{i}"})).status_code
            for i in range(n)]


def _lines(out: io.StringIO, logger: str) -> list[dict[str, Any]]:
    return [line for line in map(json.loads, out.getvalue().splitlines())
            if line["logger"] == logger]


async def test_fifty_requests_make_fifty_access_lines_past_the_flood_limit(
        captured: tuple[io.StringIO, FloodFilter]) -> None:
    out, flood = captured
    assert await _requests(50) == [404] * 50  # no such model: answered, each with its line
    access = _lines(out, "meshgate.access")
    assert [line["request_id"] for line in access] == [f"req_{i}" for i in range(50)]
    assert {(line["status"], line["route"]) for line in access} == {
        (404, "/v1/chat/completions")}
    # every other kind of line is still limited, and the access lines took nothing from
    # the total all kinds share
    storm = logging.getLogger("test.storm")
    for i in range(50):
        storm.info("storm line %d", i)
    assert len(_lines(out, "test.storm")) == BURST
    assert flood.dropped_total == 50 - BURST


async def test_no_access_log_means_no_access_lines(
        captured: tuple[io.StringIO, FloodFilter]) -> None:
    out, _ = captured
    set_access_log(False)
    assert await _requests(3) == [404] * 3
    assert _lines(out, "meshgate.access") == []
    logging.getLogger("test.other").info("still written")
    assert len(_lines(out, "test.other")) == 1


def test_the_config_and_the_command_line_turn_access_lines_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text("[log]\naccess = false\n")
    assert load_config(path).access_log is False
    path.write_text("[dispatch]\nmax_tries = 2\n")
    assert load_config(path).access_log is True
    path.write_text("[log]\naccess = \"no\"\n")
    with pytest.raises(ConfigError, match=r"log\.access: expected true or false"):
        load_config(path)
    given: list[ServeOptions] = []
    monkeypatch.setattr(server, "run_server", lambda opts, config=None: given.append(opts))
    for flag, want in (("--no-access-log", False), ("--access-log", True), (None, None)):
        args = ["serve", "--state-dir", str(tmp_path / "s"), *([flag] if flag else [])]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert given.pop().access_log is want
