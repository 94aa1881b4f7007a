"""The fuzz targets of scripts/fuzz_tunnel.py: one function per decoder or core, each
taking the input's bytes (after the first, which picked it); only TunnelError may leave.

The harness (instrumentation, dispatch, findings, seeds, the random mode) is
fuzz_tunnel.py; it imports this module after atheris has instrumented the tunnel
package, so nothing here may import `tunnel` before it does (fuzz_tunnel.py is the
entry point, never this file).
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable

import msgpack
import zstandard
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fuzz_inputs import SessionPair, grown_plaintexts, grown_value
from ws_twin import check as ws_twin_check
from ws_twin import grown as ws_grown

from tunnel.compress import decompress
from tunnel.connection import Connection
from tunnel.constants import (
    DATA_CAP_SLACK,
    FLAG_DATA,
    PROLOGUE,
)
from tunnel.errors import FrameError, TunnelError
from tunnel.frames import Frame, FrameType, decode, decode_general
from tunnel.fused import FUSED_MAX
from tunnel.handshake import ResponderHandshake, parse_hello
from tunnel.identity import Identity
from tunnel.noise import HandshakeState, public_bytes
from tunnel.session import Session
from tunnel.token import PREFIX, EnrollmentToken
from tunnel.ws import _unb64

COORDINATOR = X25519PrivateKey.generate()
NODE = Identity.generate()
TUNNEL_KEY = NODE.x25519_pub
CAP = 1 << 16

TARGETS = ["frame", "msgpack", "hello", "handshake", "zstd", "session", "token", "connection",
           "wsframes", "fused"]


# -- targets ---------------------------------------------------------------------------


def t_frame(data: bytes) -> None:
    """`decode` (its msgspec DATA fast path) agrees with the general decode: the same
    frame, or the same refusal in the same words."""
    try:
        got: Frame | str = decode(data)
    except FrameError as exc:
        got = str(exc)
    try:
        want: Frame | str = decode_general(data)
    except FrameError as exc:
        want = str(exc)
    assert got == want, (got, want)


def t_msgpack(data: bytes) -> None:
    value, _ = grown_value(data)
    try:
        packed = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return  # the generator made something msgpack cannot hold: not an input
    decode(packed)


def t_hello(data: bytes) -> None:
    if data[:1] == b"\x01":
        value, _ = grown_value(data[1:])
        if isinstance(value, dict):
            value.setdefault("v", 1)
            value.setdefault("id", NODE.ed25519_pub)
        try:
            data = msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            return
    parse_hello(data, TUNNEL_KEY)


def t_handshake(data: bytes) -> None:
    if data[:1] == b"\x01":  # a genuine Noise message 1 carrying the fuzzed payload
        sender = HandshakeState(
            True, PROLOGUE, X25519PrivateKey.generate(), rs=public_bytes(COORDINATOR)
        )
        data = sender.write_message(data[1:])
    ResponderHandshake(COORDINATOR).read_first(data)


def t_zstd(data: bytes) -> None:
    if data[:1] == b"\x01":  # a real frame, then damaged: reach past the header checks
        body = data[1:]
        packed = bytearray(zstandard.ZstdCompressor(level=1).compress(body[len(body) // 2 :]))
        for index, byte in enumerate(body[: len(body) // 2 : 3]):
            if packed:
                packed[(index * 7919 + byte) % len(packed)] ^= byte
        data = bytes(packed)
    decompress(data, CAP)


_pairs: list[SessionPair] = []  # one session pair, made on first use, renewed when it dies


def t_session(data: bytes) -> None:
    if not _pairs:
        _pairs.append(SessionPair())
    pair = _pairs[0]
    if pair.coord.dead is not None:
        pair.fresh()
    # odd first byte: the coordinator's way, TELEMETRY and INVENTORY bodies left as msgpack
    # bytes for a typed decode (`frames.decode_raw`); then that decode runs on them too
    raw = bool(data[:1]) and data[0] & 1 == 1
    pair.coord.raw_bodies = pair.lone.raw_bodies = frozenset({11, 12}) if raw else frozenset()
    if data[:1] == b"\x00":  # a proper request stream first, so seq rules are exercised
        for kind, sid, body in ((FrameType.OPEN, 1, {}), (FrameType.DATA, 1, b"x")):
            for message in pair.node.seal(Frame(kind, sid, 0, 0, body)):
                pair.coord.open(message)
                pair.lone.open(message)
    plaintexts = grown_plaintexts(data[1:])[:8]
    if raw and data[0] & 2:  # telemetry next in order (or one off): the fused case's own
        value, _ = grown_value(data[1:])
        seq = pair.coord._streams.next_seq(0, 1) + (data[0] >> 2 & 1)
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            plaintexts.insert(0, bytes([0]) + msgpack.packb([11, 0, seq, 0, value],
                                                            use_bin_type=True))
    for plaintext in plaintexts:
        message = pair.node._send.encrypt_with_ad(b"", plaintext)
        try:
            sized = pair.coord.open_sized(message)
        except TunnelError as exc:
            _lone_refuses(pair.lone, message, exc)
            pair.fresh()
            raise
        _lone_agrees(pair.lone, message, sized)
        for frame, _ in sized:
            if raw and isinstance(frame.body, bytes) and frame.type == FrameType.TELEMETRY:
                _typed_telemetry(frame.body)


def _lone_agrees(lone: Session, message: bytes, sized: list[tuple[Frame, int]]) -> None:
    """`open_lone` (the coordinator's fused case) gives what `open_sized` gave."""
    got = lone.open_lone(message)
    assert (got if isinstance(got, list) else [got]) == sized, (got, sized)
    assert isinstance(got, list) or (lone.raw_bodies and got[0].stream_id == 0)


def _lone_refuses(lone: Session, message: bytes, refused: TunnelError) -> None:
    """`open_lone` refuses what `open_sized` refused, in the same words."""
    try:
        lone.open_lone(message)
    except TunnelError as exc:
        got = exc
    else:
        raise AssertionError(f"open_lone took what open_sized refused: {refused}")
    if type(got) is not type(refused) or str(got) != str(refused):
        raise AssertionError(f"open_lone refused otherwise: {refused!r} vs {got!r}")


def _typed_telemetry(body: bytes) -> None:
    """The coordinator's typed decode of a raw TELEMETRY body: ProtocolViolation (its
    refusal: the session ends) or a message, and the map view; nothing else."""
    from meshgate.node_messages import as_received, parse_telemetry
    from meshgate.protocol import ProtocolViolation

    with contextlib.suppress(ProtocolViolation):
        parse_telemetry(body)
    as_received(body)


_STREAM_KINDS = (FrameType.END, FrameType.ERROR, FrameType.CANCEL, FrameType.WINDOW)


def _conn_pair() -> tuple[Connection, Connection]:
    pair = SessionPair()
    return Connection(pair.node, initiator=True), Connection(pair.coord, initiator=False)


def _check(conn: Connection) -> None:
    """Invariants of a live core (an AssertionError is a finding); a core that failed
    (it refused the peer: the link ends) keeps the counts of what it refused."""
    if conn.dead is not None:
        return
    assert conn.send_credit >= 0
    for state in conn.streams.values():
        assert state.send_credit >= 0
        assert 0 <= state.buffered <= state.recv_limit
        # the peer never sent past what this side allowed (its window plus what the
        # application granted with WINDOW: a bound on `buffered` by the window alone was
        # wrong once a WINDOW grant arrived, a harness finding, not the core's)
        assert state.recv_total <= state.recv_limit


def t_connection(data: bytes) -> None:
    node, coord = _conn_pair()
    sides = (node, coord)
    clock = [0.0]
    while len(data) >= 2 and node.dead is None and coord.dead is None:
        op, arg, data = data[0], data[1], data[2:]
        with contextlib.suppress(TunnelError):  # a refusal; the script goes on
            data = _step(sides[op & 1], sides[1 - (op & 1)], op, arg, data, clock)
        _check(node)
        _check(coord)


def _step(
    me: Connection, peer: Connection, op: int, arg: int, data: bytes, clock: list[float]
) -> bytes:
    """One operation of a `connection` script; the rest of the input."""
    now = clock[0]
    action = (op >> 1) % 14
    live = sorted(me.streams)
    state = me.streams[live[arg % len(live)]] if live else None
    if action == 0:
        me.open_stream({"n": arg})
    elif action == 1 and state is not None:  # DATA within credit
        n = min(arg * 97, me.sendable(state))
        if n:
            me.send(state, FrameType.DATA, bytes(n))
    elif action == 2 and state is not None:
        me.send(state, _STREAM_KINDS[arg % 4], {"credit": arg} if arg % 4 == 3 else {})
    elif action == 3 and state is not None:  # the application reads what is buffered
        me.consumed(state, min(state.buffered, arg * 1024))
    elif action == 4:
        me.goaway(f"r{arg}")
    elif action == 5:
        me.ping(now)
    elif action == 6:
        clock[0] = now = now + arg / 8
        me.tick(now)
    elif action == 7:  # deliver what one side has queued
        for message in me.data_to_send(now):
            peer.receive(message, now)
    elif action == 8:  # a raw frame from a peer holding the keys (any kind, any body)
        value, data = grown_value(data[: arg])[0], data[arg:]
        kind = FrameType(1 + arg % 14)
        sid = 0 if arg & 0x80 else (live[0] if live else arg)
        me.send_raw(Frame(kind, sid, 0, 0, value))
    elif action == 9:  # raw plaintexts, as `session` makes them
        chunk, data = data[: arg * 2], data[arg * 2 :]
        for plaintext in grown_plaintexts(chunk)[:4]:
            peer.receive(me.session._send.encrypt_with_ad(b"", plaintext), now)
    elif action == 10 and state is not None:  # DATA past the credit (even), or the cap (odd)
        # just past the edge: larger bodies only cost the fuzzer time (1 MiB of zeros went
        # through msgpack and zstd here) and reach no other code
        over = state.send_credit + 1 if arg % 2 == 0 else me.stream_window + DATA_CAP_SLACK + 1
        me.send_raw(Frame(FrameType.DATA, state.id, 0, 0, bytes(over + arg // 2)))
    elif action == 11:
        me.rekey_after_messages = 1 + arg % 5
    elif action == 12 and state is not None:  # a whole answer, fused if the peer reads it
        me.send_last(state, bytes(min(arg * 97, me.sendable(state))), {"n": arg})
    elif action == 13:  # a raw fused END: within the credit (even) or past it (odd)
        credit = state.send_credit if state is not None else arg
        size = min(arg * 97, credit) if arg % 2 == 0 else credit + 1 + arg
        sid = state.id if state is not None else arg
        me.send_raw(Frame(FrameType.END, sid, 0, FLAG_DATA, {"data": bytes(size)}))
    return data


def t_fused(data: bytes) -> None:
    """An answer sent as one fused END (`send_last`) and as DATA then END, to two twin
    pairs: the reader gets the same frames and holds the same credit either way."""
    if len(data) < 3:
        return
    size = int.from_bytes(data[:2], "big") % (FUSED_MAX + 2)  # just past it: not fused
    first = data[2] * 1024  # DATA before the answer, unread: the credit left is less
    value, _ = grown_value(data[3:])
    end = value if isinstance(value, dict) else {"v": value}
    got = []
    for fuse in (True, False):
        node, coord = _conn_pair()
        sid = coord.open_stream({})
        for message in coord.data_to_send(0.0):
            node.receive(message, 0.0)
        state = node.streams[sid]
        if first:
            node.send(state, FrameType.DATA, bytes(min(first, node.sendable(state))))
        events = []
        try:
            body = bytes(min(size, node.sendable(state)))
            if not (fuse and node.send_last(state, body, end)):
                node.send(state, FrameType.DATA, body)
                node.send(state, FrameType.END, end)
            for message in node.data_to_send(0.0):
                events += coord.receive(message, 0.0)
        except TunnelError as exc:
            got.append(("refused", str(exc)))
            continue
        frames = [(e.frame.type, e.frame.stream_id, e.frame.flags, e.frame.body)
                  for e in events if hasattr(e, "frame")]
        got.append((frames, coord.recv_total, coord.ungranted, sorted(coord.streams),
                    node.send_credit))
    assert got[0] == got[1], got


def t_wsframes(data: bytes) -> None:
    stream, cuts, server, eof = ws_grown(data)
    ws_twin_check(stream, cuts, server=server, eof=eof)


def t_token(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    if data[:1] == b"\x01":
        text = PREFIX + base64.urlsafe_b64encode(data[1:]).decode()
    with contextlib.suppress(TunnelError):
        EnrollmentToken.decode(text)
    _unb64(text)


FUNCS: dict[str, Callable[[bytes], None]] = {
    "frame": t_frame,
    "msgpack": t_msgpack,
    "hello": t_hello,
    "handshake": t_handshake,
    "zstd": t_zstd,
    "session": t_session,
    "token": t_token,
    "connection": t_connection,
    "wsframes": t_wsframes,
    "fused": t_fused,
}
