"""Sizing a request for the scheduler, and never calling an over-context request "no capacity".

The coordinator has no tokenizer: it estimates a prompt's tokens from its text
(``Parsed.prompt_tokens_estimate``, about 3 bytes a token, so it errs high on
English) and the scheduler keeps the nodes whose real context (``n_ctx`` as
the node's runner runs it, from its inventory) holds the estimate plus
``max_tokens``.

When the estimate fits no node, only a node's tokenizer can say whether the
request truly does not fit. So instead of a 503 the request is sized to the
largest context any node serving the model has, and goes to such a node: it
either answers, or refuses with OpenAI's 400 ``context_length_exceeded`` and
the real counts, which dispatch passes to the client unchanged (a client
error is never retried elsewhere). A model a cloud also offers is left to the
scheduler: a cloud may hold what no node can.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from meshgate.openai import Parsed

if TYPE_CHECKING:
    from coordinator.api_context import ApiContext

#: A request this small fits any node's context: it skips the look at the fleet.
SMALL_REQUEST_TOKENS = 512


def largest_context(ctx: ApiContext, models: Sequence[str]) -> int | None:
    """The largest real context of a connected node serving one of `models`."""
    best: int | None = None
    for model in models:
        for conn in ctx.registry.serving(model):
            view = conn.view().models.get(model)
            if view is not None and (best is None or view.context_length > best):
                best = view.context_length
    return best


def fit_to_context(ctx: ApiContext, models: Sequence[str], parsed: Parsed) -> tuple[int, int]:
    """(prompt tokens, completion tokens) to schedule `parsed` with; see the module doc."""
    prompt = parsed.prompt_tokens_estimate()
    completion = 0 if parsed.endpoint == "embeddings" else parsed.max_tokens or 0
    if prompt + completion <= SMALL_REQUEST_TOKENS:
        return prompt, completion
    dispatcher = ctx.dispatcher
    if dispatcher is not None and any(
        m in c.upstream.models for c in dispatcher.clouds.values() for m in models
    ):
        return prompt, completion
    window = largest_context(ctx, models)
    if window is None or prompt + completion <= window:
        return prompt, completion
    completion = min(completion, window)
    return max(0, window - completion), completion
