"""Which engines hold the coordinator's state, and their drivers.

One coordinator runs on a SQLite file and keeps its fast state (rate-limit
buckets, the response cache, budgets between ledger reads) in memory: no
driver to install, nothing else to run. Several replicas share PostgreSQL
(`--database-url`) and Redis (`--redis-url`); their drivers are the extras
`meshgate[postgres]` (psycopg 3) and `meshgate[redis]` (redis-py). A missing
driver is one line naming the extra, at start, before anything listens.

`serve` writes the engines it was given to `engines.json` in its state
directory (0600: a URL may hold a password), so that the admin commands run on
the same box find the same database, Redis and cluster key (which goes into
enrollment tokens) without being told again.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

from coordinator.errors import CoordinatorError

DB_URL_ENV = "MESHGATE_COORDINATOR_DB_URL"
REDIS_URL_ENV = "MESHGATE_REDIS_URL"
ENGINES_FILE = "engines.json"


class MissingDriver(CoordinatorError):
    """The engine named by a URL needs a driver this install lacks; the message names the extra."""


def _require(module: str, extra: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDriver(
            f"{what} needs the '{module}' driver, which is not installed: "
            f"pip install 'meshgate[{extra}]'"
        ) from None


def database_url(url: str) -> str:
    """`url` with the driver meshgate ships for its engine; MissingDriver if it is absent.

    `postgresql://` and `postgres://` mean psycopg 3 (`postgresql+psycopg://`);
    SQLite needs nothing. Any other SQLAlchemy URL is passed on as given.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise CoordinatorError(
            f"bad database URL {url[:60]!r}: use sqlite:///PATH or postgresql://USER@HOST/DB")
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        _require("psycopg", "postgres", "a PostgreSQL database URL")
        return f"postgresql+psycopg://{rest}"
    return url


def redis_module() -> ModuleType:
    """redis-py's asyncio-and-sync package; MissingDriver naming the extra if absent."""
    return _require("redis", "redis", "--redis-url")


def check_redis_url(url: str) -> str:
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise CoordinatorError(
            f"bad Redis URL {url[:60]!r}: use redis://HOST:PORT/DB or rediss:// or unix://")
    redis_module()
    return url


@dataclass(frozen=True, slots=True)
class Engines:
    """The shared engines of a cluster; both None: one coordinator on SQLite, in memory."""

    database_url: str | None = None
    redis_url: str | None = None
    cluster_key: str | None = None  # the key file every replica shares (--cluster-key)

    @property
    def clustered(self) -> bool:
        return self.redis_url is not None

    def checked(self) -> Engines:
        """The same, with driver-qualified URLs; MissingDriver or CoordinatorError if wrong."""
        return Engines(
            database_url(self.database_url) if self.database_url else None,
            check_redis_url(self.redis_url) if self.redis_url else None,
            self.cluster_key,
        )


def resolve_engines(state_dir: Path, database: str | None = None,
                    redis: str | None = None) -> Engines:
    """Options, else the environment, else what `serve` last wrote in `state_dir`."""
    saved = read_engines(state_dir)
    return Engines(
        database or os.environ.get(DB_URL_ENV) or saved.database_url,
        redis or os.environ.get(REDIS_URL_ENV) or saved.redis_url,
        saved.cluster_key,
    )


def read_engines(state_dir: Path) -> Engines:
    try:
        data = json.loads((state_dir / ENGINES_FILE).read_text())
    except (OSError, ValueError):
        return Engines()
    if not isinstance(data, dict):
        return Engines()
    db, redis, key = data.get("database_url"), data.get("redis_url"), data.get("cluster_key")
    return Engines(db if isinstance(db, str) else None, redis if isinstance(redis, str) else None,
                   key if isinstance(key, str) else None)


def write_engines(state_dir: Path, engines: Engines) -> None:
    path = state_dir / ENGINES_FILE
    if engines == Engines():
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f"{ENGINES_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"database_url": engines.database_url, "redis_url": engines.redis_url,
                   "cluster_key": engines.cluster_key}, out)
    tmp.replace(path)
