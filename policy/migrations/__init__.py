"""Alembic migrations for the state store, run programmatically (no alembic.ini).

Alembic is imported only when a migration actually runs: a service whose
database is current never loads it (it costs start-up time and memory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

HERE = Path(__file__).resolve().parent
# The newest revision in versions/; tests check it matches Alembic's own view.
HEAD = "0006"


def _config(engine: Engine | None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["engine"] = engine
    return cfg


class SchemaTooNew(Exception):
    """The database was migrated by a newer mfa-proxy: going back is not supported."""


def known_revisions() -> set[str]:
    """Every revision in versions/ (from the file names: no Alembic loaded)."""
    return {p.name.split("_", 1)[0] for p in (HERE / "versions").glob("[0-9]*_*.py")}


def check_not_newer(engine: Engine) -> None:
    current = current_revision(engine)
    if current is not None and current not in known_revisions():
        raise SchemaTooNew(
            f"the state database is at schema revision {current}, newer than this "
            f"mfa-proxy knows (its newest is {HEAD}): a newer version migrated it, and "
            "downgrades are not supported; run that version, or restore the backup taken "
            "before the upgrade (with its key file)")


def upgrade_to_head(engine: Engine) -> None:
    if is_current(engine):
        return
    check_not_newer(engine)
    from alembic import command

    command.upgrade(_config(engine), "head")


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    head: str | None = ScriptDirectory.from_config(_config(None)).get_current_head()
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
        return str(row[0]) if row else None


def is_current(engine: Engine) -> bool:
    return current_revision(engine) == HEAD
