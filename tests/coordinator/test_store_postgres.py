"""The store contract (test_store.py) again, on a real PostgreSQL started for this module.

initdb into a temporary directory, `pg_ctl start` on a free port of 127.0.0.1
with its unix socket in that directory, one fresh database per test, stop at
teardown. PostgreSQL refuses to run as root, so as root the server runs as the
`postgres` user through `runuser`. Skipped, with the reason, only when initdb,
pg_ctl, the psycopg driver or (as root) a way to drop root are missing.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_store as contract

from coordinator.store import Store

Opener = Callable[[], Store]

_SKIP_IN_CONTRACT = {
    "test_a_sqlite_store_runs_in_wal_mode_with_a_busy_timeout",  # SQLite only by design
    "test_a_sqlite_ledger_from_before_the_route_column_gets_it",
}


def _find(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / tool).exists():
            return str(base / tool)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Server:
    def __init__(self) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            pytest.skip(
                "psycopg (the PostgreSQL driver) is not installed: pip install 'psycopg[binary]'"
            )
        initdb, pg_ctl = _find("initdb"), _find("pg_ctl")
        if initdb is None or pg_ctl is None:
            pytest.skip("PostgreSQL's initdb/pg_ctl are not installed")
        self.prefix: list[str] = []
        self.owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            try:
                self.owner = pwd.getpwnam("postgres")
            except KeyError:
                self.owner = None
            if runuser is None or self.owner is None:
                pytest.skip(
                    "running as root, and initdb refuses root: no runuser or no "
                    "'postgres' user to run PostgreSQL as"
                )
            self.prefix = [runuser, "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="meshgate-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        if self.owner is not None:
            os.chown(self.dir, self.owner.pw_uid, self.owner.pw_gid)
        self._run(
            [
                initdb,
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ]
        )
        self.pg_ctl = pg_ctl
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=50"
        )
        self._run(
            [
                pg_ctl,
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.data),
                "-l",
                str(self.dir / "server.log"),
                "-o",
                options,
            ]
        )
        self._names = itertools.count()

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(
            [*self.prefix, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=self.dir,
        )
        if done.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{argv[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{tail}"
            )

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def fresh_database(self) -> str:
        import psycopg

        name = f"contract_{next(self._names)}"
        dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # name is ours, not input
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run([self.pg_ctl, "stop", "-D", str(self.data), "-m", "fast", "-w"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[_Server]:
    server = _Server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def open_store(postgres: _Server) -> Iterator[Opener]:
    """Like test_store's fixture, but every test gets its own fresh PostgreSQL database."""
    url = postgres.fresh_database()
    opened: list[Store] = []

    def opener() -> Store:
        opened.append(Store(url))
        return opened[-1]

    yield opener
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Opener) -> Store:
    return open_store()


def test_the_store_really_runs_on_postgresql(store: Store) -> None:
    assert store.engine.dialect.name == "postgresql"
    with store.engine.connect() as conn:
        from sqlalchemy import text

        assert "PostgreSQL" in str(conn.execute(text("select version()")).scalar())


def _contract() -> dict[str, Any]:
    return {
        name: test
        for name, test in vars(contract).items()
        if name.startswith("test_") and callable(test) and name not in _SKIP_IN_CONTRACT
    }


globals().update(_contract())
