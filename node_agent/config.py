"""The node's settings: defaults < config file < environment < command line.

The config file is TOML (``/etc/meshgate/node.toml`` by default, or
``--config PATH`` / ``MESHGATE_CONFIG``) with one top-level key per option of
``meshgate-node run`` (``state_dir``, ``proxy_port``, ``models``,
``model_dirs``, ...; ``proxy-port`` is accepted for ``proxy_port``). Every
option also reads ``MESHGATE_<OPTION>`` from the environment (lists as
comma-separated values, booleans as 1/0, true/false, yes/no). The option
names, types and defaults are the fields of :class:`NodeOptions`, so a field
added there is a config key and an environment variable at once.

A bad config is refused with a :class:`ConfigError` that names the file, the
key and, where the file says it, the line: an unknown key, a value of the
wrong type, or TOML that does not parse.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/meshgate/node.toml")
ENV_PREFIX = "MESHGATE_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

#: Older environment names still honoured, option -> variable.
ENV_ALIASES: dict[str, str] = {"state_dir": "MESHGATE_NODE_STATE"}


@dataclass(frozen=True)
class NodeOptions:
    """Everything `meshgate-node run` can be told; the field names are the config keys."""

    state_dir: Path = Path("/var/lib/meshgate/node")
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 11438
    models: tuple[str, ...] = ()
    model_dirs: tuple[Path, ...] = ()
    upstreams: tuple[str, ...] = ()
    ollama: str | None = None
    ollama_period: float = 30.0
    n_ctx: int = 2048
    n_gpu_layers: int | None = None  # None: placement fits the layers to free VRAM
    keep_alive: float | None = None  # seconds an idle model stays loaded; None: for ever
    telemetry_period: float = 2.0
    inventory_period: float = 5.0
    coordinator_url: str | None = None
    connect: bool = True
    log_level: str = "info"
    log_format: str = "text"  # or "json": one JSON object a line (meshgate/logs.py)
    access_log: bool = True  # a line per request answered on the local port, never flood-limited
    electricity_price_per_kwh: float | None = None  # money per kWh: energy_cost in the ledger
    energy_period: float = 1.0  # seconds between energy readings besides each request's ends
    powercap_dir: Path = Path("/sys/class/powercap")  # RAPL counters for CPU energy
    journal_max_bytes: int = 64 * 2**20  # usage served offline, kept until uploaded
    # read pacing while the node runs behind (node_agent/runtimes/read_tick.py): once its
    # event loop runs stream_tick_engage_ms late (smoothed), with at least
    # stream_tick_streams streams read at once, a stream's upstream reads that come within
    # one tick of its last leave together at a shared tick (the lateness, 2 ms to
    # stream_tick_ms); stream_tick_ms 0 turns it off
    stream_tick_ms: float = 50.0
    stream_tick_engage_ms: float = 2.0
    stream_tick_streams: int = 16
    extra: dict[str, str] = field(default_factory=dict)


#: The longest read tick an operator may set (a token held longer reads as a stall).
MAX_TICK_MS = 1000.0

#: Fields that are not settings (filled in by code, not by an operator).
_INTERNAL = frozenset({"extra"})


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, key and line."""


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(NodeOptions) if f.name not in _INTERNAL]


def env_name(option: str) -> str:
    return ENV_PREFIX + option.upper()


def _types() -> dict[str, Any]:
    hints = typing.get_type_hints(NodeOptions)
    return {name: hints[name] for name in option_names()}


def _base(tp: Any) -> tuple[Any, bool, bool]:
    """(element type, is a tuple, may be None) of an option's type."""
    optional = False
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        optional = type(None) in args
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        return args[0], True, optional
    return tp, False, optional


def _type_name(tp: Any) -> str:
    base, many, optional = _base(tp)
    name = {
        Path: "a path",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
    }[base]
    if many:
        name = f"a list of {name.removeprefix('a ').removeprefix('an ')}s"
    return f"{name} (or nothing)" if optional else name


def _scalar(base: Any, value: Any) -> Any:
    """A TOML value as `base`, or raise TypeError."""
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    elif base is Path and isinstance(value, str):
        return Path(value).expanduser()
    raise TypeError


def coerce(option: str, value: Any) -> Any:
    """A TOML (or already parsed) value for `option`, or TypeError."""
    base, many, optional = _base(_types()[option])
    if optional and (value is None or value == ""):
        return None
    if many:
        if isinstance(value, str | Path):
            value = [value]
        if not isinstance(value, list | tuple):
            raise TypeError
        return tuple(_scalar(base, str(v) if isinstance(v, Path) else v) for v in value)
    return _scalar(base, str(value) if isinstance(value, Path) else value)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_env_value(option: str, text: str) -> Any:
    """One environment variable's text for `option`, or TypeError."""
    base, many, optional = _base(_types()[option])
    if optional and text == "":
        return None
    if many:
        return tuple(_scalar_text(base, part.strip()) for part in text.split(",") if part.strip())
    return _scalar_text(base, text.strip())


def _scalar_text(base: Any, text: str) -> Any:
    if base is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise TypeError
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise TypeError from None
    if base is float:
        try:
            return float(text)
        except ValueError:
            raise TypeError from None
    if base is Path:
        return Path(text).expanduser()
    return text


def _line_of(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^[ \t]*[\"']?{re.escape(key)}[\"']?\s*=", re.MULTILINE)
    match = pattern.search(text)
    return text.count("\n", 0, match.start()) + 1 if match else None


def _where(path: Path, text: str, key: str) -> str:
    line = _line_of(text, key)
    return f"{path}, line {line}" if line else str(path)


def read_config_file(path: Path) -> dict[str, Any]:
    """The options a TOML file sets, checked and converted; ConfigError if it is bad."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    known = set(option_names())
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        where = _where(path, text, raw_key)
        if key not in known:
            hint = _suggest(key, known)
            raise ConfigError(f"{where}: unknown key {raw_key!r}{hint}")
        try:
            out[key] = coerce(key, value)
        except TypeError:
            want = _type_name(_types()[key])
            raise ConfigError(
                f"{where}: {raw_key} must be {want}, not {type(value).__name__} {value!r}"
            ) from None
    return out


def _suggest(key: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(known), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f"; known keys: {', '.join(sorted(known))}"


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The options set by MESHGATE_* variables; ConfigError names a bad one."""
    out: dict[str, Any] = {}
    for option in option_names():
        names = [env_name(option)]
        if option in ENV_ALIASES:
            names.append(ENV_ALIASES[option])
        for name in names:
            if name in env:
                try:
                    out[option] = parse_env_value(option, env[name])
                except TypeError:
                    want = _type_name(_types()[option])
                    raise ConfigError(
                        f"environment variable {name}={env[name]!r}: must be {want}"
                    ) from None
                break
    return out


def config_path(cli_path: Path | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """(the config file to read, whether it was asked for explicitly)."""
    if cli_path is not None:
        return cli_path, True
    if env.get("MESHGATE_CONFIG"):
        return Path(env["MESHGATE_CONFIG"]), True
    return DEFAULT_CONFIG, False


def load_options(
    cli: Mapping[str, Any],
    *,
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> NodeOptions:
    """Merge defaults < file < environment < `cli` (entries that are None are not given).

    The default file is read only if it exists; a file named by ``--config`` or
    ``MESHGATE_CONFIG`` must exist.
    """
    env = os.environ if env is None else env
    path, explicit = config_path(config, env)
    merged: dict[str, Any] = {}
    if explicit or path.exists():
        merged.update(read_config_file(path))
    merged.update(read_env(env))
    known = set(option_names())
    for key, value in cli.items():
        if key not in known:
            raise ConfigError(f"unknown option {key!r}")
        if value is None or (isinstance(value, list | tuple) and not value):
            continue  # not given (typer gives [] for a repeatable option not used)
        try:
            merged[key] = coerce(key, value)
        except TypeError:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag}: must be {_type_name(_types()[key])}") from None
    opts = NodeOptions(**merged)
    validate(opts, source=str(path) if (explicit or path.exists()) else "the options")
    return opts


def validate(opts: NodeOptions, source: str = "the options") -> None:
    """Values of the right type but out of range."""
    if not 0 <= opts.proxy_port <= 65535:
        raise ConfigError(f"{source}: proxy_port {opts.proxy_port} is not a TCP port")
    if opts.telemetry_period <= 0:
        raise ConfigError(f"{source}: telemetry_period must be > 0 seconds")
    if opts.inventory_period <= 0:
        raise ConfigError(f"{source}: inventory_period must be > 0 seconds")
    if opts.n_ctx <= 0:
        raise ConfigError(f"{source}: n_ctx must be > 0")
    if opts.keep_alive is not None and opts.keep_alive <= 0:
        raise ConfigError(f"{source}: keep_alive must be > 0 seconds (leave it out: for ever)")
    if opts.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(
            f"{source}: log_level {opts.log_level!r} is not one of {', '.join(LOG_LEVELS)}"
        )
    if opts.log_format not in ("json", "text"):
        raise ConfigError(f"{source}: log_format {opts.log_format!r} must be json or text")
    if opts.ollama is not None and not opts.ollama.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: ollama {opts.ollama!r} must be http://HOST:PORT")
    _validate_tick(opts, source)
    if opts.ollama_period <= 0:
        raise ConfigError(f"{source}: ollama_period must be > 0 seconds")
    for spec in opts.upstreams:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{source}: upstream {spec!r} must be NAME=http://HOST:PORT/v1")


def _validate_tick(opts: NodeOptions, source: str) -> None:
    if not 0 <= opts.stream_tick_ms <= MAX_TICK_MS:
        raise ConfigError(f"{source}: stream_tick_ms must be 0 (off) to {MAX_TICK_MS:g} ms, "
                          f"not {opts.stream_tick_ms:g}")
    if opts.stream_tick_engage_ms < 0:
        raise ConfigError(f"{source}: stream_tick_engage_ms must be >= 0 ms, "
                          f"not {opts.stream_tick_engage_ms:g}")
    if opts.stream_tick_streams < 1:
        raise ConfigError(f"{source}: stream_tick_streams must be >= 1")


def example_config() -> str:
    """A commented config file with every option at its default."""
    defaults = NodeOptions()
    lines = [
        "# meshgate-node configuration (TOML). Precedence: command line > MESHGATE_* env > here.",
        "# Every key is optional; the values shown are the defaults.",
        "",
    ]
    for option in option_names():
        value = getattr(defaults, option)
        lines.append(f"# {option} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if value is None:
        return '""  # unset'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
