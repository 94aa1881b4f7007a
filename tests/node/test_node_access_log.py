"""The node's access lines can be turned off like the coordinator's: ``--no-access-log``,
``MESHGATE_ACCESS_LOG=no`` or ``access_log = false`` in node.toml."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshgate.logs import access_log, set_access_log
from node_agent.cli import app
from node_agent.config import NodeOptions, load_options
from node_agent.daemon import setup_node_logging


def test_access_lines_are_on_by_default_and_off_from_env_or_file(tmp_path: Path) -> None:
    assert load_options({}, config=None, env={}).access_log is True
    assert load_options({}, config=None, env={"MESHGATE_ACCESS_LOG": "no"}).access_log is False
    path = tmp_path / "node.toml"
    path.write_text("access_log = false\n")
    assert load_options({}, config=path, env={}).access_log is False
    assert load_options({"access_log": True}, config=path, env={}).access_log is True  # CLI wins


@pytest.mark.usefixtures("restored_logging")
def test_the_daemons_logging_follows_the_option() -> None:
    setup_node_logging(NodeOptions(log_format="json", access_log=False))
    assert not access_log.isEnabledFor(logging.INFO)
    setup_node_logging(NodeOptions(log_format="json", access_log=True))
    assert access_log.isEnabledFor(logging.INFO)


def test_the_run_command_takes_the_flag() -> None:
    out = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    assert out.exit_code == 0
    assert "--no-access-log" in out.output


def test_nothing_is_written_for_a_request_when_off(restored_logging: None) -> None:
    stream = io.StringIO()
    setup_node_logging(NodeOptions(log_format="json", access_log=False))
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    from meshgate.logs import access_line

    access_line({"method": "POST", "path": "/v1/chat/completions", "state": {}}, 200, 0.01)
    set_access_log(True)
    access_line({"method": "POST", "path": "/v1/chat/completions", "state": {}}, 200, 0.01)
    assert stream.getvalue().count("/v1/chat/completions") == 1
