"""The directory backend's connections, kept open and shared: links, and the queue for bind links.

A :class:`Link` is one connection slot: it connects on demand (through the
directory's opener, which tries the URLs in order), is shared by whoever
needs it meanwhile, and moves back to a preferred URL once that one is up
again and the link is idle. The service-account links carry many searches
at once; :class:`BindLinks` hands out the user-bind links one bind at a
time (RFC 4511 §4.2.1: nothing else may be in flight during a bind), and
callers queue for one, each for ``timeout`` at most.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from operator import attrgetter
from typing import Any
from typing import Protocol as Interface

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from backends.base import DirectoryUnavailable
from backends.ldap_client import LdapClientProtocol
from backends.ldap_common import Endpoints


class Link:
    """One persistent connection slot: connects on demand, shared by concurrent callers."""

    def __init__(self, opener: Callable[[], Deferred[LdapClientProtocol]],
                 endpoints: Endpoints) -> None:
        self._opener = opener
        self._endpoints = endpoints
        self.client: LdapClientProtocol | None = None
        self._waiters: list[Deferred[LdapClientProtocol]] | None = None

    @property
    def load(self) -> int:
        """Requests in flight; -1 when not connected, so idle slots get connected first."""
        client = self.client
        return len(client.pending) if client is not None and client.is_connected else -1

    def ready(self) -> LdapClientProtocol | None:
        """The connection, when :meth:`get` would hand it over as it is (no side effect)."""
        client = self.client
        if client is not None and client.is_connected and not self._should_move(client):
            return client
        return None

    def get(self) -> Deferred[tuple[LdapClientProtocol, bool]]:
        """The connection and whether it was already open (it may have gone stale)."""
        client = self.client
        if client is not None and client.is_connected:
            if not self._should_move(client):
                return defer.succeed((client, True))
            client.close()
        waiter: Deferred[LdapClientProtocol] = Deferred()
        if self._waiters is None:
            self._waiters = [waiter]
            self._opener().addBoth(self._opened)
        else:
            self._waiters.append(waiter)
        return waiter.addCallback(lambda fresh: (fresh, False))

    def _should_move(self, client: LdapClientProtocol) -> bool:
        """True when a preferred URL may be back: leave the fallback once it is idle."""
        order = self._endpoints.all
        if len(order) < 2:
            return False  # nowhere else to go
        preferred = self._endpoints.preferred()
        if preferred is None or preferred is client.endpoint:
            return False
        return order.index(preferred) < order.index(client.endpoint) and not client.pending

    def _opened(self, result: LdapClientProtocol | Failure) -> None:
        waiters, self._waiters = self._waiters or [], None
        if isinstance(result, LdapClientProtocol):
            self.client = result
            for waiter in waiters:
                waiter.callback(result)
        else:
            for waiter in waiters:
                waiter.errback(result)

    def close(self) -> Deferred[None]:
        client, self.client = self.client, None
        return client.close() if client is not None else defer.succeed(None)


by_load = attrgetter("load")  # a Link's load, as a key function (no Python frame)


class LinkWaiter(Interface):
    """A caller queued for a bind link: given one, or told the wait is over."""

    def give(self, link: Link) -> None: ...

    def expire(self, why: DirectoryUnavailable) -> None: ...


class _QueuedDeferred:
    """A coroutine's place in the bind queue."""

    __slots__ = ("deferred",)

    def __init__(self, links: BindLinks) -> None:
        self.deferred: Deferred[Link] = Deferred(lambda _: links.forget(self))

    def give(self, link: Link) -> None:
        self.deferred.callback(link)

    def expire(self, why: DirectoryUnavailable) -> None:
        self.deferred.errback(why)


class BindLinks:
    """Links for user binds: each carries one bind at a time; callers queue for one.

    A caller waits ``timeout`` at most. The queue is in arrival order, hence in
    deadline order, so one timer, due for the head of the queue, serves all.
    """

    def __init__(self, links: list[Link], timeout: float, reactor: Any) -> None:
        self.links = links
        self._idle = list(links)
        self._queue: deque[tuple[float, LinkWaiter]] = deque()
        self._timeout = timeout
        self._reactor = reactor
        self._timer: Any = None

    def take(self) -> Link | None:
        """An idle link, if any, now."""
        return self._idle.pop() if self._idle else None

    def wait(self, waiter: LinkWaiter) -> None:
        """Queue ``waiter`` for the next link released."""
        self._queue.append((self._reactor.seconds() + self._timeout, waiter))
        if self._timer is None:
            self._arm()

    def acquire(self) -> Deferred[Link]:
        """A link, now or once one is released; fails with DirectoryUnavailable in time."""
        link = self.take()
        if link is not None:
            return defer.succeed(link)
        queued = _QueuedDeferred(self)
        self.wait(queued)
        return queued.deferred

    def release(self, link: Link) -> None:
        if self._queue:
            self._queue.popleft()[1].give(link)
        else:
            self._idle.append(link)

    def forget(self, waiter: LinkWaiter) -> None:
        """Take a cancelled waiter out of the queue."""
        for queued in self._queue:
            if queued[1] is waiter:
                self._queue.remove(queued)
                return

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        delay = self._queue[0][0] - self._reactor.seconds()
        self._timer = self._reactor.callLater(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._reactor.seconds()
        while self._queue and self._queue[0][0] <= now:
            self._queue.popleft()[1].expire(DirectoryUnavailable(
                f"no free bind connection within {self._timeout:g}s"))
        if self._queue:  # (expire may have queued more: arm for the head, whoever it is)
            self._arm()
