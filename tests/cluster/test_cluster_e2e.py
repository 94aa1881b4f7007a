"""Three coordinator replicas on one PostgreSQL and one Redis, HAProxy in front, three real
nodes (one with the real SmolLM2, two fronting the FAKE OpenAI server), all real processes.

The module builds the cluster once: replicas a and b, the nodes (enrolled through a), then
replica c joins late; the tests then run in order, the destructive ones (engine restarts,
SIGKILL of a replica) last.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from coordinator.ledger_journal import JOURNAL_DIR
from coordinator.store import Store
from tests.cluster.engines import PostgresServer, RedisServer
from tests.cluster.harness import Cluster, Replica
from tests.e2e.mesh import cli, wait_until

pytestmark = pytest.mark.slow

FAKE = "fake"  # what the two fake nodes serve
CONFIG = """
[dispatch]
first_token_timeout_s = 10
idle_timeout_s = 10
deadline_s = 60
queue_size = 256
node_slots = 16

[[upstream]]
name = "fakecloud"
base_url = "http://127.0.0.1:{cloud_port}/v1"
api_key_env = "MESHGATE_TEST_FAKECLOUD_KEY"
models = {{ cloudy = "cloud" }}
price_per_1k_prompt = 1000.0
"""


@dataclass
class Keys:
    load: str
    limited: str
    budget: str
    doomed: str
    admin: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    postgres = PostgresServer()
    redis = RedisServer(root)
    os.environ["MESHGATE_TEST_FAKECLOUD_KEY"] = "sk-fake"
    built = Cluster(root, postgres, redis, root / "coordinator.toml")
    try:
        cloud_port = built.start_fake_upstream("cloud")
        fake_port = built.start_fake_upstream(FAKE, "--chunks", "10", "--chunk-delay", "0.03")
        built.config.write_text(CONFIG.format(cloud_port=cloud_port))
        a, b = built.start_replicas("a", "b")
        upstream = f"{FAKE}=http://127.0.0.1:{fake_port}/v1"
        built.start_nodes({"llama": ("--model", f"smollm2={model_path}"),
                           "fake1": ("--upstream", upstream),
                           "fake2": ("--upstream", upstream)})
        built.wait_nodes([a, b], 3, 90)
        c = built.start_replica("c")  # answering: it is in the members table already
        joined = time.monotonic()
        built.wait_nodes([c], 3, 30)
        built.late_join_s = time.monotonic() - joined  # type: ignore[attr-defined]
        built.start_haproxy()
        wait_until(lambda: all("smollm2" in r.health()["node_models"]  # type: ignore[operator]
                               for r in built.replicas.values()), 60, "smollm2 served",
                   built.procs())
        yield built
    finally:
        built.stop()
        redis.stop()
        postgres.remove()
        os.environ.pop("MESHGATE_TEST_FAKECLOUD_KEY", None)


@pytest.fixture(scope="module")
def keys(cluster: Cluster) -> Keys:
    return Keys(
        load=cluster.admin("key", "create", "--name", "load"),  # the CLI finds the engines
        limited=cluster.key("limited", rpm=60),
        budget=cluster.key("budget", budget_day=5.0),
        doomed=cluster.key("doomed"),
        admin=cluster.admin_key("ops"),
    )


def _chat(base: str, key: str, model: str = FAKE, **extra: object) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 8, **extra}, timeout=60)


def test_a_replica_that_joins_later_is_learned_by_every_node(cluster: Cluster) -> None:
    assert cluster.late_join_s < 5, cluster.late_join_s  # type: ignore[attr-defined]
    print(f"late replica: every node connected {cluster.late_join_s:.2f} s after it "
          "answered")
    for replica in cluster.replicas.values():
        assert replica.nodes() == 3, replica.name
    tunnels = sorted(f"ws://127.0.0.1:{r.tunnel_port}" for r in cluster.replicas.values())

    def listed() -> list[dict[str, Any]]:  # on a's box; each replica's live view lags <= 2 s
        out: list[dict[str, Any]] = json.loads(cli(
            "coordinator", "nodes", "--json", "--state-dir", str(cluster.replicas["a"].state)
        ).stdout)
        return out

    def every_node_lists_every_replica() -> bool:
        nodes = listed()
        return [n["state"] for n in nodes] == ["connected"] * 3 and all(
            sorted(n["live"]["replicas"]) == tunnels for n in nodes)

    wait_until(every_node_lists_every_replica, 15, "every node listed on every replica")


def test_the_real_model_answers_through_the_balancer(cluster: Cluster, keys: Keys) -> None:
    client = openai.OpenAI(base_url=f"{cluster.lb}/v1", api_key=keys.load, max_retries=0)
    answer = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=6)
    assert answer.choices[0].text
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0


def test_rpm_60_across_three_replicas_is_60_not_180(cluster: Cluster, keys: Keys) -> None:
    bases = [r.api for r in cluster.replicas.values()]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda i: _chat(bases[i % 3], keys.limited).status_code,
                              range(100)))
    refill = time.monotonic() - started  # 60 a minute: one more each second
    assert set(codes) == {200, 429}
    assert 60 <= codes.count(200) <= 60 + int(refill) + 1, (codes.count(200), refill)


def test_a_budget_spent_through_one_replica_is_spent_on_all(
    cluster: Cluster, keys: Keys
) -> None:
    a, b, c = cluster.replicas["a"], cluster.replicas["b"], cluster.replicas["c"]
    for replica in (b, c):  # each replica has read this key's spend (0) from the ledger
        assert _chat(replica.api, keys.budget).status_code == 200
    assert _chat(a.api, keys.budget, model="cloudy").status_code == 200  # costs 7 of 5
    for replica in (b, c):  # pushed at once, not at the next ledger read (30 s)
        wait_until(lambda r=replica: _chat(r.api, keys.budget, model="cloudy").status_code
                   == 402, 3, f"budget spent on {replica.name}")
    assert _chat(b.api, keys.budget).status_code == 200  # local nodes still serve


def test_an_answer_cached_by_one_replica_is_served_by_another(
    cluster: Cluster, keys: Keys
) -> None:
    first = _chat(cluster.replicas["a"].api, keys.load, temperature=0, seed=11)
    again = _chat(cluster.replicas["b"].api, keys.load, temperature=0, seed=11)
    assert first.status_code == again.status_code == 200
    assert "x-meshgate-cache" not in first.headers
    assert again.headers.get("x-meshgate-cache") == "hit"
    assert again.json() == first.json()


def test_a_revoke_through_one_replica_holds_on_all_within_a_second(
    cluster: Cluster, keys: Keys
) -> None:
    others = [cluster.replicas["b"], cluster.replicas["c"]]
    for replica in others:
        assert _models(replica, keys.doomed) == 200  # verified and cached there
    revoked = httpx.delete(f"{cluster.replicas['a'].api}/admin/v1/keys/doomed",
                           headers={"Authorization": f"Bearer {keys.admin}"}, timeout=10)
    assert revoked.status_code == 200, revoked.text
    at = time.monotonic()
    waited = {}
    for replica in others:
        while _models(replica, keys.doomed) != 401:
            assert time.monotonic() - at < 1.0, f"{replica.name} still takes the revoked key"
        waited[replica.name] = time.monotonic() - at
    assert max(waited.values()) < 1.0, waited
    print(f"revoke held on the other replicas after {waited}")


def _models(replica: Replica, key: str) -> int:
    return httpx.get(f"{replica.api}/v1/models", headers={"Authorization": f"Bearer {key}"},
                     timeout=5).status_code


@dataclass
class Outcome:
    request_id: str | None
    served_by: str | None
    started: float
    ended: float
    error: str | None


class Load:
    """`clients` openai clients through HAProxy, each streaming one request after another."""

    def __init__(self, cluster: Cluster, key: str, clients: int) -> None:
        self.cluster = cluster
        self.key = key
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True)
                        for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def client(self) -> None:
        client = openai.OpenAI(base_url=f"{self.cluster.lb}/v1", api_key=self.key,
                               max_retries=0, timeout=30)
        while not self.stop.is_set():
            started, request_id, served_by, error = time.monotonic(), None, None, None
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=FAKE, messages=[{"role": "user", "content": "go"}], stream=True)
                request_id = raw.headers.get("x-request-id")
                served_by = raw.headers.get("x-served-by")
                text = "".join(c.choices[0].delta.content or "" for c in raw.parse()
                               if c.choices)
                if text.split() != [f"w{i}" for i in range(10)]:
                    error = f"truncated answer {text!r}"
            except (openai.APIError, httpx.HTTPError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            with self.lock:
                self.outcomes.append(Outcome(request_id, served_by, started,
                                             time.monotonic(), error))

    def ok_ids(self) -> set[str]:
        return {o.request_id for o in self.outcomes if o.error is None and o.request_id}

    def wait_for(self, count: int, timeout: float = 30) -> None:
        wait_until(lambda: len(self.outcomes) >= count, timeout, f"{count} answers")


def _ledger_ok(cluster: Cluster, key_name: str) -> set[str]:
    store = Store(cluster.postgres.url)
    try:
        key_id = next(k.key_id for k in store.list_keys() if k.name == key_name)
        journals = [r.state / JOURNAL_DIR for r in cluster.replicas.values()]  # uncommitted
        return {r.request_id for r in store.usage_rows_durable(*journals)
                if r.key_id == key_id and r.outcome == "ok"}
    finally:
        store.close()


def test_restarting_redis_then_postgresql_under_load_loses_nothing(
    cluster: Cluster, keys: Keys
) -> None:
    restart_key = cluster.key("restarts", rpm=100_000)  # its limits run on Redis
    with Load(cluster, restart_key, clients=6) as load:
        load.wait_for(12)
        cluster.redis.stop()
        load.wait_for(len(load.outcomes) + 12)
        cluster.redis.start()
        load.wait_for(len(load.outcomes) + 12)
        cluster.postgres.stop()
        load.wait_for(len(load.outcomes) + 12)
        cluster.postgres.start()
        load.wait_for(len(load.outcomes) + 12)
    failed = [o for o in load.outcomes if o.error is not None]
    assert not failed, failed[:5]
    print(f"redis + postgres restarts: {len(load.outcomes)} requests, 0 failed")
    _same_ledger(cluster, "restarts", load)  # spooled rows replayed
    logs = "".join(r.proc.log_text() for r in cluster.replicas.values() if r.proc)
    assert "REDIS DOWN" in logs
    assert "LEDGER: the database is back" in logs


def test_sigkill_of_one_replica_fails_only_what_was_in_flight_on_it(
    cluster: Cluster, keys: Keys
) -> None:
    victim = cluster.replicas["b"]
    survivors = [cluster.replicas["a"], cluster.replicas["c"]]
    kill_key = cluster.key("sigkill")
    seen_nodes: list[int] = []
    with Load(cluster, kill_key, clients=20) as load:
        load.wait_for(30)
        assert victim.proc is not None
        victim.proc.popen.send_signal(signal.SIGKILL)
        victim.proc.popen.wait(10)
        killed_at = time.monotonic()  # gone: its sockets are closed, its port refuses
        for _ in range(10):  # the nodes keep their tunnels to the other two
            seen_nodes += [r.nodes() for r in survivors]
        load.wait_for(len(load.outcomes) + 40)
    failed = [o for o in load.outcomes if o.error is not None]
    later = [o for o in load.outcomes if o.started > killed_at]
    assert failed, "some requests were in flight on the killed replica"
    assert all(o.started < killed_at and o.served_by in (None, "b") for o in failed), [
        (o.served_by, o.started - killed_at, o.error) for o in failed]
    assert later
    assert all(o.error is None for o in later), [o.error for o in later if o.error]
    assert set(seen_nodes) == {3}
    print(f"sigkill: {len(load.outcomes)} requests, {len(failed)} failed (all in flight on "
          f"the killed replica), {len(later)} started after its death, all answered")
    cut = _same_ledger(cluster, "sigkill", load, cut={o.request_id for o in failed
                                                       if o.request_id})
    print(f"sigkill ledger: every answer has its row; {len(cut)} row(s) of requests cut "
          "at the kill (answered by the replica, lost in its socket)")


def _same_ledger(cluster: Cluster, key_name: str, load: Load,
                 cut: set[str] | None = None) -> set[str]:
    """Every answer a client received has its ok row, and no other ok row exists, except
    (returned) rows of requests in `cut`: answered in full by a replica killed before its
    last bytes left the dead process's socket (no server can know those were lost)."""
    deadline = time.monotonic() + 20
    while True:
        ledger = _ledger_ok(cluster, key_name)
        extra = ledger - load.ok_ids()
        if load.ok_ids() <= ledger and extra <= (cut or set()):
            return extra
        if time.monotonic() > deadline:
            by_id = {o.request_id: o for o in load.outcomes}
            raise AssertionError({
                "answered, no row": sorted(load.ok_ids() - ledger),
                "row, not answered": [(i, by_id.get(i)) for i in sorted(extra)],
            })
        time.sleep(0.2)


def test_a_node_revoked_through_one_replica_is_cut_off_by_all(
    cluster: Cluster, keys: Keys
) -> None:
    survivors = [r for r in cluster.replicas.values() if r.proc and r.proc.popen.poll() is None]
    listed = httpx.get(f"{survivors[0].api}/admin/v1/nodes", timeout=10,
                       headers={"Authorization": f"Bearer {keys.admin}"}).json()
    did = next(n["did"] for n in listed["nodes"] if n["state"] == "connected"
               and n["did"] in cluster.nodes["fake2"].log_text())
    revoked = httpx.delete(f"{survivors[0].api}/admin/v1/nodes/{did}", timeout=10,
                           headers={"Authorization": f"Bearer {keys.admin}"})
    assert revoked.status_code == 200, revoked.text
    at = time.monotonic()
    wait_until(lambda: all(r.nodes() == 2 for r in survivors), 1.5, "the node cut off")
    assert time.monotonic() - at < 1.5
