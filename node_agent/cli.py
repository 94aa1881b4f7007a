"""`meshgate-node`: enroll this box, run the daemon, ask it how it is."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import typer

from node_agent.state import Enrollment, NodeState

app = typer.Typer(help="meshgate edge-node daemon", no_args_is_help=True, add_completion=False)

STATE_DIR = typer.Option(
    Path("/var/lib/meshgate/node"),
    "--state-dir",
    envvar="MESHGATE_NODE_STATE",
    help="Where the node keeps its identity and enrollment.",
)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command()
def enroll(
    token: str = typer.Argument(
        ..., help="The token printed by `meshgate-coordinator token create`."
    ),
    state_dir: Path = STATE_DIR,
) -> None:
    """Create this node's identity, prove the one-time token and pin the coordinator's key."""
    from tunnel import EnrollmentToken, RefusedError, TunnelError, connect

    try:
        parsed = EnrollmentToken.decode(token)
    except TunnelError as exc:
        raise _fail(str(exc), 2) from None
    if parsed.expires_at < time.time():
        raise _fail("this enrollment token has expired; ask for a new one", 2)
    state = NodeState(state_dir)
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
    state_dir: Path = STATE_DIR,
    proxy_host: str = typer.Option("127.0.0.1", envvar="MESHGATE_PROXY_HOST"),
    proxy_port: int = typer.Option(11438, envvar="MESHGATE_PROXY_PORT"),
    model: list[str] = typer.Option([], "--model", help="NAME=PATH.gguf, repeatable."),
    model_dir: list[Path] = typer.Option([], "--model-dir", help="Serve every .gguf below DIR."),
    upstream: list[str] = typer.Option(
        [],
        "--upstream",
        help="NAME=http://127.0.0.1:PORT/v1: an OpenAI-compatible server on this box.",
    ),
    n_ctx: int = typer.Option(2048, help="Context length for llama.cpp runners."),
    n_gpu_layers: int = typer.Option(0, help="Layers to offload to the GPU (-1: all)."),
    telemetry_period: float = typer.Option(2.0, help="Seconds between telemetry samples."),
    log_level: str = typer.Option("info", envvar="MESHGATE_LOG_LEVEL"),
) -> None:
    """Run the node daemon: model runners, the local proxy and the coordinator link."""
    from node_agent.daemon import NodeOptions, run_node

    run_node(
        NodeOptions(
            state_dir=state_dir,
            proxy_host=proxy_host,
            proxy_port=proxy_port,
            models=tuple(model),
            model_dirs=tuple(model_dir),
            upstreams=tuple(upstream),
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            telemetry_period=telemetry_period,
            log_level=log_level,
        )
    )


@app.command()
def identity(state_dir: Path = STATE_DIR) -> None:
    """Print this node's did:key and enrollment."""
    state = NodeState(state_dir)
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
