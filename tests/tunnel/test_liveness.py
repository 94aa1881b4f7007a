"""Liveness, sans I/O: when each side pings, and how soon a dead or hung peer is dropped.

Two cores on a simulated path (`Path`: a one-way delay, time passed in, no sockets, no
clock): the coordinator pings each node every RTT_PING_S, the node only after
QUIET_PING_S of silence (tunnel/constants.py; rules: `Connection.tick`). A side that
hangs reads nothing, writes nothing and runs no timer, with its TCP connection open (what
a stalled process or a proxy that keeps ACKing looks like from the other side).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

import pytest
from legacy_liveness import LegacyConnection
from tunnel_helpers import join

from tunnel.connection import Connection, Pong
from tunnel.constants import PING_TIMEOUT_S, QUIET_PING_S, RTT_PING_S
from tunnel.frames import FrameType

DELAY = 0.05  # one way, s
PERIODS = 10


@dataclass
class Side:
    conn: Connection
    hangs_at: float = math.inf
    pongs: int = 0  # answers to this side's PINGs
    heard_at: float = 0.0  # the peer's last message arrived
    ticked_at: float = -math.inf
    dropped_at: float | None = None
    reason: str | None = None

    def alive(self, now: float) -> bool:
        return self.dropped_at is None and now < self.hangs_at


@dataclass
class Path:
    node: Side
    coord: Side
    telemetry_every: float | None = None
    cut_down_at: float = math.inf  # from then on the coordinator's messages are lost
    now: float = 0.0
    _flight: list[tuple[float, int, bool, bytes]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)

    def run(self, until: float) -> None:
        """Deliver, tick and send telemetry in time order until `until`, then deliver what
        is still on the way (no more timers)."""
        next_telemetry = self.telemetry_every
        for _ in range(1_000_000):
            sides = [s for s in (self.node, self.coord) if s.alive(self.now)]
            deadlines = [(self._timer(d, s), s) for s in sides
                         if (d := s.conn.next_deadline()) is not None]
            arrival = self._flight[0][0] if self._flight else math.inf
            due = min((d for d, _ in deadlines), default=math.inf)
            telemetry = next_telemetry if next_telemetry is not None else math.inf
            at = min(arrival, due, telemetry)
            if at > until:
                break
            self.now = at
            if at == arrival:
                self._arrive()
            elif at == due:
                side = next(s for d, s in deadlines if d == due)
                side.ticked_at = at
                reason = side.conn.tick(at)
                if reason is not None:
                    side.dropped_at, side.reason = at, reason
            else:
                assert self.telemetry_every is not None
                assert next_telemetry is not None
                if self.node.alive(at):
                    self.node.conn.send_control(FrameType.TELEMETRY, {"t": at})
                next_telemetry += self.telemetry_every
            self._flush()
        else:
            raise AssertionError("the simulation did not advance")
        while self._flight:
            self.now = self._flight[0][0]
            self._arrive()
            self._flush()

    @staticmethod
    def _timer(deadline: float, side: Side) -> float:
        """When the shell's timer fires: at the deadline, or a moment later if the last
        tick left it there (the loop's clock has moved on by the next iteration; the
        previous release re-armed at the same instant after a float rounding)."""
        return deadline if deadline > side.ticked_at else side.ticked_at + 0.001

    def _arrive(self) -> None:
        at, _, upward, message = heapq.heappop(self._flight)
        side = self.coord if upward else self.node
        if not side.alive(at):
            return  # swallowed: the TCP connection stays open
        side.heard_at = at
        side.pongs += sum(type(e) is Pong for e in side.conn.receive(message, at))

    def _flush(self) -> None:
        for side, upward in ((self.node, True), (self.coord, False)):
            if not side.alive(self.now):
                continue
            for message in side.conn.data_to_send(self.now):
                if not upward and self.now >= self.cut_down_at:
                    continue
                heapq.heappush(
                    self._flight, (self.now + DELAY, next(self._order), upward, message)
                )


def new_pair(phase: float = 0.5) -> tuple[Connection, Connection]:
    """(node, coordinator) as `connect` and `serve` make them by default; the node's
    first frame (its PING) queued, as `connect` sends it."""
    node_session, coord_session, _, _ = join()
    node = Connection(node_session, initiator=True, ping_when_quiet=QUIET_PING_S,
                      ping_timeout=PING_TIMEOUT_S)
    coord = Connection(coord_session, initiator=False, ping_interval=RTT_PING_S,
                       ping_timeout=PING_TIMEOUT_S, ping_phase=phase)
    node.ping(0.0)
    return node, coord


def pings(side: Side) -> int:
    """PINGs this side sent (answered, or still waiting)."""
    return side.pongs + len(side.conn._pings)


@pytest.mark.parametrize("telemetry_every", [None, 1.0])
def test_a_healthy_pair_carries_one_ping_and_one_pong_a_period(
    telemetry_every: float | None,
) -> None:
    node, coord = new_pair(phase=0.5)
    path = Path(Side(node), Side(coord), telemetry_every=telemetry_every)
    path.run(PERIODS * RTT_PING_S)
    assert path.node.dropped_at is None
    assert path.coord.dropped_at is None
    # the coordinator: one at once (RTT from the start), one half a period later (this
    # link's phase), then one a period: 0, 30, 90, ..., 570
    assert path.coord.pongs == PERIODS + 1
    assert path.node.pongs == 1  # its first frame only: it always hears the coordinator
    assert coord.rtt_ms == pytest.approx(2 * DELAY * 1000)
    assert coord._rtt_at is not None
    assert coord._rtt_at >= (PERIODS - 1) * RTT_PING_S


def test_the_previous_release_sent_about_four_pings_a_period_where_one_goes_now() -> None:
    """The figure the new rules are for (an idle fleet of 10,000: ~440 PINGs a second
    from the nodes before, none now), kept as a comparison, not a rule."""
    node_session, coord_session, _, _ = join()
    old = Path(Side(LegacyConnection(node_session, initiator=True)),
               Side(LegacyConnection(coord_session, initiator=False)), telemetry_every=1.0)
    old.run(PERIODS * RTT_PING_S)
    node, coord = new_pair()
    new = Path(Side(node), Side(coord), telemetry_every=1.0)
    new.run(PERIODS * RTT_PING_S)
    before = pings(old.node) + pings(old.coord)
    assert before >= 4 * PERIODS  # the old node pinged every 15-22.5 s, the coordinator 60
    assert pings(old.node) >= 3 * PERIODS
    # now: the node's first frame, the coordinator's first and one a period
    assert pings(new.node) + pings(new.coord) == 1 + 1 + PERIODS


@pytest.mark.parametrize("hangs_at", [100.0, 120.0, 149.99, 151.0, 200.0])
def test_a_hung_coordinator_is_dropped_by_the_node_within_its_bound(hangs_at: float) -> None:
    node, coord = new_pair(phase=0.5)  # pings at 0, 30, 90, 150, ...
    path = Path(Side(node), Side(coord, hangs_at=hangs_at), telemetry_every=1.0)
    path.run(hangs_at + 300)
    side = path.node
    assert side.dropped_at is not None
    assert side.reason is not None
    assert "no PONG within 20 s" in side.reason
    assert side.dropped_at == pytest.approx(side.heard_at + QUIET_PING_S + PING_TIMEOUT_S)
    assert side.dropped_at <= hangs_at + QUIET_PING_S + PING_TIMEOUT_S  # <= 90 s
    assert path.node.pongs == 1  # it pinged only once the coordinator fell silent


@pytest.mark.parametrize("telemetry_every", [None, 1.0])
@pytest.mark.parametrize("hangs_at", [100.0, 149.99, 150.2, 200.0])
def test_a_hung_node_is_dropped_by_the_coordinator_within_its_bound(
    hangs_at: float, telemetry_every: float | None
) -> None:
    node, coord = new_pair(phase=0.5)
    path = Path(Side(node, hangs_at=hangs_at), Side(coord), telemetry_every=telemetry_every)
    path.run(hangs_at + 300)
    side = path.coord
    assert side.dropped_at is not None
    assert side.reason is not None
    assert "no PONG within 20 s" in side.reason
    assert side.dropped_at <= hangs_at + RTT_PING_S + PING_TIMEOUT_S  # <= 80 s


def test_telemetry_that_flows_does_not_hide_a_node_that_gets_nothing() -> None:
    """Frames up but none down (a half-broken path): the node's telemetry proves it
    lives, but it cannot be sent requests; the missing PONG drops it on both sides."""
    node, coord = new_pair(phase=0.5)
    path = Path(Side(node), Side(coord), telemetry_every=1.0, cut_down_at=100.0)
    path.run(400.0)
    assert path.coord.dropped_at is not None
    assert path.coord.dropped_at <= 100.0 + RTT_PING_S + PING_TIMEOUT_S
    assert path.node.dropped_at is not None
    assert path.node.dropped_at <= 100.0 + QUIET_PING_S + PING_TIMEOUT_S


def test_a_node_facing_a_coordinator_that_never_pings_proves_the_link_on_silence() -> None:
    node_session, coord_session, _, _ = join()
    node = Connection(node_session, initiator=True, ping_when_quiet=QUIET_PING_S,
                      ping_timeout=PING_TIMEOUT_S)
    path = Path(Side(node), Side(Connection(coord_session, initiator=False)))
    path.run(10 * QUIET_PING_S + 1)
    assert path.node.dropped_at is None
    assert path.node.pongs == 10  # one every QUIET_PING_S (+ the PONG's way back)


@pytest.mark.parametrize("telemetry_every", [None, 1.0])
@pytest.mark.parametrize("old", ["node", "coordinator"])
def test_old_and_new_peers_answer_each_others_pings(
    old: str, telemetry_every: float | None
) -> None:
    node_session, coord_session, _, _ = join()
    node: Connection
    coord: Connection
    if old == "node":
        node = LegacyConnection(node_session, initiator=True)
        coord = Connection(coord_session, initiator=False, ping_interval=RTT_PING_S,
                           ping_timeout=PING_TIMEOUT_S, ping_phase=0.5)
    else:
        node = Connection(node_session, initiator=True, ping_when_quiet=QUIET_PING_S,
                          ping_timeout=PING_TIMEOUT_S)
        coord = LegacyConnection(coord_session, initiator=False)
    path = Path(Side(node), Side(coord), telemetry_every=telemetry_every)
    path.run(PERIODS * RTT_PING_S)
    for side in (path.node, path.coord):
        assert side.dropped_at is None
        assert side.conn._pings == {}  # every PING answered
    if old == "node":
        assert path.node.pongs >= 3 * PERIODS  # it pings as it always did
        assert path.coord.pongs == PERIODS + 1
    else:
        assert path.coord.pongs >= PERIODS  # its RTT pings (every 15 s on an idle link)
        assert path.node.pongs == 0  # they are heard within QUIET_PING_S: never a PING


def test_the_periodic_pings_go_at_once_then_at_the_links_phase_then_every_period() -> None:
    _, coord_session, _, _ = join()
    coord = Connection(coord_session, initiator=False, now=5.0, ping_interval=60,
                       ping_timeout=20, ping_phase=0.25)
    assert coord.next_deadline() == 5.0
    sent = []
    now = 5.0
    while now < 300:
        assert coord.tick(now) is None
        if coord.data_to_send(now):
            sent.append(now)
            coord._pings.clear()  # answered
        deadline = coord.next_deadline()
        assert deadline is not None
        assert deadline > now
        now = deadline
    assert sent == [5.0, 20.0, 80.0, 140.0, 200.0, 260.0]


def test_a_missing_pong_is_reported_after_the_timeout() -> None:
    _, coord_session, _, _ = join()
    coord = Connection(coord_session, initiator=False, ping_interval=60, ping_timeout=20)
    assert coord.tick(0.0) is None
    assert len(coord.data_to_send(0.0)) == 1  # the PING, never answered
    assert coord.next_deadline() == 20.0  # its timeout comes before the next ping
    assert coord.tick(19.9) is None
    reason = coord.tick(20.0)
    assert reason is not None
    assert "no PONG within 20 s" in reason


def test_bad_ping_settings_are_refused() -> None:
    session, _, _, _ = join()
    for bad in ({"ping_interval": 0}, {"ping_when_quiet": -1}, {"ping_phase": 0.0}):
        with pytest.raises(ValueError, match="must be"):
            Connection(session, initiator=True, **bad)  # type: ignore[arg-type]
