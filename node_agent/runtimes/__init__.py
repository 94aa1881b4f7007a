"""Runtimes behind one interface (:class:`Runtime`): llama.cpp, Ollama, OpenAI upstream, mesh.

Only :mod:`node_agent.runtimes.base` is imported here; each implementation is
imported where it is built, so an idle daemon loads only what it serves.
"""

from node_agent.runtimes.base import FakeRuntime, Runtime, Usage, usage_of

__all__ = ["FakeRuntime", "Runtime", "Usage", "usage_of"]
