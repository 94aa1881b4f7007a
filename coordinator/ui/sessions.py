"""The web pane's login sessions: a random id in an HttpOnly SameSite=Strict cookie.

Kept in the server's memory (a restart logs everyone out), bounded, each good
for `SESSION_TTL_S` from login. A session is only as good as the admin key
that opened it: the pane checks that key is still live on every request.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

SESSION_COOKIE = "meshgate_admin"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 1000


class Sessions:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._by_id: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def open(self, admin_key_id: str) -> str:
        session = secrets.token_urlsafe(32)
        self._by_id[session] = (self._clock() + SESSION_TTL_S, admin_key_id)
        while len(self._by_id) > MAX_SESSIONS:
            self._by_id.popitem(last=False)  # the oldest login goes first
        return session

    def get(self, session: str) -> str | None:
        """The admin key id of a live session, or None."""
        entry = self._by_id.get(session)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._by_id[session]
            return None
        return entry[1]

    def close(self, session: str) -> None:
        self._by_id.pop(session, None)
