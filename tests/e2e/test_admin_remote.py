"""Administering a real coordinator process from elsewhere: the CLI with `--url` and an
admin key, from a directory that holds no coordinator state. Keys, reusable tokens that
real nodes enroll with, nodes, usage, `top`, and how fast a revoke holds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from tests.e2e.mesh import Mesh, mesh_at

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("remote")):
        mesh.start_coordinator()
        yield mesh


def remote(mesh: Mesh, *args: str, admin_key: str | None = None,
           url: str | None = None) -> Done:
    """The CLI on "another box": no state dir of its own, the admin key in the env.
    It runs in this process (CliRunner) but only speaks HTTP to the coordinator process."""
    key = admin_key if admin_key is not None else (mesh.coord_state / "admin.key").read_text()
    env = {"MESHGATE_ADMIN_KEY": key.strip(),
           "MESHGATE_COORDINATOR_STATE": str(mesh.root / "not-a-state-dir"),
           "MESHGATE_ADMIN_CONFIG": str(mesh.root / "no-config.toml")}
    result = CliRunner().invoke(
        app, [*args, "--url", url or f"http://127.0.0.1:{mesh.api_port}"], env=env)
    return Done(result.exit_code, result.stdout, result.stderr)


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def status(mesh: Mesh, key: str) -> int:
    return httpx.get(f"{mesh.api}/models", headers={"Authorization": f"Bearer {key}"}
                     ).status_code


def last(done: Done) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_keys_are_made_listed_and_revoked_over_the_url(mesh: Mesh) -> None:
    key = last(remote(mesh, "key", "create", "--name", "remote-app", "--rpm", "60"))
    assert status(mesh, key) == 200
    listed = json.loads(last_json(remote(mesh, "key", "list", "--json")))
    assert [k["name"] for k in listed] == ["remote-app"]
    assert listed[0]["rpm"] == 60
    done = remote(mesh, "key", "revoke", "remote-app")
    assert done.returncode == 0, done.stderr
    assert status(mesh, key) == 401  # the first request after the command returned
    assert not (mesh.root / "not-a-state-dir").exists()


def last_json(done: Done) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_token_for_two_uses_enrolls_two_real_nodes_and_refuses_a_third(mesh: Mesh) -> None:
    token = last(remote(mesh, "token", "create", "--uses", "2", "--ttl", "10m",
                        "--label", "site=rollout"))
    for node in ("fleet-a", "fleet-b"):
        enrolled = mesh.enroll(node, token)
        assert enrolled.returncode == 0, enrolled.stderr
    third = mesh.enroll("fleet-c", token)
    assert third.returncode != 0
    assert "used all 2 times" in third.stderr
    tokens = json.loads(last_json(remote(mesh, "token", "list", "--json")))
    [made] = [t for t in tokens if t["labels"] == {"site": "rollout"}]
    assert (made["uses"], made["max_uses"], made["state"]) == (2, 2, "used")
    nodes = json.loads(last_json(remote(mesh, "nodes", "--json")))
    assert sum(n["labels"] == {"site": "rollout"} for n in nodes) == 2


def test_a_revoke_by_the_local_cli_holds_on_the_running_server_within_a_second(
    mesh: Mesh,
) -> None:
    key = mesh.make_key("local-app")
    assert status(mesh, key) == 200  # now in the server's key cache
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "key", "revoke", "local-app",
         "--state-dir", str(mesh.coord_state)],
        capture_output=True, text=True, timeout=60, check=False)  # as an operator runs it
    assert done.returncode == 0, done.stderr
    revoked = time.monotonic()
    while status(mesh, key) == 200:
        assert time.monotonic() - revoked < 1.0, "the old key still worked a second later"
        time.sleep(0.01)
    print(f"local CLI revoke: refused {time.monotonic() - revoked:.3f} s after the command")


def test_a_wrong_admin_key_or_an_unreachable_url_is_a_clear_error(mesh: Mesh) -> None:
    wrong = remote(mesh, "key", "list", admin_key="mga_000000000000_nope")
    assert wrong.returncode == 2
    assert "invalid admin key" in wrong.stderr
    app_key = mesh.make_key("not-admin")
    as_app = remote(mesh, "key", "list", admin_key=app_key)
    assert as_app.returncode == 2
    assert "admin key" in as_app.stderr
    gone = remote(mesh, "key", "list", url="http://127.0.0.1:9")
    assert gone.returncode == 1
    assert "cannot reach the coordinator" in gone.stderr


def test_usage_and_top_work_over_the_url(mesh: Mesh) -> None:
    usage = json.loads(last_json(remote(mesh, "usage", "--by", "key", "--json")))
    assert usage["by"] == "key"
    top = remote(mesh, "top", "--once")
    assert top.returncode == 0, top.stderr
    assert "meshgate fleet" in top.stdout
    assert "requests in flight" in top.stdout


def test_the_url_and_key_file_can_come_from_the_admin_config(mesh: Mesh) -> None:
    config = mesh.root / "admin.toml"
    config.write_text(f'url = "http://127.0.0.1:{mesh.api_port}"\n'
                      f'admin_key_file = "{mesh.coord_state / "admin.key"}"\n')
    result = CliRunner().invoke(app, ["key", "list", "--json"], env={
        "MESHGATE_ADMIN_CONFIG": str(config), "MESHGATE_ADMIN_KEY": "",
        "MESHGATE_COORDINATOR_STATE": str(mesh.root / "not-a-state-dir")})
    assert result.exit_code == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)
    assert not (mesh.root / "not-a-state-dir").exists()
