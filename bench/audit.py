"""``scripts/bench audit [--rows N] [--users N]``: a one-user `mfa-proxy audit` query
on a large audit table (SQLite in a temporary folder).

Prints the time of the query that `mfa-proxy audit --user U --since 7d` runs,
against a full scan of the same table (the ratio is the figure that matters:
the machine's speed cancels out). A figure, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from policy.schema import AuditFilter, AuditRecord
from policy.store import Store


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench audit")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    args = parser.parse_args(argv)
    rng = random.Random(1)  # noqa: S311 (test data)
    with tempfile.TemporaryDirectory() as folder:
        store = Store(f"sqlite:///{Path(folder) / 'state.db'}")
        store.upgrade()
        now = time.time()
        started = time.perf_counter()
        batch: list[AuditRecord] = []
        for i in range(args.rows):
            user = f"user{rng.randrange(args.users):05d}"
            batch.append(AuditRecord(now - (args.rows - i) * 0.5, user, "radius", "vpn",
                                     "10.0.0.1", rng.choice(("accept", "reject")), "ok", 1.5))
            if len(batch) == 50_000:
                store.hot.audit(batch)
                batch = []
        store.hot.audit(batch)
        print(f"wrote {args.rows} rows for {args.users} users in "
              f"{time.perf_counter() - started:.1f} s")
        where = AuditFilter(username="user00042", since=now - 7 * 86400)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            found = store.admin.query_audit(where, 50)
            times.append(time.perf_counter() - t)
        one_user = min(times)
        t = time.perf_counter()
        scan = store.admin.query_audit(AuditFilter(reason="no-such-reason"), 50)
        full_scan = time.perf_counter() - t
        print(f"one user, newest 50 of the last 7 days: {one_user * 1000:.2f} ms "
              f"({len(found)} rows)")
        print(f"full scan (a filter no index serves): {full_scan * 1000:.0f} ms "
              f"({len(scan)} rows); ratio {full_scan / one_user:.0f}x")
        store.close()
    return 0
