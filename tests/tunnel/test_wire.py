"""`wire.WsConnection` in memory: websockets' client protocol writes the bytes, a fake
transport takes what the server side writes (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from tunnel.wire import Message, WsConnection
from tunnel.ws import WS_MAX_SIZE


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.reading = True
        self.closing = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.written.append(b"<EOF>")

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


def _open_pair() -> tuple[WsConnection, FakeTransport, ClientProtocol]:
    server = WsConnection(ServerProtocol(max_size=WS_MAX_SIZE, state=State.OPEN))
    transport = FakeTransport()
    server.connection_made(transport)
    client = ClientProtocol(parse_uri("ws://x/"), state=State.OPEN)
    return server, transport, client


def _collect(server: WsConnection, handed: bool = False) -> list[Message]:
    got: list[Message] = []

    def on_message(message: Message) -> bool:
        got.append(message)
        return handed

    server.attach(on_message, lambda why: got.append(f"closed: {why}"), lambda: None)
    return got


async def test_a_fragmented_message_is_handed_on_whole_once() -> None:
    server, _, client = _open_pair()
    got = _collect(server)
    client.send_binary(b"abc", fin=False)
    client.send_continuation(b"def", fin=False)
    client.send_continuation(b"ghi", fin=True)
    client.send_binary(b"next")
    for data in client.data_to_send():  # byte by byte: the parser waits for whole frames
        for index in range(len(data)):
            server.data_received(data[index : index + 1])
    assert got == [b"abcdefghi", b"next"]


async def test_a_message_that_hands_work_on_makes_the_rest_wait_one_loop_iteration() -> None:
    server, transport, client = _open_pair()
    got = _collect(server, handed=True)
    for n in range(3):
        client.send_binary(bytes([n]))
    server.data_received(b"".join(client.data_to_send()))  # three messages in one read
    assert got == [b"\x00"]
    assert not transport.reading  # the rest waits, and nothing more is read meanwhile
    await asyncio.sleep(0)
    assert got == [b"\x00", b"\x01"]
    await asyncio.sleep(0)
    assert got == [b"\x00", b"\x01", b"\x02"]
    assert transport.reading


async def test_messages_handled_at_once_all_go_in_the_read_that_brought_them() -> None:
    server, transport, client = _open_pair()
    got = _collect(server, handed=False)
    for n in range(50):
        client.send_binary(bytes([n]))
    server.data_received(b"".join(client.data_to_send()))
    assert got == [bytes([n]) for n in range(50)]
    assert transport.reading


async def test_a_message_over_the_limit_is_refused_with_1009_and_never_handed_on() -> None:
    server, transport, client = _open_pair()
    got = _collect(server)
    client.send_binary(b"x" * (WS_MAX_SIZE + 1))
    server.data_received(b"".join(client.data_to_send()))
    assert got == [got[0]]
    assert isinstance(got[0], str)
    assert "1009" in got[0]  # "closed: sent 1009 (message too big) ..."
    assert b"<EOF>" in transport.written


async def test_the_peers_pings_are_answered_by_websockets() -> None:
    server, transport, client = _open_pair()
    _collect(server)
    client.send_ping(b"hi")
    server.data_received(b"".join(client.data_to_send()))
    client.receive_data(b"".join(transport.written))
    (pong,) = client.events_received()
    assert pong.data == b"hi"


async def test_a_read_paused_by_two_owners_resumes_when_both_let_go() -> None:
    server, transport, _ = _open_pair()
    server.pause_reading("control")
    server.pause_reading("recv")
    server.resume_reading("control")
    assert not transport.reading
    server.resume_reading("recv")
    assert transport.reading
