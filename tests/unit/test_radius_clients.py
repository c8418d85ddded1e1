"""Client table: source address → client, the most specific prefix wins."""

from __future__ import annotations

import ipaddress

import pytest

from policy.decision import MfaMode, SplitMode
from proxy.radius.clients import (
    ClientTable,
    EnrollmentNotice,
    RadiusClientConfig,
    normalize_address,
)


def client(name: str, *networks: str, **kw) -> RadiusClientConfig:
    return RadiusClientConfig(name=name, networks=networks,
                              nas_secret=b"secret-" + name.encode(), **kw)


@pytest.fixture
def table() -> ClientTable:
    return ClientTable([
        client("lan", "10.0.0.0/8"),
        client("vpn-gw", "10.1.2.3"),
        client("dc", "10.1.0.0/16"),
        client("v6-site", "2001:db8::/32"),
        client("v6-host", "2001:db8::1/128"),
        client("loopback", "127.0.0.1", "::1"),
    ])


@pytest.mark.parametrize(("host", "name"), [
    ("10.9.9.9", "lan"),
    ("10.1.9.9", "dc"),
    ("10.1.2.3", "vpn-gw"),  # /32 beats /16 beats /8, whatever the configured order
    ("2001:db8::2", "v6-site"),
    ("2001:db8::1", "v6-host"),
    ("::ffff:10.1.2.3", "vpn-gw"),  # IPv4-mapped, from a dual-stack listener
    ("::ffff:10.200.0.1", "lan"),
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("fe80::1%eth0", None),  # a zone does not break parsing
    ("192.0.2.1", None),
    ("2001:db9::1", None),
    ("not-an-address", None),
    ("", None),
])
def test_most_specific_prefix_wins(table: ClientTable, host: str, name: str | None) -> None:
    found = table.lookup(host)
    assert (found.name if found else None) == name
    again = table.lookup(host)  # cached answer is the same
    assert (again.name if again else None) == name


def test_strings_become_typed_values() -> None:
    c = RadiusClientConfig(name="x", networks=("192.0.2.0/24",), nas_secret="text-secret",  # type: ignore[arg-type]
                           mode="challenge", mfa="strict",  # type: ignore[arg-type]
                           enrollment_notice="challenge")  # type: ignore[arg-type]
    assert c.mode is SplitMode.CHALLENGE and c.mfa is MfaMode.STRICT
    assert c.enrollment_notice is EnrollmentNotice.CHALLENGE
    assert c.networks == (ipaddress.ip_network("192.0.2.0/24"),)
    assert c.nas_secret == b"text-secret"


def test_host_bits_are_allowed_in_a_cidr() -> None:
    assert client("x", "192.0.2.7/24").networks == (ipaddress.ip_network("192.0.2.0/24"),)


@pytest.mark.parametrize("kw", [
    {"nas_secret": b""}, {"networks": ()}, {"mode": "sometimes"}, {"mfa": "maybe"},
    {"networks": ("10.0.0.300",)},
])
def test_bad_client_configs_are_refused(kw) -> None:
    args = {"name": "x", "networks": ("10.0.0.1",), "nas_secret": b"s"} | kw
    with pytest.raises(ValueError):
        RadiusClientConfig(**args)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="'a' is used twice"):
        ClientTable([client("a", "10.0.0.1"), client("a", "10.0.0.2")])


def test_two_clients_claiming_one_network_are_refused() -> None:
    with pytest.raises(ValueError, match="both claim 10.0.0.0/8"):
        ClientTable([client("a", "10.0.0.0/8"), client("b", "10.0.0.0/8")])


def test_table_iterates_its_clients(table: ClientTable) -> None:
    assert len(table) == 6 and [c.name for c in table][0] == "lan"


def test_lookup_cache_stays_bounded(table: ClientTable) -> None:
    for i in range(10_000):
        table.lookup(f"192.0.{i // 256}.{i % 256}")
    assert len(table._cache) <= 4096
    assert table.lookup("10.1.2.3").name == "vpn-gw"


def test_normalize_address() -> None:
    assert normalize_address("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert normalize_address("::1") == ipaddress.ip_address("::1")
    assert normalize_address("junk") is None
