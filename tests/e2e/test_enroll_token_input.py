"""`meshgate-node enroll` takes its token from a file or stdin, so it never has to be on a
command line (where `ps` shows it to every local user)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.mesh import Mesh, mesh_at

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("tokeninput")):
        mesh.start_coordinator()
        yield mesh


def enroll(mesh: Mesh, node: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node_agent.cli", "enroll", *args,
         "--state-dir", str(mesh.root / node)],
        input=stdin, capture_output=True, text=True, timeout=60, check=False)


def test_the_token_from_a_file(mesh: Mesh) -> None:
    path = mesh.root / "token.txt"
    path.write_text(mesh.token() + "\n")
    result = enroll(mesh, "from-file", "--token-file", str(path))
    assert result.returncode == 0, result.stderr
    assert "enrolled as did:key:" in result.stdout


@pytest.mark.parametrize("args", [("-",), ("--token-file", "-")])
def test_the_token_from_stdin(mesh: Mesh, args: tuple[str, ...]) -> None:
    result = enroll(mesh, f"stdin-{len(args)}", *args, stdin=mesh.token() + "\n")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("args", "stdin", "says"), [
    ((), "", "give the token"),
    (("--token-file", "/nonexistent/token"), "", "cannot read the token file"),
    (("-",), "  \n", "empty"),
])
def test_a_missing_token_says_how_to_give_it(mesh: Mesh, args: tuple[str, ...], stdin: str,
                                             says: str) -> None:
    result = enroll(mesh, "none", *args, stdin=stdin)
    assert result.returncode == 2
    assert says in result.stderr
