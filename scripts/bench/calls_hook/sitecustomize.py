"""cProfile on signal, for scripts/bench/request_calls.py (imported at start by ``site``
when this folder is on PYTHONPATH and MESHGATE_CALLS_DIR is set).

SIGUSR1 starts a profile of the main thread (its CPU time); SIGUSR2 stops it and writes
``$MESHGATE_CALLS_DIR/PID.prof``. Both run on the main thread between two bytecodes (the
event loops wake on a signal: asyncio's and uvloop's wakeup fd), so a profile covers
whole loop turns. Nothing happens without the variable: the folder is a bench tool's only.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

_folder = os.environ.get("MESHGATE_CALLS_DIR")

if _folder:
    import cProfile
    import time

    _profile: list[cProfile.Profile] = []

    def _start(signum: int, frame: FrameType | None) -> None:
        # the thread's CPU time, not wall time: a process put off the CPU inside a call
        # (its write woke the client on this core) would charge that call for the wait
        profile = cProfile.Profile(time.thread_time)
        _profile[:] = [profile]
        profile.enable()

    def _stop(signum: int, frame: FrameType | None) -> None:
        if _profile:
            profile = _profile.pop()
            profile.disable()
            profile.dump_stats(os.path.join(_folder or ".", f"{os.getpid()}.prof"))

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
