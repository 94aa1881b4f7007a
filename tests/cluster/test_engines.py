"""Drivers as extras, and where the coordinator finds its engines (option, env, file)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.config import parse_config
from coordinator.engines import (
    Engines,
    MissingDriver,
    database_url,
    read_engines,
    resolve_engines,
    write_engines,
)
from coordinator.errors import CoordinatorError
from coordinator.state import StateDir
from coordinator.store import Store


@pytest.fixture
def no_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a plain `pip install meshgate`: neither psycopg nor redis importable."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "redis", None)


def test_postgresql_urls_mean_psycopg_3() -> None:
    assert database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(CoordinatorError, match="bad database URL"):
        database_url("just-a-path.db")


@pytest.mark.usefixtures("no_drivers")
def test_a_missing_postgres_driver_names_the_extra() -> None:
    with pytest.raises(MissingDriver) as caught:
        Store("postgresql://meshgate@127.0.0.1:1/meshgate")
    assert str(caught.value) == (
        "a PostgreSQL database URL needs the 'psycopg' driver, which is not installed: "
        "pip install 'meshgate[postgres]'"
    )


@pytest.mark.usefixtures("no_drivers")
@pytest.mark.parametrize(
    ("option", "extra"),
    [("--database-url=postgresql://u@127.0.0.1:1/db", "postgres"),
     ("--redis-url=redis://127.0.0.1:1/0", "redis")],
)
def test_serve_without_the_driver_is_one_line_naming_the_extra(
    tmp_path: Path, option: str, extra: str
) -> None:
    result = CliRunner().invoke(app, ["serve", "--state-dir", str(tmp_path), option])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert f"pip install 'meshgate[{extra}]'" in lines[0]


def test_a_bad_redis_url_is_refused_before_anything_listens(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["serve", "--state-dir", str(tmp_path), "--redis-url", "http://nope"])
    assert result.exit_code == 2
    assert "bad Redis URL" in result.output


def test_the_config_file_has_a_cluster_section(tmp_path: Path) -> None:
    config = parse_config({"cluster": {"database_url": "postgresql://a@b/c",
                                       "redis_url": "redis://r:6379/0",
                                       "key_file": "cluster.key"}}, base=tmp_path)
    assert config.cluster.database_url == "postgresql://a@b/c"
    assert config.cluster.redis_url == "redis://r:6379/0"
    assert config.cluster.key_file == tmp_path / "cluster.key"
    with pytest.raises(CoordinatorError, match="cluster: unknown key 'redis'"):
        parse_config({"cluster": {"redis": "x"}})


def test_admin_commands_find_the_engines_serve_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHGATE_COORDINATOR_DB_URL", raising=False)
    monkeypatch.delenv("MESHGATE_REDIS_URL", raising=False)
    state = tmp_path / "state"
    assert StateDir(state).db_url.endswith("coordinator.db")
    write_engines(state, Engines(f"sqlite:///{tmp_path / 'shared.db'}", "redis://r/0"))
    assert (state / "engines.json").stat().st_mode & 0o077 == 0  # a URL may hold a password
    assert StateDir(state).db_url.endswith("shared.db")
    assert resolve_engines(state).redis_url == "redis://r/0"
    assert resolve_engines(state, redis="redis://other/1").redis_url == "redis://other/1"
    write_engines(state, Engines())  # serve on SQLite again: the file goes
    assert read_engines(state) == Engines()
    assert StateDir(state).db_url.endswith("coordinator.db")


def test_replicas_share_one_cluster_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESHGATE_COORDINATOR_DB_URL", raising=False)
    monkeypatch.delenv("MESHGATE_REDIS_URL", raising=False)
    first = StateDir(tmp_path / "a")
    shared = first.path / "coordinator_static.key"
    key = first.static_key()
    other = StateDir(tmp_path / "b").static_key(shared)
    assert other.private_bytes_raw() == key.private_bytes_raw()
    with pytest.raises(CoordinatorError, match="cluster key file"):
        StateDir(tmp_path / "c").static_key(tmp_path / "missing.key")
    # serve --cluster-key notes the file, so `token create` on that box puts it in tokens
    write_engines(StateDir(tmp_path / "d").path, Engines(cluster_key=str(shared)))
    assert StateDir(tmp_path / "d").static_public() == first.static_public()
    assert not (tmp_path / "d" / "coordinator_static.key").exists()
