"""`mfa-proxy audit`'s own logic: times, rows as text and JSON, --follow (SQLite in
a temporary folder; the CLI end to end is in tests/integration/test_audit.py)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from policy.schema import AuditFilter, AuditRecord
from policy.store import Store
from proxy.audit import JSON_KEYS, as_json, follow, json_line, parse_time, text_line

NOW = 1_700_000_000.0


@pytest.mark.parametrize(("text", "ago"), [
    ("90s", 90), ("15m", 900), ("15min", 900), ("1h", 3600), ("7d", 7 * 86400),
    ("2w", 14 * 86400), ("1.5h", 5400), (" 1H ", 3600), ("now", 0),
])
def test_relative_times_count_back_from_now(text: str, ago: float) -> None:
    assert parse_time(text, NOW) == NOW - ago


def test_iso_times_with_an_offset_or_z() -> None:
    assert parse_time("2023-11-14T22:13:20Z", 0) == NOW
    assert parse_time("2023-11-14T23:13:20+01:00", 0) == NOW


def test_iso_times_without_an_offset_are_local_time() -> None:
    assert parse_time("2024-05-01T09:02:00", 0) == datetime(2024, 5, 1, 9, 2).timestamp()
    assert parse_time("2024-05-01", 0) == datetime(2024, 5, 1).timestamp()


@pytest.mark.parametrize("text", ["yesterday", "15", "1y", "-1h", "2024-13-01", ""])
def test_other_times_are_refused_saying_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time(text, NOW)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'state.db'}")
    s.upgrade()
    yield s
    s.close()


def rec(at: float, user: str = "alice", result: str = "accept", reason: str = "ok",
        protocol: str = "radius", client: str = "vpn", latency: float | None = 1.25
        ) -> AuditRecord:
    return AuditRecord(at, user, protocol, client, "10.0.0.1", result, reason, latency)


def test_rows_newest_first_with_every_filter(store: Store) -> None:
    store.hot.audit([rec(NOW - 300, reason="bad_code", result="reject"),
                     rec(NOW - 200, user="bob", protocol="ldap", client="ldap"),
                     rec(NOW - 100, result="challenge", reason="code_needed"),
                     rec(NOW, user="bob", protocol="portal", client="portal", latency=None)])

    def users(**where: object) -> list[tuple[str, float]]:
        return [(r.record.username, r.record.at)
                for r in store.admin.query_audit(AuditFilter(**where), None)]  # type: ignore[arg-type]

    assert users() == [("bob", NOW), ("alice", NOW - 100), ("bob", NOW - 200),
                       ("alice", NOW - 300)]
    assert users(username="alice") == [("alice", NOW - 100), ("alice", NOW - 300)]
    assert users(since=NOW - 200, until=NOW - 100) == [("alice", NOW - 100), ("bob", NOW - 200)]
    assert users(result="reject") == [("alice", NOW - 300)]
    assert users(reason="code_needed") == [("alice", NOW - 100)]
    assert users(protocol="ldap") == [("bob", NOW - 200)]
    assert users(client="portal") == [("bob", NOW)]
    assert users(username="bob", protocol="radius") == []
    assert len(store.admin.query_audit(AuditFilter(), 2)) == 2
    (row,) = store.admin.query_audit(AuditFilter(client="portal"))
    assert row.record.latency_ms is None


def test_one_user_query_reads_the_user_time_index(store: Store) -> None:
    from sqlalchemy import text

    with store.engine.connect() as c:
        plan = " ".join(str(r[-1]) for r in c.execute(text(
            "EXPLAIN QUERY PLAN SELECT * FROM audit WHERE username = 'alice' "
            "AND at >= 0 ORDER BY at DESC, id DESC LIMIT 50")))
    assert "ix_audit_user_time" in plan
    assert "TEMP B-TREE" not in plan  # no sort: the index gives the order


def test_json_has_the_contract_keys_and_text_one_line(store: Store) -> None:
    store.hot.audit([rec(NOW, user="eve\nFORGED", latency=3.14159)])
    (row,) = store.admin.query_audit(AuditFilter())
    obj = json.loads(json_line(row))
    assert tuple(obj) == JSON_KEYS
    assert obj == as_json(row)
    assert obj["time"] == "2023-11-14T22:13:20Z"
    assert obj["user"] == "eve\\nFORGED"  # escaped when written
    assert obj["latency_ms"] == 3.142
    line = text_line(row)
    assert "\n" not in line and "3.1 ms" in line and "eve\\nFORGED" in line


def test_follow_prints_the_last_rows_then_only_new_ones(store: Store) -> None:
    store.hot.audit([rec(NOW - i) for i in range(20, 0, -1)])
    polls: list[list[float]] = []

    def sleep(_seconds: float) -> None:
        if len(polls) == 1:
            store.hot.audit([rec(NOW + 1, user="bob"), rec(NOW + 2)])

    for batch in follow(store, AuditFilter(username="alice"), 3, sleep=sleep, polls=2):
        polls.append([r.record.at for r in batch])
    assert polls == [[NOW - 3, NOW - 2, NOW - 1], [NOW + 2], []]
