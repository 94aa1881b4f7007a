"""A whole answer written below ASGI (`HotExchange.respond`, meshgate/http_hot.py): its
headers refused as uvicorn's ``send`` refuses them (the first bad one's error, in order),
and its bytes sent at once (`CorkedTransport.write_last`: after what is held, with no loop
callback set)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from meshgate.cork import CorkedTransport
from meshgate.http_hot import _add_headers
from tests.meshgate.test_httpserver import Recorder

NAME, VALUE = "Invalid HTTP header name.", "Invalid HTTP header value."


@pytest.mark.parametrize(("headers", "error"), [
    ([(b"x-a", b"1"), (b"x-b", b"2")], None),
    ([(b"x-a", b"1"), (b"x b", b"2")], NAME),
    ([(b"x-a", b"1"), (b"x-b", b"2\r\nx-c: 3")], VALUE),
    ([(b"x-a", b"1\n"), (b"x:b", b"2")], VALUE),  # the first bad header's error, as uvicorn
    ([(b"x(a", b"1"), (b"x-b", b"\x00")], NAME),
    ([(b"content-length", b"bad\n"), (b"x-a", b"1")], None),  # replaced, never written
], ids=["fine", "name", "value", "value-first", "name-first", "length-skipped"])
def test_headers_are_refused_as_uvicorn_refuses_them(headers: list[tuple[bytes, bytes]],
                                                     error: str | None) -> None:
    cycle = SimpleNamespace(keep_alive=True)
    content: list[bytes] = []
    if error is None:
        _add_headers(cycle, headers, content)  # type: ignore[arg-type]
        assert b"".join(content) == b"".join(
            n + b": " + v + b"\r\n" for n, v in headers if n != b"content-length")
        return
    with pytest.raises(RuntimeError) as caught:
        _add_headers(cycle, headers, content)  # type: ignore[arg-type]
    assert str(caught.value) == error


def test_a_connection_close_header_ends_the_connection() -> None:
    cycle = SimpleNamespace(keep_alive=True)
    _add_headers(cycle, [(b"connection", b"Close")], [])  # type: ignore[arg-type]
    assert cycle.keep_alive is False


async def test_the_last_write_leaves_at_once_after_what_is_held() -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    corked = CorkedTransport(recorder, loop)  # type: ignore[arg-type]
    corked.write_last(b"answer")
    assert recorder.writes == [b"answer"]  # at once, nothing held
    await asyncio.sleep(0)
    assert recorder.writes == [b"answer"]
    corked.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # held for the turn's end
    corked.write_last(b"answer")
    assert recorder.writes == [b"answer", b"HTTP/1.1 100 Continue\r\n\r\nanswer"]
    assert corked.get_write_buffer_size() == 0
