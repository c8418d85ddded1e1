"""/readyz tells why it is not ready only to admin sources (loopback and
``[http] admin_networks``); anyone else who reaches the port learns ready or not."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.web.test.requesthelper import DummyRequest

from proxy.http.server import AdminSources, Ready

INTERNAL = ["directory: ldap://10.1.2.3:389: invalid credentials for cn=svc,dc=corp",
            "state store: OperationalError: could not connect to db.internal:5432"]
ADMIN_NETWORKS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]


def ask(peer: object, problems: list[str] | Exception,
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = ADMIN_NETWORKS
        ) -> tuple[int, str]:
    """GET /readyz from ``peer`` with the checks answering ``problems``."""
    def check() -> Deferred[list[str]]:
        return fail(problems) if isinstance(problems, Exception) else succeed(problems)

    request = DummyRequest([b""])
    request.client = peer  # type: ignore[assignment]
    Ready(check, AdminSources(networks)).render_GET(request)  # type: ignore[arg-type]
    assert request.finished
    return request.responseCode or 200, b"".join(request.written).decode()


def tcp(host: str) -> IPv4Address | IPv6Address:
    return (IPv6Address if ":" in host else IPv4Address)("TCP", host, 50000)


@pytest.mark.parametrize("host", ["192.0.2.7", "172.16.0.1", "11.0.0.1", "2001:db9::1",
                                  "::ffff:192.0.2.7", "fe80::1%eth0"])
def test_a_stranger_learns_not_ready_and_nothing_else(host: str) -> None:
    assert ask(tcp(host), INTERNAL) == (503, "not ready\n")
    assert ask(tcp(host), RuntimeError("db.internal refused")) == (503, "not ready\n")


def test_no_ip_address_is_no_admin() -> None:
    assert ask(UNIXAddress(b"/run/x.sock"), INTERNAL) == (503, "not ready\n")
    assert ask(None, INTERNAL) == (503, "not ready\n")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1",
                                  "10.20.30.40", "::ffff:10.0.0.9", "2001:db8::5"])
def test_loopback_and_admin_networks_see_the_reasons(host: str) -> None:
    assert ask(tcp(host), INTERNAL) == (503, "not ready\n" + "".join(f"{p}\n" for p in INTERNAL))
    status, body = ask(tcp(host), RuntimeError("db.internal refused"))
    assert (status, body) == (503, "not ready\ncheck failed: db.internal refused\n")


def test_without_admin_networks_only_loopback_sees_the_reasons() -> None:
    assert ask(tcp("10.20.30.40"), INTERNAL, networks=[]) == (503, "not ready\n")
    assert ask(tcp("127.0.0.1"), INTERNAL, networks=[])[1].startswith("not ready\ndirectory:")


@pytest.mark.parametrize("host", ["192.0.2.7", "127.0.0.1"])
def test_ready_is_200_for_everyone(host: str) -> None:
    assert ask(tcp(host), []) == (200, "ready\n")


def test_through_the_real_site_a_stranger_gets_no_reasons() -> None:
    """make_site as serve builds it, a real HTTP request parsed from bytes, the
    peer address as the TCP connection gives it."""
    from prometheus_client import CollectorRegistry
    from twisted.internet.testing import StringTransport

    from proxy.http.server import make_site

    def answer(peer: IPv4Address) -> bytes:
        site = make_site(CollectorRegistry(), lambda: succeed(INTERNAL), ADMIN_NETWORKS)
        protocol = site.buildProtocol(peer)
        assert protocol is not None
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /readyz HTTP/1.1\r\nHost: proxy\r\n"
                              b"X-Forwarded-For: 127.0.0.1\r\n\r\n")
        return transport.value()

    stranger = answer(IPv4Address("TCP", "198.51.100.9", 40000))
    assert stranger.startswith(b"HTTP/1.1 503 ")
    assert b"not ready\n" in stranger  # X-Forwarded-For is not believed
    assert b"ldap://" not in stranger and b"db.internal" not in stranger
    admin = answer(IPv4Address("TCP", "10.9.8.7", 40000))
    assert admin.startswith(b"HTTP/1.1 503 ") and b"ldap://10.1.2.3:389" in admin


# -- the reasons, readable -------------------------------------------------------------------


@pytest.mark.parametrize(("component", "raw", "shown"), [
    ("directory", "directory unavailable (ldap://127.0.0.1:1: Connection was refused by other "
                  "side: 111: Connection refused.; ldap://127.0.0.1:2: TCP connection timed "
                  "out: 110: Connection timed out.)",
     "directory: ldap://127.0.0.1:1 connection refused; ldap://127.0.0.1:2 connection timed "
     "out"),
    ("directory", "directory unavailable (ldap://dc1:389: DNS lookup failed: address 'dc1' not "
                  "found: [Errno -2] Name or service not known.)",
     "directory: ldap://dc1:389 host name not found"),
    ("directory", "directory unavailable (ldap://dc1:389: service bind as 'cn=svc' failed: "
                  "result 49; ldap://dc1:389: service bind as 'cn=svc' failed: result 49)",
     "directory: ldap://dc1:389 service bind as 'cn=svc' failed: result 49"),
    ("directory", "users file /var/users.toml: not valid TOML",
     "directory: users file /var/users.toml: not valid TOML"),
    ("state store", "OperationalError: database is locked",
     "state store: OperationalError: database is locked"),
])
def test_reasons_name_the_component_and_each_url_once(component: str, raw: str,
                                                      shown: str) -> None:
    from proxy.http.server import readable_problem

    assert readable_problem(component, raw) == shown
