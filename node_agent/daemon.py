"""`meshgate-node run`: runners, the local proxy and the coordinator link in one process.

Besides the runners and the proxy, the daemon runs a few small loops over what
:class:`~node_agent.node_parts.NodeParts` holds:

- telemetry: a :class:`TelemetryService` samples host, GPUs and runtime every
  ``telemetry_period`` seconds in a worker thread; the latest sample is what
  ``GET /meshgate/telemetry`` returns, what the link's heartbeat sends up as
  TELEMETRY frames, and what ``/metrics`` reads its gauges from;
- inventory: the model directories are scanned on start (GGUF metadata; a
  broken file is listed as unusable with the reason and not served) and
  polled every ``inventory_period`` seconds (stat only); a change is sent to
  the coordinator as an INVENTORY frame at once;
- the link to the coordinator, when enrolled;
- with ``--ollama URL``: every model of that Ollama server is served as an
  :class:`~node_agent.runtimes.ollama.OllamaRuntime` under Ollama's name, found again
  every ``ollama_period`` seconds (new models are added; a model loaded or
  unloaded there, or added, is sent to the coordinator as a new inventory).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

from meshgate.httpserver import NODE_LIMITS, from_env, server_config
from meshgate.logs import set_access_log, setup_logging
from meshgate.serving import DaemonServer, run
from meshgate.startup import StartupError, check_port, model_dir_warnings
from node_agent.config import NodeOptions
from node_agent.local_daemon import announce, forget
from node_agent.models import parse_model_spec
from node_agent.node_parts import NodeParts, build_manager, load_nvml_module
from node_agent.pipeline import Pipeline
from node_agent.proxy import build_app, served_app
from node_agent.runtimes import read_tick
from node_agent.state import NodeState

__all__ = ["NodeOptions", "NodeParts", "build_manager", "load_nvml_module", "run_node", "serve"]

log = logging.getLogger(__name__)

#: On stop, requests in flight over the tunnel get this long to finish (systemd waits 90 s).
DRAIN_GRACE_S = 30.0


async def serve(opts: NodeOptions) -> None:
    read_tick.configure(opts.stream_tick_ms / 1000, opts.stream_tick_engage_ms / 1000,
                        opts.stream_tick_streams, read_tick.fixed_lag(os.environ))
    state = NodeState(opts.state_dir)
    enrollment = state.enrollment()
    parts = NodeParts(opts, state)
    await parts.setup()
    manager = parts.manager
    await manager.start()
    await parts.telemetry.refresh()
    log.info("node serves %s", manager.names())
    pipeline = Pipeline(manager, metrics=parts.metrics, mesh=parts.mesh_runtime)
    # the guard (refuses what web pages send), request ids, access lines and the hot routes
    app = served_app(build_app(
        manager,
        telemetry=parts.latest,
        metrics=parts.metrics,
        inventory=parts.inventory_body,
        pipeline=pipeline,
    ))
    config = server_config(  # bounded: timeouts, connection cap (meshgate/httpserver.py)
        app,
        NODE_LIMITS,
        host=opts.proxy_host,
        port=opts.proxy_port,
        log_level=opts.log_level.lower(),
        access_log=False,
        lifespan="off",
        ws="none",  # no WebSocket routes here; "auto" would import websockets (~2 MiB idle)
        log_config=None,  # ours (meshgate/logs.py)
    )
    server = DaemonServer(config)
    tasks = [
        asyncio.create_task(parts.telemetry.run(), name="telemetry"),
        asyncio.create_task(parts.meter.run(), name="energy"),
        asyncio.create_task(parts.watch_inventory(), name="inventory"),
    ]
    if parts.ollama is not None:
        watch = parts.ollama.watch(manager, opts.ollama_period, parts.inventory_changed)
        tasks.append(asyncio.create_task(watch, name="ollama"))
    if not opts.connect:
        log.info("connect = false: serving the local proxy only")
    elif enrollment is None:
        log.warning("not enrolled: serving the local proxy only (run `meshgate-node enroll TOKEN`)")
    else:
        # deferred: the link, the tunnel and its crypto load only for an enrolled node
        from node_agent.link import CoordinatorLink
        from node_agent.members import MemberLinks

        identity = state.identity()
        log.info("node %s links to %s", identity.did, enrollment.url)
        if opts.coordinator_url:
            enrollment = dataclasses.replace(enrollment, url=opts.coordinator_url)
        def member_link(url: str, on_members: Callable[[Any], None]) -> CoordinatorLink:
            link = CoordinatorLink(
                identity,
                dataclasses.replace(enrollment, url=url),
                manager,
                telemetry=parts.latest,
                telemetry_period=opts.telemetry_period,
                inventory=parts.inventory_body,
                metrics=parts.metrics,
                journal=parts.journal,  # any replica takes the upload (one at a time)
                pipeline=pipeline,
                load_state=parts.load_state,  # each link sends its own deltas
            )
            link.on_members = on_members
            return link

        parts.link = MemberLinks(member_link, enrollment.url)  # one link per replica
        tasks.append(asyncio.create_task(parts.link.run(), name="link"))
    tasks.append(asyncio.create_task(announce(opts.state_dir, server, opts.proxy_host),
                                     name="announce"))  # daemon.json: where status finds us
    try:
        await server.serve()
    finally:
        forget(opts.state_dir)
        if parts.link is not None:  # requests from the coordinator finish before runners stop
            await parts.link.drain(DRAIN_GRACE_S)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await manager.stop()
        if parts.ollama is not None:
            await parts.ollama.aclose()
        parts.nvml.close()
        parts.energy_nvml.close()
        log.info("node stopped")


def run_node(opts: NodeOptions) -> None:
    """Run the daemon; :class:`StartupError` (one line naming the fix) if it cannot start."""
    setup_node_logging(opts)
    check_startup(opts)
    run(serve(opts), loop="uvloop")  # MESHGATE_LOOP=asyncio: asyncio's (meshgate/serving.py)


def setup_node_logging(opts: NodeOptions) -> None:
    """The daemon's log lines as the options say: format, level, access lines on or off."""
    setup_logging(opts.log_format, opts.log_level)
    set_access_log(opts.access_log)


def check_startup(opts: NodeOptions) -> None:
    """What would stop the node from starting, as one :class:`StartupError`; warnings logged."""
    for spec in opts.models:
        try:
            _, path = parse_model_spec(spec)
        except ValueError as exc:
            raise StartupError(f"--model {spec}: {exc}") from None
        if not path.is_file():
            raise StartupError(f"--model {spec}: no such file {path}: fix the path "
                               "(--model NAME=/path/to/model.gguf) or leave the option out")
    from_env(NODE_LIMITS)  # MESHGATE_HTTP_*, read again by `server_config`
    check_port(opts.proxy_host, opts.proxy_port, what="local proxy", option="--proxy-port")
    try:
        read_tick.fixed_lag(os.environ)  # the tests' hook, read again by `serve`
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    for warning in model_dir_warnings(list(opts.model_dirs)):
        log.warning(warning)
