"""Run a synchronous Directory off the reactor thread."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from backends.base import Directory, Identity


class ThreadedDirectory:
    def __init__(self, directory: Directory, reactor: Any, pool: ThreadPool) -> None:
        self.directory, self.reactor, self.pool = directory, reactor, pool

    def verify(self, username: str, password: str) -> Deferred[Identity]:
        return deferToThreadPool(self.reactor, self.pool, self.directory.verify, username,
                                 password)

    def lookup(self, username: str) -> Deferred[Identity | None]:
        return deferToThreadPool(self.reactor, self.pool, self.directory.lookup, username)

    def lookup_dn(self, dn: str) -> Deferred[Identity | None]:
        """A directory without DNs (the local file) resolves no bind DN."""
        lookup_dn = getattr(self.directory, "lookup_dn", None)
        if lookup_dn is None:
            return succeed(None)
        return deferToThreadPool(self.reactor, self.pool, lookup_dn, dn)

    def check_password(self, identity: Identity, password: str) -> Deferred[Identity]:
        return deferToThreadPool(self.reactor, self.pool, self.directory.check_password,
                                 identity, password)

    def forget(self, name: str) -> None:
        """Nothing is cached here."""

    def groups(self, identity: Identity) -> Deferred[Identity]:
        """A synchronous directory's look-ups carry every group already."""
        return succeed(identity)

    def ping(self) -> Deferred[None]:
        return deferToThreadPool(self.reactor, self.pool, self.directory.ping)

    def close(self) -> None:
        self.directory.close()
