"""Enrollment and identity abuse against a real coordinator process: every attempt is
refused with a message that says why, and leaves the store as it was. Nodes here run
without models; only their tunnel matters."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.mesh import Mesh, cli, mesh_at, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("abuse")):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("abuse")
        yield mesh


def dids(mesh: Mesh) -> set[str]:
    return {str(n["did"]) for n in mesh.nodes_json()}


def enrolled_did(stdout: str) -> str:
    match = re.search(r"enrolled as (did:key:\S+)", stdout)
    assert match, stdout
    return match.group(1)


def wait_connected(mesh: Mesh, count: int, timeout: float = 30) -> None:
    procs = [p for p in [mesh.coordinator] if p is not None]
    wait_until(lambda: mesh.connected_nodes() == count, timeout, f"{count} connected", procs)


def test_an_expired_token_is_refused(mesh: Mesh) -> None:
    before = dids(mesh)
    token = mesh.token("--ttl", "1s")
    time.sleep(1.5)
    result = mesh.enroll("late", token)
    assert result.returncode != 0
    assert "expired" in result.stderr
    assert dids(mesh) == before


def test_a_reused_token_is_refused_and_the_first_enrollment_stands(mesh: Mesh) -> None:
    token = mesh.token()
    first = mesh.enroll("once-a", token)
    assert first.returncode == 0, first.stderr
    did = enrolled_did(first.stdout)
    before = dids(mesh)
    second = mesh.enroll("once-b", token)
    assert second.returncode != 0
    assert "already used" in second.stderr
    assert did in second.stderr  # says who used it
    assert dids(mesh) == before


def test_a_token_of_another_coordinator_is_refused(mesh: Mesh) -> None:
    """A token made by another coordinator (another static key) but pointing here."""
    other = mesh.root / "other-coordinator"
    cli("coordinator", "init", "--state-dir", str(other))
    made = cli("coordinator", "token", "create", "--state-dir", str(other),
               "--tunnel-url", f"ws://127.0.0.1:{mesh.tunnel_port}")
    token = made.stdout.strip().splitlines()[-1]
    before = dids(mesh)
    result = mesh.enroll("stranger", token)
    assert result.returncode != 0
    assert result.stderr.strip()
    assert dids(mesh) == before
    coordinator = mesh.coordinator
    assert coordinator is not None
    assert re.search(r"handshake from 127\.0\.0\.1 failed", coordinator.log_text())
    assert mesh.connected_nodes() == 0  # the coordinator is up and nothing got in


def test_disconnect_does_not_move_last_seen(mesh: Mesh) -> None:
    result = mesh.enroll("brief")
    assert result.returncode == 0, result.stderr
    did = enrolled_did(result.stdout)
    node = mesh.start_node("brief")
    wait_connected(mesh, 1)
    time.sleep(0.5)
    stopped_at = time.time()
    node.stop()
    wait_connected(mesh, 0)
    time.sleep(0.5)
    (record,) = [n for n in mesh.nodes_json() if n["did"] == did]
    assert isinstance(record["last_seen"], float)
    assert record["last_seen"] < stopped_at


def test_revoking_a_connected_node_closes_its_tunnel_and_refuses_it(mesh: Mesh) -> None:
    result = mesh.enroll("doomed")
    assert result.returncode == 0, result.stderr
    did = enrolled_did(result.stdout)
    node = mesh.start_node("doomed")
    wait_connected(mesh, 1)
    revoked_at = time.monotonic()
    out = cli("coordinator", "node", "revoke", did, "--state-dir", str(mesh.coord_state))
    assert "revoked node" in out.stdout
    wait_connected(mesh, 0, timeout=10)
    assert time.monotonic() - revoked_at < 5  # promptly, not at the next reconnect
    wait_until(lambda: "revoked" in node.log_text(), 30, "node told it is revoked", [node])
    coordinator_log = mesh.coordinator.log_text()  # type: ignore[union-attr]
    assert f"node {did} was revoked; closing its tunnel" in coordinator_log
    assert f"refused revoked node {did}" in coordinator_log
    time.sleep(2)
    assert mesh.connected_nodes() == 0  # and it stays out
    (record,) = [n for n in mesh.nodes_json() if n["did"] == did]
    assert record["state"] == "revoked"
    node.stop()


def test_two_connections_of_one_identity_the_newer_wins(mesh: Mesh, tmp_path: Path) -> None:
    result = mesh.enroll("twin")
    assert result.returncode == 0, result.stderr
    did = enrolled_did(result.stdout)
    original = mesh.start_node("twin")
    wait_connected(mesh, 1)
    shutil.copytree(mesh.root / "twin", mesh.root / "twin-clone",
                    ignore=shutil.ignore_patterns("run", "*.sock"))
    clone = mesh.start_node("twin-clone")
    coordinator = mesh.coordinator
    assert coordinator is not None
    wait_until(lambda: f"node {did} connected again from" in coordinator.log_text(), 30,
               "the newer connection replaces the older", [coordinator, clone])
    assert "closing its older connection" in coordinator.log_text()
    assert mesh.connected_nodes() == 1  # one entry per identity, never two
    clone.stop()
    original.stop()
    wait_connected(mesh, 0)


def test_after_all_that_a_legit_node_still_enrolls_and_connects(mesh: Mesh) -> None:
    result = mesh.enroll("legit")
    assert result.returncode == 0, result.stderr
    node = mesh.start_node("legit")
    wait_connected(mesh, 1)
    node.stop()
