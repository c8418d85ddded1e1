"""Bind names → usernames, DN rules, the bind cache and the config checks."""

from __future__ import annotations

import pytest

from proxy.ldap.bindcache import BindCache
from proxy.ldap.config import (
    BindCacheRule,
    LdapFrontendConfig,
    parse_listen,
    parse_upstream,
)
from proxy.ldap.dn import DnSuffixMap, normalize_dn, parse_dn, username_from_bind_name


@pytest.mark.parametrize(
    ("name", "username"),
    [
        ("uid=alice,ou=people,dc=example,dc=org", "alice"),
        ("UID=Alice, OU=People, DC=example, DC=org", "Alice"),
        ("uid = alice , ou=people", "alice"),
        ("cn=Alice Smith+uid=alice,ou=people,dc=example,dc=org", "alice"),
        ("uid=st\\2Ar\\28x\\29,ou=people", "st*r(x)"),
        ("uid=a\\,b,ou=people", "a,b"),
        ("uid=zo\\C3\\AB,ou=people", "zoë"),
        ("uid=zoë,ou=people", "zoë"),
        ("0.9.2342.19200300.100.1.1=alice,dc=x", "alice"),
        ('uid="a,b",ou=people', "a,b"),
        ("uid=alice\\ ,ou=people", "alice "),
        # Not DNs, or DNs without the attribute: passed as they are.
        ("alice@example.org", "alice@example.org"),
        ("EXAMPLE\\alice", "EXAMPLE\\alice"),
        ("cn=admin,dc=example,dc=org", "cn=admin,dc=example,dc=org"),
        ("alice", "alice"),
        ("uid=alice\\", "uid=alice\\"),
    ],
)
def test_username_from_bind_name(name: str, username: str) -> None:
    assert username_from_bind_name(name, "uid") == username


def test_username_attribute_is_configurable() -> None:
    assert username_from_bind_name("cn=bob,ou=people,dc=x", "cn") == "bob"
    assert username_from_bind_name("CN=bob,ou=people,dc=x", "CN") == "bob"


def test_parse_dn_multivalued_and_escapes() -> None:
    assert parse_dn("cn=a+sn=b,dc=x") == [(("cn", "a"), ("sn", "b")), (("dc", "x"),)]
    assert parse_dn("") == []
    for bad in ("noequals", "=x,dc=y", 'cn="open', "cn=\\zz\\"):
        with pytest.raises(ValueError):
            parse_dn(bad)


def test_normalize_dn_sees_through_spellings() -> None:
    assert normalize_dn("UID=Alice, OU=People,DC=Example,DC=org") == normalize_dn(
        "uid=alice,ou=people,dc=example,dc=org"
    )
    assert normalize_dn("uid=a\\2cb,dc=x") == normalize_dn("uid=a\\,b,dc=x")
    assert normalize_dn("alice@example.org") is None


def test_suffix_map_matches_whole_rdns_and_longest_wins() -> None:
    rules = DnSuffixMap(
        [
            ("ou=services,dc=example,dc=org", 10),
            ("cn=jenkins,ou=services,dc=example,dc=org", 60),
            ("svc@example.org", 5),
        ]
    )
    assert rules.lookup("cn=jenkins,ou=services,dc=example,dc=org") == 60
    assert rules.lookup("CN=Grafana, OU=Services, DC=example, DC=org") == 10
    assert rules.lookup("ou=services,dc=example,dc=org") == 10
    assert rules.lookup("cn=x,ou=xservices,dc=example,dc=org") is None
    assert rules.lookup("uid=alice,ou=people,dc=example,dc=org") is None
    assert rules.lookup("SVC@example.org") == 5
    assert rules.lookup("not a dn") is None
    assert not DnSuffixMap([])


# ---------------------------------------------------------------- bind cache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_hit_within_window_then_expiry() -> None:
    clock = FakeClock()
    cache = BindCache(clock=clock)
    key = cache.key("uid=alice,ou=people,dc=x", b"pw,123456", "127.0.0.1")
    cache.put(key, "alice", 2, "", 30)
    entry = cache.get(key)
    assert entry is not None and entry.username == "alice" and entry.password_length == 2
    clock.now += 30
    assert cache.get(key) is None
    assert len(cache) == 0


def test_cache_key_depends_on_every_part_and_not_on_dn_spelling() -> None:
    cache = BindCache()
    key = cache.key("uid=alice,ou=people,dc=x", b"pw,123456", "127.0.0.1")
    assert key == cache.key("UID=alice, ou=People,dc=x", b"pw,123456", "127.0.0.1")
    assert key != cache.key("uid=alice,ou=people,dc=x", b"pw,123457", "127.0.0.1")
    assert key != cache.key("uid=alice,ou=people,dc=x", b"pw,123456", "127.0.0.2")
    assert key != cache.key("uid=bob,ou=people,dc=x", b"pw,123456", "127.0.0.1")
    assert b"pw" not in key and len(key) == 32
    assert key != BindCache().key("uid=alice,ou=people,dc=x", b"pw,123456", "127.0.0.1")


def test_cache_forget_user_drops_every_entry_of_that_user() -> None:
    cache = BindCache()
    one = cache.key("uid=alice,dc=x", b"pw,111111", "127.0.0.1")
    two = cache.key("uid=alice,dc=x", b"pw,222222", "127.0.0.2")
    other = cache.key("uid=bob,dc=x", b"pw,111111", "127.0.0.1")
    cache.put(one, "alice", 2, "", 60, aliases=("Alice",))
    cache.put(two, "alice", 2, "", 60)
    cache.put(other, "bob", 2, "", 60)
    cache.forget_user("ALICE")
    assert cache.get(one) is None and cache.get(two) is None
    assert cache.get(other) is not None


def test_cache_never_stores_with_zero_window_and_stays_bounded() -> None:
    cache = BindCache(max_entries=10)
    cache.put(cache.key("uid=a", b"x", ""), "a", 1, "", 0)
    assert len(cache) == 0
    for i in range(25):
        cache.put(cache.key(f"uid=u{i}", b"x", ""), f"u{i}", 1, "", 60)
    assert len(cache) <= 10
    assert cache.get(cache.key("uid=u24", b"x", "")) is not None


# ---------------------------------------------------------------- config


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:3389") == ("127.0.0.1", 3389)
    assert parse_listen("[::1]:636") == ("::1", 636)
    for bad in ("3389", "::1:389", "[::1:389", "host:x", "h:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_parse_upstream() -> None:
    assert parse_upstream("ldap://127.0.0.1").port == 389
    ldaps = parse_upstream("ldaps://[::1]:1636")
    assert (ldaps.host, ldaps.port, ldaps.tls) == ("::1", 1636, True)
    with pytest.raises(ValueError):
        parse_upstream("http://x")


def test_config_problems_name_the_key() -> None:
    assert LdapFrontendConfig().problems() == []
    config = LdapFrontendConfig(
        listen=("nope",),
        ldaps_listen=("127.0.0.1:636",),
        upstream="ldaps://x",
        upstream_start_tls=True,
        max_connections=0,
        bind_cache_rules=(BindCacheRule("ou=x", -1),),
    )
    problems = config.problems()
    for key in (
        "ldap.listen",
        "ldap.ldaps_listen",
        "ldap.upstream_start_tls",
        "ldap.max_connections",
        "ldap.bind_cache_rules",
    ):
        assert any(p.startswith(key + ":") for p in problems), key
