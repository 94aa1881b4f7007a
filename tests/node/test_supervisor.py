"""The runner supervisor against a real process: a fake OpenAI server that
starts slowly, crashes on cue or ignores SIGTERM."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshgate.openai import OpenAIError
from node_agent.runtimes.llama.supervisor import Runner, RunnerError, backoff_delays, socket_path

FAKE = str(Path(__file__).with_name("fake_openai_server.py"))
CHAT = b'{"model":"fake","messages":[{"role":"user","content":"hi"}]}'

pytestmark = pytest.mark.timeout(60)


def fake(tmp_path: Path, *flags: str, **opts: Any) -> Runner:
    return Runner(
        "fake",
        [sys.executable, FAKE, "--name", "fake", *flags],
        run_dir=tmp_path,
        kind="upstream",
        **opts,
    )


async def wait_for(check: Callable[[], bool], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_backoff_starts_at_half_a_second_doubles_and_caps_at_thirty() -> None:
    assert list(itertools.islice(backoff_delays(), 9)) == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_socket_path_falls_back_to_a_short_directory_when_run_dir_is_deep(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    assert len(os.fsencode(socket_path(deep, "m"))) <= 100
    assert socket_path(Path("/run/mg"), "a/b") == Path("/run/mg/a_b.sock")


async def test_a_slow_starting_runner_is_waited_for_then_answers(tmp_path: Path) -> None:
    runner = fake(tmp_path, "--start-delay", "1.0")
    began = time.monotonic()
    await runner.start()
    try:
        assert time.monotonic() - began >= 1.0
        assert await runner.runtime.health()
        data, usage = await runner.runtime.complete("chat/completions", CHAT)
        assert b"w0 w1 w2" in data
        assert usage == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        chunks = [
            c
            async for c in runner.runtime.stream("chat/completions", CHAT[:-1] + b',"stream":true}')
        ]
        assert len(chunks) == 4
        assert b'"usage"' in chunks[-1]
    finally:
        await runner.stop()
    assert runner.returncode is not None
    assert not runner.socket.exists()


async def test_a_runner_that_exits_while_starting_fails_with_its_log(tmp_path: Path) -> None:
    runner = fake(tmp_path, "--fail-start", "--exit-code", "7")
    with pytest.raises(RunnerError, match="exited with code 7") as caught:
        await runner.start()
    assert "starting [" in str(caught.value)  # the log tail rides along


async def test_a_runner_that_never_answers_times_out_and_is_killed(tmp_path: Path) -> None:
    runner = fake(tmp_path, "--start-delay", "30", ready_timeout=0.5)
    with pytest.raises(RunnerError, match=r"did not answer within 0\.5 s"):
        await runner.start()
    assert runner.returncode is not None


async def test_a_crash_is_counted_refused_fast_and_recovered(tmp_path: Path) -> None:
    cue = tmp_path / "crash-now"
    runner = fake(tmp_path, "--crash-file", str(cue), backoff_first=0.5)
    await runner.start()
    try:
        first_pid = runner.pid
        cue.touch()
        await wait_for(lambda: runner.state == "restarting")
        began = time.monotonic()
        with pytest.raises(OpenAIError) as caught:
            await runner.runtime.complete("chat/completions", CHAT)
        assert time.monotonic() - began < 0.1
        assert (caught.value.status, caught.value.hop) == (503, "node")
        assert caught.value.message == "runner for fake crashed; restarting"
        cue.unlink()
        await wait_for(lambda: runner.state == "up")
        assert (runner.crashes, runner.restarts) == (1, 1)
        assert runner.pid != first_pid
        data, _ = await runner.runtime.complete("chat/completions", CHAT)
        assert b"w0" in data
    finally:
        await runner.stop()


async def test_repeated_crashes_restart_after_doubling_delays_and_log_the_exit_code(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = fake(
        tmp_path, "--crash-after", "0.2", "--exit-code", "9", backoff_first=0.2, backoff_cap=0.8
    )
    await runner.start()
    try:
        await wait_for(lambda: runner.crashes >= 4)
    finally:
        await runner.stop()
    logged = [r.getMessage() for r in caplog.records]
    crashes = [m for m in logged if "exited with code 9 (crash" in m]
    assert [m.rsplit("restarting in ", 1)[1] for m in crashes[:4]] == [
        "0.2 s",
        "0.4 s",
        "0.8 s",
        "0.8 s",
    ]


async def test_a_runner_killed_with_sigkill_is_restarted(tmp_path: Path) -> None:
    runner = fake(tmp_path, backoff_first=0.1)
    await runner.start()
    try:
        assert runner.pid is not None
        os.kill(runner.pid, signal.SIGKILL)
        await wait_for(lambda: runner.crashes == 1 and runner.state == "up")
        data, _ = await runner.runtime.complete("completions", b'{"model":"fake","prompt":"x"}')
        assert b"text_completion" in data
    finally:
        await runner.stop()


async def test_a_runner_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    runner = fake(tmp_path, "--ignore-sigterm")
    await runner.start()
    began = time.monotonic()
    await runner.stop(grace=0.5)
    assert 0.5 <= time.monotonic() - began < 5
    assert runner.returncode == -signal.SIGKILL
    assert runner.crashes == 0


async def test_a_stopped_runner_refuses_requests(tmp_path: Path) -> None:
    runner = fake(tmp_path)
    await runner.start()
    await runner.stop()
    assert runner.returncode == -signal.SIGTERM or runner.returncode == 0
    with pytest.raises(OpenAIError, match="stopped"):
        await runner.runtime.complete("chat/completions", CHAT)
