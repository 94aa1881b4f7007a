"""`meshgate-coordinator` admin commands, on a real state directory.

Most tests drive the typer app in process (CliRunner); the ones marked as
such run the real console module in a subprocess, as an operator would.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from coordinator.cli import parse_duration
from coordinator.state import StateDir
from tests.coordinator.cli_admin_harness import (
    DID,
    TUNNEL_URL,
    last_line,
    make_state_dir,
    open_store,
    run,
    run_real,
)
from tunnel.token import EnrollmentToken


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return make_state_dir(tmp_path)


# ----------------------------------------------------------------------------- tokens


def test_token_create_prints_a_token_for_the_advertised_tunnel_and_static_key(
    state_dir: Path,
) -> None:
    """A real subprocess, as an operator runs it next to a running coordinator."""
    state = StateDir(state_dir)
    state.write_advertise(tunnel_url=TUNNEL_URL, api_url="http://10.0.0.5:8470")
    done = run_real(state_dir, "token", "create", "--ttl", "15m", "--label", "site=lab-1")
    assert done.returncode == 0, done.stderr
    token = EnrollmentToken.decode(last_line(done.stdout))
    assert token.url == TUNNEL_URL
    assert token.coordinator_key == state.static_public()
    assert abs(token.expires_at - (time.time() + 15 * 60)) < 30
    assert "site=lab-1" in done.stderr


def test_a_token_for_a_loopback_tunnel_comes_with_a_warning(state_dir: Path) -> None:
    done = run(state_dir, "token", "create", "--tunnel-url", "ws://127.0.0.1:8471")
    assert done.exit_code == 0, done.stderr
    assert "loopback" in done.stderr
    assert EnrollmentToken.decode(last_line(done.stdout)).url == "ws://127.0.0.1:8471"


def test_a_printed_token_enrolls_a_node_once_with_its_labels(state_dir: Path) -> None:
    done = run(state_dir, "token", "create", "--tunnel-url", TUNNEL_URL,
               "--label", "site=lab-1", "--label", "gpu=a100")
    assert done.exit_code == 0, done.stderr
    token = EnrollmentToken.decode(last_line(done.stdout))
    store = open_store(state_dir)
    try:
        node = store.redeem_token(token.token_id, token.secret, DID, time.time())
    finally:
        store.close()
    assert node.labels == {"site": "lab-1", "gpu": "a100"}


def test_token_create_without_a_tunnel_address_says_to_start_the_coordinator(
    state_dir: Path,
) -> None:
    done = run(state_dir, "token", "create")
    assert done.exit_code == 2
    assert "start the coordinator first or pass --tunnel-url" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("ttl", ["2x", "0", "0h", "-1h", "", "1.5h", "h"])
def test_a_bad_ttl_is_refused_with_a_usage_error(state_dir: Path, ttl: str) -> None:
    done = run(state_dir, "token", "create", "--tunnel-url", TUNNEL_URL, "--ttl", ttl)
    assert done.exit_code == 2
    assert "bad duration" in done.stderr
    assert "7d" in done.stderr


def test_a_bad_ttl_is_refused_by_the_real_command_too(state_dir: Path) -> None:
    done = run_real(state_dir, "token", "create", "--tunnel-url", TUNNEL_URL, "--ttl", "soon")
    assert done.returncode == 2
    assert "bad duration 'soon'" in done.stderr


@pytest.mark.parametrize("label", ["site", "=x", "my site=x"])
def test_a_bad_label_is_refused_with_a_usage_error(state_dir: Path, label: str) -> None:
    done = run(state_dir, "token", "create", "--tunnel-url", TUNNEL_URL, "--label", label)
    assert done.exit_code == 2
    assert "key=value" in done.stderr


def test_a_tunnel_url_must_be_a_websocket_url(state_dir: Path) -> None:
    done = run(state_dir, "token", "create", "--tunnel-url", "http://x:1")
    assert done.exit_code == 2
    assert "ws://" in done.stderr


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("15m", 900), ("1h", 3600), ("7d", 604800), ("90", 90),
])
def test_durations_read_seconds_minutes_hours_and_days(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


# ----------------------------------------------------------------------------- keys


def test_key_create_prints_a_key_that_the_store_verifies(state_dir: Path) -> None:
    """A real subprocess: the key is the last line of stdout."""
    done = run_real(state_dir, "key", "create", "--name", "web-app")
    assert done.returncode == 0, done.stderr
    store = open_store(state_dir)
    try:
        record = store.verify_key(last_line(done.stdout))
    finally:
        store.close()
    assert record is not None
    assert record.name == "web-app"


def test_key_create_with_models_scopes_the_key(state_dir: Path) -> None:
    done = run(state_dir, "key", "create", "--name", "app", "--model", "smollm2")
    listed = json.loads(run(state_dir, "key", "list", "--json").stdout)
    assert listed[0]["models"] == ["smollm2"]
    assert listed[0]["key_id"] in last_line(done.stdout)


def test_key_create_with_every_scope_lists_them_and_rotate_keeps_them(state_dir: Path) -> None:
    done = run(state_dir, "key", "create", "--name", "app", "--models", "smollm2,llama-*",
               "--prefer", "local", "--label", "site=a", "--rpm", "60", "--tpm", "20000",
               "--budget-day", "5.00", "--budget-month", "50")
    assert done.exit_code == 0, done.stderr
    assert "60 rpm, 20000 tpm, 5/day, 50/month" in done.stderr
    [key] = json.loads(run(state_dir, "key", "list", "--json").stdout)
    expected = {"models": ["llama-*", "smollm2"], "prefer": "local", "labels": {"site": "a"},
                "rpm": 60, "tpm": 20000, "budget_day": 5.0, "budget_month": 50.0}
    assert {k: key[k] for k in expected} == expected
    table = run(state_dir, "key", "list").stdout
    assert "llama-*,smollm2" in table
    assert "site=a" in table
    new = last_line(run(state_dir, "key", "rotate", "app").stdout)
    store = open_store(state_dir)
    try:
        record = store.verify_key(new)
    finally:
        store.close()
    assert record is not None
    assert record.allows_model("llama-3-8b")
    assert not record.allows_model("qwen")
    [after] = json.loads(run(state_dir, "key", "list", "--json").stdout)
    assert {k: after[k] for k in expected} == expected


@pytest.mark.parametrize(("args", "message"), [
    (["--prefer", "fastest"], "bad prefer 'fastest'"),
    (["--rpm", "0"], "rpm must be a positive"),
    (["--budget-day", "-1"], "budget_day must be a positive"),
    (["--label", "site"], "key=value"),
])
def test_bad_key_scopes_are_usage_errors(state_dir: Path, args: list[str], message: str) -> None:
    done = run(state_dir, "key", "create", "--name", "app", *args)
    assert done.exit_code == 2
    assert message in done.stderr
    assert json.loads(run(state_dir, "key", "list", "--json").stdout) == []


def test_key_list_shows_every_key_and_never_a_secret(state_dir: Path) -> None:
    plaintext = last_line(run(state_dir, "key", "create", "--name", "app").stdout)
    secret = plaintext.split("_", 2)[2]
    as_json = run(state_dir, "key", "list", "--json").stdout
    as_table = run(state_dir, "key", "list").stdout
    assert [k["name"] for k in json.loads(as_json)] == ["app"]
    assert "app" in as_table
    assert "active" in as_table
    assert secret not in as_json + as_table


def test_key_revoke_makes_the_key_fail_verification(state_dir: Path) -> None:
    plaintext = last_line(run(state_dir, "key", "create", "--name", "app").stdout)
    done = run(state_dir, "key", "revoke", "app")
    assert done.exit_code == 0, done.stderr
    store = open_store(state_dir)
    try:
        assert store.verify_key(plaintext) is None
    finally:
        store.close()
    assert json.loads(run(state_dir, "key", "list", "--json").stdout)[0]["state"] == "revoked"


def test_key_rotate_prints_a_new_key_and_the_old_one_stops_working(state_dir: Path) -> None:
    old = last_line(run(state_dir, "key", "create", "--name", "app").stdout)
    done = run(state_dir, "key", "rotate", "app")
    assert done.exit_code == 0, done.stderr
    new = last_line(done.stdout)
    store = open_store(state_dir)
    try:
        assert store.verify_key(old) is None
        record = store.verify_key(new)
    finally:
        store.close()
    assert record is not None
    assert record.name == "app"


@pytest.mark.parametrize("command", ["revoke", "rotate"])
def test_an_unknown_key_is_a_usage_error(state_dir: Path, command: str) -> None:
    done = run(state_dir, "key", command, "nope")
    assert done.exit_code == 2
    assert "unknown API key 'nope'" in done.stderr


def test_a_second_live_key_with_the_same_name_is_refused(state_dir: Path) -> None:
    run(state_dir, "key", "create", "--name", "app")
    done = run(state_dir, "key", "create", "--name", "app")
    assert done.exit_code == 2
    assert "already exists" in done.stderr
