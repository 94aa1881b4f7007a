"""`meshgate-node join TOKEN --model ...`: enroll, config, service, and the node serves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.config import load_options
from tests.e2e.mesh import Mesh, cli, free_port, mesh_at, spawn

pytestmark = pytest.mark.slow

MODEL = "smollm2"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("join")):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("join")
        yield mesh


def test_join_enrolls_writes_the_config_installs_the_service_and_the_node_serves(
    mesh: Mesh, model_path: Path
) -> None:
    state, units = mesh.root / "node-state", mesh.root / "units"
    config = mesh.root / "etc" / "node.toml"
    joined = cli("node", "join", mesh.token(), "--model", f"{MODEL}={model_path}",
                 "--state-dir", str(state), "--config", str(config), "--unit-dir", str(units))
    lines = joined.stdout.splitlines()
    assert lines[0].startswith("enrolled as did:key:")
    assert f"wrote {config}" in lines
    assert f"wrote {units / 'meshgate-node.service'}" in lines
    # no systemd in the test box: the commands are printed for the host
    assert "would run: systemctl enable --now meshgate-node.service" in lines
    assert f"would run: chown -R meshgate:meshgate {state}" in lines
    unit = (units / "meshgate-node.service").read_text()
    assert f"run --config {config}" in unit
    opts = load_options({}, config=config, env={})
    assert opts.state_dir == state
    assert list(opts.models) == [f"{MODEL}={model_path}"]

    again = cli("node", "join", mesh.token(), "--state-dir", str(state), "--config",
                str(config), "--unit-dir", str(units), check=False)
    assert again.returncode == 1
    assert "already enrolled" in again.stdout
    assert f"{config} exists" in again.stderr

    port = mesh.proxy_ports["joined"] = free_port()
    mesh.nodes["joined"] = spawn("node", ["run", "--config", str(config), "--proxy-port",
                                          str(port)], mesh.root / "joined.log")
    mesh.wait_serving(MODEL)
    # status finds the daemon from its state dir (it listens on a port the config never named)
    status = cli("node", "status", "--config", str(config), "--json")
    assert json.loads(status.stdout)["runtime"][MODEL]
    by_state = cli("node", "status", "--state-dir", str(state), "--json", check=False)
    assert by_state.returncode == 0, by_state.stderr
