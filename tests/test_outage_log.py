"""meshgate/outage.py: a failing periodic job logs once, not once per try."""

from __future__ import annotations

import logging

import pytest

from meshgate.outage import OutageLog

LOG = logging.getLogger("test.outage")


def test_an_outage_is_one_error_with_traceback_then_one_recovery_line(
        caplog: pytest.LogCaptureFixture) -> None:
    outage = OutageLog(LOG, "reading the key generation")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.succeeded()
        for _ in range(40):  # ten seconds of a 0.25 s watcher against a dead database
            outage.failed(ConnectionRefusedError("connection refused"))
        assert outage.down
        outage.succeeded()
        outage.succeeded()
    records = caplog.records
    assert [r.levelno for r in records] == [logging.ERROR, logging.WARNING]
    assert records[0].exc_info is not None
    assert "reading the key generation failed (ConnectionRefusedError" in records[0].getMessage()
    assert records[1].getMessage() == "reading the key generation works again after 40 failed tries"
    assert not outage.down


def test_a_different_error_mid_outage_is_written_once_more(
        caplog: pytest.LogCaptureFixture) -> None:
    outage = OutageLog(LOG, "checking for revoked nodes")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.failed(ConnectionRefusedError("refused"))
        outage.failed(ConnectionRefusedError("refused"))
        outage.failed(TimeoutError("timed out"))
        outage.failed(TimeoutError("timed out"))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "still failing, now with TimeoutError: timed out" in messages[1]
    assert caplog.records[1].exc_info is None
