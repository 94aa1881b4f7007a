"""Prometheus /metrics and request ids, through the real API on a real uvicorn."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from coordinator_harness import BROKEN, MODEL, coordinator
from prometheus_client.parser import text_string_to_metric_families

from coordinator.logs import JsonFormatter, RequestIdFilter, accept_request_id
from coordinator.metrics import Metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_two_metrics_objects_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.cache_hits.inc()
    assert b"meshgate_coordinator_cache_hits_total 1.0" in a.render()
    assert b"meshgate_coordinator_cache_hits_total 0.0" in b.render()


async def test_metrics_count_requests_tokens_fallbacks_refusals_and_latency(
    tmp_path: Path,
) -> None:
    async with coordinator(tmp_path) as coord:
        key = coord.key(models=(MODEL,))
        assert (await coord.chat(key)).status_code == 200
        assert (await coord.chat(key)).status_code == 200
        assert (await coord.chat(key, model="other")).status_code in (403, 404)
        await coord.settled()
        got = await coord.http.get("/metrics")
    assert got.status_code == 200
    assert got.headers["content-type"].startswith("text/plain")
    m = samples(got.text)
    ok = (
        "meshgate_coordinator_requests_total",
        (("model", MODEL), ("route", "cloud"), ("status", "200")),
    )
    assert m[ok] == 2
    completion = ("meshgate_coordinator_tokens_total", (("kind", "completion"), ("model", MODEL)))
    assert m[completion] == 40
    assert m[("meshgate_coordinator_cloud_fallbacks_total", (("upstream", "paid"),))] == 2
    assert (
        m[
            (
                "meshgate_coordinator_request_duration_seconds_count",
                (("endpoint", "chat/completions"), ("route", "cloud")),
            )
        ]
        == 2
    )
    refused = [
        v
        for (name, labels), v in m.items()
        if name == "meshgate_coordinator_requests_total" and ("route", "none") in labels
    ]
    assert refused == [1]
    assert m[("meshgate_coordinator_nodes_connected", ())] == 0
    assert m[("meshgate_coordinator_queue_length", ())] == 0


async def test_a_client_request_id_is_echoed_and_logged(tmp_path: Path) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("coordinator")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        async with coordinator(tmp_path) as coord:
            key = coord.key()
            given = await coord.chat(key, headers={"X-Request-Id": "trace-42.a"})
            fresh = await coord.chat(key)
            broken = await coord.chat(key, model=BROKEN, headers={"X-Request-Id": "trace-43"})
            bad = await coord.chat(key, headers={"X-Request-Id": "no spaces allowed"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert given.headers["x-request-id"] == "trace-42.a"
    assert fresh.headers["x-request-id"].startswith("req_")
    assert bad.headers["x-request-id"].startswith("req_")
    assert broken.status_code == 503
    assert broken.headers["x-request-id"] == "trace-43"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [line for line in lines if line.get("request_id") == "trace-43"]
    assert failed, lines
    assert failed[0]["level"] == "warning"
    assert "failed before its first token" in failed[0]["message"]


async def test_unauthenticated_errors_also_carry_a_request_id(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as coord:
        got = await coord.http.post("/v1/chat/completions", json={})
    assert got.status_code == 401
    assert got.headers["x-request-id"].startswith("req_")


def test_request_ids_from_clients_are_kept_only_when_sane() -> None:
    assert accept_request_id("abc-1:2.3_x") == "abc-1:2.3_x"
    for bad in (None, "", "a b", "x" * 129, "é", "a\nb"):
        assert accept_request_id(bad).startswith("req_")


def test_json_lines_carry_extra_fields() -> None:
    record = logging.LogRecord(
        "coordinator.x", logging.INFO, __file__, 1, "hello %s", ("world",), None
    )
    record.node = "did:key:z"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello world"
    assert line["node"] == "did:key:z"
    assert "request_id" not in line


async def test_metrics_need_no_key_but_the_api_does(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as coord:
        assert (await coord.http.get("/metrics")).status_code == 200
        assert (await coord.http.get("/v1/models")).status_code == 401
