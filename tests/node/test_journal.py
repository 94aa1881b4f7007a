"""The offline usage journal: durable appends, ordered confirmation, bounds, crash repair,
and the node's accounting that decides what goes in it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from node_agent.accounting import Accounting, outcome_of
from node_agent.energy import cpu_only
from node_agent.energy_meter import EnergyMeter, NvmlEnergy
from node_agent.journal import ACKED, JOURNAL, UsageJournal
from node_agent.metrics import NodeMetrics
from node_agent.nvml import NvmlSource
from tests.node.fake_nvml import FakeNvml, load_fixture


def row(i: int) -> dict[str, object]:
    return {"request_id": f"r{i}", "model": "smollm2", "prompt_tokens": i}


def test_rows_come_back_in_order_until_confirmed_then_the_files_go(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    assert not journal.has_pending()
    for i in range(5):
        assert journal.append(row(i))
    rows, offset = journal.pending(limit=3)
    assert [r["request_id"] for r in rows] == ["r0", "r1", "r2"]
    journal.ack(offset)
    assert int((tmp_path / ACKED).read_text()) == offset
    rest, end = journal.pending()
    assert [r["request_id"] for r in rest] == ["r3", "r4"]
    journal.ack(end)
    assert not journal.has_pending()
    assert not (tmp_path / JOURNAL).exists()
    assert not (tmp_path / ACKED).exists()


def test_a_restarted_node_sends_only_what_was_not_confirmed(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    for i in range(4):
        journal.append(row(i))
    _, offset = journal.pending(limit=2)
    journal.ack(offset)
    again = UsageJournal(tmp_path)  # the process died and came back
    rows, _ = again.pending()
    assert [r["request_id"] for r in rows] == ["r2", "r3"]


def test_a_torn_last_line_is_cut_off_on_open(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    journal.append(row(0))
    with (tmp_path / JOURNAL).open("ab") as f:
        f.write(b'{"request_id": "r1", "mod')  # the crash came mid-write
    again = UsageJournal(tmp_path)
    rows, _ = again.pending()
    assert [r["request_id"] for r in rows] == ["r0"]
    again.append(row(2))
    assert [r["request_id"] for r in again.pending()[0]] == ["r0", "r2"]


def test_a_garbled_line_is_skipped_and_confirmed_with_the_rest(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    journal.append(row(0))
    with (tmp_path / JOURNAL).open("ab") as f:
        f.write(b"[1, 2]\n")
    again = UsageJournal(tmp_path)
    again.append(row(1))
    rows, offset = again.pending()
    assert [r["request_id"] for r in rows] == ["r0", "r1"]
    again.ack(offset)
    assert not again.has_pending()


def test_the_journal_is_bounded_and_counts_what_it_dropped(tmp_path: Path) -> None:
    size = len(json.dumps(row(0), separators=(",", ":"))) + 1
    journal = UsageJournal(tmp_path, max_bytes=3 * size)
    assert [journal.append(row(i)) for i in range(5)] == [True, True, True, False, False]
    assert journal.dropped == 2
    journal.ack(journal.pending()[1])  # uploaded: room again
    assert journal.append(row(9))


async def test_wait_pending_wakes_on_append(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    waiter = asyncio.create_task(journal.wait_pending())
    await asyncio.sleep(0)
    assert not waiter.done()
    journal.append(row(0))
    await asyncio.wait_for(waiter, 5)


# --- accounting: what goes in, with what energy ------------------------------------------


class Link:
    up = False


def accounting(tmp_path: Path, link: Link) -> tuple[Accounting, NodeMetrics, FakeNvml]:
    fake = FakeNvml(load_fixture("nvml_h100_80gb_hbm3.json"))  # 71.234 W
    meter = EnergyMeter([NvmlEnergy(NvmlSource(fake))], clock=lambda: fake.now,
                        price_per_kwh=0.36)
    acct = Accounting(meter, UsageJournal(tmp_path), online=lambda: link.up)
    metrics = NodeMetrics(served=lambda: ["smollm2"])
    metrics.account(acct)
    return acct, metrics, fake


def test_requests_served_here_while_offline_are_journaled_with_their_energy(
    tmp_path: Path,
) -> None:
    link = Link()
    acct, metrics, fake = accounting(tmp_path, link)
    track = metrics.track("smollm2", "proxy", "chat/completions")
    fake.advance(2.0)
    track.usage = {"prompt_tokens": 12, "completion_tokens": 5}
    track.finish(200)
    link.up = True
    online = metrics.track("smollm2", "proxy", "chat/completions")
    fake.advance(1.0)
    online.finish(200)
    assert acct.journal is not None
    [got], _ = acct.journal.pending()
    assert got["model"] == "smollm2"
    assert got["endpoint"] == "chat/completions"
    assert (got["prompt_tokens"], got["completion_tokens"], got["outcome"]) == (12, 5, "ok")
    assert got["joules"] == pytest.approx(2 * 71.234, abs=0.01)
    assert got["energy_cost"] == pytest.approx(2 * 71.234 / 3.6e6 * 0.36, rel=1e-3)
    assert str(got["request_id"]).startswith("off_")
    scrape = metrics.render().decode()
    assert 'meshgate_node_energy_joules_total{model="smollm2"}' in scrape
    assert 'meshgate_node_energy_measured_joules_total{device="gpu0"}' in scrape
    pending = acct.journal.unacked_bytes
    assert pending > 0
    assert f"meshgate_node_usage_journal_pending_bytes {float(pending)}" in scrape
    assert "meshgate_node_usage_journal_dropped_total 0.0" in scrape


def test_a_request_that_started_offline_and_ended_online_is_journaled(tmp_path: Path) -> None:
    link = Link()
    acct, metrics, _ = accounting(tmp_path, link)
    track = metrics.track("smollm2", "proxy", "completions")
    link.up = True
    track.finish(499)
    assert acct.journal is not None
    [got], _ = acct.journal.pending()
    assert got["outcome"] == "client_cancelled"


def test_a_whole_answer_is_journaled_before_it_leaves_and_only_once(tmp_path: Path) -> None:
    """Pipeline.answer calls answered() before the client can read the answer: a node
    SIGKILLed as its client reads it still has the row (e2e: test_energy_offline)."""
    link = Link()
    acct, metrics, _ = accounting(tmp_path, link)
    track = metrics.track("smollm2", "proxy", "chat/completions")
    track.answered({"prompt_tokens": 3, "completion_tokens": 2})
    assert acct.journal is not None
    [got], _ = acct.journal.pending()  # on disk already, before the finish
    assert (got["prompt_tokens"], got["completion_tokens"], got["outcome"]) == (3, 2, "ok")
    track.finish(499)  # the client left before reading it: the row stands, no second one
    rows, _ = acct.journal.pending()
    assert len(rows) == 1


def test_tunnel_requests_and_models_served_elsewhere_are_never_journaled(
    tmp_path: Path,
) -> None:
    acct, metrics, fake = accounting(tmp_path, Link())
    tunnel = metrics.track("smollm2", "tunnel", "chat/completions")
    fake.advance(1.0)
    report = tunnel.energy_report()
    assert report["joules"] == pytest.approx(71.234, abs=0.01)
    assert report["energy_estimated"] is False
    tunnel.finish(200)
    far = metrics.track("llama-70b", "proxy", "chat/completions")  # the mesh's, not ours
    assert far.energy_report() == {"joules": None, "energy_estimated": False,
                                   "energy_cost": None}
    far.finish(200)
    assert acct.journal is not None
    assert not acct.journal.has_pending()


def test_outcome_words() -> None:
    assert [outcome_of(s) for s in (200, "499", 503)] == ["ok", "client_cancelled", "error_503"]


def test_a_model_on_the_cpu_alone_gets_none_of_the_gpus_energy(tmp_path: Path) -> None:
    acct, metrics, fake = accounting(tmp_path, Link())
    acct.devices_for = lambda model: cpu_only if model == "smollm2" else None
    track = metrics.track("smollm2", "tunnel", "chat/completions")
    fake.advance(1.0)
    assert track.energy_report()["joules"] is None  # the only meter here is the GPU's
    track.finish(200)
