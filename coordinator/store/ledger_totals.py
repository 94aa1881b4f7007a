"""Ledger rows added to the database's grouped totals, in Python: the rows a reader in
another process finds only in a ledger journal (`LedgerStore.usage_totals(journals=...)`).

Pure: each row goes to its group as the totals query groups it (`group_of`), and the
sums, the latency average and the energy columns are combined as SQL would have
computed them over all the rows together.
"""

from __future__ import annotations

from collections.abc import Iterable

from coordinator.store.records import UsageGroup, UsageRecord, UsageTotal


def group_of(record: UsageRecord, by: UsageGroup) -> str:
    """The row's group as the totals query has it: COALESCE(key_id, '-'), COALESCE(node_did,
    upstream, '-') or model, with the columns' cuts (`_usage_values`)."""
    if by == "key":
        return record.key_id if record.key_id is not None else "-"
    if by == "node":
        if record.node_did is not None:
            return record.node_did
        return record.upstream[:200] if record.upstream is not None else "-"
    return record.model[:255]


def one_row(record: UsageRecord, group: str) -> UsageTotal:
    measured = record.joules is not None
    return UsageTotal(
        group, 1, int(record.outcome == "ok"), record.prompt_tokens, record.completion_tokens,
        record.latency_ms, record.cost, record.joules,
        record.prompt_tokens + record.completion_tokens if measured else 0, record.energy_cost)


def _optional_sum(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else a + b


def combine(a: UsageTotal, b: UsageTotal) -> UsageTotal:
    """One group's totals over the rows of both `a` and `b`."""
    requests = a.requests + b.requests
    return UsageTotal(
        a.group, requests, a.ok + b.ok, a.prompt_tokens + b.prompt_tokens,
        a.completion_tokens + b.completion_tokens,
        (a.avg_latency_ms * a.requests + b.avg_latency_ms * b.requests) / requests,
        a.cost + b.cost, _optional_sum(a.joules, b.joules), a.joules_tokens + b.joules_tokens,
        _optional_sum(a.energy_cost, b.energy_cost))


def with_rows(totals: list[UsageTotal], records: Iterable[UsageRecord],
              by: UsageGroup) -> list[UsageTotal]:
    """`totals` (grouped `by`) with `records` added; in group order, as the query's."""
    merged = {t.group: t for t in totals}
    added = False
    for record in records:
        group = group_of(record, by)
        row = one_row(record, group)
        merged[group] = combine(merged[group], row) if group in merged else row
        added = True
    return sorted(merged.values(), key=lambda t: t.group) if added else totals
