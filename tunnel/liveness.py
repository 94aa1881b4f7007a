"""The tunnel connection's liveness rules, sans I/O: PING, RTT, dead-peer detection.

A mixin of `Connection` (tunnel/connection.py), which answers PINGs and measures PONGs as
they arrive; this part decides when this side sends a PING and when an unanswered one
means the peer is gone (`tick`, at the times `next_deadline` gives). The bounds it keeps
are stated in `tick` and tunnel/DESIGN.md.
"""

from __future__ import annotations

from tunnel.frames import Frame, FrameType
from tunnel.session import Session

MAX_PINGS = 16  # unanswered pings remembered

__all__ = ["MAX_PINGS", "Liveness"]


class Liveness:
    """PING timing for `Connection`; `_init_liveness` from its constructor."""

    session: Session
    closed: str | None

    def _check(self) -> None:
        raise NotImplementedError  # `Connection._check`

    def _queue(self, frame: Frame) -> None:
        raise NotImplementedError  # `Connection._queue`

    def _init_liveness(self, now: float, ping_interval: float | None,
                       ping_timeout: float | None, ping_when_quiet: float | None,
                       ping_phase: float) -> None:
        if ping_interval is not None and ping_interval <= 0:
            raise ValueError("ping_interval must be > 0 (None: no periodic pings)")
        if ping_when_quiet is not None and ping_when_quiet <= 0:
            raise ValueError("ping_when_quiet must be > 0 (None: no pings on silence)")
        if not 0.0 < ping_phase <= 1.0:
            raise ValueError("ping_phase must be in (0, 1]")
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.ping_when_quiet = ping_when_quiet
        self.ping_phase = ping_phase
        self.rtt_ms: float | None = None
        self._pings: dict[int, float] = {}
        self._next_ping = now if ping_interval else None  # the first periodic one at once
        self._phase = ping_phase  # the gap after the first, in intervals; then 1
        self._heard = now  # when the peer's last message (any, a PONG too) arrived
        self._rtt_at: float | None = None  # when the last PONG arrived

    def next_deadline(self) -> float | None:
        """When `tick` next has work (a ping due, a quiet link, a ping's timeout), or None."""
        deadline = self._next_ping
        if self._pings:
            if self.ping_timeout is not None:
                expiry = next(iter(self._pings.values())) + self.ping_timeout
                deadline = expiry if deadline is None else min(deadline, expiry)
        elif self.ping_when_quiet is not None:
            quiet = self._heard + self.ping_when_quiet
            deadline = quiet if deadline is None else min(deadline, quiet)
        return deadline

    def tick(self, now: float) -> str | None:
        """Send a ping if one is due; why the link should be dropped (no PONG in time).

        Two kinds of PING, each side configured with either or both:

        - periodic (`ping_interval`): the first at once, the second `ping_phase`
          intervals later (the shell draws the phase per link, so a coordinator's pings
          to a fleet that connected together are spread over the period, not a burst),
          then one every interval, whatever was heard: it keeps `rtt_ms` fresh (a routing
          cost) and, arriving at the peer, is the peer's proof that this side lives.
        - on silence (`ping_when_quiet`): one when nothing at all (any frame, a PING or
          PONG too) has come from the peer for that long and none of ours is unanswered.

        Any PING unanswered after `ping_timeout` s means a dead or stalled path (no FIN,
        no RST; or a proxy that keeps the TCP connection open and forwards nothing): the
        reason is returned and the shell drops the link. The coordinator pings every
        node periodically (RTT_PING_S) and the node pings only on silence longer than
        that period plus slack (QUIET_PING_S; tunnel/constants.py), so a healthy link
        carries one PING and one PONG per period, and:

        - a node drops a coordinator that went silent within ping_when_quiet +
          ping_timeout s of the last frame it heard (defaults: 70 + 20 = 90 s);
        - a coordinator drops a node that went silent within ping_interval +
          ping_timeout s (60 + 20 = 80 s), frames flowing or not: the node's telemetry
          proves it lives, but a PONG that does not come back means the coordinator's
          own frames do not reach it.
        """
        pings = self._pings
        if pings and self.ping_timeout is not None:
            oldest = next(iter(pings.values()))
            if now - oldest >= self.ping_timeout:
                return f"no PONG within {self.ping_timeout:g} s: the peer is unreachable"
        due = False
        interval = self.ping_interval
        if self._next_ping is not None and interval and now >= self._next_ping:
            due = True
            self._next_ping = now + interval * self._phase
            self._phase = 1.0
        quiet = self.ping_when_quiet
        if quiet is not None and not pings and now - self._heard >= quiet:
            due = True
        if due and self.session.dead is None and self.closed is None:
            self.ping(now)
        return None

    def ping(self, now: float) -> int:
        """Queue a PING; its stamp (the PONG event carries it back)."""
        self._check()
        stamp = int(now * 1000)
        while stamp in self._pings:
            stamp += 1
        self._queue(Frame(FrameType.PING, 0, 0, 0, {"t": stamp}))
        self._pings[stamp] = now
        if len(self._pings) > MAX_PINGS:
            self._pings.pop(next(iter(self._pings)))
        return stamp
