"""The fake Ollama server itself speaks Ollama's wire protocol: checked with the
real `ollama` client and raw HTTP (NDJSON by default, keep_alive durations,
load/unload answers, Ollama's error shapes), so tests built on it test
against what a real Ollama would send."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import ollama
import pytest

from tests.node.fake_ollama_server import CANNED, parse_keep_alive, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

HELLO: Any = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with running("--model", "llama3.2", "--model", "nomic-embed-text=embedding") as url:
        yield url


def test_keep_alive_reads_numbers_and_go_durations() -> None:
    assert parse_keep_alive(None) == 300.0
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive("0") == 0
    assert parse_keep_alive("1h30m") == 5400.0
    assert parse_keep_alive("250ms") == pytest.approx(0.25)
    assert parse_keep_alive(-1) is None
    assert parse_keep_alive("-1m") is None


def test_streaming_is_the_default_and_is_ndjson(url: str) -> None:
    reply = httpx.post(f"{url}/api/chat", json={"model": "llama3.2", "messages": HELLO})
    assert reply.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert len(lines) == len(CANNED) + 1
    assert [line["done"] for line in lines] == [False] * len(CANNED) + [True]
    last = lines[-1]
    assert last["done_reason"] == "stop"
    assert last["eval_count"] == len(CANNED)
    assert last["prompt_eval_count"] == 2
    assert last["message"] == {"role": "assistant", "content": ""}


def test_keep_alive_loads_for_that_long_and_zero_unloads(url: str) -> None:
    client = ollama.Client(host=url)
    loaded = client.generate(model="llama3.2", keep_alive="10m")
    assert loaded.done is True
    assert loaded.response == ""
    (running_model,) = client.ps().models
    assert running_model.model == "llama3.2:latest"
    assert running_model.expires_at is not None
    left = running_model.expires_at - datetime.now(UTC)
    assert timedelta(minutes=9) < left <= timedelta(minutes=10)
    assert running_model.size_vram
    unloaded = client.chat(model="llama3.2", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert client.ps().models == []
    assert client.chat(model="llama3.2", keep_alive=-1).done_reason == "load"
    (forever,) = client.ps().models
    assert forever.expires_at is not None
    assert forever.expires_at.year == 2318


def test_errors_have_ollamas_shape_and_status(url: str) -> None:
    client = ollama.Client(host=url)
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="missing", messages=HELLO)
    assert (caught.value.status_code, caught.value.error) == (404, "model 'missing' not found")
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="nomic-embed-text", prompt="x")
    assert caught.value.status_code == 400
    for body in (
        b"{oops",
        b'{"messages": []}',
        b'{"model": "llama3.2", "keep_alive": "soon"}',
        b'{"model": "llama3.2", "options": {"num_predict": "x"}}',
    ):
        reply = httpx.post(f"{url}/api/generate", content=body)
        assert reply.status_code == 400, body
        assert isinstance(reply.json()["error"], str)


def test_embed_and_the_catalogue(url: str) -> None:
    client = ollama.Client(host=url)
    assert [m.model for m in client.list().models] == ["llama3.2:latest", "nomic-embed-text:latest"]
    vectors = client.embed(model="nomic-embed-text", input=["a", "b"]).embeddings
    assert len(vectors) == 2
    assert sum(x * x for x in vectors[0]) == pytest.approx(1.0, abs=1e-4)
    assert client.show("nomic-embed-text").capabilities == ["embedding"]
    assert httpx.get(f"{url}/api/version").json()["version"]
