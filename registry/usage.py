"""Token usage for billing: requests, prompt and completion tokens per tenant, model and hour, kept in the
catalog (registry.catalog owns the connection and its lock; these functions run inside its transactions; the
table is registry.schema.usage).

One row per (tenant, adapter, hour): the counts of the requests that ended in that hour (UTC). Days are sums
of 24 hours. `adapter` is the adapter's name, or "" for the base model. A deleted tenant's rows are kept (the
last period still has to be billed) under a name no tenant can take (`retired_name`), so a new tenant of the
same name never sees them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from registry.schema import tenants, usage

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


def add(db: Connection, counts: Mapping[UsageKey, UsageCount]) -> None:
    if not counts:
        return
    # An upsert: SQLite and PostgreSQL spell it the same way (ON CONFLICT ... DO UPDATE), SQLAlchemy per dialect.
    insert = (postgresql.insert if db.dialect.name == "postgresql" else sqlite.insert)(usage)
    db.execute(
        insert.on_conflict_do_update(
            index_elements=[usage.c.tenant, usage.c.adapter, usage.c.hour],
            set_={c: usage.c[c] + insert.excluded[c] for c in ("requests", "prompt_tokens", "completion_tokens")},
        ),
        # in key order: two processes adding overlapping rows lock them in the same order (no deadlock)
        [{"tenant": t, "adapter": a or "", "hour": hour, "requests": c.requests, "prompt_tokens": c.prompt_tokens,
          "completion_tokens": c.completion_tokens}
         for (t, a, hour), c in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1] or "", kv[0][2]))],
    )  # fmt: skip


def retire(db: Connection, tenant: str, deleted: int) -> None:
    """Moves a deleted tenant's rows under retired_name (merged with an earlier deletion of the same second)."""
    rows = db.execute(select(usage.c.adapter, usage.c.hour, usage.c.requests, usage.c.prompt_tokens,
                             usage.c.completion_tokens).where(usage.c.tenant == tenant)).all()  # fmt: skip
    add(db, {(retired_name(tenant, deleted), a or None, h): UsageCount(r, p, c) for a, h, r, p, c in rows})
    db.execute(delete(usage).where(usage.c.tenant == tenant))


def query(
    db: Connection, *, tenant: str | None, adapter: str | None, start: int, end: int, granularity: str
) -> list[UsageRow]:
    """The rows of periods overlapping [start, end), summed per period of `granularity`; tenant None: all
    tenants; adapter None: all models ("" selects the base)."""
    step = GRANULARITIES[granularity]
    period = ((usage.c.hour // step) * step).label("period")
    stmt = select(usage.c.tenant, usage.c.adapter, period, func.sum(usage.c.requests), func.sum(usage.c.prompt_tokens),
                  func.sum(usage.c.completion_tokens)).where(usage.c.hour >= start // step * step, usage.c.hour < end)  # fmt: skip
    if tenant is not None:
        stmt = stmt.where(usage.c.tenant == tenant)
    if adapter is not None:
        stmt = stmt.where(usage.c.adapter == adapter)
    rows = db.execute(stmt.group_by(usage.c.tenant, usage.c.adapter, period)
                      .order_by(period, usage.c.tenant, usage.c.adapter)).all()  # fmt: skip
    # int(): PostgreSQL sums BIGINTs as NUMERIC (Decimal in Python)
    return [UsageRow(t, a or None, int(p), int(r), int(pt), int(ct)) for t, a, p, r, pt, ct in rows]


def top_tenants(db: Connection, n: int, since: int) -> list[str]:
    """The n live tenants with the most tokens since `since` (most first; ties by name)."""
    tokens = func.sum(usage.c.prompt_tokens + usage.c.completion_tokens)
    rows = db.execute(
        select(usage.c.tenant).where(usage.c.hour >= hour_of(since), usage.c.tenant.in_(select(tenants.c.name)))
        .group_by(usage.c.tenant).order_by(tokens.desc(), usage.c.tenant).limit(n)
    ).all()  # fmt: skip
    return [t for (t,) in rows]
