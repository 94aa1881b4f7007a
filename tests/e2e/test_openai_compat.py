"""Apps written against OpenAI's and Ollama's docs work unchanged, and every refusal is clear.

Real parts: coordinator and node processes, the tunnel on loopback, SmolLM2 in our
llama.cpp runner (n_ctx 2048), and the official `openai` and `ollama` clients.
"""

from __future__ import annotations

import io
import math
import re
import sqlite3
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.e2e.mesh import Mesh, mesh_at, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "smollm2"
HELLO = [{"role": "user", "content": "Say hello."}]
N_CTX = 2048


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("compat")):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("compat")
        enrolled = mesh.enroll("node-a")
        assert enrolled.returncode == 0, enrolled.stderr
        mesh.start_node("node-a", f"{MODEL}={model_path}", extra=("--n-ctx", str(N_CTX)))
        mesh.wait_serving(MODEL)
        yield mesh


@pytest.fixture(params=["coordinator", "node"])
def client(request: pytest.FixtureRequest, mesh: Mesh) -> openai.OpenAI:
    if request.param == "coordinator":
        return openai.OpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0)
    return openai.OpenAI(base_url=mesh.proxy("node-a"), api_key="unused", max_retries=0)


@pytest.fixture
def coordinator(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0)


def test_the_docs_plain_streaming_loop_runs_to_the_end(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8,
                                                 stream=True)
    out = io.StringIO()
    with redirect_stdout(out):
        for chunk in stream:  # exactly as in OpenAI's docs: no chunk without a choice
            print(chunk.choices[0].delta.content or "", end="")
    assert out.getvalue()


def test_the_usage_chunk_comes_only_when_asked(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert 0 < chunks[-1].usage.completion_tokens <= 8
    assert all(c.choices for c in chunks[:-1])


def test_embeddings_of_a_list_come_back_in_order_and_unit_length(client: openai.OpenAI) -> None:
    texts = ["The cat sat on the mat.", "Quarterly revenue rose by ten percent.", "hello"]
    reply = client.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64
    vectors = [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]
    assert len(vectors) == 3
    assert {len(v) for v in vectors} == {576}  # SmolLM2-135M's embedding length
    for v in vectors:
        assert math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-3)
    assert vectors[0] != vectors[1]
    assert reply.usage.prompt_tokens > 0
    floats = client.embeddings.create(model=MODEL, input="hello", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vectors[2], abs=1e-5)


def test_ollama_embed_on_the_node_port(mesh: Mesh) -> None:
    host = mesh.proxy("node-a").removesuffix("/v1")
    reply = ollama.Client(host=host).embed(model=MODEL, input=["first text", "second text"])
    assert len(reply.embeddings) == 2
    assert len(reply.embeddings[0]) == 576
    assert reply.embeddings[0] != reply.embeddings[1]


def test_models_retrieve_names_one_model_or_is_a_404(client: openai.OpenAI) -> None:
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object) == (MODEL, "model")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def over_context(client: openai.OpenAI, **extra: object) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, **extra)  # type: ignore[call-overload]
    return caught.value


def test_a_prompt_three_times_the_context_is_a_400_with_the_real_numbers(mesh: Mesh) -> None:
    long = [{"role": "user", "content": "Tell me about the weather today. " * (3 * N_CTX // 7)}]
    answers = {}
    for port in ("coordinator", "node"):
        client = openai.OpenAI(base_url=mesh.api if port == "coordinator" else mesh.proxy(
            "node-a"), api_key=mesh.key, max_retries=0)
        error = over_context(client, messages=long, max_tokens=16)
        assert error.code == "context_length_exceeded"
        assert error.param == "messages"
        answers[port] = error.message
    assert answers["coordinator"] == answers["node"]  # the node's count, passed on unchanged
    found = re.search(r"maximum context length is (\d+) tokens. However, you requested (\d+) "
                      r"tokens \((\d+) in the messages, 16 in the completion\)", answers["node"])
    assert found is not None, answers["node"]
    window, asked, prompt = map(int, found.groups())
    assert window == N_CTX
    assert asked == prompt + 16
    assert prompt > 2.5 * N_CTX


def test_max_tokens_beyond_the_context_is_a_400_not_a_cut_answer(client: openai.OpenAI) -> None:
    error = over_context(client, messages=HELLO, max_tokens=100000)
    assert error.code == "context_length_exceeded"
    assert f"maximum context length is {N_CTX} tokens" in error.message
    assert "100000 in the completion" in error.message


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"max_tokens": -1}, "max_tokens", "Expected a value >= 1, but got -1 instead"),
        ({"max_tokens": "ten"}, "max_tokens", "expected an integer, but got a string"),
        ({"max_tokens": 10**30}, "max_tokens", "integer above maximum value"),
        ({"temperature": 5}, "temperature", "Expected a value <= 2, but got 5 instead"),
        ({"top_p": 2}, "top_p", "Expected a value <= 1"),
        ({"n": 0}, "n", "Expected a value >= 1"),
        ({"messages": []}, "messages", "empty array"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "'robot'"),
    ],
)
def test_each_bad_value_is_a_400_naming_its_param(
    client: openai.OpenAI, extra: dict[str, object], param: str, words: str
) -> None:
    body: dict[str, object] = {"messages": HELLO, **extra}
    error = over_context(client, **body)
    assert error.param == param
    assert words in error.message
    assert "Input should" not in error.message  # pydantic's words
    assert "not supported between" not in error.message  # Python's


def test_unknown_routes_and_methods_answer_in_openais_shape(mesh: Mesh) -> None:
    auth = {"Authorization": f"Bearer {mesh.key}"}
    missing = httpx.post(f"{mesh.api}/chat/complete", headers=auth, json={})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_url"
    assert "POST /v1/chat/complete" in missing.json()["error"]["message"]
    wrong = httpx.get(f"{mesh.api}/chat/completions", headers=auth)
    assert wrong.status_code == 405
    assert "POST" in wrong.json()["error"]["message"]
    assert "detail" not in wrong.json()


def _metric_total(mesh: Mesh) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.api_port}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("meshgate_coordinator_requests_total{"))


def _ledger(mesh: Mesh) -> list[tuple[int | None, str | None, str | None, str]]:
    db = sqlite3.connect(f"file:{mesh.coord_state / 'coordinator.db'}?mode=ro", uri=True)
    try:
        return list(db.execute("SELECT status, error, key_id, outcome FROM usage_ledger"))
    finally:
        db.close()


def test_every_outcome_is_a_ledger_row_so_usage_and_metrics_agree(
    mesh: Mesh, coordinator: openai.OpenAI
) -> None:
    with pytest.raises(openai.BadRequestError):
        coordinator.chat.completions.create(model=MODEL, messages=HELLO, temperature=5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=mesh.api, api_key="wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=HELLO)
    with pytest.raises(openai.NotFoundError):
        coordinator.chat.completions.create(model="no-such-model", messages=HELLO)
    over_context(coordinator, messages=HELLO, max_tokens=100000)  # the node's own refusal
    coordinator.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    wait_until(lambda: len(_ledger(mesh)) == _metric_total(mesh), 10, "ledger rows = metrics")
    rows = _ledger(mesh)
    by_status = {(status, error) for status, error, _, _ in rows}
    assert (400, "decimal_above_max_value") in by_status
    assert (401, "invalid_api_key") in by_status
    assert (404, "model_not_found") in by_status
    assert (400, "context_length_exceeded") in by_status
    assert (200, None) in by_status
    keyed = {error: key for _, error, key, _ in rows}
    assert keyed["invalid_api_key"] is None
    assert keyed["model_not_found"] is not None  # the key is known by then


def test_both_ports_give_a_request_id_and_log_one_access_line(mesh: Mesh) -> None:
    auth = {"Authorization": f"Bearer {mesh.key}"}
    for n, (base, log) in enumerate([(mesh.api, mesh.root / "coordinator.log"),
                                     (mesh.proxy("node-a"), mesh.root / "node-a.log")]):
        rid = f"req_access_{n}"
        reply = httpx.post(f"{base}/chat/completions", headers={**auth, "x-request-id": rid},
                           json={"model": MODEL, "messages": HELLO, "max_tokens": 2})
        assert reply.status_code == 200
        assert reply.headers["x-request-id"] == rid

        def logged(rid: str = rid, log: Path = log) -> bool:
            return any("meshgate.access" in line and rid in line
                       for line in log.read_text().splitlines())

        wait_until(logged, 10, f"the access line of {rid}")
        text = log.read_text()
        assert "object at 0x" not in text
        assert "HTTP Request:" not in text  # no per-request line of the http client
