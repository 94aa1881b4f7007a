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

from meshgate.bounds import clamp_tokens

__all__ = ["WIDTHS", "fit_row"]

WIDTHS = {"request_id": 128, "key_id": 64, "node_did": 255, "upstream": 200, "model": 255,
          "endpoint": 64, "route": 200, "outcome": 64}
"""The ledger's string columns and their widths (coordinator/store/schema.py, UsageRow)."""


def fit_row(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for name, width in WIDTHS.items():
        value = out.get(name)
        if value is not None:
            text = value if isinstance(value, str) else str(value)
            out[name] = text[:width]
    for name in ("prompt_tokens", "completion_tokens"):
        out[name] = clamp_tokens(out.get(name, 0)) or 0
    for name in ("latency_ms", "cost"):
        value = out.get(name, 0.0)
        number = float(value) if isinstance(value, int | float) else 0.0
        out[name] = number if math.isfinite(number) and number >= 0 else 0.0
    return out
