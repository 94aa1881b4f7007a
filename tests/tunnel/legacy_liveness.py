"""The previous release's ping rules (tunnel/connection.py at 1e30c54), to test that old and
new peers interoperate: the wire (PING/PONG `{"t": int}`) did not change, only when each
side pings and what counts as hearing the peer.

Then both sides pinged every 15 s (ping_interval) unless the peer was heard (any frame
but a PONG) within 1.5 intervals, with one ping every 4 intervals kept for `rtt_ms`.
"""

from __future__ import annotations

from tunnel.connection import Connection, Event, Pong
from tunnel.session import Session

RTT_EVERY = 4
HEARD_SLACK = 1.5
LEGACY_INTERVAL = 15.0
LEGACY_TIMEOUT = 20.0


class LegacyConnection(Connection):
    """A core that pings as the previous release did (both of its defaults: 15 s / 20 s)."""

    def __init__(self, session: Session, *, initiator: bool, now: float = 0.0) -> None:
        super().__init__(
            session,
            initiator=initiator,
            now=now,
            ping_interval=LEGACY_INTERVAL,
            ping_timeout=LEGACY_TIMEOUT,
        )
        self._next_ping = now + LEGACY_INTERVAL

    def receive(self, message: bytes, now: float) -> list[Event]:
        heard = self._heard
        events = super().receive(message, now)
        if events and type(events[-1]) is Pong:  # the answer to our PING was not news
            self._heard = heard
        return events

    def next_deadline(self) -> float | None:
        times = [self._next_ping] if self._next_ping is not None else []
        if self.ping_timeout is not None and self._pings:
            times.append(next(iter(self._pings.values())) + self.ping_timeout)
        return min(times) if times else None

    def tick(self, now: float) -> str | None:
        if self.ping_timeout is not None and self._pings:
            oldest = next(iter(self._pings.values()))
            if now - oldest >= self.ping_timeout:
                return f"no PONG within {self.ping_timeout:g} s: the peer is unreachable"
        interval = self.ping_interval
        if self._next_ping is not None and now >= self._next_ping and interval:
            rtt_due = None if self._rtt_at is None else self._rtt_at + RTT_EVERY * interval
            if rtt_due is not None and now < rtt_due and now - self._heard < HEARD_SLACK * interval:
                self._next_ping = min(self._heard + HEARD_SLACK * interval, rtt_due)
                return None
            self._next_ping = now + interval
            if self.session.dead is None and self.closed is None:
                self.ping(now)
        return None
