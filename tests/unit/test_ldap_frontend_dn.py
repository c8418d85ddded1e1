"""DN parsing, DN suffix rules and the config checks of the LDAP front-end."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.ldap.config import (
    BindCacheRule,
    LdapFrontendConfig,
    parse_listen,
    parse_upstream,
)
from proxy.ldap.dn import DnSuffixMap, _ascii_lower, _parse_any, normalize_dn, parse_dn


@pytest.mark.parametrize(
    ("name", "uid"),
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
    ],
)
def test_parse_dn_reads_the_first_rdn(name: str, uid: str) -> None:
    assert dict(parse_dn(name)[0])["uid"] == uid


@pytest.mark.parametrize("name", ["alice@example.org", "EXAMPLE\\alice", "alice", "uid=alice\\",
                                  "uid;x=alice,ou=people"])
def test_names_that_are_not_dns_do_not_parse(name: str) -> None:
    with pytest.raises(ValueError):
        parse_dn(name)
    assert normalize_dn(name) is None


def test_only_ascii_case_folds() -> None:
    """The directory folds more than this; never the other way round."""
    assert normalize_dn("UID=ALICE,DC=X") == normalize_dn("uid=alice,dc=x")
    assert normalize_dn("uid=ZOË,dc=x") != normalize_dn("uid=zoë,dc=x")
    assert normalize_dn("uid=ａｌｉｃｅ,dc=x") != normalize_dn("uid=alice,dc=x")
    exempt = DnSuffixMap([("cn=svc,dc=x", True)])
    assert exempt.lookup("CN=SVC,DC=X") and not exempt.lookup("cn=ｓｖｃ,dc=x")


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


def _parsed_or_refused(parse: Any, name: str) -> Any:
    try:
        return parse(name)
    except ValueError:
        return ValueError


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="uidcnoOUDC=, \t#<>ab09.\\\"+;é", max_size=40)
       | st.from_regex(r"\A[ \t]*(uid|UID|cn|ou|dc|0\.9\.2342\.19200300\.100\.1\.1)[ \t]*="
                       r"[a-zA-Z0-9 \t=<>#.]*(,[ \t]*(ou|dc)[ \t]*=[a-z0-9 \t]*)*,?[ \t]*\Z"))
@example("uid=\talice\t,ou=people")
@example("uid=alice, ,dc=org")
@example(" UID = Alice ,OU=People ")
def test_the_plain_dn_fast_path_reads_what_the_full_parser_reads(name: str) -> None:
    assert _parsed_or_refused(parse_dn, name) == _parsed_or_refused(_parse_any, name)
    # normalize_dn's own fast path (no sort, str.lower) compares like the general one
    assert normalize_dn(name) == _normalized_by_the_full_parser(name)


def _normalized_by_the_full_parser(name: str) -> Any:
    try:
        rdns = _parse_any(name)
    except ValueError:
        return None
    return tuple(tuple(sorted((t, _ascii_lower(v)) for t, v in rdn)) for rdn in rdns)
