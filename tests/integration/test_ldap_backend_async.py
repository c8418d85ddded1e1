"""What only the Twisted-native client has: the DN cache, bind queueing, many requests at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import ldap3
import pytest
from twisted.internet import defer
from twisted.internet.threads import blockingCallFromThread

from backends.base import DirectoryUnavailable, Identity, InvalidCredentials
from backends.ldap_async import AsyncLdapDirectory
from tests.integration.slapd import Slapd, user_dn
from tests.integration.test_ldap_backend import options_for

MakeAsync = Callable[..., AsyncLdapDirectory]


@pytest.fixture
def call(twisted_reactor: Any) -> Callable[..., Any]:
    """Run a function in the reactor thread and wait for its (Deferred) result."""

    def run(function: Callable[..., Any], *args: Any) -> Any:
        return blockingCallFromThread(twisted_reactor, function, *args)

    return run


@pytest.fixture
def make_async(twisted_reactor: Any, call: Callable[..., Any]) -> Iterator[MakeAsync]:
    made: list[AsyncLdapDirectory] = []

    def make(server: Slapd, **overrides: Any) -> AsyncLdapDirectory:
        directory: AsyncLdapDirectory = call(AsyncLdapDirectory,
                                             options_for(server, **overrides), twisted_reactor)
        made.append(directory)
        return directory

    yield make
    for directory in made:
        call(directory.close)


def test_cache_saves_the_search_never_the_bind(make_async: MakeAsync, slapd: Slapd,
                                               call: Callable[..., Any]) -> None:
    directory = make_async(slapd, dn_cache_seconds=60)
    call(directory.verify, "dave", "dave-pw")
    searches, binds = directory.stats.searches, directory.stats.binds
    identity = call(directory.verify, "dave", "dave-pw")
    assert identity == Identity("dave", user_dn("dave"), ("staff",))
    assert (directory.stats.searches, directory.stats.binds) == (searches, binds + 1)
    assert directory.cache.hits == 1


def test_wrong_password_with_a_cached_dn_costs_one_bind(make_async: MakeAsync, slapd: Slapd,
                                                        call: Callable[..., Any]) -> None:
    directory = make_async(slapd, dn_cache_seconds=60)
    call(directory.lookup, "erin")
    binds = directory.stats.binds
    with pytest.raises(InvalidCredentials):
        call(directory.verify, "erin", "wrong")
    assert directory.stats.binds == binds + 1


def test_cache_off_searches_every_time(make_async: MakeAsync, slapd: Slapd,
                                       call: Callable[..., Any]) -> None:
    directory = make_async(slapd, dn_cache_seconds=0)
    for _ in range(3):
        call(directory.verify, "frank", "frank-pw")
    assert directory.stats.searches == 3 and directory.cache.hits == 0


def test_a_stale_cached_dn_is_looked_up_again(make_async: MakeAsync, slapd_fresh: Slapd,
                                              call: Callable[..., Any]) -> None:
    directory = make_async(slapd_fresh, user_base=slapd_fresh.base_dn, dn_cache_seconds=60)
    assert call(directory.verify, "alice", "alice-pw").dn == user_dn("alice")
    admin = ldap3.Connection(slapd_fresh.url, slapd_fresh.admin_dn, slapd_fresh.admin_password,
                             auto_bind=True)
    assert admin.modify_dn(user_dn("alice"), "uid=alice",
                           new_superior=f"ou=services,{slapd_fresh.base_dn}")
    admin.unbind()
    moved = call(directory.verify, "alice", "alice-pw")
    assert moved.dn == f"uid=alice,ou=services,{slapd_fresh.base_dn}"


def test_many_requests_share_few_connections(make_async: MakeAsync, slapd: Slapd,
                                             call: Callable[..., Any]) -> None:
    directory = make_async(slapd, pool_size=1, bind_pool_size=2, dn_cache_seconds=0)
    names = [f"user{i:05d}" for i in range(1, 301)]

    def attempt(name: str, good: bool) -> defer.Deferred[bool]:
        password = "pass" + name[4:] if good else "wrong"
        d = directory.verify(name, password)
        d.addCallback(lambda identity: good and identity.username == name)
        d.addErrback(lambda failure: not good and bool(failure.check(InvalidCredentials)))
        return d

    def all_at_once() -> defer.Deferred[list[bool]]:
        return defer.gatherResults([attempt(n, i % 4 != 0) for i, n in enumerate(names)])

    assert all(call(all_at_once))
    assert directory.stats.connects == 3  # one service connection, two for binds


def test_closed_directory_is_unavailable(make_async: MakeAsync, slapd: Slapd,
                                         call: Callable[..., Any]) -> None:
    directory = make_async(slapd)
    call(directory.verify, "grace", "grace-pw")
    call(directory.close)
    with pytest.raises(DirectoryUnavailable):
        call(directory.verify, "grace", "grace-pw")
