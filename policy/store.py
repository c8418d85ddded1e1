"""The state store: SQLAlchemy models and the only queries.

Every method is one unit of work in its own session, safe to call from many
threads. Counters and the last accepted time step change only through atomic
``UPDATE … WHERE`` statements, so several processes sharing one database
never both accept one code and never lose a failure.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    exists,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from policy.escaping import escape_controls

LOCKED_FOREVER = 2**53  # "until an admin unlocks" (lockout_seconds = 0)
DAY = 86400

# The MFA status rule, the one definition of it: each status is the facts that
# make it -- (has a key, required, enrollment deadline still ahead), None where
# either will do. UserRecord.status reads it per request; Store.count_by_status
# turns the same rows into one SQL CASE (users by status without loading them).
STATUS_RULES: tuple[tuple[str, bool, bool, bool | None], ...] = (
    ("enrolled", True, True, None),
    ("in_enrollment", False, True, True),
    ("enrollment_expired", False, True, False),
    ("enrolled_not_required", True, False, None),
    ("not_required", False, False, None),
)
STATUSES = tuple(status for status, *_ in STATUS_RULES)


def _status_by_facts() -> dict[tuple[bool, bool, bool], str]:
    """Every combination of the three facts, to its one status (checked: each
    combination is covered exactly once, so the rows can be read in any order)."""
    table: dict[tuple[bool, bool, bool], str] = {}
    for status, enrolled, required, ahead in STATUS_RULES:
        for a in (True, False) if ahead is None else (ahead,):
            facts = (enrolled, required, a)
            if facts in table:
                raise AssertionError(f"STATUS_RULES: {status} overlaps {table[facts]}")
            table[facts] = status
    if len(table) != 8:
        raise AssertionError("STATUS_RULES: not every combination has a status")
    return table


_STATUS_BY_FACTS = _status_by_facts()


class StoreError(Exception):
    """The state store cannot be used (down, locked, not migrated)."""


class Base(DeclarativeBase):
    pass


class UserState(Base):
    __tablename__ = "users"

    username: Mapped[str] = mapped_column(String(256), primary_key=True)
    required: Mapped[bool] = mapped_column(Boolean, default=False)
    enrollment_deadline: Mapped[int | None] = mapped_column(BigInteger, index=True)
    totp_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_version: Mapped[int | None] = mapped_column(Integer)
    enrolled_at: Mapped[int | None] = mapped_column(BigInteger)
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[int | None] = mapped_column(BigInteger)
    bypass: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    # A key the user is setting up in the portal: encrypted like ``totp_key``, not
    # active until a code from it verifies (then moved to ``totp_key`` in one UPDATE).
    pending_totp_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    pending_key_version: Mapped[int | None] = mapped_column(Integer)
    pending_created_at: Mapped[int | None] = mapped_column(BigInteger)
    pending_expires_at: Mapped[int | None] = mapped_column(BigInteger)
    # The deadline of the enrollment period whose reminder mail was queued: a
    # period is reminded at most once (a new deadline is a new period).
    reminded_deadline: Mapped[int | None] = mapped_column(BigInteger)
    # A bypass that ends by itself (`user bypass --for`): over at this time; NULL
    # with ``bypass``: until an admin turns it off (migration 0006).
    bypass_until: Mapped[int | None] = mapped_column(BigInteger)
    # Time steps the user's authenticator runs ahead (negative: behind), from
    # `user resync`; 0 for a new key.
    step_offset: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class RecoveryCode(Base):
    """One unused recovery code: only its keyed hash (policy/recovery.py). Using
    it deletes the row, in one conditional DELETE: one use, however many race."""

    __tablename__ = "recovery_codes"

    username: Mapped[str] = mapped_column(String(256), primary_key=True)
    code_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class AuditEntry(Base):
    __tablename__ = "audit"
    # One user's rows, newest first (`mfa-proxy audit --user`): an index range
    # read backwards, however large the table (migration 0003).
    __table_args__ = (Index("ix_audit_user_time", "username", "at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[int] = mapped_column(BigInteger, index=True)
    username: Mapped[str] = mapped_column(String(256))
    protocol: Mapped[str] = mapped_column(String(16))
    client: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(64))
    result: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32))
    # From the request reaching the core to its decision (NULL: rows written
    # before 0003, and rows no request made, such as an admin's).
    latency_ms: Mapped[float | None] = mapped_column(Float)


class RepeatEntry(Base):
    """Idempotent-success cache: only a keyed hash of the credential, never the
    credential; only successes; shared by every instance on the database."""

    __tablename__ = "repeat_cache"

    key: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    username: Mapped[str] = mapped_column(String(256), index=True)
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)


class PortalSessionRow(Base):
    """A portal session: only a hash of its id is kept (a copy of the database
    lets nobody in); the identity the password step verified stays here, never
    in the page."""

    __tablename__ = "portal_sessions"

    id_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    username: Mapped[str] = mapped_column(String(256), index=True)
    stage: Mapped[str] = mapped_column(String(16))
    identity: Mapped[str] = mapped_column(String(4096))  # JSON: the directory entry
    mfa_verified: Mapped[bool] = mapped_column(Boolean, default=False)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)
    # New recovery codes (encrypted) to show once, on the next account page.
    recovery_display: Mapped[bytes | None] = mapped_column(LargeBinary)


class OutboxRow(Base):
    """A mail to send (policy/mail.py says which), written in the transaction of
    the change that caused it; ``serve`` claims it (``claimed_until``, a lease
    with ``claim_token``), sends it and marks it sent, or schedules a retry."""

    __tablename__ = "mail_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event: Mapped[str] = mapped_column(String(16))
    username: Mapped[str] = mapped_column(String(256), index=True)
    deadline: Mapped[int | None] = mapped_column(BigInteger)
    detail: Mapped[str] = mapped_column(String(1024))  # JSON: where from, what replaced
    created_at: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), index=True)  # MAIL_STATUSES
    next_attempt_at: Mapped[int] = mapped_column(BigInteger, index=True)
    claimed_until: Mapped[int | None] = mapped_column(BigInteger)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(512))
    address: Mapped[str | None] = mapped_column(String(320))  # where it went (or was tried)
    done_at: Mapped[int | None] = mapped_column(BigInteger)


# pending: to send (or being sent, while claimed); sent; failed: given up (the
# error says why); cancelled: no longer true when its turn came (a reminder
# for a user who enrolled meanwhile).
MAIL_STATUSES = ("pending", "sent", "failed", "cancelled")


@dataclass(frozen=True)
class OutboxMail:
    """A mail to queue: ``event`` for ``username``; ``deadline`` (Unix time) of the
    period it is about, if any; ``detail``: JSON text (source, replaced ...)."""

    event: str
    username: str
    deadline: int | None = None
    detail: str = "{}"


@dataclass(frozen=True)
class QueuedMail:
    """One outbox row as stored."""

    id: int
    event: str
    username: str
    deadline: int | None
    detail: str
    created_at: int
    status: str
    next_attempt_at: int
    attempts: int
    last_error: str | None
    address: str | None
    claim_token: str | None
    done_at: int | None


@dataclass(frozen=True)
class PendingKey:
    """A key being set up: encrypted, and when it stops being usable."""

    totp_key: bytes
    key_version: int
    created_at: int
    expires_at: int


@dataclass(frozen=True)
class SessionData:
    """One portal session as stored (``id_hash``: SHA-256 of the id the browser holds)."""

    id_hash: bytes
    username: str
    stage: str
    identity: str
    mfa_verified: bool
    csrf_token: str
    created_at: int
    expires_at: int


@dataclass(slots=True)  # per request: see policy/decision.py on frozen
class UserRecord:
    """A snapshot of one user's MFA state."""

    username: str
    required: bool = False
    enrollment_deadline: int | None = None
    totp_key: bytes | None = None
    key_version: int | None = None
    last_step: int | None = None
    failures: int = 0
    locked_until: int | None = None
    bypass: bool = False
    bypass_until: int | None = None
    step_offset: int = 0

    @property
    def enrolled(self) -> bool:
        return self.totp_key is not None

    def locked(self, now: float) -> bool:
        return self.locked_until is not None and self.locked_until > now

    def bypassed(self, now: float) -> bool:
        """Password only, now: a bypass that has not ended (as :func:`_bypass_active`)."""
        return self.bypass and (self.bypass_until is None or self.bypass_until > now)

    def status(self, now: float) -> str:
        """The user's status word, by STATUS_RULES."""
        deadline = self.enrollment_deadline
        ahead = deadline is not None and deadline > now
        return _STATUS_BY_FACTS[self.totp_key is not None, self.required, ahead]

    def days_left(self, now: float) -> int | None:
        if self.status(now) != "in_enrollment":
            return None
        return days_left(self.enrollment_deadline, now)


def days_left(deadline: int | None, now: float) -> int | None:
    """Whole days from ``now`` to ``deadline``, rounded up (7 right after --days 7)."""
    return None if deadline is None else math.ceil((deadline - now) / DAY)


@dataclass(slots=True)  # per request: see policy/decision.py on frozen
class FailureResult:
    failures: int
    lockout_started: bool
    locked_until: int | None


@dataclass(slots=True)  # per request: see policy/decision.py on frozen
class AuditRecord:
    at: float
    username: str
    protocol: str
    client: str
    source: str
    result: str
    reason: str
    latency_ms: float | None = None


@dataclass(frozen=True)
class AuditFilter:
    """Which audit rows to read (None: any). ``since``/``until`` are Unix times,
    both inclusive; ``after_id`` reads only rows written after that one."""

    username: str | None = None
    since: float | None = None
    until: float | None = None
    result: str | None = None
    reason: str | None = None
    protocol: str | None = None
    client: str | None = None
    after_id: int | None = None


@dataclass(frozen=True)
class BackupSummary:
    path: str
    users: int
    audit_rows: int
    revision: str | None
    size: int


@dataclass(frozen=True)
class AuditRow:
    """One audit row as read back, with its id (the order rows were written in)."""

    id: int
    record: AuditRecord


users: Table = UserState.__table__  # type: ignore[assignment]
outbox: Table = OutboxRow.__table__  # type: ignore[assignment]
_OUTBOX_COLUMNS = (outbox.c.id, outbox.c.event, outbox.c.username, outbox.c.deadline,
                   outbox.c.detail, outbox.c.created_at, outbox.c.status,
                   outbox.c.next_attempt_at, outbox.c.attempts, outbox.c.last_error,
                   outbox.c.address, outbox.c.claim_token, outbox.c.done_at)


def _queued(row: Any) -> QueuedMail:
    return QueuedMail(*row)

_USER_COLUMNS = (UserState.username, UserState.required, UserState.enrollment_deadline,
                 UserState.totp_key, UserState.key_version, UserState.last_step,
                 UserState.failures, UserState.locked_until, UserState.bypass,
                 UserState.bypass_until, UserState.step_offset)


def _record(row: Any) -> UserRecord:
    # Raw DBAPI rows: SQLite gives booleans as 0/1 and blobs as bytes-likes.
    (name, required, deadline, totp_key, version, last, failures, locked, bypass, until,
     offset) = row
    return UserRecord(name, bool(required), deadline, bytes(totp_key) if totp_key is not None
                      else None, version, last, failures, locked, bool(bypass), until,
                      offset or 0)


def _status_case(t: int) -> Any:
    """STATUS_RULES as one SQL CASE over the users table at time ``t``: the same
    three facts as UserRecord.status, each written once here."""
    ahead = UserState.enrollment_deadline.is_not(None) & (UserState.enrollment_deadline > t)
    facts = (UserState.totp_key.is_not(None), UserState.required, ahead)
    whens = []
    for status, *wanted in STATUS_RULES:
        conditions = [fact if want else ~fact
                      for fact, want in zip(facts, wanted, strict=True) if want is not None]
        whens.append((and_(*conditions), status))
    return case(*whens)


def _bypass_active(t: int) -> Any:
    """UserRecord.bypassed in SQL: on, and not ended by ``t``."""
    return and_(UserState.bypass.is_(True),
                or_(UserState.bypass_until.is_(None), UserState.bypass_until > t))


@dataclass(frozen=True)
class UserFilter:
    """Which users ``list_user_rows`` reads (every condition given must hold):
    ``status`` a STATUSES word; ``locked`` now; ``bypass`` in force now;
    ``expiring_within`` seconds: in an enrollment period that ends that soon."""

    status: str | None = None
    locked: bool = False
    bypass: bool = False
    expiring_within: int | None = None

    def matches_default(self) -> bool:
        """Whether a user the store has no row for (not required) is one of them."""
        return (self.status in (None, "not_required") and not self.locked
                and not self.bypass and self.expiring_within is None)


class UserRow(NamedTuple):
    """One user as ``list_user_rows`` reads it: the status and the bypass as the
    database computed them at that time (STATUS_RULES, :func:`_bypass_active`)."""

    username: str
    status: str
    required: bool
    enrolled: bool
    enrollment_deadline: int | None
    failures: int
    locked_until: int | None
    bypass: bool  # in force at that time
    bypass_until: int | None
    step_offset: int
    recovery_codes_left: int


class _Raw:
    """A statement compiled once for one dialect, run on a DBAPI cursor."""

    def __init__(self, stmt: Any, dialect: Any) -> None:
        self.compiled = stmt.compile(dialect=dialect)
        self.sql = str(self.compiled)
        self.order = list(self.compiled.positiontup or ()) if dialect.positional else None
        # The statement's own literals (``failures=0``...), and the names a caller
        # must give: merged per call instead of ``construct_params`` (~8 µs each).
        self.defaults = self.compiled.construct_params(_check=False)
        self.required = frozenset(bind.key for bind in self.compiled.binds.values()
                                  if bind.required)

    def run(self, cur: Any, **params: Any) -> Any:
        if not self.required <= params.keys():
            missing = sorted(self.required - params.keys())
            raise TypeError(f"missing statement parameters: {missing}")
        values = self.defaults | params
        if self.order is not None:
            cur.execute(self.sql, tuple([values[n] for n in self.order]))
        else:
            cur.execute(self.sql, values)
        return cur


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across crashes of the process
    cur.execute("PRAGMA busy_timeout=10000")  # other processes' writers: wait, don't fail
    cur.close()


def _background_checkpoints(dbapi_conn: Any, _record: Any) -> None:
    # A commit that fills the WAL past 1,000 pages checkpoints on the spot: it
    # copies pages and syncs while sign-ins wait for it (measured: p99 at c=32
    # halves without). The owner runs Store.checkpoint() from another thread.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA wal_autocheckpoint=0")
    cur.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")  # truncated back after one
    cur.close()


_NO_PENDING: dict[str, Any] = dict(pending_totp_key=None, pending_key_version=None,
                                   pending_created_at=None, pending_expires_at=None)

# The WAL file is cut back to this after a checkpoint (it may grow past it between two).
WAL_SIZE_LIMIT = 64 * 1024 * 1024


def make_engine(url: str, background_checkpoints: bool = False) -> Engine:
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # The file holds encrypted keys and the audit trail: owner only.
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        engine = create_engine(url, connect_args={"timeout": 10, "check_same_thread": False},
                               pool_size=8, max_overflow=8)
        event.listen(engine, "connect", _sqlite_pragmas)
        if background_checkpoints:
            event.listen(engine, "connect", _background_checkpoints)
        return engine
    return create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)


class Store:
    def __init__(self, url: str, clock: Any = time.time,
                 background_checkpoints: bool = False) -> None:
        """``background_checkpoints`` (SQLite; for a long-running server): commits
        never checkpoint the WAL themselves; the owner calls :meth:`checkpoint`
        often, from a thread that no sign-in waits for."""
        self.url = url
        self.engine = make_engine(url, background_checkpoints)
        self.dialect = self.engine.dialect.name
        self.clock = clock
        self._local = threading.local()
        self._owned: list[Any] = []
        self._owned_lock = threading.Lock()
        self._compile_hot_path()

    def _compile_hot_path(self) -> None:
        """The per-request statements, built once, on the table (SQLAlchemy Core:
        no ORM session bookkeeping on the hot path)."""
        u = users
        me = u.c.username == bindparam("u")
        not_locked = u.c.locked_until.is_(None) | (u.c.locked_until <= bindparam("t"))
        expired = u.c.locked_until.is_not(None) & (u.c.locked_until <= bindparam("t"))
        q_get = select(*(u.c[col.key] for col in _USER_COLUMNS)).where(me)
        q_ensure = self._insert(UserState).values(
            username=bindparam("username"), required=False, failures=0, bypass=False,
            step_offset=0, created_at=bindparam("created_at"), updated_at=bindparam("updated_at"),
        ).on_conflict_do_nothing(index_elements=["username"])
        # A lock that has run out starts a fresh count.
        q_fail = u.update().where(me).values(
            failures=case((expired, 1), else_=u.c.failures + 1),
            locked_until=case((expired, None), else_=u.c.locked_until),
            updated_at=bindparam("t"),
        ).returning(u.c.failures)
        q_lock = u.update().where(
            me, u.c.failures >= bindparam("max"), u.c.locked_until.is_(None),
        ).values(locked_until=bindparam("until")).returning(u.c.locked_until)
        q_accept = u.update().where(
            me, u.c.totp_key.is_not(None),
            u.c.last_step.is_(None) | (u.c.last_step < bindparam("step")), not_locked,
        ).values(last_step=bindparam("step"), failures=0, locked_until=None,
                 updated_at=bindparam("t"))
        q_success = u.update().where(
            me, (u.c.failures > 0) | u.c.locked_until.is_not(None), not_locked,
        ).values(failures=0, locked_until=None, updated_at=bindparam("t"))
        rc: Table = RecoveryCode.__table__  # type: ignore[assignment]
        locked_now = select(u.c.username).where(me, u.c.locked_until.is_not(None),
                                                u.c.locked_until > bindparam("t"))
        q_recovery = rc.delete().where(rc.c.username == bindparam("u"),
                                       rc.c.code_hash == bindparam("h"), ~exists(locked_now))
        r: Table = RepeatEntry.__table__  # type: ignore[assignment]
        q_repeat_hit = select(r.c.key).where(r.c.key == bindparam("k"),
                                                   r.c.expires_at > bindparam("t"))
        q_repeat_put = self._insert(RepeatEntry).values(
            key=bindparam("k"), username=bindparam("u"), expires_at=bindparam("e"))
        q_repeat_put = q_repeat_put.on_conflict_do_update(
            index_elements=["key"], set_={"expires_at": q_repeat_put.excluded.expires_at})
        q_repeat_forget = r.delete().where(r.c.username == bindparam("u"))
        a: Table = AuditEntry.__table__  # type: ignore[assignment]
        self._q_audit = _Raw(a.insert().values(
            {c: bindparam(c) for c in ("at", "username", "protocol", "client", "source",
                                       "result", "reason", "latency_ms")}),
            self.engine.dialect)
        self._ensure_stmt = q_ensure  # the admin writes' insert-if-absent too
        d = self.engine.dialect
        self._q_get, self._q_ensure = _Raw(q_get, d), _Raw(q_ensure, d)
        self._q_fail, self._q_lock = _Raw(q_fail, d), _Raw(q_lock, d)
        self._q_accept, self._q_success = _Raw(q_accept, d), _Raw(q_success, d)
        self._q_recovery = _Raw(q_recovery, d)
        self._q_repeat_hit = _Raw(q_repeat_hit, d)
        self._q_repeat_put, self._q_repeat_forget = _Raw(q_repeat_put, d), _Raw(q_repeat_forget, d)

    def _thread_connection(self) -> Any:
        """Each thread keeps its own DBAPI connection, out of the pool: no checkout,
        reset-on-return or pre-ping round trip per statement on the hot path."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            fairy = self.engine.raw_connection()
            fairy.detach()
            conn = self._local.conn = fairy
            with self._owned_lock:
                self._owned.append(conn)
        return conn

    def _drop_thread_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._owned_lock:
                if conn in self._owned:
                    self._owned.remove(conn)
            with suppress(Exception):
                conn.close()

    @contextmanager
    def _raw(self) -> Iterator[Any]:
        """A DBAPI cursor in one transaction: the hot path skips SQLAlchemy's
        per-statement machinery (it was most of the CPU per request). Inside
        :meth:`group` the group's transaction is used and committed at its end."""
        try:
            conn = self._thread_connection()
            cur = conn.cursor()
        except Exception as e:
            raise StoreError(f"state store unavailable: {type(e).__name__}: {e}") from e
        grouped = getattr(self._local, "grouped", False)
        try:
            yield cur
            if not grouped:
                conn.commit()
        except StoreError:
            if not grouped:
                self._rollback_or_drop(conn)
            raise
        except Exception as e:
            if not grouped:
                self._rollback_or_drop(conn)
            raise StoreError(f"state store failed: {type(e).__name__}: {e}") from e
        finally:
            with suppress(Exception):
                cur.close()

    @contextmanager
    def group(self) -> Iterator[None]:
        """Several hot-path units of work (``get``, ``accept_step``,
        ``record_failure`` ...) in one transaction with one commit: on SQLite a
        commit costs more than the UPDATE it ends (~25 of ~34 µs). Results read
        inside must not be acted on before the block has left without an error:
        on any error everything in it is rolled back. Only the hot-path methods
        may run inside (the admin methods use their own connection, which would
        wait for this transaction's lock)."""
        try:
            conn = self._thread_connection()
        except Exception as e:
            raise StoreError(f"state store unavailable: {type(e).__name__}: {e}") from e
        self._local.grouped = True
        try:
            yield
            self._local.grouped = False
            conn.commit()
        except BaseException as e:
            self._local.grouped = False
            self._rollback_or_drop(conn)
            if isinstance(e, StoreError) or not isinstance(e, Exception):
                raise
            raise StoreError(f"state store failed: {type(e).__name__}: {e}") from e

    def _rollback_or_drop(self, conn: Any) -> None:
        """After an error: a connection that cannot even roll back is broken (the
        server restarted, the network dropped): the next call makes a new one."""
        try:
            conn.rollback()
        except Exception:
            self._drop_thread_connection()

    # -- plumbing ---------------------------------------------------------------

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """The admin writes made inside (on this thread) commit together, or none
        does: a change and the mail it causes (:meth:`enqueue_mail`) are stored
        in one transaction, so a crash never keeps one without the other. An
        error leaves the block rolled back. Nested blocks join the outer one.
        The hot-path methods (``get``, ``record_failure`` ...) are not part of it:
        inside, only admin writes and reads that need not see them."""
        if getattr(self._local, "tx", None) is not None:
            yield
            return
        try:
            with self._session() as s, s.begin():
                self._local.tx = s
                try:
                    yield
                finally:
                    self._local.tx = None
        except SQLAlchemyError as e:
            raise StoreError(f"state store failed: {type(e).__name__}: {e}") from e

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        """The session of the enclosing :meth:`transaction`, or a new one that
        commits at the end of the block."""
        outer: Session | None = getattr(self._local, "tx", None)
        if outer is not None:
            yield outer
            return
        with self._session() as s, s.begin():
            yield s

    def _insert(self, model: type[Base]) -> Any:
        # Only the dialect in use: importing PostgreSQL's costs a SQLite command ~60 ms.
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(model)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(model)

    def _ensure(self, s: Session, username: str, now: int) -> None:
        s.execute(self._ensure_stmt, {"username": username, "created_at": now,
                                      "updated_at": now})

    def _update(self, username: str, **values: Any) -> bool:
        """Set fields on an existing user; False when there is no such row."""
        with self._tx() as s:
            values["updated_at"] = int(self.clock())
            result = s.execute(update(UserState).where(UserState.username == username)
                               .values(**values))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def _upsert(self, username: str, **values: Any) -> None:
        now = int(self.clock())
        with self._tx() as s:
            self._ensure(s, username, now)
            s.execute(update(UserState).where(UserState.username == username)
                      .values(updated_at=now, **values))

    def upgrade(self) -> None:
        from policy.migrations import SchemaTooNew, upgrade_to_head

        try:
            upgrade_to_head(self.engine)
        except SchemaTooNew as e:
            raise StoreError(str(e)) from None

    def check_current(self) -> None:
        from policy.migrations import SchemaTooNew, check_not_newer, is_current

        if not is_current(self.engine):
            try:
                check_not_newer(self.engine)
            except SchemaTooNew as e:
                raise StoreError(str(e)) from None
            raise StoreError("the state database is not at the current schema: "
                             "run `mfa-proxy db upgrade`")

    def backup(self, target: str | os.PathLike[str]) -> BackupSummary:
        """SQLite: a consistent copy of the whole database at ``target`` (a new
        file, owner-only), taken with SQLite's online backup API while others
        keep reading and writing; checked with ``PRAGMA quick_check``. Other
        databases: NotImplementedError (their own tools do it: pg_dump)."""
        if self.dialect != "sqlite":
            raise NotImplementedError(self.dialect)
        import sqlite3

        final = os.path.abspath(target)
        folder, base = os.path.split(final)
        tmp = os.path.join(folder, f".{base}.{os.getpid()}.tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            source = self.engine.raw_connection()
            try:
                copy = sqlite3.connect(tmp)
                try:
                    # Steps of 1024 pages: writers get the lock between them.
                    source.driver_connection.backup(copy, pages=1024)  # type: ignore[union-attr]
                    check = copy.execute("PRAGMA quick_check").fetchone()[0]
                    if check != "ok":
                        raise StoreError(f"the copy failed its check: {check}")
                    users_n = copy.execute("SELECT count(*) FROM users").fetchone()[0]
                    audit_n = copy.execute("SELECT count(*) FROM audit").fetchone()[0]
                    row = copy.execute("SELECT version_num FROM alembic_version").fetchone()
                    copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                finally:
                    copy.close()
            finally:
                source.close()
            os.replace(tmp, final)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        return BackupSummary(final, int(users_n), int(audit_n), str(row[0]) if row else None,
                             os.path.getsize(final))

    def checkpoint(self) -> tuple[int, int, int] | None:
        """SQLite: copy the WAL's committed pages into the database without making
        anyone wait (PASSIVE). (busy, WAL pages, pages copied); None elsewhere."""
        if self.dialect != "sqlite":
            return None
        try:
            with self.engine.connect() as c:
                row = c.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        except SQLAlchemyError as e:
            raise StoreError(f"checkpoint failed: {type(e).__name__}: {e}") from e
        return int(row[0]), int(row[1]), int(row[2])

    def ping(self) -> None:
        try:
            with self.engine.connect() as c:
                c.execute(text("SELECT 1"))
        except SQLAlchemyError as e:
            raise StoreError(f"state store unavailable: {type(e).__name__}") from e

    def close(self) -> None:
        with self._owned_lock:
            owned, self._owned = self._owned, []
        for conn in owned:
            with suppress(Exception):
                conn.close()
        self.engine.dispose()

    # -- reads ------------------------------------------------------------------

    def get(self, username: str) -> UserRecord | None:
        with self._raw() as cur:
            row = self._q_get.run(cur, u=username).fetchone()
        return _record(row) if row else None

    def list_users(self) -> list[UserRecord]:
        with self._session() as s:
            rows = s.execute(select(*_USER_COLUMNS).order_by(UserState.username))
            return [_record(r) for r in rows]

    def list_user_rows(self, now: float, where: UserFilter | None = None) -> list[UserRow]:
        """The users matching ``where``, by username: one query, the filter, the
        status (STATUS_RULES' CASE) and the bypass worked out by the database, and
        the recovery codes left counted by it (10,000 users: tens of ms)."""
        t = int(now)
        u = UserState
        f = where or UserFilter()
        rc = RecoveryCode
        left = (select(rc.username, func.count().label("n")).group_by(rc.username)
                .subquery("left"))
        status = _status_case(t)
        q = (select(u.username, status, u.required, u.totp_key.is_not(None),
                    u.enrollment_deadline, u.failures, u.locked_until, _bypass_active(t),
                    u.bypass_until, u.step_offset, func.coalesce(left.c.n, 0))
             .outerjoin(left, left.c.username == u.username).order_by(u.username))
        if f.status is not None:
            q = q.where(status == f.status)
        if f.locked:
            q = q.where(u.locked_until.is_not(None), u.locked_until > t)
        if f.bypass:
            q = q.where(_bypass_active(t))
        if f.expiring_within is not None:
            q = q.where(status == "in_enrollment",
                        u.enrollment_deadline <= t + f.expiring_within)
        # On a DBAPI cursor: SQLAlchemy's row processing cost more than the query.
        stmt = _Raw(q, self.engine.dialect)
        conn = self.engine.raw_connection()
        try:
            cur = conn.cursor()
            rows = stmt.run(cur).fetchall()
            cur.close()
        finally:
            conn.close()
        return [UserRow(name, st, bool(req), bool(enr), deadline, failures, locked,
                        bool(bypass), until, offset or 0, int(n))
                for (name, st, req, enr, deadline, failures, locked, bypass, until, offset, n)
                in rows]

    def usernames(self) -> set[str]:
        """Every username the store has a row for."""
        with self.engine.connect() as c:
            return {str(name) for name, in c.execute(select(UserState.username))}

    def recovery_codes_left(self, username: str) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(RecoveryCode).where(
                RecoveryCode.username == username)).scalar_one())

    def count_by_status(self, now: float) -> dict[str, int]:
        """Users by status, counted by the database (no rows loaded)."""
        status = _status_case(int(now)).label("status")
        counts = dict.fromkeys(STATUSES, 0)
        with self.engine.connect() as c:
            for name, n in c.execute(select(status, func.count()).group_by(status)):
                counts[name] = n
        return counts

    def count_enrollment_ending(self, now: float, horizons: Sequence[int]) -> dict[int, int]:
        """Users in an enrollment period (required, no key) whose deadline comes
        within each of ``horizons`` seconds from ``now``: one scan, no rows loaded."""
        t = int(now)
        u = UserState
        sums = [func.coalesce(func.sum(case((u.enrollment_deadline <= t + h, 1), else_=0)), 0)
                for h in horizons]
        with self.engine.connect() as c:
            row = c.execute(select(*sums).where(
                u.required.is_(True), u.totp_key.is_(None),
                u.enrollment_deadline.is_not(None), u.enrollment_deadline > t)).one()
        return {h: int(n) for h, n in zip(horizons, row, strict=True)}

    # -- admin writes -----------------------------------------------------------

    def require(self, username: str, deadline: int) -> None:
        self._upsert(username, required=True, enrollment_deadline=deadline)

    def unrequire(self, username: str) -> bool:
        return self._update(username, required=False)

    def require_new(self, username: str, deadline: int) -> bool:
        """Require MFA with an enrollment period ending at ``deadline`` unless the
        user is required already: one conditional ``INSERT … ON CONFLICT DO UPDATE
        … WHERE NOT required``, so of two sign-ins racing (two instances) exactly
        one starts the period and the other leaves it as it is. True when this
        call started it. Joins the caller's :meth:`transaction` (with its mail)."""
        now = int(self.clock())
        stmt = self._insert(UserState).values(
            username=username, required=True, enrollment_deadline=deadline, failures=0,
            bypass=False, created_at=now, updated_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=["username"],
            set_={"required": True, "enrollment_deadline": deadline, "updated_at": now},
            where=UserState.required.is_(False)).returning(UserState.username)
        with self._tx() as s:
            # RETURNING, not rowcount: psycopg counts the skipped DO UPDATE as a row
            return s.execute(stmt).first() is not None

    def set_totp_key(self, username: str, blob: bytes, key_version: int) -> None:
        now = int(self.clock())
        self._upsert(username, totp_key=blob, key_version=key_version, enrolled_at=now,
                     last_step=None, step_offset=0, **_NO_PENDING)

    def reset(self, username: str, deadline: int) -> None:
        """Clear the key, and the recovery codes and clock offset that went with it."""
        with self.transaction(), self._tx() as s:
            self._upsert(username, totp_key=None, key_version=None, enrolled_at=None,
                         last_step=None, step_offset=0, required=True,
                         enrollment_deadline=deadline, **_NO_PENDING)
            s.execute(delete(RecoveryCode).where(RecoveryCode.username == username))

    def extend(self, username: str, deadline: int) -> None:
        self._upsert(username, required=True, enrollment_deadline=deadline)

    def unlock(self, username: str) -> bool:
        return self._update(username, failures=0, locked_until=None)

    def set_bypass(self, username: str, on: bool, until: int | None = None) -> None:
        """Bypass on (until ``until``, or until turned off) or off."""
        self._upsert(username, bypass=on, bypass_until=until if on else None)

    def set_step_offset(self, username: str, totp_key: bytes, offset: int,
                        used_step: int) -> bool:
        """The user's clock offset, while ``totp_key`` is still the key; ``used_step``
        (the last code the resync was given) is marked used. False: the key changed."""
        u = UserState
        with self._tx() as s:
            r = s.execute(update(u).where(u.username == username, u.totp_key == totp_key)
                          .values(step_offset=offset, updated_at=int(self.clock()),
                                  last_step=case((u.last_step.is_(None)
                                                  | (u.last_step < used_step), used_step),
                                                 else_=u.last_step)))
            return bool(r.rowcount)  # type: ignore[attr-defined]

    def replace_recovery_codes(self, username: str, hashes: Sequence[bytes]) -> None:
        """The user's recovery codes are these (keyed hashes), and no others."""
        now = int(self.clock())
        with self._tx() as s:
            s.execute(delete(RecoveryCode).where(RecoveryCode.username == username))
            if hashes:
                s.execute(self._insert(RecoveryCode), [
                    dict(username=username, code_hash=h, created_at=now) for h in hashes])

    def delete_user(self, username: str) -> bool:
        """Everything kept for the user -- key, requirement, counters, recovery codes,
        the repeat cache, portal sessions -- gone in one transaction; mails still
        waiting for them are cancelled. Audit rows stay. False: no such user."""
        now = int(self.clock())
        with self._tx() as s:
            gone = s.execute(delete(UserState).where(UserState.username == username))
            s.execute(delete(RecoveryCode).where(RecoveryCode.username == username))
            s.execute(delete(RepeatEntry).where(RepeatEntry.username == username))
            s.execute(delete(PortalSessionRow).where(PortalSessionRow.username == username))
            s.execute(update(OutboxRow).where(OutboxRow.username == username,
                                              OutboxRow.status == "pending")
                      .values(status="cancelled", done_at=now, claimed_until=None,
                              last_error="the user was deleted"))
            return bool(gone.rowcount)  # type: ignore[attr-defined]

    def import_users(self, rows: Sequence[tuple[str, bytes, int, int | None]],
                     requirements: Sequence[tuple[str, int]] = ()) -> int:
        """Keys ``(username, encrypted TOTP key, key version, deadline or None)`` and
        requirements without a key ``(username, deadline)``, in one transaction."""
        now = int(self.clock())
        values = [dict(username=u, totp_key=blob, key_version=v, enrolled_at=now, last_step=None,
                       required=True, enrollment_deadline=d, failures=0, bypass=False,
                       created_at=now, updated_at=now) for u, blob, v, d in rows]
        stmt = self._insert(UserState)
        stmt = stmt.on_conflict_do_update(index_elements=["username"], set_={
            k: getattr(stmt.excluded, k) for k in
            ("totp_key", "key_version", "enrolled_at", "last_step", "required",
             "enrollment_deadline", "updated_at")})
        required = [dict(username=u, required=True, enrollment_deadline=d, failures=0,
                         bypass=False, created_at=now, updated_at=now) for u, d in requirements]
        req_stmt = self._insert(UserState)
        req_stmt = req_stmt.on_conflict_do_update(index_elements=["username"], set_={
            k: getattr(req_stmt.excluded, k) for k in
            ("required", "enrollment_deadline", "updated_at")})
        with self._tx() as s:
            for i in range(0, len(values), 5000):
                s.execute(stmt, values[i:i + 5000])
            for i in range(0, len(required), 5000):
                s.execute(req_stmt, required[i:i + 5000])
        return len(values)

    def keys_to_rotate(self, current_version: int, batch: int = 1000) -> Iterator[
            list[tuple[str, bytes]]]:
        """Keys not under ``current_version``, in batches, one pass in username order."""
        after = ""
        while True:
            with self._session() as s:
                rows = s.execute(
                    select(UserState.username, UserState.totp_key)
                    .where(UserState.totp_key.is_not(None),
                           UserState.key_version != current_version,
                           UserState.username > after)
                    .order_by(UserState.username).limit(batch)).all()
            if not rows:
                return
            after = rows[-1][0]
            yield [(u, b) for u, b in rows if b is not None]

    def replace_totp_key(self, username: str, old: bytes, new: bytes, version: int) -> bool:
        """Compare-and-swap: a key re-enrolled meanwhile is left alone."""
        with self._session() as s, s.begin():
            r = s.execute(update(UserState)
                          .where(UserState.username == username, UserState.totp_key == old)
                          .values(totp_key=new, key_version=version))
            return bool(r.rowcount)  # type: ignore[attr-defined]

    # -- keys set up by the user (the portal) ----------------------------------------

    def set_pending(self, username: str, blob: bytes, key_version: int,
                    expires_at: int) -> None:
        """Keep ``blob`` as the user's pending key (replacing any older one); the
        active key, the status and the counters stay as they are."""
        now = int(self.clock())
        self._upsert(username, pending_totp_key=blob, pending_key_version=key_version,
                     pending_created_at=now, pending_expires_at=expires_at)

    def get_pending(self, username: str, now: float) -> PendingKey | None:
        """The user's pending key, unless there is none or it has expired."""
        with self._session() as s:
            row = s.execute(select(UserState.pending_totp_key, UserState.pending_key_version,
                                   UserState.pending_created_at, UserState.pending_expires_at)
                            .where(UserState.username == username,
                                   UserState.pending_totp_key.is_not(None),
                                   UserState.pending_expires_at > int(now))).first()
        if row is None:
            return None
        blob, version, created, expires = row
        assert blob is not None and version is not None  # the WHERE says so
        return PendingKey(bytes(blob), int(version), int(created or 0), int(expires or 0))

    def activate_pending(self, username: str, blob: bytes, step: int, now: float) -> bool:
        """Make the pending key ``blob`` the active key, in one ``UPDATE … WHERE``:
        only while it is still the pending key (not replaced by a newer set-up),
        not expired, and the user not locked. ``step`` (the time step of the code
        that proved it) is marked used, so that code cannot be replayed elsewhere.
        A user who was not required is required from now (as ``enroll`` does: a key
        that is active is asked for). False: nothing changed."""
        t = int(now)
        with self._tx() as s:
            r = s.execute(update(UserState).where(
                UserState.username == username, UserState.pending_totp_key == blob,
                UserState.pending_expires_at > t,
                UserState.locked_until.is_(None) | (UserState.locked_until <= t),
            ).values(
                totp_key=UserState.pending_totp_key, key_version=UserState.pending_key_version,
                enrolled_at=t, last_step=step, step_offset=0, failures=0, locked_until=None,
                required=True,
                enrollment_deadline=func.coalesce(UserState.enrollment_deadline, t),
                updated_at=t, **_NO_PENDING))
            return bool(r.rowcount)  # type: ignore[attr-defined]

    def drop_pending(self, username: str) -> bool:
        return self._update(username, **_NO_PENDING)

    # -- portal sessions --------------------------------------------------------------

    def create_session(self, data: SessionData) -> None:
        with self._session() as s, s.begin():
            s.execute(self._insert(PortalSessionRow).values(
                id_hash=data.id_hash, username=data.username, stage=data.stage,
                identity=data.identity, mfa_verified=data.mfa_verified,
                csrf_token=data.csrf_token, created_at=data.created_at,
                expires_at=data.expires_at))

    def touch_session(self, id_hash: bytes, now: float, idle_seconds: int) -> SessionData | None:
        """The session, if it has not been idle too long; its idle timer restarts
        (one ``UPDATE … WHERE not expired``: an expired session stays dead)."""
        t = int(now)
        p = PortalSessionRow
        with self._session() as s, s.begin():
            row = s.execute(update(p).where(p.id_hash == id_hash, p.expires_at > t)
                            .values(expires_at=t + idle_seconds)
                            .returning(p.id_hash, p.username, p.stage, p.identity,
                                       p.mfa_verified, p.csrf_token, p.created_at,
                                       p.expires_at)).first()
            if row is None:  # expired: gone for good, whatever the clock says later
                s.execute(delete(p).where(p.id_hash == id_hash))
                return None
        return SessionData(bytes(row[0]), row[1], row[2], row[3], bool(row[4]), row[5],
                           int(row[6]), int(row[7]))

    def hold_session_display(self, id_hash: bytes, blob: bytes) -> bool:
        """Keep ``blob`` (encrypted) with the session, to show once."""
        p = PortalSessionRow
        with self._session() as s, s.begin():
            r = s.execute(update(p).where(p.id_hash == id_hash).values(recovery_display=blob))
            return bool(r.rowcount)  # type: ignore[attr-defined]

    def take_session_display(self, id_hash: bytes) -> bytes | None:
        """What the session holds to show, taken: read, then cleared by an ``UPDATE …
        WHERE`` it is still that (RETURNING would give the cleared value), so it
        is shown once, whichever instance serves the page."""
        p = PortalSessionRow
        with self._session() as s, s.begin():
            blob = s.execute(select(p.recovery_display).where(p.id_hash == id_hash)).scalar()
            if blob is None:
                return None
            taken = s.execute(update(p).where(p.id_hash == id_hash,
                                              p.recovery_display == blob)
                              .values(recovery_display=None))
            return bytes(blob) if taken.rowcount else None  # type: ignore[attr-defined]

    def delete_session(self, id_hash: bytes) -> bool:
        with self._session() as s, s.begin():
            r = s.execute(delete(PortalSessionRow).where(PortalSessionRow.id_hash == id_hash))
            return bool(r.rowcount)  # type: ignore[attr-defined]

    # -- the mail outbox ----------------------------------------------------------------

    def enqueue_mail(self, mails: Sequence[OutboxMail]) -> None:
        """Queue mails, inside the caller's :meth:`transaction` when there is one."""
        if not mails:
            return
        now = int(self.clock())
        with self._tx() as s:
            s.execute(outbox.insert(), [dict(
                event=m.event, username=m.username, deadline=m.deadline, detail=m.detail,
                created_at=now, status="pending", next_attempt_at=now, attempts=0)
                for m in mails])

    def mark_reminded(self, username: str, deadline: int) -> None:
        """The period ending at ``deadline`` needs no reminder (its own mail says it)."""
        with self._tx() as s:
            s.execute(update(UserState).where(UserState.username == username,
                                              UserState.enrollment_deadline == deadline)
                      .values(reminded_deadline=deadline))

    def queue_reminders(self, now: float, before_seconds: int, event: str = "reminder",
                        limit: int = 500) -> list[tuple[str, int]]:
        """Mark every period ending within ``before_seconds`` of ``now`` whose user is
        required, has no key and was not reminded of it, and queue one ``event``
        mail for each -- in one transaction. The UPDATE re-checks "not reminded"
        row by row (and PostgreSQL skips rows another instance is marking), so two
        instances scanning at once queue each reminder once. (username, deadline)
        of the reminders queued; at most ``limit`` a call."""
        t = int(now)
        u = UserState
        due = (u.required.is_(True), u.totp_key.is_(None), u.enrollment_deadline.is_not(None),
               u.enrollment_deadline > t, u.enrollment_deadline <= t + before_seconds,
               u.reminded_deadline.is_(None) | (u.reminded_deadline != u.enrollment_deadline))
        pick = (select(u.username).where(*due).order_by(u.enrollment_deadline).limit(limit)
                .with_for_update(skip_locked=True))
        with self._tx() as s:
            rows = s.execute(update(u).where(u.username.in_(pick.scalar_subquery()), *due)
                             .values(reminded_deadline=u.enrollment_deadline)
                             .returning(u.username, u.enrollment_deadline)).all()
            marked = [(str(name), int(deadline or 0)) for name, deadline in rows]
            if marked:
                s.execute(outbox.insert(), [dict(
                    event=event, username=name, deadline=deadline, detail="{}",
                    created_at=t, status="pending", next_attempt_at=t, attempts=0)
                    for name, deadline in marked])
        return marked

    def claim_mail(self, now: float, lease_seconds: int, token: str,
                   limit: int = 20) -> list[QueuedMail]:
        """Take up to ``limit`` due mails for ``lease_seconds``, under ``token``:
        one UPDATE that re-checks "due and not claimed" row by row (PostgreSQL:
        rows being claimed by another instance are skipped), so each mail is
        claimed by one sender. A claim that runs out (its sender died) makes the
        mail due again."""
        t = int(now)
        o = outbox.c
        due = (o.status == "pending", o.next_attempt_at <= t,
               o.claimed_until.is_(None) | (o.claimed_until <= t))
        pick = (select(o.id).where(*due).order_by(o.next_attempt_at, o.id).limit(limit)
                .with_for_update(skip_locked=True))
        with self._tx() as s:
            rows = s.execute(outbox.update().where(o.id.in_(pick.scalar_subquery()), *due)
                             .values(claimed_until=t + lease_seconds, claim_token=token,
                                     attempts=o.attempts + 1)
                             .returning(*_OUTBOX_COLUMNS)).all()
        return sorted((_queued(r) for r in rows), key=lambda m: m.id)

    def finish_mail(self, mail_id: int, token: str, status: str, now: float,
                    error: str | None = None, address: str | None = None) -> bool:
        """Mark a claimed mail ``sent``, ``failed`` or ``cancelled``. A mail that was
        sent is marked sent even if its claim ran out meanwhile (it went out)."""
        o = outbox.c
        owned = (o.claim_token == token) if status != "sent" else (o.status == "pending")
        with self._tx() as s:
            r = s.execute(outbox.update().where(o.id == mail_id, owned).values(
                status=status, done_at=int(now), claimed_until=None, last_error=error,
                address=address))
            return bool(r.rowcount)  # type: ignore[attr-defined]

    def retry_mail(self, mail_id: int, token: str, at: float, error: str,
                   address: str | None = None) -> bool:
        """Give a claimed mail back, due again at ``at``, with why it failed."""
        o = outbox.c
        with self._tx() as s:
            r = s.execute(outbox.update().where(o.id == mail_id, o.claim_token == token,
                                                o.status == "pending")
                          .values(next_attempt_at=int(at), claimed_until=None,
                                  claim_token=None, last_error=error[:512], address=address))
            return bool(r.rowcount)  # type: ignore[attr-defined]

    def mail_queue(self, statuses: Sequence[str] = ("pending", "failed"),
                   limit: int = 1000) -> list[QueuedMail]:
        """Mails with these statuses, oldest first."""
        with self._session() as s:
            rows = s.execute(select(*_OUTBOX_COLUMNS).where(outbox.c.status.in_(statuses))
                             .order_by(outbox.c.id).limit(limit)).all()
        return [_queued(r) for r in rows]

    def pending_mail_count(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(outbox)
                                 .where(outbox.c.status == "pending")).scalar_one())

    # -- the hot path: atomic counters --------------------------------------------

    def record_failure(self, username: str, now: float, max_failures: int,
                       lockout_seconds: int) -> FailureResult:
        """Count one failure; lock at ``max_failures``. Atomic across processes."""
        t = int(now)
        until = LOCKED_FOREVER if lockout_seconds == 0 else t + lockout_seconds
        with self._raw() as cur:
            self._q_ensure.run(cur, username=username, created_at=t, updated_at=t)
            failures = self._q_fail.run(cur, u=username, t=t).fetchone()[0]
            row = self._q_lock.run(cur, u=username, max=max_failures, until=until).fetchone()
        locked = row[0] if row else None
        return FailureResult(failures, locked is not None, locked)

    def use_recovery_code(self, username: str, code_hash: bytes, now: float) -> bool:
        """Use one recovery code: one ``DELETE … WHERE`` its row exists and the user
        is not locked (of many racing uses of one code exactly one deletes it), then
        the failure count is cleared as by a code. The replay marker is not
        touched: a recovery code is no time step. False: no such code (or locked)."""
        t = int(now)
        with self._raw() as cur:
            if not self._q_recovery.run(cur, u=username, h=code_hash, t=t).rowcount:
                return False
            self._q_success.run(cur, u=username, t=t)
        return True

    def accept_step(self, username: str, step: int, now: float) -> bool:
        """Move the replay marker to ``step``; False when it is already there or
        beyond (a replay) or the user got locked meanwhile. Exactly one of many
        racing requests with one code wins."""
        with self._raw() as cur:
            return bool(self._q_accept.run(cur, u=username, step=step, t=int(now)).rowcount)

    def record_success(self, username: str, now: float) -> bool:
        """A password-only success clears the failure count, unless the user is
        locked (atomically): False when nothing was cleared (locked, or no
        failures left to clear)."""
        with self._raw() as cur:
            return bool(self._q_success.run(cur, u=username, t=int(now)).rowcount)

    # -- audit and the repeat cache ---------------------------------------------------

    def audit(self, records: Iterable[AuditRecord]) -> None:
        """One executemany on the raw connection: a busy proxy writes a thousand
        rows a second, and the ORM's bulk insert spent ~60 µs on each.

        The text is escaped first (policy/escaping.py): a username is what a
        client sent when it was refused as invalid, and a newline or a terminal
        escape in it must not reach whoever reads the audit trail."""
        esc = escape_controls
        rows = [dict(at=int(r.at), username=esc(r.username)[:256], protocol=esc(r.protocol),
                     client=esc(r.client)[:64], source=esc(r.source)[:64],
                     result=esc(r.result), reason=esc(r.reason),
                     latency_ms=None if r.latency_ms is None else round(r.latency_ms, 3))
                for r in records]
        if rows:
            q = self._q_audit
            params: list[Any] = rows if q.order is None else [
                tuple([row[n] for n in q.order]) for row in rows]
            with self._raw() as cur:
                cur.executemany(q.sql, params)

    def recent_audit(self, username: str | None = None, limit: int = 50) -> list[AuditRecord]:
        return [row.record for row in self.query_audit(AuditFilter(username=username), limit)]

    def query_audit(self, where: AuditFilter, limit: int | None = 50,
                    oldest_first: bool = False) -> list[AuditRow]:
        """Audit rows matching ``where``, newest first (by decision time, then by
        the order they were written), at most ``limit`` (None: all).

        One user's rows come from the (username, at, id) index, read backwards:
        a few milliseconds whatever the size of the table."""
        a = AuditEntry
        q = select(a.id, a.at, a.username, a.protocol, a.client, a.source, a.result,
                   a.reason, a.latency_ms)
        for column, value in ((a.username, where.username), (a.result, where.result),
                              (a.reason, where.reason), (a.protocol, where.protocol),
                              (a.client, where.client)):
            if value is not None:
                q = q.where(column == value)
        if where.since is not None:
            q = q.where(a.at >= math.floor(where.since))
        if where.until is not None:
            q = q.where(a.at <= math.floor(where.until))
        if where.after_id is not None:
            q = q.where(a.id > where.after_id)
        if oldest_first:
            q = q.order_by(a.at, a.id) if where.after_id is None else q.order_by(a.id)
        else:
            q = q.order_by(a.at.desc(), a.id.desc())
        if limit is not None:
            q = q.limit(limit)
        try:
            with self._session() as s:
                rows = s.execute(q).all()
        except SQLAlchemyError as e:
            raise StoreError(f"cannot read the audit table: {type(e).__name__}: {e}") from e
        return [AuditRow(r[0], AuditRecord(float(r[1]), *r[2:8],
                                           None if r[8] is None else float(r[8])))
                for r in rows]

    def last_audit_id(self) -> int:
        """The id of the newest audit row (0 when there is none)."""
        with self._session() as s:
            return int(s.execute(select(func.max(AuditEntry.id))).scalar() or 0)

    def prune(self, now: float, audit_days: int) -> None:
        with self._session() as s, s.begin():
            s.execute(delete(AuditEntry).where(AuditEntry.at < int(now) - audit_days * DAY))
            s.execute(delete(RepeatEntry).where(RepeatEntry.expires_at <= int(now)))
            s.execute(delete(PortalSessionRow).where(PortalSessionRow.expires_at <= int(now)))
            # Mails sent or given up are kept as long as the audit trail.
            s.execute(delete(OutboxRow).where(OutboxRow.status != "pending",
                                              OutboxRow.done_at < int(now) - audit_days * DAY))
            s.execute(update(UserState).where(UserState.pending_expires_at <= int(now))
                      .values(**_NO_PENDING))

    def repeat_hit(self, key: bytes, now: float) -> bool:
        with self._raw() as cur:
            return self._q_repeat_hit.run(cur, k=key, t=int(now)).fetchone() is not None

    def repeat_put(self, key: bytes, username: str, expires_at: float) -> None:
        with self._raw() as cur:
            self._q_repeat_put.run(cur, k=key, u=username, e=math.ceil(expires_at))

    def repeat_forget(self, username: str) -> None:
        with self._raw() as cur:
            self._q_repeat_forget.run(cur, u=username)
