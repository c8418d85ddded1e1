"""Shared fixtures for the integration suite (other fixtures may be appended)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.slapd import Slapd, start_slapd


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One real slapd for the whole session (1,200 extra users for paged searches).

    No skip when slapd is missing: CI installs it, so its absence is a failure.
    Tests must not stop it; use ``slapd_fresh`` for that.
    """
    server = start_slapd(tmp_path_factory.mktemp("slapd"), extra_users=1200)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def slapd_fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """A private slapd for one test, which may stop() and start() it."""
    server = start_slapd(tmp_path_factory.mktemp("slapd-fresh"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def twisted_reactor() -> Iterator[Any]:
    """The global reactor, running in a background thread for the rest of the session.

    Drive it with ``twisted.internet.threads.blockingCallFromThread``. A process
    can run its reactor only once, so it is stopped only when the session ends.
    """
    from twisted.internet import reactor

    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                              name="reactor", daemon=True)
    thread.start()
    yield reactor
    reactor.callFromThread(reactor.stop)
    thread.join(timeout=10)
