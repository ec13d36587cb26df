"""Token usage for billing: requests, prompt and completion tokens per tenant, model and hour, kept in the
catalog (registry.catalog owns the connection and its lock; these functions run inside its transactions).

One row per (tenant, adapter, hour): the counts of the requests that ended in that hour (UTC). Days are sums
of 24 hours. `adapter` is the adapter's name, or "" for the base model. A deleted tenant's rows are kept (the
last period still has to be billed) under a name no tenant can take (`retired_name`), so a new tenant of the
same name never sees them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    tenant            TEXT NOT NULL,
    adapter           TEXT NOT NULL,
    hour              INTEGER NOT NULL,
    requests          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (tenant, adapter, hour)
);
CREATE INDEX IF NOT EXISTS usage_hour ON usage(hour);
"""
GRANULARITIES = {"hour": 3600, "day": 86400}
HOUR = GRANULARITIES["hour"]


@dataclass
class UsageCount:
    """What some requests used: how many, their prompt tokens and their generated tokens."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: UsageCount) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens


@dataclass(frozen=True)
class UsageRow:
    """One tenant's use of one model in one period [period_start, period_start + granularity)."""

    tenant: str
    adapter: str | None  # None: the base model
    period_start: int  # unix seconds, UTC
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


UsageKey = tuple[str, str | None, int]  # tenant, adapter (None: the base), unix seconds of the hour's start


def hour_of(unix_seconds: float) -> int:
    """The start of the UTC hour that `unix_seconds` falls in."""
    return int(unix_seconds) // HOUR * HOUR


def retired_name(tenant: str, deleted: int) -> str:
    """The name a deleted tenant's usage is kept under: '#' is never in a tenant name (registry.names)."""
    return f"{tenant}#deleted-{deleted}"


def add(db: sqlite3.Connection, counts: Mapping[UsageKey, UsageCount]) -> None:
    db.executemany(
        "INSERT INTO usage (tenant, adapter, hour, requests, prompt_tokens, completion_tokens) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, adapter, hour) DO UPDATE SET "
        "requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
        "completion_tokens = completion_tokens + excluded.completion_tokens",
        [(t, a or "", hour, c.requests, c.prompt_tokens, c.completion_tokens) for (t, a, hour), c in counts.items()],
    )


def retire(db: sqlite3.Connection, tenant: str, deleted: int) -> None:
    """Moves a deleted tenant's rows under retired_name (merged with an earlier deletion of the same second)."""
    add(db, {(retired_name(tenant, deleted), a or None, h): UsageCount(r, p, c) for a, h, r, p, c in db.execute(
        "SELECT adapter, hour, requests, prompt_tokens, completion_tokens FROM usage WHERE tenant=?", (tenant,))})  # fmt: skip
    db.execute("DELETE FROM usage WHERE tenant=?", (tenant,))


def query(
    db: sqlite3.Connection, *, tenant: str | None, adapter: str | None, start: int, end: int, granularity: str
) -> list[UsageRow]:
    """The rows of periods overlapping [start, end), summed per period of `granularity`; tenant None: all
    tenants; adapter None: all models ("" selects the base)."""
    step = GRANULARITIES[granularity]
    where, args = ["hour >= ?", "hour < ?"], [start // step * step, end]
    if tenant is not None:
        where.append("tenant = ?")
        args.append(tenant)
    if adapter is not None:
        where.append("adapter = ?")
        args.append(adapter)
    rows = db.execute(
        f"SELECT tenant, adapter, hour / {step} * {step} AS period, SUM(requests), SUM(prompt_tokens), "
        f"SUM(completion_tokens) FROM usage WHERE {' AND '.join(where)} "
        "GROUP BY tenant, adapter, period ORDER BY period, tenant, adapter",
        args,
    ).fetchall()
    return [UsageRow(t, a or None, p, r, pt, ct) for t, a, p, r, pt, ct in rows]


def top_tenants(db: sqlite3.Connection, n: int, since: int) -> list[str]:
    """The n live tenants with the most tokens since `since` (most first; ties by name)."""
    rows = db.execute(
        "SELECT tenant FROM usage WHERE hour >= ? AND tenant IN (SELECT name FROM tenants) GROUP BY tenant "
        "ORDER BY SUM(prompt_tokens + completion_tokens) DESC, tenant LIMIT ?",
        (hour_of(since), n),
    ).fetchall()
    return [t for (t,) in rows]
