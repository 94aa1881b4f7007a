"""llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``) with ggml's
weights in plain CPU buffers, as our runner loads them (see
``node_agent.runtimes.llama.worker.without_extra_buffer_types``: AMX dies with SIGILL
on hosts that advertise it without running it). Same arguments as the server's.

    python tests/llama_server.py --model PATH.gguf --port N
"""

from __future__ import annotations

import runpy

from node_agent.runtimes.llama.worker import without_extra_buffer_types

if __name__ == "__main__":
    without_extra_buffer_types()
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
