"""Pieces of the OpenAI wire format shared by the node agent and the coordinator.

`tunnel/` knows nothing of LLMs, and `node_agent/` and `coordinator/` must not
import each other, so what both of them speak about requests lives here:
OpenAI's error shape, request validation, SSE framing and the messages that
ride inside a tunnel stream. This package imports nothing of ours.
"""

__version__ = "0.1.0"
