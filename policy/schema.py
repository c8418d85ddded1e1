"""The state database's shape: tables, the MFA status rule, the records the
stores return, and the engine. No query that changes state lives here: the
sign-in path's are in policy/hot_store.py, the admin's in policy/admin_store.py,
and policy/store.py puts the two on one database."""

from __future__ import annotations

import math
import os
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
    event,
    or_,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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
OUTBOX_COLUMNS = (outbox.c.id, outbox.c.event, outbox.c.username, outbox.c.deadline,
                   outbox.c.detail, outbox.c.created_at, outbox.c.status,
                   outbox.c.next_attempt_at, outbox.c.attempts, outbox.c.last_error,
                   outbox.c.address, outbox.c.claim_token, outbox.c.done_at)


def queued_mail(row: Any) -> QueuedMail:
    return QueuedMail(*row)

USER_COLUMNS = (UserState.username, UserState.required, UserState.enrollment_deadline,
                 UserState.totp_key, UserState.key_version, UserState.last_step,
                 UserState.failures, UserState.locked_until, UserState.bypass,
                 UserState.bypass_until, UserState.step_offset)


def user_record(row: Any) -> UserRecord:
    # Raw DBAPI rows: SQLite gives booleans as 0/1 and blobs as bytes-likes.
    (name, required, deadline, totp_key, version, last, failures, locked, bypass, until,
     offset) = row
    return UserRecord(name, bool(required), deadline, bytes(totp_key) if totp_key is not None
                      else None, version, last, failures, locked, bool(bypass), until,
                      offset or 0)


def status_case(t: int) -> Any:
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


def bypass_active(t: int) -> Any:
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


class RawStatement:
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


NO_PENDING: dict[str, Any] = dict(pending_totp_key=None, pending_key_version=None,
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


def insert_for(dialect: str, model: type[Base]) -> Any:
    """An INSERT with ON CONFLICT for the dialect in use (importing PostgreSQL's
    costs a SQLite command ~60 ms)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(model)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(model)


def ensure_user_stmt(dialect: str) -> Any:
    """A users row for ``username`` unless there is one (no requirement, no key):
    what every write to a user starts from."""
    return insert_for(dialect, UserState).values(
        username=bindparam("username"), required=False, failures=0, bypass=False,
        step_offset=0, created_at=bindparam("created_at"), updated_at=bindparam("updated_at"),
    ).on_conflict_do_nothing(index_elements=["username"])
