"""The LDAP directory backend against a real slapd (see tests/integration/slapd.py).

Every test runs against each implementation of the backend (``impl``): the
ldap3 one and the Twisted-native one, driven synchronously by an adapter.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, cast

import ldap3
import pytest
from twisted.internet.threads import blockingCallFromThread

from backends.base import DirectoryUnavailable, Identity, InvalidCredentials, UnknownUser
from backends.ldap import LdapDirectory, LdapOptions
from backends.ldap_async import AsyncLdapDirectory
from tests.integration.slapd import Slapd, group_dn, make_ca, start_slapd, user_dn

ALICE = "uid=alice,ou=people,dc=example,dc=org"
MakeDirectory = Callable[..., Any]


def dead_url() -> str:
    """A loopback port nobody listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"ldap://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def hung_url() -> Iterator[str]:
    """A port that accepts TCP connections (backlog) but never answers a byte."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"ldap://127.0.0.1:{s.getsockname()[1]}"


def options_for(server: Slapd, **overrides: Any) -> LdapOptions:
    base = LdapOptions(
        urls=[server.url],
        bind_dn=server.svc_dn,
        bind_password=server.svc_password,
        user_base=f"ou=people,{server.base_dn}",
        group_base=f"ou=groups,{server.base_dn}",
        connect_timeout=2.0,
        timeout=3.0,
        pool_size=4,
    )
    return replace(base, **overrides)


class BlockingAsyncDirectory:
    """AsyncLdapDirectory seen as a synchronous Directory, through the reactor thread."""

    name = "ldap"

    def __init__(self, options: LdapOptions, reactor: Any) -> None:
        self.reactor = reactor
        self.directory: AsyncLdapDirectory = self._call(AsyncLdapDirectory, options, reactor)

    def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        return blockingCallFromThread(self.reactor, function, *args)

    def verify(self, username: str, password: str) -> Identity:
        return self._with_groups(self._call(self.directory.verify, username, password))

    def lookup(self, username: str) -> Identity | None:
        found = self._call(self.directory.lookup, username)
        return None if found is None else self._with_groups(found)

    def _with_groups(self, identity: Identity) -> Identity:
        """As the core sees it when a rule needs the groups (the group search then)."""
        return cast(Identity, self._call(self.directory.groups, identity))

    def lookup_dn(self, dn: str) -> Identity | None:
        return cast("Identity | None", self._call(self.directory.lookup_dn, dn))

    def check_password(self, identity: Identity, password: str) -> Identity:
        return cast(Identity, self._call(self.directory.check_password, identity, password))

    def group_members(self, group: str) -> list[str]:
        return cast("list[str]", self._call(self.directory.group_members, group))

    def ping(self) -> None:
        self._call(self.directory.ping)

    def close(self) -> None:
        self._call(self.directory.close)


@pytest.fixture(params=["ldap3", "twisted"])
def make_directory(request: pytest.FixtureRequest) -> Iterator[MakeDirectory]:
    """Build a backend from a server and option overrides; closed after the test."""
    made: list[Any] = []

    def make(server: Slapd, **overrides: Any) -> Any:
        options = options_for(server, **overrides)
        if request.param == "ldap3":
            directory: Any = LdapDirectory(options)
        else:
            directory = BlockingAsyncDirectory(options, request.getfixturevalue("twisted_reactor"))
        made.append(directory)
        return directory

    yield make
    for directory in made:
        directory.close()


@pytest.fixture
def directory(slapd: Slapd, make_directory: MakeDirectory) -> Any:
    return make_directory(slapd)


# ---------------------------------------------------------------- passwords


def test_good_password(directory: Any) -> None:
    identity = directory.verify("alice", "alice-pw")
    assert identity == Identity("alice", ALICE,
                                tuple(group_dn(g) for g in ("admins", "staff", "vpn-users")))


def test_wrong_password(directory: Any) -> None:
    with pytest.raises(InvalidCredentials) as caught:
        directory.verify("alice", "bob-pw")
    assert not isinstance(caught.value, UnknownUser)
    assert "bob-pw" not in str(caught.value)


def test_unknown_user(directory: Any) -> None:
    with pytest.raises(UnknownUser):
        directory.verify("nobody", "nobody-pw")
    with pytest.raises(UnknownUser):
        directory.verify("", "some-pw")
    assert directory.lookup("nobody") is None
    assert directory.lookup("") is None


def test_empty_password_never_reaches_the_server(make_directory: MakeDirectory,
                                                 slapd: Slapd) -> None:
    # Pointed at a dead port: any network use would raise DirectoryUnavailable instead.
    directory = make_directory(slapd, urls=[dead_url()])
    with pytest.raises(InvalidCredentials):
        directory.verify("alice", "")


@pytest.mark.parametrize("username", ["*", "alice)(uid=*", "*)(|(uid=*", "al*", "\\", "a\0b"])
def test_filter_injection_finds_nothing(directory: Any, username: str) -> None:
    assert directory.lookup(username) is None
    with pytest.raises(UnknownUser):
        directory.verify(username, "alice-pw")


@pytest.mark.parametrize("username", ["st*r(x)", "zoë"])
def test_usernames_with_metacharacters_and_unicode(directory: Any, username: str) -> None:
    identity = directory.verify(username, f"{username}-pw")
    assert identity.username == username
    assert identity.dn == user_dn(username)


def test_extra_users(directory: Any) -> None:
    assert directory.verify("user01200", "pass01200").username == "user01200"


def test_mail_filter_returns_the_username_attribute(make_directory: MakeDirectory,
                                                    slapd: Slapd) -> None:
    directory = make_directory(slapd, user_filter="(mail={username})")
    identity = directory.verify("bob@example.org", "bob-pw")
    assert (identity.username, identity.dn) == ("bob", user_dn("bob"))
    with pytest.raises(UnknownUser):
        directory.verify("bob", "bob-pw")


def test_ambiguous_filter_is_refused(make_directory: MakeDirectory, slapd: Slapd) -> None:
    directory = make_directory(slapd, user_filter="(|(uid={username})(uid=bob))")
    assert directory.lookup("alice") is None
    with pytest.raises(UnknownUser):
        directory.verify("alice", "alice-pw")


def test_concurrent_verifies(directory: Any) -> None:
    names = ["alice", "bob", "carol", "dave", "user00042"]

    def attempt(i: int) -> bool:
        name = names[i % len(names)]
        good = i % 3 != 0
        password = (f"{name}-pw" if not name.startswith("user") else "pass00042") if good else "x"
        try:
            return directory.verify(name, password).username == name and good
        except InvalidCredentials:
            return not good

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(attempt, range(200)))


# ---------------------------------------------------------------- look-ups and groups


def test_lookup(directory: Any) -> None:
    assert directory.lookup("carol") == Identity("carol", user_dn("carol"),
                                                 (group_dn("staff"), group_dn("vpn-users")))


def test_groups_from_memberof_without_group_base(make_directory: MakeDirectory,
                                                 slapd: Slapd) -> None:
    directory = make_directory(slapd, group_base="")
    assert directory.verify("alice", "alice-pw").groups == tuple(
        group_dn(g) for g in ("admins", "staff", "vpn-users"))


def test_groups_by_group_search(make_directory: MakeDirectory, slapd: Slapd) -> None:
    directory = make_directory(slapd, use_memberof=False)
    assert directory.verify("bob", "bob-pw").groups == (group_dn("staff"), group_dn("vpn-users"))
    assert directory.lookup("zoë").groups == ()


def test_no_groups_without_memberof_or_group_base(make_directory: MakeDirectory,
                                                  slapd: Slapd) -> None:
    directory = make_directory(slapd, use_memberof=False, group_base="")
    assert directory.verify("alice", "alice-pw").groups == ()


def test_group_members(directory: Any) -> None:
    assert directory.group_members("vpn-users") == ["alice", "bob", "carol"]
    assert len(directory.group_members("staff")) == 16
    many = directory.group_members("many")
    assert len(many) == 1200 and many[0] == "user00001"
    with pytest.raises(UnknownUser):
        directory.group_members("no-such-group")
    with pytest.raises(UnknownUser):
        directory.group_members("*")


# ---------------------------------------------------------------- failover and outages


def test_ping(directory: Any) -> None:
    directory.ping()


def test_failover_from_a_dead_first_url(make_directory: MakeDirectory, slapd: Slapd) -> None:
    directory = make_directory(slapd, urls=[dead_url(), slapd.url])
    assert directory.verify("alice", "alice-pw").username == "alice"
    with pytest.raises(InvalidCredentials):
        directory.verify("alice", "wrong")


def test_failover_from_a_hung_first_url_is_remembered(make_directory: MakeDirectory,
                                                      slapd: Slapd, hung_url: str) -> None:
    directory = make_directory(slapd, urls=[hung_url, slapd.url], timeout=0.5,
                               connect_timeout=0.5, down_seconds=60)
    started = time.monotonic()
    assert directory.verify("alice", "alice-pw").username == "alice"
    first = time.monotonic() - started
    assert first < 5
    # The hung URL is now known to be down: the next requests go straight to slapd.
    started = time.monotonic()
    for _ in range(5):
        directory.verify("bob", "bob-pw")
    assert time.monotonic() - started < 0.5


def test_all_urls_dead(make_directory: MakeDirectory, slapd: Slapd, hung_url: str) -> None:
    directory = make_directory(slapd, urls=[dead_url(), hung_url], timeout=0.5,
                               connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(DirectoryUnavailable) as caught:
        directory.verify("alice", "alice-pw")
    assert time.monotonic() - started < 3
    message = str(caught.value)
    assert hung_url in message and "alice-pw" not in message
    with pytest.raises(DirectoryUnavailable):
        directory.ping()
    with pytest.raises(DirectoryUnavailable):
        directory.lookup("alice")


def test_wrong_service_password_is_unavailable(make_directory: MakeDirectory,
                                               slapd: Slapd) -> None:
    directory = make_directory(slapd, bind_password="not-the-svc-secret")
    with pytest.raises(DirectoryUnavailable) as caught:
        directory.verify("alice", "alice-pw")
    assert "not-the-svc-secret" not in str(caught.value)


def test_recovery_after_restart(make_directory: MakeDirectory, slapd_fresh: Slapd) -> None:
    directory = make_directory(slapd_fresh, timeout=1.0, connect_timeout=1.0)
    assert directory.verify("alice", "alice-pw").username == "alice"
    slapd_fresh.stop()
    with pytest.raises(DirectoryUnavailable):
        directory.verify("alice", "alice-pw")
    with pytest.raises(DirectoryUnavailable):
        directory.ping()
    slapd_fresh.start()
    # Pooled connections died with the old process: the backend must reconnect by itself.
    assert directory.verify("alice", "alice-pw").username == "alice"
    directory.ping()


def test_restart_between_requests_is_invisible(make_directory: MakeDirectory,
                                               slapd_fresh: Slapd) -> None:
    directory = make_directory(slapd_fresh)
    directory.verify("bob", "bob-pw")
    slapd_fresh.stop()
    slapd_fresh.start()
    assert directory.verify("bob", "bob-pw").username == "bob"
    with pytest.raises(InvalidCredentials):
        directory.verify("bob", "wrong")


def test_failover_to_a_second_directory_and_back(make_directory: MakeDirectory, slapd: Slapd,
                                                 slapd_fresh: Slapd) -> None:
    primary, secondary = slapd_fresh.url, slapd.url
    directory = make_directory(slapd_fresh, urls=[primary, secondary],
                               down_seconds=0.2, timeout=1.0)
    directory.verify("carol", "carol-pw")
    assert urls_in_use(directory) == {primary}
    slapd_fresh.stop()
    assert directory.verify("carol", "carol-pw").username == "carol"
    assert urls_in_use(directory) == {secondary}
    slapd_fresh.start()
    time.sleep(0.3)  # once, past down_seconds: the primary may be tried again
    for _ in range(3):
        assert directory.verify("carol", "carol-pw").username == "carol"
    assert urls_in_use(directory) == {primary}


def urls_in_use(directory: Any) -> set[str]:
    """The URLs of the open connections a backend keeps (white-box, both implementations)."""
    if isinstance(directory, LdapDirectory):
        pools = [directory._service, directory._binder]
        return {p.endpoint.url for pool in pools for p in pool._idle}
    inner = directory.directory
    links = inner._service + inner._binders.links
    return {link.client.endpoint.url for link in links
            if link.client is not None and link.client.is_connected}


# ---------------------------------------------------------------- TLS


def test_start_tls_with_the_ca(make_directory: MakeDirectory, slapd: Slapd) -> None:
    directory = make_directory(slapd, start_tls=True, ca_file=slapd.ca_file)
    assert directory.verify("alice", "alice-pw").username == "alice"


def test_ldaps_with_the_ca(make_directory: MakeDirectory, slapd: Slapd) -> None:
    directory = make_directory(slapd, urls=[slapd.ldaps_url], ca_file=slapd.ca_file)
    assert directory.verify("alice", "alice-pw").username == "alice"
    with pytest.raises(InvalidCredentials):
        directory.verify("alice", "nope")


@pytest.mark.parametrize("scheme", ["ldaps", "starttls"])
def test_tls_without_the_ca_is_unavailable(make_directory: MakeDirectory, slapd: Slapd,
                                           scheme: str) -> None:
    # Verification is on by default: the system CAs do not know the test CA.
    directory = make_directory(slapd, **_tls_overrides(slapd, scheme))
    with pytest.raises(DirectoryUnavailable):
        directory.verify("alice", "alice-pw")


@pytest.mark.parametrize("scheme", ["ldaps", "starttls"])
def test_tls_with_a_wrong_ca_is_unavailable(make_directory: MakeDirectory, slapd: Slapd,
                                            scheme: str, tmp_path: Any) -> None:
    wrong_ca, _key, _cert = make_ca(tmp_path, "some other CA")
    directory = make_directory(slapd, ca_file=str(wrong_ca), **_tls_overrides(slapd, scheme))
    with pytest.raises(DirectoryUnavailable):
        directory.verify("alice", "alice-pw")


@pytest.mark.parametrize("scheme", ["ldaps", "starttls"])
def test_tls_certificate_for_another_name_is_unavailable(make_directory: MakeDirectory,
                                                         tmp_path: Any, scheme: str) -> None:
    server = start_slapd(tmp_path / "other-name", server_names=("ldap.example.org",))
    try:
        directory = make_directory(server, ca_file=server.ca_file,
                                   **_tls_overrides(server, scheme))
        with pytest.raises(DirectoryUnavailable):
            directory.verify("alice", "alice-pw")
    finally:
        server.stop()


def test_tls_verify_off_accepts_an_unknown_ca(make_directory: MakeDirectory,
                                              slapd: Slapd) -> None:
    directory = make_directory(slapd, urls=[slapd.ldaps_url], tls_verify=False)
    assert directory.verify("alice", "alice-pw").username == "alice"


def test_tls_failure_fails_over_to_the_next_url(make_directory: MakeDirectory,
                                                slapd: Slapd) -> None:
    # ldaps:// against the plain port: the TLS handshake fails, the next URL works.
    plain_as_ldaps = slapd.url.replace("ldap://", "ldaps://")
    directory = make_directory(slapd, urls=[plain_as_ldaps, slapd.ldaps_url],
                               ca_file=slapd.ca_file, timeout=1.0)
    assert directory.verify("alice", "alice-pw").username == "alice"


def _tls_overrides(server: Slapd, scheme: str) -> dict[str, Any]:
    if scheme == "ldaps":
        return {"urls": [server.ldaps_url]}
    return {"start_tls": True}


# ---------------------------------------------------------------- the test directory itself


def test_directory_acls(slapd: Slapd) -> None:
    """description is hidden from anonymous readers, userPassword from everyone."""
    anonymous = ldap3.Connection(slapd.url, auto_bind=True)
    anonymous.search(ALICE, "(objectClass=*)", ldap3.BASE, attributes=["description", "cn"])
    assert not anonymous.response[0]["raw_attributes"].get("description")
    service = ldap3.Connection(slapd.url, slapd.svc_dn, slapd.svc_password, auto_bind=True)
    service.search(ALICE, "(objectClass=*)", ldap3.BASE,
                   attributes=["description", "userPassword", "memberOf"])
    attributes = service.response[0]["raw_attributes"]
    assert attributes.get("description") and not attributes.get("userPassword")
    assert len(attributes["memberOf"]) == 3
    for conn in (anonymous, service):
        conn.unbind()


def test_slapd_restart_keeps_ports_and_data(tmp_path: Any) -> None:
    server = start_slapd(tmp_path / "own")
    try:
        url, pid = server.url, server.pid
        server.stop()
        assert not server.running
        server.start()
        assert server.url == url and server.pid != pid
        conn = ldap3.Connection(server.url, user_dn("dave"), "dave-pw", auto_bind=True)
        assert conn.extend.standard.who_am_i() == f"dn:{user_dn('dave')}"
        conn.unbind()
    finally:
        server.stop()
