"""`OpenRequest.from_wire`: an OPEN's map back to the request, or one refusal that says why."""

from __future__ import annotations

from typing import Any

import pytest

from meshgate.protocol import OpenRequest, ProtocolViolation

WIRE = OpenRequest("req_1", "chat/completions", "m", False, b'{"x":1}').to_wire()


def test_a_request_goes_to_the_wire_and_back_whole() -> None:
    request = OpenRequest.from_wire(dict(WIRE))
    assert request == OpenRequest("req_1", "chat/completions", "m", False, b'{"x":1}')
    assert request.to_wire() == WIRE
    with pytest.raises(AttributeError):  # still frozen
        request.model = "other"  # type: ignore[misc]


@pytest.mark.parametrize(("body", "says"), [
    ([WIRE], "open body must be a map"),
    ({k: v for k, v in WIRE.items() if k != "model"}, "open body lacks 'model'"),
    ({k: v for k, v in WIRE.items() if k != "body"}, "open body lacks 'body'"),
    ({**WIRE, "endpoint": "models"}, "unknown endpoint 'models'"),
    ({**WIRE, "endpoint": ["chat/completions"]}, "unknown endpoint"),
    ({**WIRE, "endpoint": "models", "request_id": 5}, "unknown endpoint"),  # in this order
    ({**WIRE, "request_id": "a b"}, "request_id must be 1-128"),
    ({**WIRE, "request_id": 5, "model": 5}, "request_id must be 1-128"),
    ({**WIRE, "model": 5}, "wrong type"),
    ({**WIRE, "stream": 1}, "wrong type"),
    ({**WIRE, "body": "text"}, "wrong type"),
])
def test_each_bad_open_is_refused_with_its_reason(body: Any, says: str) -> None:
    with pytest.raises(ProtocolViolation, match=says):
        OpenRequest.from_wire(body)
