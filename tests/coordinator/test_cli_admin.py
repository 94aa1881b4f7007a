"""`meshgate-coordinator` admin commands, on a real state directory.

Most tests drive the typer app in process (CliRunner); the ones marked as
such run the real console module in a subprocess, as an operator would.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from coordinator.cli import app, parse_duration
from coordinator.live import LIVE_FILE
from coordinator.state import StateDir
from coordinator.store import Store, UsageRecord
from tunnel.token import EnrollmentToken

DID = "did:key:z6MkNODE"
TUNNEL_URL = "ws://10.0.0.5:8471"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A coordinator's state dir, as `init` (or a first `serve`) leaves it."""
    path = tmp_path / "coordinator"
    done = CliRunner().invoke(app, ["init", "--state-dir", str(path)])
    assert done.exit_code == 0, done.stderr
    return path


def run(state_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(app, [*args, "--state-dir", str(state_dir)])


def run_real(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args, "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def open_store(state_dir: Path) -> Store:
    return Store(StateDir(state_dir).db_url)


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


# ----------------------------------------------------------------------------- nodes


def _enroll(state_dir: Path, did: str, labels: dict[str, str]) -> Store:
    store = open_store(state_dir)
    token_id, secret = store.create_token(60, labels, time.time())
    store.redeem_token(token_id, secret, did, time.time())
    return store


def write_live_file(state_dir: Path, nodes: dict[str, dict[str, object]], age: float) -> None:
    """What a running server writes (coordinator.live), `age` seconds ago."""
    view = {"written_at": time.time() - age, "period_s": 2.0, "pid": 1, "nodes": nodes}
    (state_dir / LIVE_FILE).write_text(json.dumps(view))


LIVE = {
    "rtt_ms": 1.5, "in_flight": 2, "models": ["smollm2"], "loaded": ["smollm2"],
    "cpu_util_pct": 37.0, "load_1m": 1.25, "mem_total_bytes": 32 * 1024**3,
    "mem_available_bytes": 20 * 1024**3,
    "gpus": [{"name": "NVIDIA GeForce RTX 4090", "vram_used_bytes": 18 * 1024**3,
              "vram_total_bytes": 24 * 1024**3, "gpu_util_pct": 97.0}],
}


def test_nodes_json_marks_nodes_in_the_live_view_connected(state_dir: Path) -> None:
    store = _enroll(state_dir, DID, {"site": "a"})
    quiet = "did:key:z6MkQUIET"
    try:
        store.touch_node(DID, time.time(), ["smollm2"])
        token_id, secret = store.create_token(60, {}, time.time())
        store.redeem_token(token_id, secret, quiet, time.time())
        store.touch_node(quiet, time.time() - 1)  # seen a moment ago, but gone since
    finally:
        store.close()
    write_live_file(state_dir, {DID: LIVE}, age=0.5)
    done = run_real(state_dir, "nodes", "--json")
    assert done.returncode == 0, done.stderr
    nodes = {n["did"]: n for n in json.loads(done.stdout)}
    assert nodes[DID]["connected"] is True
    assert nodes[DID]["state"] == "connected"
    assert nodes[DID]["models"] == ["smollm2"]
    assert nodes[DID]["labels"] == {"site": "a"}
    assert nodes[quiet]["connected"] is False
    assert nodes[quiet]["state"] == "enrolled"
    assert nodes[DID]["live"]["rtt_ms"] == 1.5
    assert nodes[quiet]["live"] is None


def test_nodes_table_shows_live_gpu_memory_and_round_trip(state_dir: Path) -> None:
    _enroll(state_dir, DID, {}).close()
    write_live_file(state_dir, {DID: LIVE}, age=0.5)
    done = run(state_dir, "nodes")
    assert done.exit_code == 0, done.stderr
    [row] = [line for line in done.stdout.splitlines() if line.startswith(DID)]
    assert "connected" in row
    assert "1.5ms" in row
    assert "GeForce RTX 4090 18.0/24.0G 97%" in row
    assert "12.0/32.0G" in row  # memory used of total
    assert "smollm2*" in row  # loaded


def test_a_stale_live_view_means_nobody_is_connected(state_dir: Path) -> None:
    _enroll(state_dir, DID, {}).close()
    write_live_file(state_dir, {DID: LIVE}, age=60)  # the server died a minute ago
    [node] = json.loads(run(state_dir, "nodes", "--json").stdout)
    assert node["connected"] is False
    assert "no coordinator is serving" in run(state_dir, "nodes").stdout


def test_nodes_table_lists_each_node_with_its_state_and_labels(state_dir: Path) -> None:
    _enroll(state_dir, DID, {"site": "a"}).close()
    done = run(state_dir, "nodes")
    assert done.exit_code == 0, done.stderr
    assert DID in done.stdout
    assert "site=a" in done.stdout
    assert "never" in done.stdout


def test_node_revoke_marks_the_node_revoked(state_dir: Path) -> None:
    _enroll(state_dir, DID, {}).close()
    done = run(state_dir, "node", "revoke", DID)
    assert done.exit_code == 0, done.stderr
    [node] = json.loads(run(state_dir, "nodes", "--json").stdout)
    assert node["state"] == "revoked"
    assert node["connected"] is False
    assert "already revoked" in run(state_dir, "node", "revoke", DID).stdout


def test_revoking_an_unknown_node_is_a_usage_error(state_dir: Path) -> None:
    done = run(state_dir, "node", "revoke", DID)
    assert done.exit_code == 2
    assert f"unknown node {DID}" in done.stderr


# ----------------------------------------------------------------------------- usage


def _ledger(state_dir: Path) -> str:
    store = open_store(state_dir)
    try:
        record, _ = store.create_key("web-app", time.time())
        for i, (model, age) in enumerate([("a", 10), ("a", 20), ("b", 7200)]):
            store.record_usage(UsageRecord(
                request_id=f"r{i}", key_id=record.key_id, node_did=DID, model=model,
                endpoint="/v1/chat/completions", prompt_tokens=10, completion_tokens=2,
                latency_ms=50.0, outcome="ok", created_at=time.time() - age, cost=0.25,
            ))
    finally:
        store.close()
    return record.key_id


def test_usage_sums_the_ledger_per_model_since_a_duration_ago(state_dir: Path) -> None:
    _ledger(state_dir)
    everything = json.loads(run(state_dir, "usage", "--json").stdout)
    recent = json.loads(run(state_dir, "usage", "--since", "1h", "--json").stdout)
    assert {r["model"]: r["requests"] for r in everything["groups"]} == {"a": 2, "b": 1}
    assert everything["total"]["requests"] == 3
    assert everything["total"]["cost"] == pytest.approx(0.75)
    assert everything["since"] is None
    assert {r["model"]: r["prompt_tokens"] for r in recent["groups"]} == {"a": 20}
    assert recent["total"]["prompt_tokens"] == 20
    assert recent["since"].startswith("20")


def test_usage_by_key_names_the_key(state_dir: Path) -> None:
    key_id = _ledger(state_dir)
    [row] = json.loads(run(state_dir, "usage", "--by", "key", "--json").stdout)["groups"]
    assert row["key"] == key_id
    assert row["name"] == "web-app"
    assert "web-app" in run(state_dir, "usage", "--by", "key").stdout


def test_usage_as_csv_has_a_header_one_row_per_group_and_the_total(state_dir: Path) -> None:
    _ledger(state_dir)
    store = open_store(state_dir)
    try:
        store.record_usage(UsageRecord(
            request_id="c1", key_id=None, node_did=None, upstream="openai", model="a",
            endpoint="chat/completions", prompt_tokens=100, completion_tokens=50,
            latency_ms=300.0, outcome="ok", created_at=time.time(), cost=0.5,
            route="prefer=speed"))
    finally:
        store.close()
    done = run(state_dir, "usage", "--by", "node", "--since", "2026-11-01", "--csv")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["node"], r["requests"]) for r in rows] == [
        (DID, "3"), ("openai", "1"), ("TOTAL", "4")]
    assert float(rows[-1]["cost"]) == pytest.approx(1.25)
    assert float(rows[-1]["avg_latency_ms"]) == pytest.approx((3 * 50 + 300) / 4)


def test_usage_table_ends_with_the_total(state_dir: Path) -> None:
    _ledger(state_dir)
    lines = run(state_dir, "usage", "--since", "24h").stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["MODEL", "REQUESTS"]
    assert lines[-1].split()[:3] == ["TOTAL", "3", "3"]


@pytest.mark.parametrize("args", [["--by", "user"], ["--since", "yesterday"]])
def test_bad_usage_options_are_usage_errors(state_dir: Path, args: list[str]) -> None:
    done = run(state_dir, "usage", *args)
    assert done.exit_code == 2
    assert "bad --" in done.stderr


# ----------------------------------------------------------------------------- state dir


def test_the_state_dir_is_private_and_the_static_key_is_0600_and_stable(state_dir: Path) -> None:
    state = StateDir(state_dir)
    first = state.static_public()
    assert StateDir(state_dir).static_public() == first
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    key_file = state_dir / "coordinator_static.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32


def test_a_damaged_static_key_is_reported_not_replaced(state_dir: Path) -> None:
    (state_dir / "coordinator_static.key").write_bytes(b"short")
    done = run(state_dir, "token", "create", "--tunnel-url", TUNNEL_URL)
    assert done.exit_code == 2
    assert "not a 32-byte X25519 key" in done.stderr
    assert (state_dir / "coordinator_static.key").read_bytes() == b"short"


def test_the_state_dir_comes_from_the_environment_when_not_given(tmp_path: Path) -> None:
    env = {**os.environ, "MESHGATE_COORDINATOR_STATE": str(tmp_path / "from-env")}
    for command in (["init"], ["key", "create", "--name", "x"]):
        done = subprocess.run(
            [sys.executable, "-m", "coordinator.cli", *command],
            capture_output=True, text=True, timeout=60, check=False, env=env, cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "from-env" / "coordinator.db").exists()


@pytest.mark.parametrize("command", [
    ["key", "create", "--name", "x"], ["key", "list"], ["nodes"], ["usage"],
    ["token", "create", "--tunnel-url", TUNNEL_URL], ["node", "revoke", DID],
])
def test_a_mistyped_state_dir_is_an_error_and_creates_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    wrong = tmp_path / "coordinatr"
    done = run(wrong, *command)
    assert done.exit_code == 2
    assert f"no coordinator database in {wrong}" in done.stderr
    assert done.stdout == ""
    assert not wrong.exists()


def test_init_writes_a_private_admin_key_once(state_dir: Path) -> None:
    key_file = state_dir / "admin.key"
    first = key_file.read_text()
    assert first.startswith("mga_")
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert run(state_dir, "init").exit_code == 0
    assert key_file.read_text() == first  # a live admin key exists: nothing new
    listed = run(state_dir, "admin-key", "list").stdout
    assert "first" in listed
    assert first.strip().split("_", 2)[2] not in listed  # the whole secret (it may hold "_")


def test_the_database_url_can_point_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHGATE_COORDINATOR_DB_URL", f"sqlite:///{tmp_path / 'other.db'}")
    assert StateDir(tmp_path / "state").db_url.endswith("other.db")
    assert StateDir(tmp_path / "state", db_url="sqlite:///x.db").db_url == "sqlite:///x.db"
