"""The admins' and the portal's state: requirements, keys, bypasses, recovery
codes, keys set up in the portal, portal sessions, the mail outbox, listings and
reports, audit reads. Each method is one unit of work in an ORM session, or
joins the caller's :meth:`AdminStore.transaction` (a change and the mail it
causes commit together).

Never inside a :meth:`policy.hot_store.HotStore.group`: on SQLite this store's
connection would wait for the group's own write lock. It refuses to (a
programming error, not a state error).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from policy.clock import Clock
from policy.schema import (
    DAY,
    NO_PENDING,
    OUTBOX_COLUMNS,
    STATUSES,
    USER_COLUMNS,
    AuditEntry,
    AuditFilter,
    AuditRecord,
    AuditRow,
    OutboxMail,
    OutboxRow,
    PendingKey,
    PortalSessionRow,
    QueuedMail,
    RawStatement,
    RecoveryCode,
    RepeatEntry,
    SessionData,
    StoreError,
    UserFilter,
    UserRecord,
    UserRow,
    UserState,
    bypass_active,
    ensure_user_stmt,
    insert_for,
    outbox,
    queued_mail,
    status_case,
    user_record,
)


class AdminStore:
    def __init__(self, engine: Engine, clock: Clock = time.time,
                 in_group: Callable[[], bool] = lambda: False) -> None:
        """``in_group``: whether this thread is inside the hot path's group
        (where this store must not run)."""
        self.engine = engine
        self.dialect = engine.dialect.name
        self.clock = clock
        self._in_group = in_group
        self._local = threading.local()
        self._ensure_stmt = ensure_user_stmt(self.dialect)

    def _session(self) -> Session:
        if self._in_group():
            raise RuntimeError("an admin store call inside the hot path's group: its "
                               "connection would wait for the group's own lock")
        return Session(self.engine, expire_on_commit=False)

    def get(self, username: str) -> UserRecord | None:
        """The user's state as this thread's :meth:`transaction` sees it (its own
        writes included)."""
        with self._tx() as s:
            row = s.execute(select(*USER_COLUMNS).where(UserState.username == username)).first()
        return user_record(row) if row else None

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

    def list_users(self) -> list[UserRecord]:
        with self._session() as s:
            rows = s.execute(select(*USER_COLUMNS).order_by(UserState.username))
            return [user_record(r) for r in rows]

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
        status = status_case(t)
        q = (select(u.username, status, u.required, u.totp_key.is_not(None),
                    u.enrollment_deadline, u.failures, u.locked_until, bypass_active(t),
                    u.bypass_until, u.step_offset, func.coalesce(left.c.n, 0))
             .outerjoin(left, left.c.username == u.username).order_by(u.username))
        if f.status is not None:
            q = q.where(status == f.status)
        if f.locked:
            q = q.where(u.locked_until.is_not(None), u.locked_until > t)
        if f.bypass:
            q = q.where(bypass_active(t))
        if f.expiring_within is not None:
            q = q.where(status == "in_enrollment",
                        u.enrollment_deadline <= t + f.expiring_within)
        # On a DBAPI cursor: SQLAlchemy's row processing cost more than the query.
        stmt = RawStatement(q, self.engine.dialect)
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
        status = status_case(int(now)).label("status")
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
        stmt = insert_for(self.dialect, UserState).values(
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
                     last_step=None, step_offset=0, **NO_PENDING)

    def reset(self, username: str, deadline: int) -> None:
        """Clear the key, and the recovery codes and clock offset that went with it."""
        with self.transaction(), self._tx() as s:
            self._upsert(username, totp_key=None, key_version=None, enrolled_at=None,
                         last_step=None, step_offset=0, required=True,
                         enrollment_deadline=deadline, **NO_PENDING)
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
                s.execute(insert_for(self.dialect, RecoveryCode), [
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
        stmt = insert_for(self.dialect, UserState)
        stmt = stmt.on_conflict_do_update(index_elements=["username"], set_={
            k: getattr(stmt.excluded, k) for k in
            ("totp_key", "key_version", "enrolled_at", "last_step", "required",
             "enrollment_deadline", "updated_at")})
        required = [dict(username=u, required=True, enrollment_deadline=d, failures=0,
                         bypass=False, created_at=now, updated_at=now) for u, d in requirements]
        req_stmt = insert_for(self.dialect, UserState)
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
                updated_at=t, **NO_PENDING))
            return bool(r.rowcount)  # type: ignore[attr-defined]

    def drop_pending(self, username: str) -> bool:
        return self._update(username, **NO_PENDING)

    def create_session(self, data: SessionData) -> None:
        with self._session() as s, s.begin():
            s.execute(insert_for(self.dialect, PortalSessionRow).values(
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
                             .returning(*OUTBOX_COLUMNS)).all()
        return sorted((queued_mail(r) for r in rows), key=lambda m: m.id)

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
            rows = s.execute(select(*OUTBOX_COLUMNS).where(outbox.c.status.in_(statuses))
                             .order_by(outbox.c.id).limit(limit)).all()
        return [queued_mail(r) for r in rows]

    def pending_mail_count(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(outbox)
                                 .where(outbox.c.status == "pending")).scalar_one())

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
                      .values(**NO_PENDING))
