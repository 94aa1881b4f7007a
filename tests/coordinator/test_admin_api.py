"""The admin API on a real coordinator app: admin key, tokens, keys, nodes, usage,
and revocation that holds from the very next request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.admin_api import KEY_WATCH_S
from tests.coordinator.admin_harness import Admined, admined
from tunnel.token import EnrollmentToken


@pytest.fixture
async def coord(tmp_path: Path) -> AsyncIterator[Admined]:
    async with admined(tmp_path) as harness:
        yield harness


async def models_status(coord: Admined, key: str) -> int:
    reply = await coord.http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    return reply.status_code


async def make_key(coord: Admined, name: str = "app") -> str:
    reply = await coord.call("POST", "/keys", json={"name": name})
    assert reply.status_code == 200, reply.text
    key: str = reply.json()["key"]
    return key


# ----------------------------------------------------------------------------- the admin key


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer mga_nope_nope", "Basic x"])
async def test_the_admin_api_refuses_a_missing_or_wrong_admin_key(
    coord: Admined, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    reply = await coord.http.get("/admin/v1/keys", headers=headers)
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"


async def test_an_apps_api_key_is_never_an_admin_key(coord: Admined) -> None:
    app_key = await make_key(coord)
    reply = await coord.http.get("/admin/v1/keys", headers={"Authorization": f"Bearer {app_key}"})
    assert reply.status_code == 401
    assert "app's API key" in reply.json()["error"]["message"]


async def test_the_first_start_wrote_a_private_admin_key(coord: Admined) -> None:
    key_file = coord.state.path / "admin.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert coord.admin_key.startswith("mga_")
    stored = coord.store.engine.connect().exec_driver_sql(
        "SELECT secret_hash FROM admin_keys").fetchall()
    assert coord.admin_key.split("_", 2)[2].encode() not in repr(stored).encode()


# ----------------------------------------------------------------------------- tokens


async def test_a_token_made_over_the_api_enrolls_as_many_nodes_as_its_uses(
    coord: Admined,
) -> None:
    reply = await coord.call("POST", "/tokens", json={"ttl": "1h", "uses": 2,
                                                      "labels": {"site": "edge"}})
    assert reply.status_code == 200, reply.text
    made = reply.json()
    token = EnrollmentToken.decode(made["token"])
    assert token.url == coord.tunnel_url
    assert token.coordinator_key == coord.state.static_public()
    for did in ("did:key:za", "did:key:zb"):
        coord.store.redeem_token(token.token_id, token.secret, did, time.time())
    [listed] = (await coord.call("GET", "/tokens")).json()["data"]
    assert (listed["uses"], listed["max_uses"], listed["state"]) == (2, 2, "used")
    assert "secret" not in str(listed)
    uses = (await coord.call("GET", f"/tokens/{token.token_id}/uses")).json()["data"]
    assert [u["did"] for u in uses] == ["did:key:za", "did:key:zb"]
    revoked = await coord.call("DELETE", f"/tokens/{token.token_id}")
    assert revoked.json()["revoked"] is True
    assert (await coord.call("DELETE", "/tokens/nope")).status_code == 404


@pytest.mark.parametrize(("body", "param"), [
    ({"ttl": "soon"}, "ttl"), ({"ttl": 0}, "ttl"), ({"uses": "many"}, "uses"),
    ({"labels": ["site"]}, "labels"), ({"labels": {"site": 1}}, "labels"),
])
async def test_a_bad_token_request_is_a_400_naming_the_field(
    coord: Admined, body: dict[str, object], param: str
) -> None:
    reply = await coord.call("POST", "/tokens", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param


async def test_zero_uses_is_refused(coord: Admined) -> None:
    reply = await coord.call("POST", "/tokens", json={"uses": 0})
    assert reply.status_code == 400
    assert "uses" in reply.json()["error"]["message"]


# ----------------------------------------------------------------------------- keys


async def test_a_key_revoked_over_the_api_is_refused_by_the_very_next_request(
    coord: Admined,
) -> None:
    key = await make_key(coord)
    assert await models_status(coord, key) == 200  # verified, now in the 5 s key cache
    assert (await coord.call("DELETE", "/keys/app")).json()["revoked"] is True
    assert await models_status(coord, key) == 401


async def test_a_rotated_key_stops_working_at_once_and_the_new_one_works(coord: Admined) -> None:
    old = await make_key(coord)
    assert await models_status(coord, old) == 200
    reply = await coord.call("POST", "/keys/app/rotate")
    new = reply.json()["key"]
    assert await models_status(coord, old) == 401
    assert await models_status(coord, new) == 200
    assert reply.json()["name"] == "app"


async def test_a_key_revoked_in_the_database_by_the_cli_is_refused_within_a_second(
    coord: Admined,
) -> None:
    """The CLI on the coordinator's box writes the store; the server notices the key
    generation move and forgets the keys it had verified."""
    from coordinator.admin_api import watch_key_changes

    watcher = asyncio.create_task(watch_key_changes(coord.store, coord.api.forget_keys))
    try:
        key = await make_key(coord)
        await asyncio.sleep(KEY_WATCH_S * 2)  # the watcher has read the generation
        assert await models_status(coord, key) == 200
        revoked_at = time.monotonic()
        await asyncio.to_thread(coord.store.revoke_key, "app")
        while await models_status(coord, key) == 200:
            assert time.monotonic() - revoked_at < 1.0, "the revoke took a second or more"
            await asyncio.sleep(0.02)
        print(f"revoked in the database: refused after {time.monotonic() - revoked_at:.3f} s")
    finally:
        watcher.cancel()


@pytest.mark.parametrize(("body", "status", "param"), [
    ({}, 400, "name"), ({"name": 5}, 400, "name"), ({"name": "x", "rpm": 0}, 400, "rpm"),
    ({"name": "x", "tpm": 1.5}, 400, "tpm"), ({"name": "x", "budget_day": -1}, 400, "budget_day"),
    ({"name": "x", "prefer": "fastest"}, 400, "prefer"),
    ({"name": "x", "colour": "red"}, 400, "colour"),
    ({"name": "x", "models": "smollm2"}, 400, "models"),
    ({"name": "x", "labels": {"site": 1}}, 400, "labels"),
])
async def test_a_bad_key_request_is_refused_in_openais_shape(
    coord: Admined, body: dict[str, object], status: int, param: str | None
) -> None:
    reply = await coord.call("POST", "/keys", json=body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert (await coord.call("GET", "/keys")).json()["data"] == []


async def test_an_oversize_or_non_json_body_is_refused(coord: Admined) -> None:
    big = await coord.call("POST", "/keys", content=b'{"name": "' + b"x" * 70_000 + b'"}')
    assert big.status_code == 413
    for raw in (b"{not json", b"[1]"):
        reply = await coord.call("POST", "/keys", content=raw)
        assert reply.status_code == 400
        assert reply.json()["error"]["type"] == "invalid_request_error"


async def test_a_duplicate_name_is_a_409_and_an_unknown_key_a_404(coord: Admined) -> None:
    await make_key(coord)
    assert (await coord.call("POST", "/keys", json={"name": "app"})).status_code == 409
    assert (await coord.call("DELETE", "/keys/nope")).status_code == 404
    assert (await coord.call("POST", "/keys/nope/rotate")).status_code == 404


async def test_keys_list_their_scopes_and_never_a_secret(coord: Admined) -> None:
    reply = await coord.call("POST", "/keys", json={"name": "scoped", "models": ["smollm2"],
                                                    "rpm": 60, "labels": {"site": "a"}})
    secret = reply.json()["key"].split("_", 2)[2]
    listed = (await coord.call("GET", "/keys")).text
    assert secret not in listed
    [key] = (await coord.call("GET", "/keys")).json()["data"]
    assert (key["models"], key["rpm"], key["labels"]) == (["smollm2"], 60, {"site": "a"})


# ----------------------------------------------------------------------------- nodes, usage


async def test_a_connected_node_is_listed_live_and_a_revoke_closes_its_tunnel(
    coord: Admined,
) -> None:
    did = await coord.node(["smollm2"], {"host": {"cpu_util_pct": 12.0}})
    [node] = (await coord.call("GET", "/nodes")).json()["nodes"]
    assert (node["did"], node["state"], node["connected"]) == (did, "connected", True)
    assert node["live"]["cpu_util_pct"] == 12.0
    assert node["labels"] == {"site": "lab"}
    assert (await coord.call("DELETE", f"/nodes/{did}")).json()["revoked"] is True
    assert coord.admin.registry.get(did) is None  # closed before the answer
    [node] = (await coord.call("GET", "/nodes")).json()["nodes"]
    assert node["state"] == "revoked"
    assert (await coord.call("DELETE", "/nodes/did:key:znope")).status_code == 404


async def test_usage_sums_the_ledger_and_a_bad_group_is_a_400(coord: Admined) -> None:
    key = await make_key(coord)
    reply = await coord.http.post("/v1/chat/completions", json={
        "model": "nobody-has-it", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == 404
    await asyncio.gather(*list(coord.api._pending))
    usage = (await coord.call("GET", "/usage", params={"by": "key", "since": "1h"})).json()
    assert usage["by"] == "key"
    assert usage["total"]["requests"] == sum(g["requests"] for g in usage["groups"])
    bad = await coord.call("GET", "/usage", params={"by": "user"})
    assert bad.status_code == 400
    assert (await coord.call("GET", "/usage", params={"since": "yesterday"})).status_code == 400


async def test_live_shows_the_fleet_with_gpus_and_models_on_disk(coord: Admined) -> None:
    gpu = {"index": 0, "name": "NVIDIA RTX 4090", "vram_total_bytes": 24 * 2**30,
           "vram_used_bytes": 6 * 2**30, "gpu_util_pct": 55, "temperature_c": 61,
           "power_draw_w": 210.5, "pcie_gen_current": 4, "pcie_width_current": 16}
    await coord.node([{"name": "smollm2", "loaded": True, "size_bytes": 100},
                      {"name": "gemma", "loaded": False, "size_bytes": 200}],
                     {"gpus": [gpu], "host": {"mem_total_bytes": 8 * 2**30}})
    live = (await coord.call("GET", "/live")).json()
    [node] = live["nodes"]
    [seen] = node["gpus"]
    assert (seen["temperature_c"], seen["power_draw_w"], seen["pcie_gen_current"]) == (
        61, 210.5, 4)
    assert {m["name"]: m["loaded"] for m in node["model_detail"]} == {
        "smollm2": True, "gemma": False}
    assert set(live["traffic"]) >= {"requests_per_s", "tokens_per_s", "p50_ms", "p99_ms"}
    assert len(live["series"]["t"]) == 360
    [gemma, smollm2] = live["models"]
    assert (gemma["disk"], gemma["loaded"], smollm2["loaded"]) == (1, 0, 1)


async def test_live_shows_the_busiest_nodes_up_to_a_limit_and_counts_them_all(
    coord: Admined,
) -> None:
    busy = await coord.node(["a"], {"host": {}})
    await coord.node(["b"], {"host": {}})
    conn = coord.admin.registry.get(busy)
    assert conn is not None
    conn.in_flight = 3
    live = (await coord.call("GET", "/live", params={"nodes": 1})).json()
    assert live["node_count"] == 2
    assert [n["did"] for n in live["nodes"]] == [busy]
    assert (await coord.call("GET", "/live", params={"nodes": -1})).status_code == 400
