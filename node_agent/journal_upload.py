"""Upload the offline usage journal whenever the tunnel is up (see journal.py).

Runs beside the heartbeat for as long as one tunnel session lasts: send the
unconfirmed rows in batches, each on its own stream
(``OPEN {"usage_journal": rows}``), and confirm them in the journal only when
the coordinator's END says they are in its ledger. A batch the coordinator
took but whose END never arrived (the tunnel or this node died in between)
is sent again later; the coordinator keys rows by node and request id, so it
counts each once.
"""

from __future__ import annotations

import asyncio
import logging

from meshgate.openai import OpenAIError
from meshgate.protocol import JOURNAL_KEY, MAX_JOURNAL_ROWS, error_of
from node_agent.journal import UsageJournal
from tunnel import FrameType, Mux, TunnelError

__all__ = ["upload_journal"]

log = logging.getLogger(__name__)

RETRY_S = 5.0


async def upload_batch(journal: UsageJournal, mux: Mux, limit: int = MAX_JOURNAL_ROWS) -> int:
    """Send one batch and confirm it; returns how many rows were confirmed."""
    async with journal.uploading:
        rows, offset = journal.pending(limit)
        if not rows:
            journal.ack(offset)  # nothing, or only unreadable lines, was left
            return 0
        stream = await mux.open({JOURNAL_KEY: rows})
        frame = await stream.recv()
        if frame.type != FrameType.END:
            raise error_of(frame.body, hop="coordinator", default="journal upload refused")
        journal.ack(offset)
    body = frame.body if isinstance(frame.body, dict) else {}
    log.info("usage journal: %d row(s) uploaded (%s new, %s already in the ledger)",
             len(rows), body.get("ingested"), body.get("duplicates"))
    return len(rows)


async def upload_journal(journal: UsageJournal, mux: Mux) -> None:
    """Until cancelled (the session's end): upload rows as they appear."""
    while True:
        await journal.wait_pending()
        try:
            await upload_batch(journal, mux)
        except TunnelError:
            return  # the session is over; the next one starts again
        except (OpenAIError, OSError) as exc:  # refused, or the disk: keep the rows, retry
            log.warning("usage journal upload failed, retrying in %g s: %s", RETRY_S, exc)
            await asyncio.sleep(RETRY_S)
