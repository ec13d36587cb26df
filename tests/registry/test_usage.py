"""Token usage in the catalog (registry.usage through Registry): rows merged per tenant, model and hour, summed
by the day, kept across a restart and a tenant's deletion (never shown to a new tenant of the same name), and a
version-1 catalog gains the table when opened."""

from __future__ import annotations

from pathlib import Path

from registry.catalog import Registry
from registry.usage import UsageCount, UsageRow, hour_of, retired_name
from tests.registry.legacy import assert_current, make_pre_alembic

DAY0 = 1_764_547_200  # 2025-12-01T00:00:00Z
H = 3600


def _rows(reg: Registry, **kwargs) -> list[tuple]:
    args = dict(tenant=None, start=0, end=DAY0 + 10 * 86400, granularity="hour") | kwargs
    return [(r.tenant, r.adapter, r.period_start, r.requests, r.prompt_tokens, r.completion_tokens)
            for r in reg.usage(**args)]  # fmt: skip


def test_requests_of_one_hour_merge_and_days_sum_their_hours(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as reg:
        reg.create_tenant("acme")
        reg.create_tenant("beta")
        reg.add_usage({("acme", None, DAY0): UsageCount(1, 10, 5), ("acme", "german", DAY0 + H): UsageCount(2, 7, 3)})
        reg.add_usage({("acme", None, DAY0): UsageCount(1, 4, 1), ("beta", None, DAY0 + 25 * H): UsageCount(1, 2, 2)})
        assert _rows(reg) == [("acme", None, DAY0, 2, 14, 6), ("acme", "german", DAY0 + H, 2, 7, 3),
                              ("beta", None, DAY0 + 25 * H, 1, 2, 2)]  # fmt: skip
        assert _rows(reg, granularity="day") == [("acme", None, DAY0, 2, 14, 6), ("acme", "german", DAY0, 2, 7, 3),
                                                 ("beta", None, DAY0 + 86400, 1, 2, 2)]  # fmt: skip
        assert _rows(reg, tenant="beta") == [("beta", None, DAY0 + 25 * H, 1, 2, 2)]
        assert _rows(reg, adapter="german") == [("acme", "german", DAY0 + H, 2, 7, 3)]
        assert _rows(reg, adapter="") == [("acme", None, DAY0, 2, 14, 6), ("beta", None, DAY0 + 25 * H, 1, 2, 2)]
        # the window: periods that start before its end and end after its start (by the day: the whole day)
        assert _rows(reg, start=DAY0 + H, end=DAY0 + 2 * H) == [("acme", "german", DAY0 + H, 2, 7, 3)]
        assert [r[2] for r in _rows(reg, start=DAY0 + H, end=DAY0 + 2 * H, granularity="day")] == [DAY0, DAY0]
        assert reg.usage(tenant="acme", start=0, end=DAY0 + H, granularity="hour") == [
            UsageRow("acme", None, DAY0, 2, 14, 6)]  # fmt: skip


def test_usage_survives_a_restart(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as reg:
        reg.create_tenant("acme")
        reg.add_usage({("acme", "german", DAY0): UsageCount(3, 30, 12)})
    with Registry(tmp_path / "reg") as reg:
        assert _rows(reg) == [("acme", "german", DAY0, 3, 30, 12)]


def test_a_deleted_tenants_usage_is_kept_for_billing_but_never_shown_to_a_new_tenant_of_its_name(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as reg:
        reg.create_tenant("acme")
        reg.add_usage({("acme", None, DAY0): UsageCount(1, 10, 5)})
        reg.delete_tenant("acme")
        reg.create_tenant("acme")
        assert _rows(reg, tenant="acme") == []
        (row,) = _rows(reg)
        assert row[0].startswith("acme#deleted-") and row[1:] == (None, DAY0, 1, 10, 5)
        assert retired_name("acme", 7) == "acme#deleted-7"
        # usage still on its way when the tenant went is dropped, not given to a tenant created later
        reg.add_usage({("acme", None, DAY0): UsageCount(1, 2, 2)})  # the second acme's own
        reg.delete_tenant("acme")
        reg.add_usage({("acme", None, DAY0): UsageCount(1, 1, 1), ("ghost", None, DAY0): UsageCount(1, 1, 1)})
        assert sum(r[3] for r in _rows(reg)) == 2  # the two retired rows (one per deletion, or merged), no more
        assert all("#deleted-" in r[0] for r in _rows(reg))


def test_the_top_tenants_are_the_live_ones_with_the_most_tokens_in_the_window(tmp_path: Path) -> None:
    with Registry(tmp_path / "reg") as reg:
        for name in ("a", "b", "c", "gone"):
            reg.create_tenant(name)
        reg.add_usage({("a", None, DAY0): UsageCount(1, 5, 5), ("b", None, DAY0): UsageCount(1, 50, 0),
                       ("c", "x", DAY0 - 2 * H): UsageCount(1, 500, 0), ("c", None, DAY0): UsageCount(1, 1, 0),
                       ("gone", None, DAY0): UsageCount(1, 900, 0)})  # fmt: skip
        reg.delete_tenant("gone")
        assert reg.top_tenants(2, since=DAY0) == ["b", "a"]  # c's big hour is before the window
        assert reg.top_tenants(5, since=DAY0 - 2 * H) == ["c", "b", "a"]
        assert reg.top_tenants(5, since=DAY0 + 30 * 60) == ["b", "a", "c"]  # the window starts at its hour's start


def test_a_version_1_catalog_gains_the_usage_table(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    with Registry(root) as reg:
        reg.create_tenant("acme")
    db = make_pre_alembic(root / "catalog.sqlite3")
    db.execute("DROP TABLE usage")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    with Registry(root) as reg:
        assert reg.get_tenant("acme") is not None
        reg.add_usage({("acme", None, DAY0): UsageCount(1, 1, 1)})
        assert len(_rows(reg)) == 1
    assert_current(root / "catalog.sqlite3")


def test_hours_start_on_the_hour() -> None:
    assert hour_of(DAY0 + H + 59.9) == DAY0 + H and hour_of(DAY0) == DAY0
