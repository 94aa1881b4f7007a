"""Supervised runner processes: one model, one subprocess, one unix socket.

A :class:`Runner` starts a process that serves OpenAI's API on a unix socket
(in its own process group, output appended to ``{run_dir}/{name}.log``),
waits until ``GET /health`` answers 200, and from then on watches it: when
the process dies the runner counts a crash, logs the exit code, and starts
it again after a backoff of 0.5 s doubling to 30 s (reset once a process has
stayed up for a minute). While it is down its runtime refuses requests at
once with a 503 that says so. :class:`LlamaRunner` is a Runner whose process
is our ``node_agent.runtimes.llama.worker``.

A runner's ``instance`` (default: its model name) names its socket and log,
so that during a hot swap two runners can serve the same public name side by
side (``chat.1`` draining while ``chat.2`` takes new requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from meshgate.openai import OpenAIError
from node_agent.runtimes.base import RunnerError
from node_agent.runtimes.openai_http import OpenAIHttpRuntime

__all__ = ["LlamaRunner", "Runner", "RunnerError", "backoff_delays", "socket_path"]

log = logging.getLogger(__name__)

MAX_UDS_PATH = 100  # sun_path holds 108 bytes on Linux
STABLE_AFTER = 60.0  # a process up this long resets the backoff
LOG_TAIL = 3000
SOURCE_ROOT = str(Path(__file__).resolve().parents[1])  # so `-m node_agent...` imports uninstalled


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": f"{SOURCE_ROOT}{os.pathsep}{path}" if path else SOURCE_ROOT,
    }


def backoff_delays(first: float = 0.5, cap: float = 30.0) -> Iterator[float]:
    """Delays before each restart: `first`, doubling, capped at `cap` (pure)."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


def socket_path(run_dir: Path, name: str) -> Path:
    """Where `name`'s socket goes: in `run_dir`, or a short temp dir if that path is too long."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
    path = run_dir / f"{safe}.sock"
    if len(os.fsencode(path)) <= MAX_UDS_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="mg-")) / f"{safe}.sock"


class Runner:
    """A supervised process serving OpenAI's API for model `name` on a unix socket.

    `argv` is the command without the socket; ``--uds PATH`` is appended.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        run_dir: Path,
        kind: str = "llama.cpp",
        ready_timeout: float = 120.0,
        backoff_first: float = 0.5,
        backoff_cap: float = 30.0,
        instance: str | None = None,
    ) -> None:
        self.name = name
        self.instance = instance or name  # names the socket and the log; two may serve one name
        self.run_dir = Path(run_dir)
        self.socket = socket_path(self.run_dir, self.instance)
        self.log_path = self.run_dir / f"{socket_path(Path(), self.instance).stem}.log"
        self.argv = [*argv, "--uds", str(self.socket)]
        self.ready_timeout = ready_timeout
        self.backoff = (backoff_first, backoff_cap)
        self.crashes = 0
        self.restarts = 0
        self.state = "stopped"  # stopped | starting | up | restarting
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self.runtime = OpenAIHttpRuntime(
            name,
            kind,
            "http://runner/v1",
            uds=str(self.socket),
            health_url="http://runner/health",
            check=self._check,
            lifecycle=self,
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def _check(self) -> None:
        if self.state == "restarting":
            raise OpenAIError(503, f"runner for {self.name} crashed; restarting", hop="node")
        if self.state != "up":
            raise OpenAIError(503, f"runner for {self.name} is {self.state}", hop="node")

    async def start(self) -> None:
        """Start the process, wait until it answers, then watch it (once: a runner that is
        already up, starting or restarting is left as it is)."""
        if self.state != "stopped":
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = "starting"
        try:
            await self._spawn_ready()
        except BaseException:
            self.state = "stopped"
            raise
        self.state = "up"
        self._watch = asyncio.create_task(self.watch(), name=f"watch {self.name}")

    async def _spawn_ready(self) -> None:
        self.socket.unlink(missing_ok=True)
        with self.log_path.open("ab") as out:
            out.write(f"--- {time.strftime('%F %T')} starting {self.argv}\n".encode())
            out.flush()
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env=_child_env(),
            )
        try:
            await asyncio.wait_for(self._until_healthy(self._proc), self.ready_timeout)
        except TimeoutError:
            await self._kill(grace=1.0)
            raise RunnerError(
                f"runner for {self.name} did not answer within {self.ready_timeout:g} s; "
                f"log {self.log_path}:\n{self.log_tail()}"
            ) from None
        log.info("runner for %s is up (pid %s)", self.name, self.pid)

    async def _until_healthy(self, proc: asyncio.subprocess.Process) -> None:
        while not await self.runtime.health():
            if proc.returncode is not None:
                raise RunnerError(
                    f"runner for {self.name} exited with code {proc.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    async def watch(self) -> None:
        """Restart the process whenever it dies, until stop()."""
        delays = backoff_delays(*self.backoff)
        while True:
            assert self._proc is not None
            started = time.monotonic()
            code = await self._proc.wait()
            self.state = "restarting"
            self.crashes += 1
            if time.monotonic() - started > STABLE_AFTER:
                delays = backoff_delays(*self.backoff)
            delay = next(delays)
            log.warning(
                "runner for %s exited with code %s (crash %d); restarting in %.1f s",
                self.name,
                code,
                self.crashes,
                delay,
            )
            await asyncio.sleep(delay)
            try:
                await self._spawn_ready()
            except RunnerError as exc:
                log.warning("%s", str(exc).splitlines()[0])
                continue
            self.restarts += 1
            self.state = "up"

    async def stop(self, grace: float = 5.0) -> None:
        """Stop watching, then SIGTERM the process group and SIGKILL it after `grace`."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        self.state = "stopped"
        await self._kill(grace)
        self.socket.unlink(missing_ok=True)
        await self.runtime.aclose()

    async def _kill(self, grace: float) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.warning("runner for %s ignored SIGTERM for %g s; killing it", self.name, grace)
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


class LlamaRunner(Runner):
    """A Runner of `node_agent.runtimes.llama.worker` serving one GGUF file."""

    def __init__(
        self,
        name: str,
        model_path: Path | str,
        *,
        run_dir: Path,
        n_ctx: int = 2048,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        ready_timeout: float = 120.0,
        instance: str | None = None,
    ) -> None:
        argv = [
            sys.executable,
            "-m",
            "node_agent.runtimes.llama.worker",
            "--model",
            str(model_path),
            "--name",
            name,
            "--n-ctx",
            str(n_ctx),
            "--n-gpu-layers",
            str(n_gpu_layers),
        ]
        if n_threads is not None:
            argv += ["--n-threads", str(n_threads)]
        super().__init__(
            name, argv, run_dir=run_dir, ready_timeout=ready_timeout, instance=instance
        )
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_gpu_layers = n_gpu_layers
