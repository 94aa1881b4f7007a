"""A model manager and the node's local proxy in front of it, on their own event-loop
thread, so that synchronous clients (the `openai` and `ollama` libraries) can drive a
real proxy and real runners from a plain test."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn

from node_agent.metrics import NodeMetrics
from node_agent.models import ModelManager
from node_agent.proxy import build_app

#: Run on the node's loop before the manager starts; what it returns runs after it stops.
Setup = Callable[[ModelManager], Awaitable[Callable[[], Awaitable[None]] | None]]


class ProxyThread:
    def __init__(self, manager: ModelManager, *, setup: Setup | None = None, **app: Any) -> None:
        self.manager = manager
        self.setup = setup
        config = uvicorn.Config(
            build_app(manager, **app),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        self.failed: BaseException | None = None
        self.port = 0
        self.url = ""

    async def _run(self) -> None:
        cleanup = None
        try:
            if self.setup is not None:
                cleanup = await self.setup(self.manager)
            await self.manager.start()
            await self.server.serve()
        except BaseException as exc:
            self.failed = exc
            raise
        finally:
            await self.manager.stop()
            if cleanup is not None:
                await cleanup()

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.failed is None, self.failed
            assert time.monotonic() < deadline, "the node did not start"
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class NodeThread(ProxyThread):
    """A fresh manager set up by `setup` (e.g. Ollama models), with metrics; a context manager."""

    def __init__(self, run_dir: Path, setup: Setup) -> None:
        manager = ModelManager(run_dir=run_dir)
        self.metrics = NodeMetrics(served=manager.names)
        super().__init__(manager, setup=setup, metrics=self.metrics)

    def __enter__(self) -> NodeThread:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
