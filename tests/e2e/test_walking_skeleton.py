"""End to end, with real parts: coordinator and node processes, the real
SmolLM2 model in a llama.cpp runner, the encrypted tunnel on loopback, and the
`openai` client library driving both ports."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.mesh import Mesh, cli, mesh_at, wait_until

pytestmark = pytest.mark.slow

MODEL = "smollm2"
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("mesh")):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("e2e")
        enrolled = mesh.enroll("node-a")
        assert enrolled.returncode == 0, enrolled.stderr
        mesh.start_node("node-a", f"{MODEL}={model_path}")
        mesh.wait_serving(MODEL)
        yield mesh


@pytest.fixture(params=["coordinator", "node"])
def client(request: pytest.FixtureRequest, mesh: Mesh) -> openai.OpenAI:
    if request.param == "coordinator":
        return openai.OpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0)
    return openai.OpenAI(base_url=mesh.proxy("node-a"), api_key="unused", max_retries=0)


def test_chat_completion_answers_with_text_and_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12)
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 12


def test_streaming_chat_ends_with_usage_that_counts_the_chunks(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=12, stream=True, temperature=0,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert text
    assert len(usage) == 1
    assert usage[0].prompt_tokens > 0
    assert 0 < usage[0].completion_tokens <= 12


def test_completions_endpoint_answers(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6)
    assert reply.choices[0].text
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list()]


def test_unknown_model_is_a_404_in_openais_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert "no-such-model" in str(caught.value)


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"model": "smollm2"}'])
def test_malformed_body_is_a_400(mesh: Mesh, body: bytes) -> None:
    for base, key in [(mesh.api, mesh.key), (mesh.proxy("node-a"), "x")]:
        reply = httpx.post(f"{base}/chat/completions", content=body,
                           headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["type"] == "invalid_request_error"


def test_oversize_body_is_a_413(mesh: Mesh) -> None:
    body = b'{"model": "smollm2", "messages": [], "pad": "' + b"x" * (5 << 20) + b'"}'
    reply = httpx.post(f"{mesh.api}/chat/completions", content=body,
                       headers={"Authorization": f"Bearer {mesh.key}"})
    assert reply.status_code == 413


def test_missing_or_wrong_api_key_is_a_401(mesh: Mesh) -> None:
    for key in ["", "mg_nope_nope"]:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=mesh.api, api_key=key or "-", max_retries=0).models.list()
    reply = httpx.get(f"{mesh.api}/models")
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"


def test_a_token_works_once(mesh: Mesh) -> None:
    token = mesh.token()
    first = mesh.enroll("node-b", token)
    assert first.returncode == 0, first.stderr
    second = mesh.enroll("node-c", token)
    assert second.returncode != 0
    assert "already used" in second.stderr


def test_node_keys_are_private_files(mesh: Mesh) -> None:
    key_file = mesh.root / "node-a" / "identity.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_node_metrics_count_requests_from_both_paths(mesh: Mesh) -> None:
    client = openai.OpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0)
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    text = httpx.get(mesh.proxy("node-a").removesuffix("/v1") + "/metrics").text
    served = {
        via: sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("meshgate_node_requests_total{")
            and f'via="{via}"' in line
            and 'status="200"' in line
        )
        for via in ("tunnel", "proxy")
    }
    assert served["tunnel"] >= 1, text
    assert served["proxy"] >= 1, text  # the node-path tests of this module ran before


def connected(mesh: Mesh) -> list[dict[str, object]]:
    return [n for n in mesh.nodes_json() if n.get("connected")]


def test_nodes_command_lists_the_connected_node_and_its_models(mesh: Mesh) -> None:
    wait_until(lambda: len(connected(mesh)) == 1, 20, "nodes shows the node connected")
    [node] = connected(mesh)
    assert str(node["did"]).startswith("did:key:z6Mk")
    assert MODEL in node["models"]  # type: ignore[operator]
    live = node["live"]
    assert isinstance(live, dict)
    assert live["models"] == [MODEL]
    assert "rtt_ms" in live  # None until the first tunnel ping (every 15 s)
    wait_until(
        lambda: (connected(mesh)[0]["live"] or {}).get("mem_total_bytes", 0) > 0,  # type: ignore[union-attr]
        20,
        "the node's telemetry in the live view",
    )
    table = cli("coordinator", "nodes", "--state-dir", str(mesh.coord_state)).stdout
    assert "connected" in table
    assert "cpu only" in table  # no GPU on this box, said so rather than left blank


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_chunks_through_the_coordinator_match_the_runners_field_by_field(
    mesh: Mesh, endpoint: str
) -> None:
    """The node sends compact token frames (meshgate/token_frames.py) and the coordinator
    rebuilds each chunk: the openai SDK sees the same chunks, field by field, as on the
    node's own port (which passes the runner's through), bar the per-request id and time."""
    ports = {
        "coordinator": openai.OpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0),
        "node": openai.OpenAI(base_url=mesh.proxy("node-a"), api_key="unused", max_retries=0),
    }
    seen: dict[str, list[dict[str, object]]] = {}
    for name, client in ports.items():
        if endpoint == "chat":
            chunks = list(client.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=12, stream=True, temperature=0,
                stream_options={"include_usage": True}, seed=7,
            ))
        else:
            chunks = list(client.completions.create(
                model=MODEL, prompt="The capital of France is", max_tokens=8, stream=True,
                temperature=0, seed=7, stream_options={"include_usage": True},
            ))
        seen[name] = [c.model_dump(exclude={"id", "created"}) for c in chunks]
        assert len({c.id for c in chunks}) == 1  # one id through the stream
    assert seen["coordinator"] == seen["node"]


def test_model_known_but_not_connected_is_a_503(mesh: Mesh) -> None:
    """Last in the module: it stops the node."""
    mesh.nodes["node-a"].stop()
    client = openai.OpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO)
    assert caught.value.status_code == 503
    # and the admin sees it gone within a live-view period or two, not after a timeout
    wait_until(lambda: not connected(mesh), 6, "nodes shows the node gone")

