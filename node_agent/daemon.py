"""`meshgate-node run`: runners, the local proxy and the coordinator link in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from node_agent.link import CoordinatorLink
from node_agent.models import ModelManager, parse_model_spec, scan_model_dirs
from node_agent.proxy import build_app
from node_agent.state import NodeState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeOptions:
    state_dir: Path
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 11438
    models: tuple[str, ...] = ()
    model_dirs: tuple[Path, ...] = ()
    upstreams: tuple[str, ...] = ()
    n_ctx: int = 2048
    n_gpu_layers: int = 0
    telemetry_period: float = 2.0
    log_level: str = "info"
    extra: dict[str, str] = field(default_factory=dict)


def build_manager(opts: NodeOptions, state: NodeState) -> ModelManager:
    manager = ModelManager(run_dir=state.run_dir)
    specs = [parse_model_spec(spec) for spec in opts.models]
    specs += scan_model_dirs(list(opts.model_dirs))
    for name, path in specs:
        manager.add_llama(name, path, n_ctx=opts.n_ctx, n_gpu_layers=opts.n_gpu_layers)
    for spec in opts.upstreams:
        name, _, url = spec.partition("=")
        manager.add_upstream(name, url)
    return manager


async def serve(opts: NodeOptions) -> None:
    state = NodeState(opts.state_dir)
    identity = state.identity()
    enrollment = state.enrollment()
    manager = build_manager(opts, state)
    await manager.start()
    log.info("node %s serves %s", identity.did, manager.names())
    config = uvicorn.Config(
        build_app(manager),
        host=opts.proxy_host,
        port=opts.proxy_port,
        log_level=opts.log_level.lower(),
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    link_task: asyncio.Task[None] | None = None
    if enrollment is None:
        log.warning("not enrolled: serving the local proxy only (run `meshgate-node enroll TOKEN`)")
    else:
        link = CoordinatorLink(
            identity, enrollment, manager, telemetry_period=opts.telemetry_period
        )
        link_task = asyncio.create_task(link.run())
    try:
        await server.serve()
    finally:
        if link_task is not None:
            link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link_task
        await manager.stop()
        log.info("node stopped")


def run_node(opts: NodeOptions) -> None:
    logging.basicConfig(
        level=opts.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(opts))
