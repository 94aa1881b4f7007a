"""`meshgate-node join TOKEN`: one command from a fresh box to a node in the fleet.

It does what `enroll`, a hand-written config and `install-service` did as
three steps: enroll into the state dir, write the config (state dir, models,
model dirs) the service runs with, install the systemd unit, give the state
dir to the service's user and start it. Where systemd is not running (a
container, a chroot) the commands are printed for the host instead. Each
step yields one line; :class:`JoinError` is one line naming the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from node_agent.config import option_names
from node_agent.models import parse_model_spec
from node_agent.service import UNIT_NAME, ServiceError, install, systemd_running

__all__ = ["JoinError", "join_config", "join_steps"]


class JoinError(RuntimeError):
    pass


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def join_config(state_dir: Path, models: Sequence[str], model_dirs: Sequence[Path]) -> str:
    """The node.toml a joined node runs with (pure)."""
    assert {"state_dir", "models", "model_dirs"} <= set(option_names())
    lines = [
        "# written by `meshgate-node join`; every other option is at its default",
        "# (see `meshgate-node install-service --dry-run` for the full list).",
        f"state_dir = {_toml_str(str(state_dir))}",
        "models = [" + ", ".join(_toml_str(m) for m in models) + "]",
        "model_dirs = [" + ", ".join(_toml_str(str(d)) for d in model_dirs) + "]",
    ]
    return "\n".join(lines) + "\n"


def check_models(models: Sequence[str], model_dirs: Sequence[Path]) -> None:
    for spec in models:
        try:
            _, path = parse_model_spec(spec)
        except ValueError as exc:
            raise JoinError(f"--model {spec}: {exc}") from None
        if not path.is_file():
            raise JoinError(f"--model {spec}: no such file {path}: fix the path")
    for d in model_dirs:
        if not d.is_dir():
            raise JoinError(f"--model-dir {d} is not a directory: create it or fix the path")


def join_steps(
    *,
    enroll: Callable[[], str],
    enrolled: str | None,
    state_dir: Path,
    config: Path,
    models: Sequence[str],
    model_dirs: Sequence[Path],
    user: str,
    unit_dir: Path,
    service: bool,
    run: Callable[[list[str]], None],
) -> Iterator[str]:
    """Enroll (unless `enrolled` names the did already enrolled), write `config`, install and
    start the service; one line per step."""
    check_models(models, model_dirs)
    yield f"already enrolled as {enrolled}: kept" if enrolled else enroll()
    if config.exists():
        raise JoinError(f"{config} exists: edit it (models, model_dirs) or remove it, then "
                        "join again, or pass --config with another path")
    try:
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(join_config(state_dir, models, model_dirs))
    except OSError as exc:
        raise JoinError(f"cannot write {config}: {exc} (run as root, or pass --config)") from None
    yield f"wrote {config}"
    if not service:
        yield f"start it with: meshgate-node run --config {config}"
        return
    try:
        for line in install(user=user, config=config, unit_dir=unit_dir, run=run):
            if not line.startswith(("then enroll", "systemd is not running")):
                yield line
    except ServiceError as exc:
        raise JoinError(str(exc)) from None
    after = [["chown", "-R", f"{user}:{user}", str(state_dir)],
             ["systemctl", "restart", UNIT_NAME]]
    live = systemd_running()
    for cmd in after:
        if live:
            run(cmd)
            yield "ran: " + " ".join(cmd)
        else:
            yield "would run: " + " ".join(cmd)
    if not live:
        yield "systemd is not running here: run the commands above on the target host"
