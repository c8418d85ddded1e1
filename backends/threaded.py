"""Run a synchronous Directory off the reactor thread."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
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

    def ping(self) -> Deferred[None]:
        return deferToThreadPool(self.reactor, self.pool, self.directory.ping)

    def close(self) -> None:
        self.directory.close()
