"""The coordinator's state directory: its static key, its database, what it advertises.

Layout (the directory is 0700, secrets 0600 from the moment they exist):

    coordinator_static.key   raw 32-byte X25519 private key of the tunnel endpoint
    coordinator.db           the SQLite store (unless a database URL is given)
    advertise.json           {"tunnel_url": ..., "api_url": ...}, written by `serve`

`serve` writes advertise.json at start so that `token create`, run by an admin
on the same box, knows which tunnel address to put in a token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from coordinator.engines import resolve_engines
from coordinator.errors import StateError

STATIC_KEY_FILE = "coordinator_static.key"
DB_FILE = "coordinator.db"
ADVERTISE_FILE = "advertise.json"
KEY_LEN = 32


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Everything `meshgate-coordinator serve` was told, parsed once and passed down."""

    state_dir: Path
    api_host: str
    api_port: int
    tunnel_host: str
    tunnel_port: int
    advertise_url: str | None
    log_level: str
    config: Path | None = None  # coordinator.toml; None: the default path if it exists
    cache: bool = False  # answer repeated deterministic requests from memory (cache.py)
    cache_ttl_s: float = 300.0
    cache_entries: int = 1024
    log_format: str = "json"  # json (one object a line, with request_id) or text
    access_log: bool | None = None  # a line per request answered; None: the config's [log]
    database_url: str | None = None  # None: $MESHGATE_COORDINATOR_DB_URL, else SQLite here
    redis_url: str | None = None  # shared fast state (cluster.py); None: in this process
    static_key_file: Path | None = None  # the cluster's shared key; None: the state dir's


@dataclass(frozen=True, slots=True)
class Advertise:
    tunnel_url: str
    api_url: str


class StateDir:
    """One coordinator's state directory; created (0700) if it does not exist."""

    def __init__(self, path: Path | str, *, db_url: str | None = None) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.path}: {exc}") from None
        self._db_url = db_url

    @property
    def db_url(self) -> str:
        """The option, else $MESHGATE_COORDINATOR_DB_URL, else the database `serve` last
        used here (engines.json), else the SQLite file in this dir."""
        if self._db_url:
            return self._db_url
        chosen = resolve_engines(self.path).database_url
        if chosen:
            return chosen
        return f"sqlite:///{(self.path / DB_FILE).resolve()}"

    def static_key(self, shared: Path | None = None) -> X25519PrivateKey:
        """Load the tunnel endpoint's static key, creating it on first use.

        The key is written whole to a private temporary file, then linked into
        place, so a second process never reads a half-written key and two
        first starts agree on one key.
        """
        if shared is None and (saved := resolve_engines(self.path).cluster_key):
            shared = Path(saved)  # the key `serve` was given (engines.json)
        if shared is not None:  # a cluster's replicas share one key; never made here
            if not shared.is_file():
                raise StateError(f"the cluster key file {shared} does not exist; copy the "
                                 f"first replica's {STATIC_KEY_FILE} there")
            return self._load_key(shared)
        key_path = self.path / STATIC_KEY_FILE
        if key_path.exists():
            return self._load_key(key_path)
        key = X25519PrivateKey.generate()
        tmp = key_path.with_name(f"{STATIC_KEY_FILE}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)  # left by a crashed start with our pid
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(key.private_bytes_raw())
                out.flush()
                os.fsync(out.fileno())
            os.link(tmp, key_path)
        except FileExistsError:
            return self._load_key(key_path)
        finally:
            tmp.unlink(missing_ok=True)
        return key

    def static_public(self) -> bytes:
        return self.static_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def read_advertise(self) -> Advertise | None:
        """What the running (or last) server advertised; None if it never started here."""
        path = self.path / ADVERTISE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"{path} is unreadable ({exc}); restart the coordinator") from None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str) for k in ("tunnel_url", "api_url")
        ):
            raise StateError(f"{path} lacks tunnel_url or api_url; restart the coordinator")
        return Advertise(tunnel_url=data["tunnel_url"], api_url=data["api_url"])

    def write_advertise(self, *, tunnel_url: str, api_url: str) -> None:
        path = self.path / ADVERTISE_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"tunnel_url": tunnel_url, "api_url": api_url}) + "\n")
        tmp.replace(path)

    @staticmethod
    def _load_key(path: Path) -> X25519PrivateKey:
        raw = path.read_bytes()
        if len(raw) != KEY_LEN:
            raise StateError(
                f"{path} holds {len(raw)} bytes, not a {KEY_LEN}-byte X25519 key; "
                "restore it from a backup (enrolled nodes pin this key)"
            )
        return X25519PrivateKey.from_private_bytes(raw)
