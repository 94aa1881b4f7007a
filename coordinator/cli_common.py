"""What every `meshgate-coordinator` command shares: options, parsing, tables, errors."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import typer

STATE_DIR = typer.Option(
    Path("/var/lib/meshgate/coordinator"), "--state-dir", envvar="MESHGATE_COORDINATOR_STATE",
    help="Where the coordinator keeps its key, database and advertised addresses.",
)
URL = typer.Option(
    None, "--url", envvar="MESHGATE_COORDINATOR_URL",
    help="Administer a coordinator over its admin API (http(s)://host:8470) instead of the "
    "database in --state-dir; also read from the admin config file.",
)
ADMIN_KEY_FILE = typer.Option(
    None, "--admin-key-file", envvar="MESHGATE_ADMIN_KEY_FILE",
    help="File holding the admin key for --url ($MESHGATE_ADMIN_KEY holds the key itself).",
)
JSON_OUT = typer.Option(False, "--json", help="One JSON document on stdout.")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def parse_duration(text: str) -> int:
    """`30s`, `15m`, `1h`, `7d` (a bare number is seconds) -> seconds; ValueError if not."""
    match = _DURATION.match(text)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"bad duration {text!r}: use a positive number with s, m, h or d, "
                         "such as 30s, 15m, 1h or 7d")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def parse_labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or any(c.isspace() for c in key.strip()):
            raise ValueError(f"bad label {pair!r}: write it as key=value, such as site=lab-1")
        labels[key.strip()] = value.strip()
    return labels


def parse_since(text: str, now: float) -> float:
    """An ISO date or time (UTC unless it says otherwise), or a duration back from now."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"bad --since {text!r}: give an ISO time (2025-01-31T12:00Z) "
                         "or a duration back from now (1h, 7d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        typer.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    seconds = max(0, int(now - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"
