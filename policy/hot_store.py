"""The sign-in path's state: the statements every request runs, compiled once
and run on a DBAPI cursor (SQLAlchemy's per-statement machinery was most of the
CPU per request), on one connection per thread, out of the pool.

Counters and the last accepted time step change only through atomic ``UPDATE
… WHERE`` statements, so several processes sharing one database never both
accept one code and never lose a failure. :meth:`HotStore.group` puts several
of these steps in one transaction with one commit; nothing else may run inside
(policy/admin_store.py refuses to: its connection would wait for this one's lock).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from sqlalchemy import Table, bindparam, case, exists, select
from sqlalchemy.engine import Engine

from policy.escaping import escape_controls
from policy.schema import (
    LOCKED_FOREVER,
    USER_COLUMNS,
    AuditEntry,
    AuditRecord,
    FailureResult,
    RawStatement,
    RecoveryCode,
    RepeatEntry,
    StoreError,
    UserRecord,
    ensure_user_stmt,
    insert_for,
    user_record,
    users,
)


class HotStore:
    """Per-request reads and atomic writes: the user's record, failures and
    lockout, the replay marker, recovery codes, the repeat cache, audit rows.
    Safe to call from many threads (each has its own connection)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._local = threading.local()
        self._owned: list[Any] = []
        self._owned_lock = threading.Lock()
        self._compile_hot_path()

    def in_group(self) -> bool:
        """Whether this thread is inside :meth:`group`."""
        return bool(getattr(self._local, "grouped", False))

    def close(self) -> None:
        """Close every thread's connection (the threads may still be running:
        the next call on one makes a new connection)."""
        with self._owned_lock:
            owned, self._owned = self._owned, []
        for conn in owned:
            with suppress(Exception):
                conn.close()

    def _compile_hot_path(self) -> None:
        """The per-request statements, built once, on the table (SQLAlchemy Core:
        no ORM session bookkeeping on the hot path)."""
        u = users
        me = u.c.username == bindparam("u")
        not_locked = u.c.locked_until.is_(None) | (u.c.locked_until <= bindparam("t"))
        expired = u.c.locked_until.is_not(None) & (u.c.locked_until <= bindparam("t"))
        q_get = select(*(u.c[col.key] for col in USER_COLUMNS)).where(me)
        q_ensure = ensure_user_stmt(self.dialect)
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
        q_recovery_held = select(rc.c.username).where(rc.c.username == bindparam("u"),
                                                      rc.c.code_hash == bindparam("h"))
        q_repeat_hit = select(r.c.key).where(r.c.key == bindparam("k"),
                                                   r.c.expires_at > bindparam("t"))
        q_repeat_put = insert_for(self.dialect, RepeatEntry).values(
            key=bindparam("k"), username=bindparam("u"), expires_at=bindparam("e"))
        q_repeat_put = q_repeat_put.on_conflict_do_update(
            index_elements=["key"], set_={"expires_at": q_repeat_put.excluded.expires_at})
        q_repeat_forget = r.delete().where(r.c.username == bindparam("u"))
        a: Table = AuditEntry.__table__  # type: ignore[assignment]
        self._q_audit = RawStatement(a.insert().values(
            {c: bindparam(c) for c in ("at", "username", "protocol", "client", "source",
                                       "result", "reason", "latency_ms")}),
            self.engine.dialect)
        d = self.engine.dialect
        self._q_get, self._q_ensure = RawStatement(q_get, d), RawStatement(q_ensure, d)
        self._q_fail, self._q_lock = RawStatement(q_fail, d), RawStatement(q_lock, d)
        self._q_accept, self._q_success = RawStatement(q_accept, d), RawStatement(q_success, d)
        self._q_recovery = RawStatement(q_recovery, d)
        self._q_recovery_held = RawStatement(q_recovery_held, d)
        self._q_repeat_hit = RawStatement(q_repeat_hit, d)
        self._q_repeat_put = RawStatement(q_repeat_put, d)
        self._q_repeat_forget = RawStatement(q_repeat_forget, d)

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
        on any error everything in it is rolled back. Only this store's methods
        run inside: the admin store refuses to (its own connection would wait
        for this transaction's lock), and its refusal rolls the group back."""
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

    def get(self, username: str) -> UserRecord | None:
        with self._raw() as cur:
            row = self._q_get.run(cur, u=username).fetchone()
        return user_record(row) if row else None

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

    def holds_recovery_code(self, username: str, code_hash: bytes) -> bool:
        """Whether the user has this recovery code, unused (a read: nothing used)."""
        with self._raw() as cur:
            return self._q_recovery_held.run(cur, u=username, h=code_hash).fetchone() is not None

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

    def repeat_hit(self, key: bytes, now: float) -> bool:
        with self._raw() as cur:
            return self._q_repeat_hit.run(cur, k=key, t=int(now)).fetchone() is not None

    def repeat_put(self, key: bytes, username: str, expires_at: float) -> None:
        with self._raw() as cur:
            self._q_repeat_put.run(cur, k=key, u=username, e=math.ceil(expires_at))

    def repeat_forget(self, username: str) -> None:
        with self._raw() as cur:
            self._q_repeat_forget.run(cur, u=username)
