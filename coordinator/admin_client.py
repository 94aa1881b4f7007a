"""Where the CLI's admin commands go: the admin API (`--url`) or the local database.

`open_admin` picks: with a URL (option, `$MESHGATE_COORDINATOR_URL`, or `url`
in the admin config file) it speaks HTTP to the admin API with an admin key
(`$MESHGATE_ADMIN_KEY`, `--admin-key-file`, `admin_key_file` in the config,
else `admin.key` in the state dir); without one it works on the database in
the state directory, which must already exist: a mistyped `--state-dir` is an
error, never a fresh empty database. Locally, `usage` also counts the rows a running
server has journaled (`ledger-journal/` there) and not committed yet, each once.

The admin config file is `$MESHGATE_ADMIN_CONFIG`, else
`~/.config/meshgate/admin.toml`:

    url = "https://gate.example.com:8470"
    admin_key_file = "~/.config/meshgate/admin.key"
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from coordinator.admin_keys import ADMIN_KEY_FILE, read_admin_key
from coordinator.admin_ops import Admin, AdminOps
from coordinator.errors import CoordinatorError
from coordinator.ledger_journal import JOURNAL_DIR
from coordinator.state import DB_FILE, StateDir
from coordinator.store import Store

CONFIG_ENV = "MESHGATE_ADMIN_CONFIG"
KEY_ENV = "MESHGATE_ADMIN_KEY"
TIMEOUT_S = 30.0


class AdminCallError(CoordinatorError):
    """The admin API refused a call; `status` is its HTTP status (0: never reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class AdminConfig:
    url: str | None = None
    admin_key_file: Path | None = None


def load_config(path: Path | None = None) -> AdminConfig:
    """The admin config file, if there is one (a bad one is an error, a missing one is not)."""
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        path = Path(env) if env else Path.home() / ".config" / "meshgate" / "admin.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return AdminConfig()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CoordinatorError(f"cannot read the admin config {path}: {exc}") from None
    url, key_file = data.get("url"), data.get("admin_key_file")
    if url is not None and not isinstance(url, str):
        raise CoordinatorError(f"{path}: url must be a string")
    if key_file is not None and not isinstance(key_file, str):
        raise CoordinatorError(f"{path}: admin_key_file must be a string")
    return AdminConfig(url, Path(key_file).expanduser() if key_file else None)


class RemoteAdmin:
    """The admin API over HTTP; every method returns what `AdminOps` returns."""

    def __init__(self, url: str, admin_key: str, transport: httpx.BaseTransport | None = None
                 ) -> None:
        if not url.startswith(("http://", "https://")):
            raise CoordinatorError(f"--url must start with http:// or https://, not {url!r}")
        self.url = url.rstrip("/")
        self.client = httpx.Client(
            base_url=self.url + "/admin/v1", timeout=TIMEOUT_S, transport=transport,
            headers={"Authorization": f"Bearer {admin_key}"})

    def close(self) -> None:
        self.client.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            reply = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AdminCallError(0, f"cannot reach the coordinator at {self.url}: {exc}") from None
        try:
            body = reply.json()
        except ValueError:
            body = None
        if reply.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            message = error.get("message") if isinstance(error, dict) else None
            raise AdminCallError(reply.status_code, str(message or f"HTTP {reply.status_code} "
                                                      f"from {self.url}"))
        if body is None:
            raise AdminCallError(reply.status_code, f"{self.url} answered something not JSON")
        return body

    def create_token(self, *, ttl_s: int, uses: int, labels: dict[str, str],
                     tunnel_url: str | None) -> dict[str, Any]:
        body = {"ttl": ttl_s, "uses": uses, "labels": labels, "tunnel_url": tunnel_url}
        result: dict[str, Any] = self._call("POST", "/tokens", json=body)
        return result

    def list_tokens(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._call("GET", "/tokens")["data"]
        return data

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/tokens/{quote(token_id, safe='')}")
        return result

    def create_key(self, name: str, scopes: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/keys", json={"name": name, **scopes})
        return result

    def list_keys(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._call("GET", "/keys")["data"]
        return data

    def revoke_key(self, key: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/keys/{quote(key, safe='')}")
        return result

    def rotate_key(self, key: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/keys/{quote(key, safe='')}/rotate")
        return result

    def list_nodes(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/nodes")
        return result

    def revoke_node(self, did: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/nodes/{quote(did, safe='')}")
        return result

    def usage(self, by: str, since: float | None) -> dict[str, Any]:
        params: dict[str, Any] = {"by": by}
        if since is not None:
            params["since"] = repr(since)
        result: dict[str, Any] = self._call("GET", "/usage", params=params)
        return result

    def live(self, nodes: int = 200) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/live", params={"nodes": nodes})
        return result


def existing_state(state_dir: Path) -> StateDir:
    """The state dir of a coordinator that has run here; never creates one."""
    default_file = f"sqlite:///{(state_dir / DB_FILE).resolve()}"
    if not state_dir.is_dir() or (StateDir(state_dir).db_url == default_file
                                  and not (state_dir / DB_FILE).exists()):
        raise CoordinatorError(
            f"no coordinator database in {state_dir}: check --state-dir (or "
            "$MESHGATE_COORDINATOR_STATE), or make one with 'meshgate-coordinator init "
            f"--state-dir {state_dir}' (serve makes it too); to administer a coordinator "
            "elsewhere, pass --url")
    return StateDir(state_dir)


def local_ops(state: StateDir, store: Store) -> AdminOps:
    def tunnel_url() -> str | None:
        advertised = state.read_advertise()
        return advertised.tunnel_url if advertised else None

    return AdminOps(store, state.static_public, tunnel_url,
                    lambda: _live(state.path), journals=(state.path / JOURNAL_DIR,))


def _live(state_dir: Path) -> dict[str, dict[str, Any]] | None:
    """This server's live view, or every replica's merged (coordinator/cluster.py)."""
    from coordinator.cluster import cluster_live

    return cluster_live(state_dir, time.time())


def admin_key_for(state_dir: Path, key_file: Path | None, config: AdminConfig) -> str:
    from_env = os.environ.get(KEY_ENV, "").strip()
    if from_env:
        return from_env
    for path in (key_file, config.admin_key_file):
        if path is not None:
            return read_admin_key(path)
    local = state_dir / ADMIN_KEY_FILE
    if local.exists():
        return read_admin_key(local)
    raise CoordinatorError(f"no admin key for --url: set ${KEY_ENV}, pass --admin-key-file, "
                           "or name admin_key_file in the admin config")


@contextmanager
def open_admin(state_dir: Path, url: str | None, key_file: Path | None) -> Iterator[Admin]:
    """The admin API at `url` (or the config's), else the local database."""
    config = load_config()
    url = url or config.url
    if url:
        remote = RemoteAdmin(url, admin_key_for(state_dir, key_file, config))
        try:
            yield remote
        finally:
            remote.close()
        return
    state = existing_state(state_dir)
    store = Store(state.db_url)
    try:
        yield local_ops(state, store)
    finally:
        store.close()
