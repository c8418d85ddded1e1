"""Store.require_new (the requirement a require_groups member gets at sign-in),
against SQLite and a real PostgreSQL server: conditional, and of many racing
calls exactly one starts the period."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from policy.store import Store
from tests.integration.test_store import (  # noqa: F401 (fixtures)
    T0,
    backend,
    clock,
    pg_store_url,
    raw_row,
    store,
    url,
)

pytestmark = pytest.mark.timeout(60)


def test_require_new_starts_a_period_only_for_a_user_not_required(store: Store) -> None:  # noqa: F811
    assert store.admin.require_new("alice", T0 + 100)  # no row yet: inserted
    assert not store.admin.require_new("alice", T0 + 200)  # required: left as it is
    row = raw_row(store, "alice")
    assert (row["required"], row["enrollment_deadline"]) == (True, T0 + 100)
    store.admin.set_totp_key("bob", b"blob", 1)  # a row, not required
    assert store.admin.require_new("bob", T0 + 300)
    record = store.admin.get("bob")
    assert record is not None and record.required and record.totp_key == b"blob"
    assert record.enrollment_deadline == T0 + 300


def test_racing_calls_start_one_period(backend: str, url: str, tmp_path: Path) -> None:  # noqa: F811
    first = Store(url)
    first.upgrade()
    stores = [first] + [Store(url) for _ in range(5)]
    try:
        barrier = threading.Barrier(len(stores))
        started: list[int] = []

        def race(n: int) -> None:
            barrier.wait()
            with stores[n].admin.transaction():
                if stores[n].admin.require_new("carol", T0 + n):
                    started.append(n)

        threads = [threading.Thread(target=race, args=(n,)) for n in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(started) == 1
        record = first.admin.get("carol")
        assert record is not None and record.enrollment_deadline == T0 + started[0]
    finally:
        for s in stores:
            s.close()
