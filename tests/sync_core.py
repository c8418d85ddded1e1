"""The real core, run to its answer on the calling thread (tests only).

:func:`authenticate_sync` is :class:`policy.engine.Authenticator` — every
phase the front-ends go through, the group step and the per-identity gate
included — over a synchronous directory, with the state steps run inline
instead of on the state thread. Nothing about the decision is imitated:
the tests that race threads on one store (each call its own Authenticator,
so its own gate) prove the store's atomic updates, and the unit tests walk
every phase without a reactor.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from backends.base import Identity
from policy.decision import AuthRequest, Decision
from policy.engine import Authenticator, PolicyEngine


class SyncAsAsync:
    """A synchronous directory behind the AsyncDirectory interface (Deferreds
    that have fired by the time they are returned)."""

    def __init__(self, directory: Any) -> None:
        self.directory = directory

    def lookup(self, username: str) -> Deferred[Identity | None]:
        return maybeDeferred(self.directory.lookup, username)

    def lookup_dn(self, dn: str) -> Deferred[Identity | None]:
        lookup_dn = getattr(self.directory, "lookup_dn", None)
        if lookup_dn is None:  # a directory that resolves no DNs: nobody
            return maybeDeferred(lambda: None)
        return maybeDeferred(lookup_dn, dn)

    def check_password(self, identity: Identity, password: str) -> Deferred[Identity]:
        return maybeDeferred(self.directory.check_password, identity, password)

    def groups(self, identity: Identity) -> Deferred[Identity]:
        groups = getattr(self.directory, "groups", None)
        if groups is None:  # its entries come with every group
            return maybeDeferred(replace, identity, groups_complete=True)
        return maybeDeferred(groups, identity)

    def ping(self) -> Deferred[None]:
        return maybeDeferred(lambda: None)


def authenticate_sync(engine: PolicyEngine, request: AuthRequest, directory: Any) -> Decision:
    """The decision for ``request``, as a front-end would get it."""
    auth = Authenticator(engine, SyncAsAsync(directory), lambda f, *a: maybeDeferred(f, *a),
                         clock=engine.clock)
    results: list[Any] = []
    auth.authenticate(request).addBoth(results.append)
    assert results, "the core did not answer synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    decision: Decision = results[0]
    return decision
