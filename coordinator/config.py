"""`coordinator.toml`: cloud upstreams, aliases, task routes and dispatch limits.

    [dispatch]                 # all optional
    max_tries = 3              # node attempts before cloud fallback
    node_slots = 4             # requests in flight per node before it counts as busy
    queue_size = 64            # requests waiting for a busy fleet; more is a 429
    deadline_s = 300           # whole request; past it a 504 (or an error event)
    first_token_timeout_s = 60 # no first token from a node: try the next candidate
    idle_timeout_s = 60        # a started stream silent this long ends with an error event

    [relay]                    # requests nodes send up for apps on their box (no API key)
    cloud = false              # may they reach paid cloud upstreams? (default: no)
    per_node = 8               # relayed requests one node may have running or starting
    queue_share = 0.5          # share of dispatch.queue_size relayed requests may fill

    [cluster]                  # several replicas (coordinator/CLUSTER.md); all optional
    database_url = "postgresql://meshgate@db/meshgate"   # or --database-url
    redis_url = "redis://cache:6379/0"                   # or --redis-url
    key_file = "/etc/meshgate/cluster.key"               # or --cluster-key

    [stream]                   # write pacing while the coordinator runs behind (write_tick.py)
    tick_ms = 50               # the longest a paced stream's tokens wait; 0: off
    tick_engage_ms = 2         # from this event-loop lag (smoothed) on
    tick_streams = 16          # and this many streams written at once

    [log]
    access = true              # a line per request answered, never flood-limited
                               # (--access-log / --no-access-log win over it)

    [aliases]
    fast-chat = ["smollm2", "gpt-4o-mini"]

    [routes]                   # task -> model names or aliases, best first
    summarize = ["fast-chat"]

    [[upstream]]
    name = "openai"
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"     # or api_key_file = "/etc/meshgate/openai.key"
    models = { smollm2 = "gpt-4o-mini" }   # public name -> upstream model
    price_per_1k_prompt = 0.00015
    price_per_1k_completion = 0.0006

An upstream's key is read once at start from the environment or a file and
is never printed: `Upstream.api_key` is left out of its repr. Any mistake in
the file is a `ConfigError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.errors import CoordinatorError
from coordinator.routing import RoutingConfig

DEFAULT_CONFIG_PATH = Path("/etc/meshgate/coordinator.toml")
CONFIG_ENV = "MESHGATE_COORDINATOR_CONFIG"


class ConfigError(CoordinatorError):
    """The coordinator config file is missing, unreadable or wrong; the message says where."""


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    api_key: str = field(repr=False)
    models: dict[str, str] = field(default_factory=dict)
    price_per_1k_prompt: float = 0.0
    price_per_1k_completion: float = 0.0
    timeout_s: float = 120.0
    context_length: int | None = None


@dataclass(frozen=True)
class DispatchConfig:
    max_tries: int = 3
    node_slots: int = 4
    queue_size: int = 64
    deadline_s: float = 300.0
    first_token_timeout_s: float = 60.0
    idle_timeout_s: float = 60.0


@dataclass(frozen=True)
class RelayConfig:
    """Requests nodes relay for the apps on their box: no API key vouches for them, so they
    get a quota per node, a share of the queue, and no paid cloud unless `cloud` is set."""

    cloud: bool = False
    per_node: int = 8
    queue_share: float = 0.5


@dataclass(frozen=True)
class StreamConfig:
    """Write pacing (coordinator/write_tick.py): while the loop runs `tick_engage_ms` late
    and `tick_streams` streams are written, a stream's writes within a tick wait for it."""

    tick_ms: float = 50.0
    tick_engage_ms: float = 2.0
    tick_streams: int = 16


#: The longest write tick an operator may set (a token held longer reads as a stall).
MAX_TICK_MS = 1000.0


@dataclass(frozen=True)
class ClusterConfig:
    database_url: str | None = None
    redis_url: str | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class CoordinatorConfig:
    upstreams: tuple[Upstream, ...] = ()
    aliases: dict[str, list[str]] = field(default_factory=dict)
    tasks: dict[str, list[str]] = field(default_factory=dict)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    path: Path | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    access_log: bool = True  # [log] access: one line per request answered (logs.py)

    def routing(self, models: frozenset[str] | None = None) -> RoutingConfig:
        return RoutingConfig(aliases=self.aliases, tasks=self.tasks, models=models)


def _names(where: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(
        isinstance(v, str) and v for v in value
    ):
        raise ConfigError(f"{where}: expected a model name or a non-empty list of names")
    return list(value)


def _number(where: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, not {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{where}: must be {'positive' if positive else 'zero or more'}")
    return float(value)


def _integer(where: str, value: Any, *, minimum: int = 0) -> int:
    """A TOML integer of `minimum` or more: 2.5 (or 2.0) is refused, never cut to 2."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected a whole number, not {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}: expected {minimum} or more, not {value!r}")
    return value


def _read_key(where: str, entry: dict[str, Any], base: Path) -> str:
    env, file = entry.get("api_key_env"), entry.get("api_key_file")
    if "api_key" in entry:
        raise ConfigError(f"{where}: put the key in api_key_env or api_key_file, not in the file")
    if (env is None) == (file is None):
        raise ConfigError(f"{where}: give exactly one of api_key_env or api_key_file")
    if env is not None:
        if not isinstance(env, str) or not env:
            raise ConfigError(f"{where}.api_key_env: expected an environment variable name")
        key = os.environ.get(env, "")
        if not key.strip():
            raise ConfigError(f"{where}: environment variable {env} is not set or empty")
        return key.strip()
    if not isinstance(file, str) or not file:
        raise ConfigError(f"{where}.api_key_file: expected a path")
    path = (base / file).expanduser()
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where}.api_key_file: cannot read {path}: {exc.strerror}") from None
    if not key:
        raise ConfigError(f"{where}.api_key_file: {path} is empty")
    return key


_UPSTREAM_KEYS = {"name", "base_url", "api_key_env", "api_key_file", "api_key", "models",
                  "price_per_1k_prompt", "price_per_1k_completion", "timeout_s", "context_length"}


def _upstream(i: int, entry: Any, base: Path) -> Upstream:
    where = f"upstream[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(entry) - _UPSTREAM_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    name, base_url = entry.get("name"), entry.get("base_url")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: required")
    where = f"upstream {name!r}"
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.base_url: expected an http:// or https:// URL")
    models = entry.get("models")
    if not isinstance(models, dict) or not models or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in models.items()
    ):
        raise ConfigError(f"{where}.models: expected a table of public name = upstream model")
    context = entry.get("context_length")
    if context is not None and (not isinstance(context, int) or context <= 0):
        raise ConfigError(f"{where}.context_length: expected a positive integer")
    return Upstream(
        name=name,
        base_url=base_url.rstrip("/"),
        api_key=_read_key(where, entry, base),
        models=dict(models),
        price_per_1k_prompt=_number(f"{where}.price_per_1k_prompt",
                                    entry.get("price_per_1k_prompt", 0.0)),
        price_per_1k_completion=_number(f"{where}.price_per_1k_completion",
                                        entry.get("price_per_1k_completion", 0.0)),
        timeout_s=_number(f"{where}.timeout_s", entry.get("timeout_s", 120.0), positive=True),
        context_length=context,
    )


def _dispatch(value: Any) -> DispatchConfig:
    if value is None:
        return DispatchConfig()
    if not isinstance(value, dict):
        raise ConfigError("dispatch: expected a table")
    defaults = DispatchConfig()
    out: dict[str, Any] = {}
    for key, raw in value.items():
        if not hasattr(defaults, key):
            raise ConfigError(f"dispatch: unknown key {key!r}")
        out[key] = (_integer(f"dispatch.{key}", raw, minimum=0 if key == "queue_size" else 1)
                    if isinstance(getattr(defaults, key), int)
                    else _number(f"dispatch.{key}", raw, positive=True))
    return DispatchConfig(**out)


def _relay(value: Any) -> RelayConfig:
    if value is None:
        return RelayConfig()
    if not isinstance(value, dict):
        raise ConfigError("relay: expected a table")
    unknown = sorted(set(value) - {"cloud", "per_node", "queue_share"})
    if unknown:
        raise ConfigError(f"relay: unknown key {unknown[0]!r}")
    cloud = value.get("cloud", False)
    if not isinstance(cloud, bool):
        raise ConfigError("relay.cloud: expected true or false")
    per_node = _integer("relay.per_node", value.get("per_node", 8), minimum=1)
    share = _number("relay.queue_share", value.get("queue_share", 0.5), positive=True)
    if share > 1:
        raise ConfigError("relay.queue_share: expected a share between 0 and 1")
    return RelayConfig(cloud, per_node, share)


def _stream(value: Any) -> StreamConfig:
    if value is None:
        return StreamConfig()
    if not isinstance(value, dict):
        raise ConfigError("stream: expected a table")
    defaults = StreamConfig()
    out: dict[str, Any] = {}
    for key, raw in value.items():
        if not hasattr(defaults, key):
            raise ConfigError(f"stream: unknown key {key!r}")
        if key == "tick_streams":
            out[key] = _integer("stream.tick_streams", raw, minimum=1)
            continue
        number = _number(f"stream.{key}", raw)
        if key == "tick_ms" and number > MAX_TICK_MS:
            raise ConfigError(f"stream.tick_ms: at most {MAX_TICK_MS:g} (a token held longer "
                              f"reads as a stall), not {raw!r}")
        out[key] = number
    return StreamConfig(**out)


def _cluster(value: Any, base: Path) -> ClusterConfig:
    if value is None:
        return ClusterConfig()
    if not isinstance(value, dict):
        raise ConfigError("cluster: expected a table")
    unknown = sorted(set(value) - {"database_url", "redis_url", "key_file"})
    if unknown:
        raise ConfigError(f"cluster: unknown key {unknown[0]!r}")
    for name, raw in value.items():
        if not isinstance(raw, str) or not raw:
            raise ConfigError(f"cluster.{name}: expected a string")
    key_file = value.get("key_file")
    return ClusterConfig(value.get("database_url"), value.get("redis_url"),
                         (base / key_file).expanduser() if key_file else None)


def parse_config(data: dict[str, Any], *, base: Path = Path(".")) -> CoordinatorConfig:
    unknown = sorted(set(data) - {"upstream", "aliases", "routes", "dispatch", "cluster",
                                  "relay", "stream", "log"})
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} (known: upstream, aliases, routes, "
                          "dispatch, cluster, relay, stream, log)")
    raw_upstreams = data.get("upstream", [])
    if not isinstance(raw_upstreams, list):
        raise ConfigError("upstream: write each one as [[upstream]]")
    upstreams = tuple(_upstream(i, e, base) for i, e in enumerate(raw_upstreams))
    names = [u.name for u in upstreams]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"upstream {dupes[0]!r} is defined twice")
    tables: dict[str, dict[str, list[str]]] = {}
    for section in ("aliases", "routes"):
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table")
        tables[section] = {k: _names(f"{section}.{k}", v) for k, v in table.items()}
    return CoordinatorConfig(
        upstreams=upstreams,
        aliases=tables["aliases"],
        tasks=tables["routes"],
        dispatch=_dispatch(data.get("dispatch")),
        cluster=_cluster(data.get("cluster"), base),
        relay=_relay(data.get("relay")),
        stream=_stream(data.get("stream")),
        access_log=_access_log(data.get("log")),
    )


def _access_log(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict):
        raise ConfigError("log: expected a table")
    unknown = sorted(set(value) - {"access"})
    if unknown:
        raise ConfigError(f"log: unknown key {unknown[0]!r}")
    access = value.get("access", True)
    if not isinstance(access, bool):
        raise ConfigError("log.access: expected true or false")
    return access


def load_config(path: Path) -> CoordinatorConfig:
    """Read and check `path`; every problem is a ConfigError naming the file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    try:
        config = parse_config(data, base=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"config {path}: {exc}") from None
    return dataclasses.replace(config, path=path)


def resolve_config(path: Path | None) -> CoordinatorConfig:
    """The config from `path`, else the default file if it exists, else no config."""
    if path is not None:
        return load_config(path)
    if DEFAULT_CONFIG_PATH.is_file():
        return load_config(DEFAULT_CONFIG_PATH)
    return CoordinatorConfig()
