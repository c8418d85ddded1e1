"""RFC 4515 escaping, filter templates, DN values and URL preference (no sockets)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.ldap import (
    Endpoints,
    LdapOptions,
    escape_filter_value,
    group_search_filter,
    rdn_value,
    user_search_filter,
)
from tests.clock import ManualClock


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        # RFC 4515 §4 examples and each reserved character.
        ("Parens R Us (for all your parenthetical needs)",
         r"Parens R Us \28for all your parenthetical needs\29"),
        ("*", r"\2a"),
        ("C:\\MyFile", r"C:\5cMyFile"),
        ("a\0b", r"a\00b"),
        ("alice)(uid=*", r"alice\29\28uid=\2a"),
        ("zoë", "zoë"),  # non-ASCII is sent as UTF-8, not escaped
        ("", ""),
        (r"\2a", r"\5c2a"),  # an escape sequence typed by a user is literal text
        (" bob\t", r"\20bob\09"),  # ldap3 would strip it unescaped
        ("   ", r"\20\20\20"),
    ],
)
def test_escape_filter_value(raw: str, escaped: str) -> None:
    assert escape_filter_value(raw) == escaped


def _unescape(value: str) -> str:
    raw = re.sub(rb"\\([0-9a-f]{2})", lambda m: bytes((int(m.group(1), 16),)), value.encode())
    return raw.decode()


@given(st.text())
def test_escaped_values_hold_no_filter_syntax_and_round_trip(value: str) -> None:
    escaped = escape_filter_value(value)
    assert not set("()*\0") & set(escaped)
    assert re.fullmatch(r"(?:[^\\]|\\[0-9a-f]{2})*", escaped, re.DOTALL)
    assert _unescape(escaped) == value


def test_user_filter_template_substitutes_every_placeholder() -> None:
    template = "(|(sAMAccountName={username})(userPrincipalName={username}))"
    assert user_search_filter(template, "a*") == r"(|(sAMAccountName=a\2a)(userPrincipalName=a\2a))"


def test_user_filter_template_keeps_other_braces() -> None:
    # str.format would fail on these; the template is replaced literally.
    assert user_search_filter("(&(uid={username})(x={y}))", "bob") == "(&(uid=bob)(x={y}))"


def test_group_filter_escapes_the_dn() -> None:
    dn = r"cn=Smith\, John (ext),ou=people"
    expected = r"(member=cn=Smith\5c, John \28ext\29,ou=people)"
    assert group_search_filter("(member={dn})", dn) == expected


@pytest.mark.parametrize(
    ("dn", "attribute", "value"),
    [
        ("cn=vpn-users,ou=groups,dc=example,dc=org", "cn", "vpn-users"),
        ("CN=VPN Users,OU=Groups,DC=corp", "cn", "VPN Users"),
        (r"cn=Smith\, John,ou=people", "cn", "Smith, John"),
        (r"uid=zo\C3\AB,ou=people", "uid", "zoë"),
        ("uid=alice,ou=people", "cn", None),
        ("", "cn", None),
    ],
)
def test_rdn_value(dn: str, attribute: str, value: str | None) -> None:
    assert rdn_value(dn, attribute) == value


def test_options_problems_name_the_key() -> None:
    bad = LdapOptions(urls=["http://x"], user_filter="uid=x", user_base="", timeout=0,
                      group_filter="(member=x)", pool_size=0)
    keys = {line.split(":")[0] for line in bad.problems()}
    assert keys == {"urls", "user_filter", "user_base", "timeout", "group_filter", "pool_size"}
    good = LdapOptions(urls=["ldap://a", "ldaps://b:636"], user_base="ou=people,dc=x")
    assert good.problems() == []


def test_unbalanced_user_filter() -> None:
    problems = LdapOptions(user_base="dc=x", user_filter="(uid={username}))").problems()
    assert len(problems) == 1 and problems[0].startswith("user_filter: not an LDAP filter")


def test_placeholder_outside_a_value() -> None:
    problems = LdapOptions(user_base="dc=x", user_filter="({username}=x)").problems()
    assert len(problems) == 1 and problems[0].startswith("user_filter:")


def test_endpoints_down_urls_go_last_until_they_expire() -> None:
    clock = ManualClock(100.0)
    endpoints = Endpoints(["ldap://a", "ldap://b", "ldap://c"], down_seconds=5, clock=clock)
    a, b, c = endpoints.all
    endpoints.mark_down(a, "refused")
    assert endpoints.in_order() == [b, c, a]
    assert endpoints.preferred() is b
    clock.t += 1
    endpoints.mark_down(b, "timeout")
    assert endpoints.in_order() == [c, a, b]  # the one back soonest is tried first
    clock.t += 4.5
    assert endpoints.in_order() == [a, c, b]
    endpoints.mark_up(b)
    assert endpoints.in_order() == [a, b, c]
