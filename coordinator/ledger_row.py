"""A ledger row made safe to insert: whatever a peer put in it, the insert cannot fail on it.

Strings are cut to their column's width (PostgreSQL refuses longer ones; a
model name comes from a client, a route from a node), token counts are ints in
[0, MAX_TOKENS_CLAIM], money and latency finite and not negative. A row that
cannot be written is a request nobody is billed for, so this runs before every
insert (`ApiContext.commit`).
"""

from __future__ import annotations

import math
from typing import Any

from meshgate.bounds import MAX_TOKENS_CLAIM, clamp_tokens

__all__ = ["WIDTHS", "fit_row"]

WIDTHS = {"request_id": 128, "key_id": 64, "node_did": 255, "upstream": 200, "model": 255,
          "endpoint": 64, "route": 200, "outcome": 64}
"""The ledger's string columns and their widths (coordinator/store/schema.py, UsageRow)."""


def fit_row(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for name, width in _WIDTHS:
        value = out.get(name)
        if value is not None:
            if type(value) is not str:  # a str subclass too: a plain str, as the column's
                out[name] = (value if isinstance(value, str) else str(value))[:width]
            elif len(value) > width:
                out[name] = value[:width]
    for name in ("prompt_tokens", "completion_tokens"):
        value = out.get(name, 0)
        fits = type(value) is int and 0 <= value <= MAX_TOKENS_CLAIM  # the usual: as it is
        out[name] = value if fits else clamp_tokens(value) or 0
    for name in ("latency_ms", "cost"):
        value = out.get(name, 0.0)
        if type(value) is float and 0.0 <= value < math.inf:  # the usual: as it is
            out[name] = value
            continue
        number = float(value) if isinstance(value, int | float) else 0.0
        out[name] = number if math.isfinite(number) and number >= 0 else 0.0
    return out


_WIDTHS = tuple(WIDTHS.items())
