"""`meshgate-node`: enroll this box, run the daemon, ask it how it is."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import typer

from meshgate.version import version_callback
from node_agent.state import Enrollment, NodeState

app = typer.Typer(
    rich_markup_mode=None,  # click's plain help: rich's panels label every flag <bool>
    pretty_exceptions_enable=False,  # rich and pygments cost the idle daemon ~10 MB
    help="meshgate edge-node daemon", no_args_is_help=True, add_completion=False)


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=version_callback("meshgate-node"), is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """meshgate edge-node daemon"""

STATE_DIR = typer.Option(
    None,
    "--state-dir",
    envvar="MESHGATE_NODE_STATE",
    help="Where the node keeps its identity and enrollment "
    "(default: state_dir from the config, else /var/lib/meshgate/node).",
)


CONFIG = typer.Option(
    None,
    "--config",
    help="TOML config file (default /etc/meshgate/node.toml if it exists; env MESHGATE_CONFIG).",
)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _read_token(token: str | None, token_file: Path | None) -> str:
    """The enrollment token from the argument, a file, or stdin (`-`)."""
    if (token is None) == (token_file is None):
        raise _fail("give the token as an argument, or --token-file PATH (`-` for stdin)", 2)
    source = str(token_file) if token_file is not None else token
    if source == "-":
        text = sys.stdin.read()
    elif token_file is not None:
        try:
            text = token_file.read_text()
        except OSError as exc:
            raise _fail(f"cannot read the token file {token_file}: {exc.strerror or exc}",
                        2) from None
    else:
        text = token or ""
    text = text.strip()
    if not text:
        raise _fail("the enrollment token is empty", 2)
    return text


@app.command()
def enroll(
    token: str | None = typer.Argument(
        None, help="The token printed by `meshgate-coordinator token create`; `-` reads it "
        "from stdin. On the command line it is visible to other local users (`ps`): prefer "
        "--token-file or stdin.",
    ),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="Read the token from this file (`-`: stdin).",
    ),
    state_dir: Path | None = STATE_DIR,
    config: Path | None = CONFIG,
) -> None:
    """Create this node's identity, prove the one-time token and pin the coordinator's key."""
    from tunnel import EnrollmentToken, RefusedError, TunnelError, connect

    try:
        parsed = EnrollmentToken.decode(_read_token(token, token_file))
    except TunnelError as exc:
        raise _fail(str(exc), 2) from None
    if parsed.expires_at < time.time():
        raise _fail("this enrollment token has expired; ask for a new one", 2)
    state = NodeState(_state_dir(state_dir, config))
    if state.enrollment() is not None:
        raise _fail(f"already enrolled (see {state.path}); remove the state dir to enroll again")
    identity = state.identity()

    async def prove() -> dict[str, object]:
        link = await connect(
            parsed.url,
            identity,
            parsed.coordinator_key,
            enroll=(parsed.token_id, parsed.secret),
        )
        accept = dict(link.accept or {})
        await link.close()
        return accept

    try:
        accept = asyncio.run(prove())
    except RefusedError as exc:
        raise _fail(f"the coordinator refused enrollment: {exc.reason}") from None
    except (TunnelError, OSError) as exc:
        raise _fail(f"could not reach the coordinator at {parsed.url}: {exc}") from None
    labels = accept.get("labels")
    state.save_enrollment(
        Enrollment(
            url=parsed.url,
            coordinator_key=parsed.coordinator_key,
            did=identity.did,
            labels=dict(labels) if isinstance(labels, dict) else {},
            enrolled_at=time.time(),
        )
    )
    typer.echo(f"enrolled as {identity.did} with {parsed.url}")


@app.command()
def run(
    config: Path | None = CONFIG,
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="Where the node keeps its identity and enrollment."
    ),
    proxy_host: str | None = typer.Option(None, help="Local proxy address (default: 127.0.0.1)."),
    proxy_port: int | None = typer.Option(None, help="Local proxy port (default: 11438)."),
    model: list[str] = typer.Option([], "--model", help="NAME=PATH.gguf, repeatable."),
    model_dir: list[Path] = typer.Option([], "--model-dir", help="Serve every .gguf below DIR."),
    upstream: list[str] = typer.Option(
        [],
        "--upstream",
        help="NAME=http://127.0.0.1:PORT/v1: an OpenAI-compatible server on this box.",
    ),
    ollama: str | None = typer.Option(
        None,
        help="http://127.0.0.1:11434: serve this Ollama server's models under Ollama's names.",
    ),
    ollama_period: float | None = typer.Option(
        None, help="Seconds between looks at the Ollama server's models (default: 30)."
    ),
    n_ctx: int | None = typer.Option(
        None, help="Context length for llama.cpp runners (default: 2048)."
    ),
    n_gpu_layers: int | None = typer.Option(
        None, help="Layers to offload to the GPU (-1: all) (default: fit to free VRAM)."
    ),
    keep_alive: float | None = typer.Option(
        None, help="Seconds an idle model stays loaded before it is unloaded (default: for ever)."
    ),
    telemetry_period: float | None = typer.Option(
        None, help="Seconds between telemetry samples (default: 2)."
    ),
    inventory_period: float | None = typer.Option(
        None, help="Seconds between checks of the model dirs for changes (default: 5)."
    ),
    coordinator_url: str | None = typer.Option(
        None, help="Connect here instead of the URL pinned at enrollment."
    ),
    connect: bool | None = typer.Option(
        None, "--connect/--no-connect", help="Connect to the coordinator if enrolled (default)."
    ),
    log_level: str | None = typer.Option(
        None, help="critical, error, warning, info (default) or debug."
    ),
    log_format: str | None = typer.Option(
        None, help="text (default) or json: one JSON object a line, for log collectors."
    ),
    access_log: bool | None = typer.Option(
        None, "--access-log/--no-access-log",
        help="A log line per request answered on the local port, never dropped under load "
        "(default: on).", show_default=False,
    ),
) -> None:
    """Run the node daemon: model runners, the local proxy and the coordinator link.

    Every option can also come from the config file or a MESHGATE_<OPTION>
    environment variable; the command line wins over the environment, which
    wins over the file.
    """
    from node_agent.config import ConfigError, load_options
    from node_agent.daemon import run_node

    given: dict[str, object] = {
        "state_dir": state_dir,
        "proxy_host": proxy_host,
        "proxy_port": proxy_port,
        "models": model,
        "model_dirs": model_dir,
        "upstreams": upstream,
        "ollama": ollama,
        "ollama_period": ollama_period,
        "n_ctx": n_ctx,
        "n_gpu_layers": n_gpu_layers,
        "keep_alive": keep_alive,
        "telemetry_period": telemetry_period,
        "inventory_period": inventory_period,
        "coordinator_url": coordinator_url,
        "connect": connect,
        "log_level": log_level,
        "log_format": log_format,
        "access_log": access_log,
    }
    try:
        opts = load_options(given, config=config)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    from meshgate.startup import StartupError

    try:
        run_node(opts)
    except StartupError as exc:
        raise _fail(str(exc)) from None


def _state_dir(state_dir: Path | None, config: Path | None) -> Path:
    """`--state-dir`, else the one `meshgate-node run` would use (config file, env, default)."""
    if state_dir is not None:
        return state_dir
    from node_agent.config import ConfigError, load_options

    try:
        return load_options({}, config=config).state_dir
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


def _local_url(url: str | None, config: Path | None, state_dir: Path | None = None) -> str:
    """The running daemon's local proxy: `url`; else the one the daemon of the state dir
    (`--state-dir`, else the config's) announced in its daemon.json; else where the
    config says it listens."""
    if url is not None:
        return url
    from node_agent.config import ConfigError, load_options
    from node_agent.local_daemon import local_url_of

    try:
        opts = load_options({"state_dir": state_dir}, config=config)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    announced = local_url_of(opts.state_dir)
    if announced is not None:
        return announced
    host = "127.0.0.1" if opts.proxy_host in ("0.0.0.0", "::", "") else opts.proxy_host  # noqa: S104
    return f"http://{host}:{opts.proxy_port}"


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="The raw telemetry as JSON."),
    url: str | None = typer.Option(
        None, help="The node's local proxy (default: the running daemon's, found from its "
        "state dir, else PROXY_PORT from the config)."
    ),
    config: Path | None = CONFIG,
    state_dir: Path | None = STATE_DIR,
) -> None:
    """How this box is doing: host, GPUs and models, from the running daemon."""
    import httpx

    from node_agent.status import render_status

    url = _local_url(url, config, state_dir)
    try:
        reply = httpx.get(f"{url.rstrip('/')}/meshgate/telemetry", timeout=5.0)
    except httpx.HTTPError as exc:
        raise _fail(
            f"the node daemon is not running (nothing answers at {url}: {exc}); "
            "start it with `meshgate-node run` or `systemctl start meshgate-node`"
        ) from None
    if reply.status_code != 200:
        raise _fail(f"{url} answered {reply.status_code}: {reply.text[:200]}")
    sample = reply.json()
    typer.echo(json.dumps(sample, indent=2) if as_json else render_status(sample))


@app.command()
def swap(
    old: str = typer.Argument(..., help="The model name apps use now (it keeps that name)."),
    new: str = typer.Argument(..., help="NAME=PATH.gguf, PATH.gguf or a name in the inventory."),
    n_ctx: int | None = typer.Option(None, help="Context length (default: the old runner's)."),
    n_gpu_layers: int | None = typer.Option(None, help="GPU layers (default: placement decides)."),
    url: str | None = typer.Option(
        None, help="The node's local proxy (default: the running daemon's, found from its "
        "state dir, else PROXY_PORT from the config)."
    ),
    config: Path | None = CONFIG,
    state_dir: Path | None = STATE_DIR,
) -> None:
    """Hot-swap what serves OLD to NEW without dropping a request."""
    import httpx

    url = _local_url(url, config, state_dir)
    body = {"model": old, "to": new, "n_ctx": n_ctx, "n_gpu_layers": n_gpu_layers}
    try:
        reply = httpx.post(f"{url.rstrip('/')}/meshgate/swap", json=body, timeout=600.0)
    except httpx.HTTPError as exc:
        raise _fail(f"the node daemon is not running (nothing answers at {url}: {exc})") from None
    try:
        answer = reply.json()
    except ValueError:
        answer = {"error": {"message": reply.text[:500]}}
    if reply.status_code != 200:
        message = (answer.get("error") or {}).get("message") if isinstance(answer, dict) else None
        raise _fail(f"swap refused ({reply.status_code}): {message or reply.text[:500]}")
    to = answer.get("to") or {}
    typer.echo(
        f"{old} now served from {to.get('file')} (runner {to.get('runner')}, pid "
        f"{to.get('pid')}, {answer.get('mode')}) in {answer.get('seconds')} s"
    )


@app.command()
def join(
    token: str | None = typer.Argument(
        None, help="The token from `meshgate-coordinator token create` (`-`: stdin)."),
    model: list[str] = typer.Option([], "--model", help="NAME=PATH.gguf to serve, repeatable."),
    model_dir: list[Path] = typer.Option([], "--model-dir", help="Serve every .gguf below DIR."),
    token_file: Path | None = typer.Option(None, "--token-file", help="Read the token here."),
    state_dir: Path = typer.Option(Path("/var/lib/meshgate/node"), "--state-dir"),
    config: Path = typer.Option(Path("/etc/meshgate/node.toml"), "--config"),
    user: str = typer.Option("meshgate", help="The system user the service runs as."),
    unit_dir: Path = typer.Option(Path("/etc/systemd/system"), help="Where the unit goes."),
    service: bool = typer.Option(True, "--service/--no-service",
                                 help="Install and start the systemd service (default)."),
) -> None:
    """Enroll this box, write its config and install + start the service, in one step."""
    from node_agent.join import JoinError, join_steps
    from node_agent.service import _run

    state = NodeState(state_dir)
    enrollment = state.enrollment() if state.path.exists() else None

    def do_enroll() -> str:
        enroll(token=token, token_file=token_file, state_dir=state_dir, config=None)
        return f"enrolled into {state_dir}"

    try:
        for line in join_steps(
            enroll=do_enroll, enrolled=enrollment.did if enrollment else None,
            state_dir=state_dir, config=config, models=model, model_dirs=model_dir,
            user=user, unit_dir=unit_dir, service=service, run=_run,
        ):
            typer.echo(line)
    except JoinError as exc:
        raise _fail(str(exc)) from None


@app.command("install-service")
def install_service(
    user: str = typer.Option("meshgate", help="The system user the daemon runs as."),
    config: Path = typer.Option(Path("/etc/meshgate/node.toml"), "--config"),
    unit_dir: Path = typer.Option(Path("/etc/systemd/system"), help="Where to write the unit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be done, do nothing."),
) -> None:
    """Install meshgate-node as a systemd service (unit, config dir, user, enable --now)."""
    from node_agent.service import ServiceError, install

    try:
        for line in install(user=user, config=config, unit_dir=unit_dir, dry_run=dry_run):
            typer.echo(line)
    except ServiceError as exc:
        raise _fail(str(exc)) from None


@app.command()
def identity(state_dir: Path | None = STATE_DIR, config: Path | None = CONFIG) -> None:
    """Print this node's did:key and enrollment."""
    state = NodeState(_state_dir(state_dir, config))
    enrollment = state.enrollment()
    typer.echo(
        json.dumps(
            {
                "did": state.identity().did,
                "enrollment": enrollment.to_json() if enrollment else None,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    app()
