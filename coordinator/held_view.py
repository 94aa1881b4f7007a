"""Whether the view the scheduler's index holds for a node still is the node's view.

A request acquires a node and releases it (`Registry.acquire`, `release`): our own
in-flight count of the model moves, and with it the model's queue depth. Between two
requests the counts are usually back where they were when the index last put the node's
slots, and so is everything else the view is made of (what the node reports changes
through `Registry._refresh`, which puts the node again). `still` checks the few inputs
that move without a refresh, so `Registry.index` rebuilds the view and puts the slots
only when one of them did (what `model_view` makes of them is `moving`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshgate.node_messages import ModelLoad

if TYPE_CHECKING:
    from coordinator.registry import NodeConn
    from coordinator.scheduler import NodeView

NO_LOAD = ModelLoad()
"""A model the node has not reported load for."""


def moving(conn: NodeConn, name: str, load: ModelLoad) -> tuple[int, int, float]:
    """What of one model's view moves with requests rather than with the node's reports:
    (our in-flight count, the queue depth, the decode rate)."""
    ours = conn.per_model.get(name, 0)
    # what the node reported, less ours that ended since: a client's next request right
    # after an answer must not find the node still busy with the one it just got
    reported = max((load.in_flight or 0) + load.waiting - conn.released.get(name, 0), 0)
    decode = load.decode_tps or 0.0
    seen = conn.observed.get(name)
    if seen is not None:  # what we measured beats what it claims (the decode rate: a
        decode = seen.decode_tps(decode)  # first-token time is mostly overhead on short prompts)
    return ours, max(ours, reported), decode


def still(conn: NodeConn, held: NodeView, models: Iterable[str]) -> bool:
    """Whether `held` (the view the index has for `conn`) is still `node_view(conn)` after
    our own counts of `models` moved: every other input changes through `_refresh`, but
    for the link's round trip and state, read here too."""
    if held.rtt_ms != (conn.rtt_ms or 0.0) or held.connected == conn.link.closed:
        return False
    for name in models:
        view = held.models.get(name)
        if view is None or (view.in_flight, view.queue_depth, view.decode_tps) != moving(
                conn, name, conn.load.get(name) or NO_LOAD):
            return False
    return True
