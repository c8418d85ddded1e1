"""Session-wide fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg import Postgres, start_postgres


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One real PostgreSQL server for the session, started on first use.

    No skip when PostgreSQL is missing: scripts/test installs it, so its
    absence is a failure.
    """
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres: Postgres) -> str:
    """A database for the session (tests that need an empty one call
    ``postgres.new_database()``)."""
    return postgres.new_database("session")
