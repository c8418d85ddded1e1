"""Reading the audit table for `mfa-proxy audit`: times, rows as text or JSON, --follow.

Every decision leaves one row (policy/engine.py); this module only reads
them back, through the store's one query (:meth:`policy.admin_store.AdminStore.query_audit`).
No Twisted here: the command starts in a few tens of milliseconds.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from policy.schema import AuditFilter, AuditRow
from policy.store import Store

RESULTS = ("accept", "reject", "challenge")
PROTOCOLS = ("radius", "ldap", "portal")
JSON_KEYS = ("time", "user", "protocol", "client", "source", "result", "reason", "latency_ms")

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

# --follow: rows of other writers may commit out of id order (PostgreSQL sequences
# are handed out before the commit); ids this far back are looked at again.
FOLLOW_LOOKBACK = 1000


def parse_time(text: str, now: float) -> float:
    """A Unix time from ISO 8601 (``2024-05-01``, ``2024-05-01T09:02``,
    ``2024-05-01T09:02:03+02:00``, ``…Z``; without an offset: local time) or
    from a relative form meaning that long ago (``90s``, ``15m``, ``1h``,
    ``7d``, ``2w``), or ``now``. ValueError says what is accepted."""
    value = text.strip()
    if value.lower() == "now":
        return now
    relative = _RELATIVE.match(value)
    if relative:
        return now - float(relative.group(1)) * _UNITS[relative.group(2).lower()]
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r}: expected ISO 8601 (2024-05-01T09:02:00, optionally with "
                         "an offset or Z) or a time ago such as 15m, 1h, 7d") from None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()  # local time, as an operator types it
    return parsed.timestamp()


def iso_utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def local_time(at: float) -> str:
    return datetime.fromtimestamp(at).astimezone().strftime("%Y-%m-%d %H:%M:%S%z")


def as_json(row: AuditRow) -> dict[str, Any]:
    r = row.record
    return {"time": iso_utc(r.at), "user": r.username, "protocol": r.protocol,
            "client": r.client, "source": r.source, "result": r.result, "reason": r.reason,
            "latency_ms": r.latency_ms}


def json_line(row: AuditRow) -> str:
    # The stored text is already escaped (policy/store.py): one row, one line.
    return json.dumps(as_json(row), ensure_ascii=False)


TEXT_HEADER = (f"{'TIME':24} {'USER':20} {'PROTOCOL':8} {'CLIENT':12} {'SOURCE':15} "
               f"{'RESULT':9} {'REASON':21} {'LATENCY':>9}")


def text_line(row: AuditRow) -> str:
    r = row.record
    latency = "-" if r.latency_ms is None else f"{r.latency_ms:.1f} ms"
    return (f"{local_time(r.at):24} {r.username:20} {r.protocol:8} {r.client:12} "
            f"{r.source or '-':15} {r.result:9} {r.reason:21} {latency:>9}")


def rows(store: Store, where: AuditFilter, limit: int | None) -> list[AuditRow]:
    """Newest first."""
    return store.admin.query_audit(where, limit)


def follow(store: Store, where: AuditFilter, initial: int, interval: float = 1.0,
           sleep: Callable[[float], None] = time.sleep,
           polls: int | None = None) -> Iterator[list[AuditRow]]:
    """Batches of rows in the order they were written: first the newest
    ``initial`` matching rows (oldest of them first), then, every ``interval``
    seconds, the rows written since (``polls`` bounds the loop, for tests)."""
    first = list(reversed(store.admin.query_audit(where, initial))) if initial else []
    newest = max((r.id for r in first), default=0)
    if not first:
        newest = store.admin.last_audit_id()
    # Rows already there when we started are not news, shown or not.
    seen = {r.id for r in store.admin.query_audit(
        replace(where, after_id=max(0, newest - FOLLOW_LOOKBACK)), None, oldest_first=True)}
    seen.update(r.id for r in first)
    yield first
    done = 0
    while polls is None or done < polls:
        sleep(interval)
        done += 1
        low = max(0, newest - FOLLOW_LOOKBACK)
        found = [r for r in store.admin.query_audit(replace(where, after_id=low), None,
                                                    oldest_first=True) if r.id not in seen]
        if found:
            seen.update(r.id for r in found)
            newest = max(newest, *(r.id for r in found))
            floor = newest - FOLLOW_LOOKBACK
            seen = {i for i in seen if i > floor}
        yield found


def emit(batch: Iterable[AuditRow], as_json_lines: bool, write: Callable[[str], None]) -> None:
    for row in batch:
        write(json_line(row) if as_json_lines else text_line(row))
