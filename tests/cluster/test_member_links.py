"""The node's set of coordinator links follows the member list replicas send."""

from __future__ import annotations

import asyncio
from typing import Any

from node_agent.members import MAX_MEMBERS, MemberLinks, member_urls
from node_agent.runtimes.mesh import MeshRuntime


class StubLink:
    """Stands in for CoordinatorLink here (the e2e test runs the real one)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connected = asyncio.Event()
        self.drained = asyncio.Event()
        self.running = asyncio.Event()

    async def run(self) -> None:
        self.running.set()
        self.connected.set()
        await asyncio.Event().wait()

    async def drain(self, grace: float) -> None:
        self.drained.set()
        self.connected.clear()

    def mesh_runtime(self, model: str) -> MeshRuntime | None:
        return None

    def inventory_changed(self) -> None:
        pass


def test_member_lists_are_checked() -> None:
    assert member_urls("ws://a") is None
    assert member_urls(["ws://a", "http://b", 3, "ws://a", "wss://c", "x" * 300]) == [
        "ws://a", "wss://c"]
    assert len(member_urls([f"ws://m{i}" for i in range(9)]) or []) == MAX_MEMBERS


async def test_links_follow_the_member_list() -> None:
    made: dict[str, StubLink] = {}
    seen: list[Any] = []

    def make(url: str, on_members: Any) -> StubLink:
        seen.append(on_members)
        made[url] = StubLink(url)
        return made[url]

    links = MemberLinks(make, "ws://lb")
    task = asyncio.create_task(links.run())
    try:
        async with asyncio.timeout(5):
            await links.changed.wait()
            await made["ws://lb"].running.wait()
        assert links.connected
        links.on_members(["ws://a", "ws://b"])  # the enrollment address is no member
        assert sorted(links.links) == ["ws://a", "ws://b"]
        links.on_members(["ws://a", "ws://b", "ws://c"])  # a replica joined later
        assert sorted(links.links) == ["ws://a", "ws://b", "ws://c"]
        links.on_members(["ws://a", "ws://c"])  # b left
        assert sorted(links.links) == ["ws://a", "ws://c"]
        links.on_members([])  # an empty list changes nothing
        assert sorted(links.links) == ["ws://a", "ws://c"]
        async with asyncio.timeout(5):
            await made["ws://b"].drained.wait()
            await made["ws://lb"].drained.wait()
        assert not made["ws://a"].drained.is_set()
        links.on_members([f"ws://m{i}" for i in range(8)])
        assert len(links.links) == MAX_MEMBERS
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class DeadLink(StubLink):
    async def run(self) -> None:  # a member that never answers
        self.running.set()
        await asyncio.Event().wait()


async def test_with_no_tunnel_up_the_enrollment_url_is_dialed_again() -> None:
    made: list[str] = []

    def make(url: str, on_members: Any) -> StubLink:
        made.append(url)
        return DeadLink(url)

    links = MemberLinks(make, "ws://lb")
    task = asyncio.create_task(links.run(fallback_s=0.2))
    try:
        async with asyncio.timeout(5):
            await links.changed.wait()
        links.on_members(["ws://gone-a", "ws://gone-b"])
        assert "ws://lb" not in links.links
        links.changed.clear()
        async with asyncio.timeout(5):
            while "ws://lb" not in links.links:
                await links.changed.wait()
                links.changed.clear()
        assert made.count("ws://lb") == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
