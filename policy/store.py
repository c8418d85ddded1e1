"""The state store: one database, two ways in.

- ``store.hot`` (policy/hot_store.py): what a sign-in does -- its statements
  compiled once, on a DBAPI cursor per thread, grouped into one commit;
- ``store.admin`` (policy/admin_store.py): what admins, the portal and the mail
  sender do -- ORM sessions and transactions, never inside the hot path's group.

Both read the tables and the MFA status rule of policy/schema.py. This class
owns the engine: migrations, backup, checkpoints, the health check, closing.
Only these modules write SQL.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import suppress

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from policy.admin_store import AdminStore
from policy.clock import Clock
from policy.hot_store import HotStore
from policy.schema import BackupSummary, StoreError, make_engine


class Store:
    def __init__(self, url: str, clock: Clock = time.time,
                 background_checkpoints: bool = False) -> None:
        """``background_checkpoints`` (SQLite; for a long-running server): commits
        never checkpoint the WAL themselves; the owner calls :meth:`checkpoint`
        often, from a thread that no sign-in waits for."""
        self.url = url
        self.engine = make_engine(url, background_checkpoints)
        self.dialect = self.engine.dialect.name
        self._hot: HotStore | None = None
        self._hot_lock = threading.Lock()
        self.admin = AdminStore(self.engine, clock, self._in_hot_group)

    @property
    def hot(self) -> HotStore:
        """Built on first use: compiling its statements costs an admin command that
        never signs anyone in (most of them) ~10 ms."""
        hot = self._hot
        if hot is None:
            with self._hot_lock:
                if self._hot is None:
                    self._hot = HotStore(self.engine)
                hot = self._hot
        return hot

    def _in_hot_group(self) -> bool:
        return self._hot is not None and self._hot.in_group()

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
        if self._hot is not None:
            self._hot.close()
        self.engine.dispose()
