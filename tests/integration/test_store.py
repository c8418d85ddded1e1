"""The state store, against SQLite and a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from policy.keys import KeyRing
from policy.migrations import current_revision, head_revision
from policy.schema import (
    LOCKED_FOREVER,
    STATUSES,
    AuditRecord,
    StoreError,
    UserFilter,
    UserRecord,
)
from policy.store import Store
from tests.clock import ManualClock
from tests.pg import Postgres

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000
DAY = 86400
PLAIN = b"JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    server: Postgres = request.getfixturevalue("postgres")
    return server.new_database("store")


@pytest.fixture(scope="module")
def pg_store_url(postgres_url: str) -> str:
    """The session database, migrated once; tests empty its tables."""
    s = Store(postgres_url)
    s.upgrade()
    s.close()
    return postgres_url


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def store(backend: str, clock: ManualClock, request: pytest.FixtureRequest,
          tmp_path: Path) -> Iterator[Store]:
    if backend == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'state.db'}", clock)
        s.upgrade()
    else:
        # CREATE DATABASE costs half a second: reuse one database, emptied
        s = Store(request.getfixturevalue("pg_store_url"), clock)
        with s.engine.begin() as c:
            c.execute(text("TRUNCATE users, audit, repeat_cache, mail_outbox, recovery_codes"))
    yield s
    s.close()


def raw_row(store: Store, username: str) -> dict[str, object]:
    with store.engine.connect() as c:
        row = c.execute(text("SELECT * FROM users WHERE username = :u"), {"u": username})
        return dict(row.mappings().one())


# -- schema -------------------------------------------------------------------------------


def test_upgrade_reaches_head_and_is_idempotent(store: Store) -> None:
    assert current_revision(store.engine) == head_revision()
    store.check_current()
    store.upgrade()
    store.check_current()


def test_check_current_refuses_an_empty_database(url: str) -> None:
    s = Store(url)
    try:
        with pytest.raises(StoreError, match="mfa-proxy db upgrade"):
            s.check_current()
    finally:
        s.close()


def test_ping(store: Store) -> None:
    store.ping()


def test_ping_of_a_database_that_is_down() -> None:
    s = Store("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    try:
        with pytest.raises(StoreError, match="state store unavailable"):
            s.ping()
    finally:
        s.close()


def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    s = Store(f"sqlite:///{path}")
    s.upgrade()
    assert path.stat().st_mode & 0o077 == 0
    with s.engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    s.close()


# -- reads and admin writes -----------------------------------------------------------------


def test_unknown_user_has_no_record(store: Store) -> None:
    assert store.admin.get("alice") is None
    assert store.admin.list_users() == []


def test_require_then_status(store: Store, clock: ManualClock) -> None:
    store.admin.require("alice", T0 + 7 * DAY)
    rec = store.admin.get("alice")
    assert rec == UserRecord("alice", required=True, enrollment_deadline=T0 + 7 * DAY)
    assert rec.status(clock()) == "in_enrollment"
    assert rec.days_left(clock()) == 7
    assert rec.days_left(T0 + 1) == 7
    assert rec.days_left(T0 + DAY) == 6
    assert rec.status(T0 + 7 * DAY) == "enrollment_expired"
    assert rec.days_left(T0 + 7 * DAY) is None


def test_set_totp_key_enrolls_and_clears_the_replay_marker(store: Store) -> None:
    store.admin.require("alice", T0 + DAY)
    store.admin.set_totp_key("alice", b"blob-1", 1)
    assert store.hot.accept_step("alice", 100, T0)
    store.admin.set_totp_key("alice", b"blob-2", 2)
    rec = store.admin.get("alice")
    assert rec is not None
    assert (rec.totp_key, rec.key_version, rec.last_step) == (b"blob-2", 2, None)
    assert rec.status(T0) == "enrolled"
    assert raw_row(store, "alice")["enrolled_at"] == T0


def test_set_totp_key_for_a_new_user_is_enrolled_not_required(store: Store) -> None:
    store.admin.set_totp_key("bob", b"blob", 1)
    rec = store.admin.get("bob")
    assert rec is not None and rec.status(T0) == "enrolled_not_required"


def test_reset_clears_the_key(store: Store) -> None:
    store.admin.set_totp_key("alice", b"blob", 1)
    store.hot.accept_step("alice", 5, T0)
    store.admin.reset("alice", T0 + 3 * DAY)
    rec = store.admin.get("alice")
    assert rec == UserRecord("alice", required=True, enrollment_deadline=T0 + 3 * DAY)
    assert raw_row(store, "alice")["enrolled_at"] is None


def test_extend_reopens_an_expired_period(store: Store) -> None:
    store.admin.require("alice", T0 - DAY)
    assert store.admin.get("alice").status(T0) == "enrollment_expired"  # type: ignore[union-attr]
    store.admin.extend("alice", T0 + 2 * DAY)
    assert store.admin.get("alice").days_left(T0) == 2  # type: ignore[union-attr]


def test_unrequire_keeps_the_key(store: Store) -> None:
    assert not store.admin.unrequire("nobody")
    store.admin.require("alice", T0 + DAY)
    store.admin.set_totp_key("alice", b"blob", 1)
    assert store.admin.unrequire("alice")
    rec = store.admin.get("alice")
    assert rec is not None and not rec.required and rec.totp_key == b"blob"


def test_bypass(store: Store) -> None:
    store.admin.set_bypass("alice", True)
    assert store.admin.get("alice").bypass  # type: ignore[union-attr]
    store.admin.set_bypass("alice", False)
    assert not store.admin.get("alice").bypass  # type: ignore[union-attr]


def test_updated_at_follows_the_clock(store: Store, clock: ManualClock) -> None:
    store.admin.require("alice", T0 + DAY)
    clock.t += 500
    store.admin.set_bypass("alice", True)
    row = raw_row(store, "alice")
    assert (row["created_at"], row["updated_at"]) == (T0, T0 + 500)


def test_list_users_is_sorted(store: Store) -> None:
    for name in ("carol", "alice", "bob"):
        store.admin.require(name, T0 + DAY)
    assert [r.username for r in store.admin.list_users()] == ["alice", "bob", "carol"]


def test_count_by_status(store: Store) -> None:
    store.admin.require("in", T0 + DAY)
    store.admin.require("expired", T0 - 1)
    store.admin.require("enrolled", T0 + DAY)
    store.admin.set_totp_key("enrolled", b"x", 1)
    store.admin.set_totp_key("optional", b"x", 1)
    store.admin.set_bypass("plain", True)
    assert store.admin.count_by_status(T0) == {
        "enrolled": 1, "in_enrollment": 1, "enrollment_expired": 1,
        "enrolled_not_required": 1, "not_required": 1}


@pytest.mark.parametrize("deadline", [None, T0 - DAY, T0, T0 + 1, T0 + DAY],
                         ids=["none", "past", "now", "next-second", "future"])
@pytest.mark.parametrize("enrolled", [False, True], ids=["no-key", "key"])
@pytest.mark.parametrize("required", [False, True], ids=["optional", "required"])
def test_status_in_python_and_in_sql_agree(store: Store, required: bool, enrolled: bool,
                                           deadline: int | None) -> None:
    """UserRecord.status (per request) and count_by_status (the SQL CASE behind the
    users-by-status gauge) are both read from STATUS_RULES; they must say the same
    for every combination, NULLs included, on both databases."""
    with store.engine.begin() as c:
        c.execute(text("INSERT INTO users (username, required, enrollment_deadline, totp_key, "
                       "failures, bypass, created_at, updated_at) "
                       "VALUES ('u', :r, :d, :s, 0, false, 0, 0)"),
                  {"r": required, "d": deadline, "s": b"key" if enrolled else None})
    rec = store.admin.get("u")
    assert rec is not None and (rec.required, rec.enrolled) == (required, enrolled)
    python = rec.status(T0)
    assert python == status_spelled_out(required, enrolled, deadline, T0)
    sql = store.admin.count_by_status(T0)
    assert sql == {status: int(status == python) for status in STATUSES}
    # `user list` reads the same CASE (and filters by it)
    assert [(r.username, r.status) for r in store.admin.list_user_rows(T0)] == [("u", python)]
    assert [r.username for r in store.admin.list_user_rows(T0, UserFilter(status=python))] == ["u"]


def status_spelled_out(required: bool, enrolled: bool, deadline: int | None, now: int) -> str:
    """The rule as PRODUCT.md words it (what the code said before STATUS_RULES)."""
    if enrolled:
        return "enrolled" if required else "enrolled_not_required"
    if not required:
        return "not_required"
    return "in_enrollment" if deadline is not None and deadline > now else "enrollment_expired"


# -- counters ---------------------------------------------------------------------------------


def test_failures_count_and_lock_at_the_limit(store: Store) -> None:
    results = [store.hot.record_failure("alice", T0, 3, 900) for _ in range(3)]
    assert [r.failures for r in results] == [1, 2, 3]
    assert [r.lockout_started for r in results] == [False, False, True]
    assert results[-1].locked_until == T0 + 900
    rec = store.admin.get("alice")
    assert rec is not None and rec.locked(T0) and not rec.locked(T0 + 900)
    # a failure recorded while locked (a request that raced the lock) does not re-lock
    again = store.hot.record_failure("alice", T0 + 10, 3, 900)
    assert (again.failures, again.lockout_started, again.locked_until) == (4, False, None)
    assert store.admin.get("alice").locked_until == T0 + 900  # type: ignore[union-attr]


def test_expired_lock_starts_a_new_count(store: Store) -> None:
    for _ in range(3):
        store.hot.record_failure("alice", T0, 3, 60)
    r = store.hot.record_failure("alice", T0 + 60, 3, 60)
    assert (r.failures, r.lockout_started) == (1, False)
    assert store.admin.get("alice").locked_until is None  # type: ignore[union-attr]


def test_lockout_seconds_zero_is_forever(store: Store) -> None:
    r = store.hot.record_failure("alice", T0, 1, 0)
    assert r.lockout_started and r.locked_until == LOCKED_FOREVER
    assert store.admin.get("alice").locked(T0 + 100 * 365 * DAY)  # type: ignore[union-attr]
    assert store.admin.unlock("alice")
    rec = store.admin.get("alice")
    assert rec is not None and rec.failures == 0 and rec.locked_until is None


def test_record_success_clears_failures_but_not_a_lock(store: Store) -> None:
    store.hot.record_failure("alice", T0, 5, 900)
    store.hot.record_failure("alice", T0, 5, 900)
    store.hot.record_success("alice", T0)
    assert store.admin.get("alice").failures == 0  # type: ignore[union-attr]
    for _ in range(5):
        store.hot.record_failure("alice", T0, 5, 900)
    store.hot.record_success("alice", T0 + 1)  # raced the lock: must not undo it
    rec = store.admin.get("alice")
    assert rec is not None and rec.locked(T0 + 1) and rec.failures == 5
    store.hot.record_success("alice", T0 + 900)  # the lock is over
    rec = store.admin.get("alice")
    assert rec is not None and rec.failures == 0 and rec.locked_until is None
    store.hot.record_success("nobody", T0)
    assert store.admin.get("nobody") is None


def test_accept_step_moves_forward_only(store: Store) -> None:
    assert not store.hot.accept_step("alice", 10, T0)  # no such user
    store.admin.set_totp_key("alice", b"blob", 1)
    assert store.hot.accept_step("alice", 10, T0)
    assert not store.hot.accept_step("alice", 10, T0)  # same step: replay
    assert not store.hot.accept_step("alice", 9, T0)  # earlier: replay
    assert store.hot.accept_step("alice", 11, T0)
    assert store.admin.get("alice").last_step == 11  # type: ignore[union-attr]


def test_accept_step_needs_a_key(store: Store) -> None:
    store.admin.require("alice", T0 + DAY)
    assert not store.hot.accept_step("alice", 10, T0)


def test_accept_step_refused_while_locked_and_clears_failures(store: Store) -> None:
    store.admin.set_totp_key("alice", b"blob", 1)
    for _ in range(3):
        store.hot.record_failure("alice", T0, 3, 900)
    assert not store.hot.accept_step("alice", 10, T0 + 899)
    assert store.hot.accept_step("alice", 10, T0 + 900)
    rec = store.admin.get("alice")
    assert rec is not None and rec.failures == 0 and rec.locked_until is None


def test_unlock(store: Store) -> None:
    assert not store.admin.unlock("nobody")
    for _ in range(5):
        store.hot.record_failure("alice", T0, 5, 900)
    assert store.admin.unlock("alice")
    rec = store.admin.get("alice")
    assert rec is not None and rec.failures == 0 and not rec.locked(T0)


# -- keys at rest -------------------------------------------------------------------------------


def test_key_at_rest_is_not_the_plaintext(store: Store, tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "secret.key")
    store.admin.set_totp_key("alice", ring.encrypt(PLAIN, "alice"), ring.current)
    row = raw_row(store, "alice")
    stored = bytes(row["totp_key"])  # type: ignore[arg-type]
    assert PLAIN not in stored
    assert PLAIN.decode() not in repr(row)
    assert ring.decrypt(stored, "alice") == PLAIN


def test_rotation_helpers(store: Store, tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "secret.key")
    for name in ("a", "b", "c"):
        store.admin.set_totp_key(name, ring.encrypt(PLAIN, name), ring.current)
    new = ring.add_version()
    # keys_to_rotate re-reads after each batch (a batch nobody rotates comes
    # again), so take one batch at a time.
    first = next(store.admin.keys_to_rotate(new, batch=2))
    assert [u for u, _ in first] == ["a", "b"]
    for name, blob in first:
        again = ring.encrypt(ring.decrypt(blob, name), name)
        assert store.admin.replace_totp_key(name, blob, again, new)
    remaining = next(store.admin.keys_to_rotate(new, batch=10))
    assert [u for u, _ in remaining] == ["c"]
    # compare-and-swap: a key changed meanwhile is left alone
    stale = remaining[0][1]
    store.admin.set_totp_key("c", ring.encrypt(PLAIN, "c"), new)
    assert not store.admin.replace_totp_key("c", stale, b"other", new)
    assert next(store.admin.keys_to_rotate(new), None) is None


# -- bulk import -----------------------------------------------------------------------------


def test_import_users_inserts_and_updates_in_one_go(store: Store) -> None:
    store.admin.set_totp_key("alice", b"old", 1)
    store.hot.accept_step("alice", 50, T0)
    for _ in range(2):
        store.hot.record_failure("alice", T0, 5, 900)
    rows = [("alice", b"new", 2, T0 + DAY)] + [
        (f"user{i:05d}", b"k%d" % i, 2, None) for i in range(12_000)]
    assert store.admin.import_users(rows) == 12_001
    alice = store.admin.get("alice")
    assert alice is not None
    assert (alice.totp_key, alice.key_version, alice.last_step) == (b"new", 2, None)
    assert alice.required and alice.enrollment_deadline == T0 + DAY
    assert alice.failures == 2  # an import does not touch counters
    assert len(store.admin.list_users()) == 12_001
    u = store.admin.get("user11999")
    assert u is not None and u.totp_key == b"k11999" and u.required


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SAWarning")
def test_import_is_all_or_nothing(store: Store) -> None:
    """Rows go in batches of 5,000; a bad row in a later batch undoes the earlier ones."""
    from sqlalchemy.exc import IntegrityError

    rows: list[tuple[str, bytes, int, int | None]] = [
        (f"user{i:05d}", b"k", 1, None) for i in range(7_000)]
    rows[6_500] = (None, b"k", 1, None)  # type: ignore[assignment]  # NOT NULL username
    with pytest.raises(IntegrityError):
        store.admin.import_users(rows)
    assert store.admin.list_users() == []


# -- audit and the repeat cache ------------------------------------------------------------------


def test_audit_rows_and_prune(store: Store) -> None:
    store.hot.audit([AuditRecord(T0 - 100 * DAY, "old", "radius", "vpn", "10.0.0.1", "reject",
                                 "bad_password"),
                 AuditRecord(T0, "alice", "ldap", "ldap", "127.0.0.1", "accept", "ok")])
    store.hot.audit([])
    assert [r.username for r in store.admin.recent_audit()] == ["alice", "old"]
    assert [r.reason for r in store.admin.recent_audit("alice")] == ["ok"]
    store.admin.prune(T0, audit_days=90)
    assert [r.username for r in store.admin.recent_audit()] == ["alice"]


def test_audit_rows_hold_control_characters_escaped_and_nothing_else_changed(
        store: Store) -> None:
    """A refused invalid username is audited as the client sent it: a newline
    (a forged row in a text export), ESC (a terminal escape for whoever reads
    `audit`), NUL (which PostgreSQL refuses, losing the whole batch) and U+2028
    are written as visible escapes; backslashes and other text stay as sent."""
    sent = "alice\nFORGED\r\x1b[2J\x00\u2028\u0085 DOM\\x é"
    store.hot.audit([AuditRecord(T0, sent, "radius", "vpn\n", "10.0.0.1", "reject",
                                 "invalid_username")])
    escaped = "alice\\nFORGED\\r\\x1b[2J\\x00\\u2028\\x85 DOM\\x é"
    (row,) = store.admin.recent_audit()
    assert row.username == escaped
    assert row.client == "vpn\\n"
    assert (row.protocol, row.source, row.result, row.reason) == (
        "radius", "10.0.0.1", "reject", "invalid_username")
    assert store.admin.recent_audit(escaped) == [row]


def test_repeat_cache(store: Store) -> None:
    key = b"k" * 32
    assert not store.hot.repeat_hit(key, T0)
    store.hot.repeat_put(key, "alice", T0 + 30)
    assert store.hot.repeat_hit(key, T0 + 29)
    assert not store.hot.repeat_hit(key, T0 + 30)
    store.hot.repeat_put(key, "alice", T0 + 60)  # refreshed
    assert store.hot.repeat_hit(key, T0 + 59)
    store.hot.repeat_forget("alice")
    assert not store.hot.repeat_hit(key, T0)
    store.hot.repeat_put(key, "alice", T0 + 30)
    store.admin.prune(T0 + 31, audit_days=90)
    with store.engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM repeat_cache")).scalar() == 0


def test_hot_statements_refuse_a_missing_parameter(store: Store) -> None:
    # The precompiled statements merge parameters themselves: a forgotten one must
    # fail loudly, not run as NULL (``WHERE username = NULL`` would match nothing).
    with pytest.raises(TypeError, match="'u'"):
        store.hot._q_accept.run(None, step=1, t=0)
    store.admin.set_totp_key("alice", b"\x01" * 32, 1)
    assert store.hot.accept_step("alice", 5, 0.0) and not store.hot.accept_step("alice", 5, 0.0)


def test_group_commits_once_and_rolls_back_everything_on_error(store: Store) -> None:
    store.admin.set_totp_key("alice", b"\x01" * 32, 1)
    store.admin.set_totp_key("bob", b"\x02" * 32, 1)
    with store.hot.group():
        assert store.hot.accept_step("alice", 10, 0.0)
        assert store.hot.get("alice").last_step == 10  # the group reads its own writes
        store.hot.record_failure("bob", 0.0, 5, 900)
    assert store.admin.get("alice").last_step == 10 and store.admin.get("bob").failures == 1

    with pytest.raises(StoreError), store.hot.group():
        assert store.hot.accept_step("alice", 11, 0.0)
        store.hot.record_failure("bob", 0.0, 5, 900)
        raise StoreError("the disk is full")
    # nothing of the failed group stayed: the code for step 11 is still unused
    assert store.admin.get("alice").last_step == 10 and store.admin.get("bob").failures == 1
    assert store.hot.accept_step("alice", 11, 0.0)  # and the connection still works


def test_an_admin_call_inside_the_hot_group_is_refused_and_nothing_is_kept(
        store: Store) -> None:
    # The admin store's connection would wait for the group's own write lock on
    # SQLite (and, before the split, this was a rule written in a docstring).
    store.admin.set_totp_key("alice", b"\x01" * 32, 1)
    with pytest.raises(StoreError, match="inside the hot path's group"), store.hot.group():
        store.hot.record_failure("alice", 0.0, 5, 900)
        store.admin.require("alice", 10 * DAY)
    record = store.admin.get("alice")
    assert record.failures == 0 and not record.required
    with store.hot.group():  # and the thread may group again
        store.hot.record_failure("alice", 0.0, 5, 900)
    assert store.admin.get("alice").failures == 1


def test_admin_reads_see_their_own_transaction_and_the_hot_path_only_what_is_committed(
        store: Store) -> None:
    with store.admin.transaction():
        store.admin.require("bob", 10 * DAY)
        seen = store.admin.get("bob")
        assert seen is not None and seen.required
        assert store.hot.get("bob") is None  # another connection: not committed yet
    committed = store.hot.get("bob")
    assert committed is not None and committed.required


def test_background_checkpoints_leave_the_wal_to_checkpoint(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    Store(url).upgrade()
    server = Store(url, background_checkpoints=True)
    try:
        with server.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        for n in range(300):  # a few hundred commits: the WAL keeps them
            server.admin.set_totp_key(f"user{n}", b"\x01" * 32, 1)
        busy, wal_pages, copied = server.checkpoint() or (None, None, None)
        assert busy == 0 and wal_pages > 0 and copied == wal_pages
        assert len(server.admin.list_users()) == 300
    finally:
        server.close()
    # the default (CLI) keeps SQLite's own checkpoints
    cli = Store(url)
    try:
        with cli.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
    finally:
        cli.close()


def test_checkpoint_is_a_sqlite_matter(store: Store) -> None:
    done = store.checkpoint()
    assert (done is None) == (store.dialect == "postgresql")


def test_users_whose_enrollment_ends_soon(store: Store) -> None:
    store.admin.require("soon", T0 + 3600)  # 1 hour left
    store.admin.require("later", T0 + 2 * DAY)
    store.admin.require("past", T0 - 1)  # expired: no longer "ending"
    store.admin.require("keyed", T0 + 3600)
    store.admin.set_totp_key("keyed", b"x", 1)  # enrolled: not in a period
    assert store.admin.count_enrollment_ending(T0, [DAY, 3 * DAY]) == {DAY: 1, 3 * DAY: 2}
    assert store.admin.count_enrollment_ending(T0, [60]) == {60: 0}


# -- the mail outbox ----------------------------------------------------------------------


def test_a_transaction_commits_the_change_and_its_mail_together(store: Store) -> None:
    from policy.schema import OutboxMail

    with pytest.raises(RuntimeError), store.admin.transaction():
        store.admin.require("alice", T0 + DAY)
        store.admin.enqueue_mail([OutboxMail("required", "alice", T0 + DAY)])
        raise RuntimeError("crash before the commit")
    assert store.admin.get("alice") is None
    assert store.admin.mail_queue() == []
    with store.admin.transaction():
        store.admin.require("alice", T0 + DAY)
        store.admin.enqueue_mail([OutboxMail("required", "alice", T0 + DAY)])
    assert store.admin.get("alice") is not None
    assert [(m.event, m.username, m.deadline) for m in store.admin.mail_queue()] == [
        ("required", "alice", T0 + DAY)]


def test_claim_takes_each_mail_once_until_the_lease_runs_out(store: Store,
                                                            clock: ManualClock) -> None:
    from policy.schema import OutboxMail

    store.admin.enqueue_mail([OutboxMail("required", f"u{i}", T0 + DAY) for i in range(3)])
    first = store.admin.claim_mail(T0, 60, "a")
    assert [m.username for m in first] == ["u0", "u1", "u2"]
    assert all(m.attempts == 1 and m.claim_token == "a" for m in first)
    assert store.admin.claim_mail(T0 + 59, 60, "b") == []
    assert store.admin.finish_mail(first[0].id, "a", "sent", T0 + 1, address="u0@example.org")
    assert store.admin.retry_mail(first[1].id, "a", T0 + 30, "421 try later")
    again = store.admin.claim_mail(T0 + 30, 60, "b")
    assert [m.username for m in again] == ["u1"]
    assert again[0].attempts == 2 and again[0].last_error == "421 try later"
    # a's claim on u2 ran out (a died): b may take it, and a can no longer fail it
    late = store.admin.claim_mail(T0 + 61, 60, "b")
    assert [m.username for m in late] == ["u2"]
    assert not store.admin.retry_mail(first[2].id, "a", T0 + 62, "stale")
    assert store.admin.pending_mail_count() == 2
    assert [m.status for m in store.admin.mail_queue(("sent",))] == ["sent"]


def test_reminders_are_queued_once_per_period(store: Store, clock: ManualClock) -> None:
    store.admin.require("alice", T0 + 10 * 3600)   # within 24 h
    store.admin.require("bob", T0 + 3 * DAY)       # not yet
    store.admin.require("carol", T0 + 3600)
    store.admin.set_totp_key("carol", b"key", 1)     # enrolled: none
    store.admin.require("dave", T0 - 1)            # expired: none
    assert store.admin.queue_reminders(T0, DAY) == [("alice", T0 + 10 * 3600)]
    assert store.admin.queue_reminders(T0 + 60, DAY) == []
    store.admin.extend("alice", T0 + 20 * 3600)    # a new period: a new reminder
    assert store.admin.queue_reminders(T0 + 120, DAY) == [("alice", T0 + 20 * 3600)]
    assert store.admin.queue_reminders(T0 + 2 * DAY + 1, DAY) == [("bob", T0 + 3 * DAY)]
    assert [(m.event, m.username) for m in store.admin.mail_queue()] == [
        ("reminder", "alice"), ("reminder", "alice"), ("reminder", "bob")]


@pytest.mark.postgres
def test_two_instances_claim_and_remind_each_exactly_once(pg_store_url: str) -> None:
    """Several stores (as several serve instances) at once, on PostgreSQL: every
    mail is claimed by one of them, every reminder queued by one of them."""
    import threading

    from policy.schema import OutboxMail

    stores = [Store(pg_store_url, ManualClock(T0)) for _ in range(4)]
    try:
        with stores[0].engine.begin() as c:
            c.execute(text("TRUNCATE users, audit, repeat_cache, mail_outbox"))
        for i in range(200):
            stores[0].admin.require(f"user{i:03d}", T0 + 3600)
        stores[0].admin.enqueue_mail([OutboxMail("required", f"user{i:03d}", T0)
                                      for i in range(300)])
        barrier = threading.Barrier(len(stores))
        claimed: list[list[int]] = [[] for _ in stores]
        reminded: list[list[str]] = [[] for _ in stores]

        def work(n: int) -> None:
            barrier.wait()
            for _ in range(30):
                reminded[n] += [u for u, _ in stores[n].admin.queue_reminders(T0, DAY, limit=20)]
                claimed[n] += [m.id for m in stores[n].admin.claim_mail(T0, 600, f"t{n}", limit=7)]

        threads = [threading.Thread(target=work, args=(n,)) for n in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        all_claims = [i for c in claimed for i in c]
        assert len(all_claims) == len(set(all_claims))
        all_reminders = [u for r in reminded for u in r]
        assert sorted(all_reminders) == [f"user{i:03d}" for i in range(200)]
        # the reminders are in the outbox too: claimed like the others, once each
        rest = [m.id for m in stores[0].admin.claim_mail(T0, 600, "last", limit=1000)]
        assert len(all_claims) + len(rest) == 500 == len(set(all_claims) | set(rest))
    finally:
        for s in stores:
            s.close()


# -- issue 11: recovery codes, bypass --for, resync offset, delete, the filtered list -----------


def test_one_recovery_code_is_used_once_however_many_race(backend: str, url: str) -> None:
    """Several stores (as several serve instances) and threads use one code at the
    same moment: the conditional DELETE lets exactly one of them through."""
    import threading

    stores = [Store(url, ManualClock(T0)) for _ in range(4)]
    try:
        stores[0].upgrade()
        stores[0].admin.set_totp_key("alice", b"key", 1)
        stores[0].admin.replace_recovery_codes("alice", [b"h" * 32, b"i" * 32])
        for _ in range(3):
            stores[0].hot.record_failure("alice", T0, 5, 900)
        racers = 24
        barrier = threading.Barrier(racers)
        won: list[bool] = []

        def use(n: int) -> None:
            barrier.wait()
            won.append(stores[n % len(stores)].hot.use_recovery_code("alice", b"h" * 32, T0))

        threads = [threading.Thread(target=use, args=(n,)) for n in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(won) == racers and won.count(True) == 1
        assert stores[0].admin.recovery_codes_left("alice") == 1
        rec = stores[0].admin.get("alice")
        assert rec is not None and rec.failures == 0 and rec.last_step is None
    finally:
        for s in stores:
            s.close()


def test_a_recovery_code_is_not_used_while_locked(store: Store) -> None:
    store.admin.set_totp_key("alice", b"key", 1)
    store.admin.replace_recovery_codes("alice", [b"h" * 32])
    for _ in range(3):
        store.hot.record_failure("alice", T0, 3, 900)
    assert not store.hot.use_recovery_code("alice", b"h" * 32, T0 + 10)
    assert store.admin.recovery_codes_left("alice") == 1
    assert store.hot.use_recovery_code("alice", b"h" * 32, T0 + 900)  # the lock ran out
    assert not store.hot.use_recovery_code("alice", b"h" * 32, T0 + 900)
    assert not store.hot.use_recovery_code("bob", b"h" * 32, T0)


def test_a_timed_bypass_is_off_after_its_end_in_python_and_in_sql(store: Store) -> None:
    store.admin.set_bypass("alice", True, T0 + 3600)
    store.admin.set_bypass("bob", True)
    store.admin.require("carol", T0 + DAY)
    for now, bypassing in ((T0, ["alice", "bob"]), (T0 + 3600, ["bob"])):
        assert [r.username for r in store.admin.list_user_rows(now, UserFilter(bypass=True))] \
            == bypassing
        assert [n for n in ("alice", "bob", "carol")
                if store.admin.get(n).bypassed(now)] == bypassing  # type: ignore[union-attr]
    store.admin.set_bypass("alice", False)
    assert store.admin.get("alice").bypass_until is None  # type: ignore[union-attr]


def test_step_offset_and_the_replay_marker(store: Store) -> None:
    store.admin.set_totp_key("alice", b"key", 1)
    assert store.hot.accept_step("alice", 100, T0)
    assert store.admin.set_step_offset("alice", b"key", 14, 90)  # never moves the marker back
    rec = store.admin.get("alice")
    assert rec is not None and (rec.step_offset, rec.last_step) == (14, 100)
    assert store.admin.set_step_offset("alice", b"key", -3, 120)
    rec = store.admin.get("alice")
    assert rec is not None and (rec.step_offset, rec.last_step) == (-3, 120)
    assert not store.admin.set_step_offset("alice", b"other key", 5, 130)  # the key changed
    store.admin.set_totp_key("alice", b"new", 1)
    assert store.admin.get("alice").step_offset == 0  # type: ignore[union-attr]


def test_delete_user_leaves_the_audit_rows(store: Store) -> None:
    from policy.schema import OutboxMail

    store.admin.set_totp_key("alice", b"key", 1)
    store.admin.replace_recovery_codes("alice", [b"h" * 32])
    store.hot.repeat_put(b"r" * 32, "alice", T0 + 60)
    store.admin.enqueue_mail([OutboxMail("required", "alice", T0)])
    store.hot.audit([AuditRecord(T0, "alice", "radius", "vpn", "127.0.0.1", "accept", "ok")])
    store.admin.require("bob", T0 + DAY)
    assert store.admin.delete_user("alice")
    assert store.admin.get("alice") is None and store.admin.recovery_codes_left("alice") == 0
    assert not store.hot.repeat_hit(b"r" * 32, T0)
    assert [m.status for m in store.admin.mail_queue(("pending", "cancelled"))] == ["cancelled"]
    assert [r.username for r in store.admin.recent_audit("alice")] == ["alice"]
    assert store.admin.get("bob") is not None
    assert not store.admin.delete_user("alice")


def test_list_filters_in_sql(store: Store) -> None:
    store.admin.set_totp_key("enrolled", b"key", 1)
    store.admin.require("enrolled", T0 + DAY)
    store.admin.replace_recovery_codes("enrolled", [b"a" * 32, b"b" * 32])
    store.admin.require("soon", T0 + DAY)
    store.admin.require("later", T0 + 5 * DAY)
    store.admin.require("gone", T0 - 1)
    for _ in range(3):
        store.hot.record_failure("later", T0, 3, 900)

    def names(**kw: object) -> list[str]:
        return [r.username for r in store.admin.list_user_rows(T0, UserFilter(**kw))]  # type: ignore[arg-type]

    assert names() == ["enrolled", "gone", "later", "soon"]
    assert names(status="in_enrollment") == ["later", "soon"]
    assert names(expiring_within=2 * DAY) == ["soon"]
    assert names(locked=True) == ["later"]
    assert names(locked=True, expiring_within=2 * DAY) == []
    rows = {r.username: r for r in store.admin.list_user_rows(T0)}
    assert (rows["enrolled"].recovery_codes_left, rows["soon"].recovery_codes_left) == (2, 0)
    assert rows["enrolled"].enrolled and not rows["soon"].enrolled
    assert store.admin.usernames() == set(rows)


def test_migration_0006_keeps_the_users_of_0005(url: str) -> None:
    """A state at 0005 (the previous release) upgrades: its users get no offset,
    no timed bypass and no recovery codes; nothing else changes."""
    from alembic import command

    from policy.migrations import _config

    store = Store(url, ManualClock(T0))
    try:
        command.upgrade(_config(store.engine), "0005")
        with store.engine.begin() as c:
            c.execute(text("INSERT INTO users (username, required, enrollment_deadline, "
                           "totp_key, key_version, failures, bypass, created_at, updated_at) "
                           "VALUES ('alice', true, :d, :k, 1, 2, true, 0, 0)"),
                      {"d": T0 + DAY, "k": b"key"})
        store.upgrade()
        assert current_revision(store.engine) == head_revision() == "0006"
        rec = store.admin.get("alice")
        assert rec == UserRecord("alice", True, T0 + DAY, b"key", 1, None, 2, None, True,
                                 None, 0)
        assert rec.bypassed(T0 + 10 * DAY) and store.admin.recovery_codes_left("alice") == 0
    finally:
        store.close()
