"""One loud line when a periodic job starts failing, one when it works again.

A watcher that polls the database every 0.25 s would otherwise write a traceback
four times a second for the whole of a PostgreSQL outage, burying the one line an
operator needs. :class:`OutageLog` writes the first failure with its traceback,
counts the rest quietly (a changed error is written once more, without traceback),
and says how many tries failed when the job succeeds again.
"""

from __future__ import annotations

import logging

__all__ = ["OutageLog"]


class OutageLog:
    """Failure/recovery lines for one periodic job (``what`` names it in the log)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._log = logger
        self._what = what
        self.failures = 0
        """failed tries in the current (or last) outage"""
        self._last: str | None = None

    @property
    def down(self) -> bool:
        return self._last is not None

    def failed(self, exc: BaseException) -> None:
        """Call from the job's ``except`` block."""
        text = f"{type(exc).__name__}: {exc}"
        if self._last is None:
            self.failures = 0
            self._log.error("%s failed (%s); retrying quietly until it works again",
                            self._what, text, exc_info=exc)
        elif text != self._last:
            self._log.error("%s still failing, now with %s", self._what, text)
        self._last = text
        self.failures += 1

    def succeeded(self) -> None:
        """Call after each successful run (cheap when nothing was failing)."""
        if self._last is not None:
            self._log.warning("%s works again after %d failed tries", self._what, self.failures)
            self._last = None
