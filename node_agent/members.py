"""One tunnel to every coordinator replica: a `CoordinatorLink` per member.

A single coordinator is a cluster of one: the node dials the URL it enrolled with and
nothing changes. A replica of a cluster names the live members (their tunnel URLs) in
the handshake's accept map and again in a `{"op": "members"}` COMMAND whenever they
change; the node then keeps one link per member, at most `MAX_MEMBERS`, each with its
own reconnect loop, and answers whichever replica asks. All replicas share one static
key, so the key pinned at enrollment holds for every member.

A member dropped from the list is drained (GOAWAY, requests in flight finish) and its
link stopped. The enrollment URL is dialed while no member list is known, and kept if
it is a member; when it is not (a load balancer's address, say), the members' own
addresses replace it, and it is dialed again only after `FALLBACK_S` with no tunnel up
(every member gone or moved).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from node_agent.runtimes.mesh import MeshRuntime

log = logging.getLogger(__name__)

MAX_MEMBERS = 5
MAX_URL = 255
DRAIN_S = 5.0
FALLBACK_S = 30.0


class MemberLink(Protocol):
    """What `CoordinatorLink` offers that this needs (tests use the real one)."""

    connected: asyncio.Event

    async def run(self) -> None: ...
    async def drain(self, grace: float) -> None: ...
    def mesh_runtime(self, model: str) -> MeshRuntime | None: ...
    def inventory_changed(self) -> None: ...


def member_urls(raw: Any) -> list[str] | None:
    """The valid tunnel URLs of a members list from a replica (None: not a list)."""
    if not isinstance(raw, list):
        return None
    urls: list[str] = []
    for url in raw:
        if (isinstance(url, str) and len(url) <= MAX_URL and url.startswith(("ws://", "wss://"))
                and url not in urls):
            urls.append(url)
    return urls[:MAX_MEMBERS]


class MemberLinks:
    """The node's links, one per live replica; same face as one `CoordinatorLink`."""

    def __init__(self, make: Callable[[str, Callable[[Any], None]], MemberLink],
                 first_url: str) -> None:
        self._make = make
        self.first_url = first_url
        self.links: dict[str, MemberLink] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._leaving: set[asyncio.Task[None]] = set()
        self.known: list[str] | None = None
        """the latest member list a replica sent; None until one did"""
        self.changed = asyncio.Event()
        """set whenever the set of links changes (tests wait on it)"""

    async def run(self, fallback_s: float = FALLBACK_S) -> None:
        """Run every member's link until cancelled; with no tunnel up for `fallback_s`, dial
        the enrollment URL again (every member may have moved)."""
        self._start(self.first_url)
        down_since: float | None = None
        try:
            while True:
                await asyncio.sleep(min(1.0, fallback_s / 4))
                now = asyncio.get_running_loop().time()
                if self.connected or self.first_url in self.links:
                    down_since = None
                elif down_since is None:
                    down_since = now
                elif now - down_since >= fallback_s:
                    log.warning("no coordinator tunnel for %.0f s: dialing %s again",
                                fallback_s, self.first_url)
                    self._start(self.first_url, force=True)
                    down_since = None
        finally:
            for task in [*self._tasks.values(), *self._leaving]:
                task.cancel()
            await asyncio.gather(*self._tasks.values(), *self._leaving,
                                 return_exceptions=True)

    def on_members(self, raw: Any) -> None:
        """A replica's member list: dial the new members, drain the ones gone."""
        urls = member_urls(raw)
        if not urls:
            return
        if urls != self.known:
            log.info("coordinator members: %s", urls)
        self.known = urls
        for url in list(self.links):
            if url not in urls:
                self._stop(url)
        for url in urls:
            if url not in self.links:
                self._start(url)

    def _start(self, url: str, *, force: bool = False) -> None:
        if len(self.links) >= MAX_MEMBERS and not force:
            log.warning("not dialing %s: already %d coordinator tunnels", url, MAX_MEMBERS)
            return
        link = self._make(url, self.on_members)
        self.links[url] = link
        self._tasks[url] = asyncio.create_task(link.run(), name=f"link {url}")
        log.info("dialing coordinator %s", url)
        self.changed.set()

    def _stop(self, url: str) -> None:
        link = self.links.pop(url)
        task = self._tasks.pop(url)
        log.info("coordinator %s left the cluster; draining its tunnel", url)

        async def leave() -> None:
            with contextlib.suppress(Exception):
                await link.drain(DRAIN_S)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        leaving = asyncio.create_task(leave(), name=f"leave {url}")
        self._leaving.add(leaving)
        leaving.add_done_callback(self._leaving.discard)
        self.changed.set()

    def _connected(self) -> Iterable[MemberLink]:
        return (link for link in self.links.values() if link.connected.is_set())

    def connected_urls(self) -> list[str]:
        return [url for url, link in self.links.items() if link.connected.is_set()]

    @property
    def connected(self) -> bool:
        return any(link.connected.is_set() for link in self.links.values())

    def mesh_runtime(self, model: str) -> MeshRuntime | None:
        """Ask any connected replica for a model this box lacks."""
        for link in self._connected():
            runtime = link.mesh_runtime(model)
            if runtime is not None:
                return runtime
        return None

    def inventory_changed(self) -> None:
        for link in self.links.values():
            link.inventory_changed()

    async def drain(self, grace: float) -> None:
        """Stopping: drain every tunnel at once."""
        await asyncio.gather(*(link.drain(grace) for link in self.links.values()),
                             return_exceptions=True)
