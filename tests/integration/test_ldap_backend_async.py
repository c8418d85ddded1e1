"""What only the Twisted-native client has: the DN cache, bind queueing, many requests at once."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import ldap3
import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import blockingCallFromThread

from backends.base import (
    DirectoryError,
    DirectoryUnavailable,
    Identity,
    InvalidCredentials,
    UnknownUser,
)
from backends.ldap_async import AsyncLdapDirectory
from backends.ldapwire.ber import ENUMERATED, OCTET_STRING, integer, tlv
from backends.ldapwire.framing import frame_size
from backends.ldapwire.messages import BIND_REQUEST, BIND_RESPONSE, decode_envelope, ldap_message
from tests.integration.slapd import Slapd, group_dn, user_dn
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
    assert identity == Identity("dave", user_dn("dave"), (group_dn("staff"),))
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


# ---------------------------------------------------------------- the fast path of verify()


def fast_verify(directory: AsyncLdapDirectory, username: str,
                password: str) -> Deferred[Identity]:
    """The look-up, then the password, as the core calls them (no coroutine)."""
    def check(identity: Identity | None) -> Any:
        if identity is None:
            raise UnknownUser(f"no such user: {username!r}")
        return directory.check_password(identity, password)

    return directory.lookup(username).addCallback(check)


def count_coroutines(directory: AsyncLdapDirectory) -> list[int]:
    """Count the coroutines the directory starts from now on (the fast path starts none)."""
    started: list[int] = []

    def run(coroutine: Any) -> Deferred[Any]:
        started.append(1)
        return Deferred.fromCoroutine(coroutine)

    directory._run = run  # type: ignore[method-assign]
    return started


CASES = [("alice", "alice-pw"), ("alice", "wrong"), ("bob", "bob-pw"), ("nobody", "x"),
         ("zoë", "zoë-pw"), ("st*r(x)", "wrong"), ("*", "alice-pw")]


ALICE_GROUPS = tuple(group_dn(g) for g in ("admins", "staff", "vpn-users"))


# No look-up hands over for groups: a group search is made only when the core asks
# (directory.groups), which it does only when a rule for the request needs them.
@pytest.mark.parametrize(("overrides", "handed_over", "alice_groups"), [
    ({}, 0, ALICE_GROUPS),
    ({"use_memberof": False}, 0, ALICE_GROUPS),  # from the group search, when asked
    ({"group_base": ""}, 0, ALICE_GROUPS),
    ({"group_base": "", "use_memberof": False}, 0, ()),
])
def test_the_fast_and_the_slow_path_agree(make_async: MakeAsync, slapd: Slapd,
                                          call: Callable[..., Any], overrides: dict[str, Any],
                                          handed_over: int,
                                          alice_groups: tuple[str, ...]) -> None:
    directory = make_async(slapd, pool_size=1, bind_pool_size=1, dn_cache_seconds=0,
                           **overrides)
    call(directory.verify, "carol", "carol-pw")  # opens both connections

    def outcome(verify: Callable[[str, str], Deferred[Identity]], name: str,
                password: str) -> Any:
        try:
            return call(verify, name, password)
        except DirectoryError as refused:
            return type(refused), str(refused)

    started = count_coroutines(directory)
    fast = [outcome(lambda n, p: fast_verify(directory, n, p), name, password)
            for name, password in CASES]
    assert len(started) == handed_over

    def slow(name: str, password: str) -> Deferred[Identity]:
        return directory._run(directory._verify(name, password))

    assert fast == [outcome(slow, name, password) for name, password in CASES]
    alice = fast[0]
    assert alice == Identity("alice", user_dn("alice"),
                             alice_groups if alice.groups_complete else ())
    assert alice.groups_complete == (overrides.get("use_memberof", True)
                                     or not overrides.get("group_base", "x"))
    assert directory.stats.group_searches == 0
    assert call(directory.groups, alice) == Identity("alice", user_dn("alice"), alice_groups)
    assert fast[1] == (InvalidCredentials, "bind refused: result 49")
    assert fast[3] == (UnknownUser, "no such user: 'nobody'")
    assert fast[6] == (UnknownUser, "no such user: '*'")


class BindsOnly(Protocol):
    """An LDAP server that accepts every bind and never answers a search."""

    def __init__(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.buffer += data
        while (size := frame_size(self.buffer, 0)) is not None:
            message, self.buffer = self.buffer[:size], self.buffer[size:]
            message_id, tag, _start, _end = decode_envelope(message)
            if tag == BIND_REQUEST:
                result = integer(0, ENUMERATED) + tlv(OCTET_STRING, b"") * 2
                self.transport.write(ldap_message(message_id, tlv(BIND_RESPONSE, result)))


@pytest.fixture
def binds_only(twisted_reactor: Any, call: Callable[..., Any]) -> Iterator[str]:
    port = call(twisted_reactor.listenTCP, 0, Factory.forProtocol(BindsOnly), 50, "127.0.0.1")
    yield f"ldap://127.0.0.1:{port.getHost().port}"
    call(port.stopListening)


def test_a_search_without_answer_times_out_on_the_fast_path(
        make_async: MakeAsync, slapd: Slapd, call: Callable[..., Any], binds_only: str) -> None:
    directory = make_async(slapd, urls=[binds_only], pool_size=1, timeout=0.5)
    call(directory._service[0].get)  # the service connection, open and bound
    started = count_coroutines(directory)
    with pytest.raises(DirectoryUnavailable) as caught:
        call(fast_verify, directory, "alice", "alice-pw")
    assert "no answer within 0.5s" in str(caught.value)
    assert len(started) == 1  # the retry after the timeout, by the coroutine
    assert directory.endpoints.all[0].down_until > 0


def slapd_base_read(slapd: Slapd, dn: str) -> list[str]:
    """The entries slapd itself finds at ``dn`` (ldapsearch sends the DN as it is)."""
    found = subprocess.run(
        ["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", slapd.url, "-D", slapd.svc_dn,
         "-w", slapd.svc_password, "-s", "base", "-b", dn, "1.1"],
        capture_output=True, text=True, timeout=30, check=False)
    return [line[4:] for line in found.stdout.splitlines() if line.startswith("dn: ")]


@pytest.mark.parametrize("spelling", [
    "uid=alice,ou=people,dc=example,dc=org",
    "UID=ALICE,OU=PEOPLE,DC=EXAMPLE,DC=ORG",
    "uid = alice , ou = people , dc = example , dc = org",
    "uid=\\61lice,ou=people,dc=example,dc=org",
    "0.9.2342.19200300.100.1.1=alice,ou=people,dc=example,dc=org",
    "userid=alice,ou=people,dc=example,dc=org",
    "uid;x-option=alice,ou=people,dc=example,dc=org",
    "uid=ａｌｉｃｅ,ou=people,dc=example,dc=org",
    "uid=ALİCE,ou=people,dc=example,dc=org",
    "uid=𝐚lice,ou=people,dc=example,dc=org",
])
def test_lookup_dn_sees_every_spelling_slapd_accepts_as_the_one_entry(
        make_async: MakeAsync, slapd: Slapd, call: Callable[..., Any], spelling: str) -> None:
    """Whatever slapd itself resolves a spelling to is what the core is told."""
    assert slapd_base_read(slapd, spelling) == [user_dn("alice")]  # slapd: this is alice
    directory = make_async(slapd, dn_cache_seconds=0)
    identity = call(directory.lookup_dn, spelling)
    assert identity == Identity("alice", user_dn("alice"), ALICE_GROUPS)


@pytest.mark.parametrize("dn", [
    "cn=admin,dc=example,dc=org",  # the rootdn: no user entry
    "cn;x=admin,dc=example,dc=org",
    "cn=svc,ou=services,dc=example,dc=org",  # an entry outside user_base, without uid
    "uid=nobody,ou=people,dc=example,dc=org",
    "dc=example,dc=org",
    "not a dn",
    "uid=alice,ou=people,dc=example,dc=org,dc=extra",
])
def test_lookup_dn_of_anything_but_a_user_entry_is_nobody(
        make_async: MakeAsync, slapd: Slapd, call: Callable[..., Any], dn: str) -> None:
    assert call(make_async(slapd).lookup_dn, dn) is None


def test_lookup_dn_refuses_an_entry_its_own_name_does_not_find(
        make_async: MakeAsync, slapd_fresh: Slapd, call: Callable[..., Any]) -> None:
    """A second entry named alice elsewhere under the base: the name finds two,
    so neither DN is an identity (binding as one of them would be a guess)."""
    admin = ldap3.Connection(slapd_fresh.url, slapd_fresh.admin_dn,
                             slapd_fresh.admin_password, auto_bind=True)
    assert admin.add(f"uid=alice,ou=services,{slapd_fresh.base_dn}",
                     ["inetOrgPerson"], {"cn": "other alice", "sn": "x",
                                         "userPassword": "other-pw"})
    admin.unbind()
    directory = make_async(slapd_fresh, user_base=slapd_fresh.base_dn, dn_cache_seconds=0)
    assert call(directory.lookup_dn, f"uid=alice,ou=services,{slapd_fresh.base_dn}") is None
    assert call(directory.lookup_dn, user_dn("alice")) is None


def test_lookup_dn_is_cached_like_names(make_async: MakeAsync, slapd: Slapd,
                                        call: Callable[..., Any]) -> None:
    directory = make_async(slapd, dn_cache_seconds=60)
    first = call(directory.lookup_dn, "UID=Bob,OU=People,DC=example,DC=org")
    searches = directory.stats.searches
    again = call(directory.lookup_dn, "UID=Bob,OU=People,DC=example,DC=org")
    assert first == again == Identity("bob", user_dn("bob"),
                                      (group_dn("staff"), group_dn("vpn-users")))
    assert directory.stats.searches == searches and again.from_cache
