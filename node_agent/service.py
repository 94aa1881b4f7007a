"""`meshgate-node install-service`: the systemd unit, the config dir, the user, enable.

:func:`render_unit` is pure (template text in, unit text out); :func:`install`
does the steps and returns what it did, one line each. Steps that need a
running systemd (``systemctl daemon-reload``, ``enable --now``) or that change
the system's users are printed instead of run when systemd is not PID 1 (a
container, a chroot) or with ``dry_run``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from node_agent.config import example_config

UNIT_NAME = "meshgate-node.service"
#: Shipped inside the package (systemd/meshgate-node.service in the repository links here).
TEMPLATE = Path(__file__).resolve().parent / "data" / UNIT_NAME
STATE_DIR = "/var/lib/meshgate/node"


class ServiceError(RuntimeError):
    pass


def node_command() -> list[str]:
    """This install's meshgate-node: the script beside this Python, else ``python -m``."""
    script = Path(sys.executable).parent / "meshgate-node"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("meshgate-node")
    if found:
        return [found]
    return [sys.executable, "-m", "node_agent.cli"]


def render_unit(template: str, *, command: list[str], user: str, config: Path) -> str:
    """The unit with ExecStart, User/Group and the config path filled in."""
    if not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", user):
        raise ServiceError(f"bad user name {user!r}")
    exec_start = " ".join(_quote(c) for c in [*command, "run", "--config", str(config)])
    out = []
    for line in template.splitlines():
        key, sep, _ = line.partition("=")
        if sep and key == "ExecStart":
            out.append(f"ExecStart={exec_start}")
        elif sep and key in ("User", "Group"):
            out.append(f"{key}={user}")
        elif line.startswith("Environment=MESHGATE_CONFIG="):
            out.append(f"Environment=MESHGATE_CONFIG={config}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def _quote(arg: str) -> str:
    return f'"{arg}"' if re.search(r"\s", arg) else arg


def systemd_running() -> bool:
    """True when systemd is PID 1 (the test sd_booted() uses)."""
    return Path("/run/systemd/system").is_dir()


def install(
    *,
    user: str = "meshgate",
    config: Path = Path("/etc/meshgate/node.toml"),
    unit_dir: Path = Path("/etc/systemd/system"),
    dry_run: bool = False,
    template: Path = TEMPLATE,
    run: Callable[[list[str]], None] | None = None,
) -> Iterator[str]:
    """Do (or with `dry_run` only describe) each step; yields one line per step."""
    try:
        text = template.read_text()
    except OSError as exc:
        raise ServiceError(f"cannot read the unit template {template}: {exc}") from None
    unit = render_unit(text, command=node_command(), user=user, config=config)
    unit_path = unit_dir / UNIT_NAME
    live = systemd_running() and not dry_run
    run = run or _run

    if dry_run:
        yield f"would write {unit_path}:"
        yield unit.rstrip("\n")
    else:
        _write(unit_path, unit, 0o644)
        yield f"wrote {unit_path}"

    if config.exists():
        yield f"kept the existing config {config}"
    elif dry_run:
        yield f"would write an example config to {config}"
    else:
        _write(config, example_config(), 0o644)
        yield f"wrote an example config to {config}"

    commands: list[list[str]] = []
    if not _user_exists(user):
        commands.append(
            [
                "useradd",
                "--system",
                "--home-dir",
                "/var/lib/meshgate",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                user,
            ]
        )
    commands += [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", UNIT_NAME]]
    for cmd in commands:
        if live:
            run(cmd)
            yield "ran: " + " ".join(cmd)
        else:
            yield "would run: " + " ".join(cmd)
    if not live and not dry_run:
        yield "systemd is not running here: run the commands above on the target host"
    yield (
        f"then enroll as {user} and restart: sudo -u {user} {' '.join(node_command())} "
        f"enroll TOKEN --state-dir {STATE_DIR} && systemctl restart {UNIT_NAME}"
    )


def _user_exists(user: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _write(path: Path, text: str, mode: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(path)
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc} (run as root, or use --dry-run)") from None


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if result.returncode != 0:
        raise ServiceError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
