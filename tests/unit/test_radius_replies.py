"""Reply attributes by directory group."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pyrad.dictionary import Dictionary

from proxy.radius.clients import ReplyRule
from proxy.radius.packet import SHIPPED_DICTIONARY, encode_attribute, parse_datagram
from proxy.radius.replies import ReplyAttributes, group_names

DICTIONARY = Dictionary(str(SHIPPED_DICTIONARY))


def attributes_of(encoded: bytes) -> list[tuple[int, bytes]]:
    data = bytes(2) + (20 + len(encoded)).to_bytes(2, "big") + bytes(16) + encoded
    packet = parse_datagram(data)
    assert not isinstance(packet, str)
    return list(packet.attributes)


RULES = [
    ReplyRule("admins", {"Class": "admins", "Session-Timeout": 3600}),
    ReplyRule("VPN Users", [("Filter-Id", "vpn"), ("Fortinet-Group-Name", "fgt-vpn")]),
    ReplyRule("admins", {"Reply-Message": "Hello admin"}),
]


def test_every_matching_rule_applies_in_order() -> None:
    replies = ReplyAttributes(RULES, DICTIONARY)
    got = attributes_of(replies.for_groups(["admins", "vpn users"]))
    assert [t for t, _ in got] == [25, 27, 11, 26, 18]
    assert got[0] == (25, b"admins") and got[1] == (27, (3600).to_bytes(4, "big"))


def test_groups_match_case_insensitively_and_by_dn() -> None:
    replies = ReplyAttributes(RULES, DICTIONARY)
    got = attributes_of(replies.for_groups(["cn=VPN Users,ou=groups,dc=example,dc=org"]))
    assert [t for t, _ in got] == [11, 26]
    assert replies.for_groups(["ADMINS"]).startswith(encode_attribute(25, b"admins"))


def test_no_group_no_attributes() -> None:
    replies = ReplyAttributes(RULES, DICTIONARY)
    assert replies.for_groups([]) == b""
    assert replies.for_groups(["others"]) == b""
    assert ReplyAttributes([], DICTIONARY).for_groups(["admins"]) == b""


def test_a_bad_rule_fails_at_start_naming_group_and_attribute() -> None:
    with pytest.raises(ValueError, match=r"radius.reply \(group 'ops'\): Session-Timeout"):
        ReplyAttributes([ReplyRule("ops", {"Session-Timeout": "forever"})], DICTIONARY)
    with pytest.raises(ValueError, match="Nope: not in the RADIUS dictionary"):
        ReplyAttributes([ReplyRule("ops", {"Nope": "x"})], DICTIONARY)


def test_group_names() -> None:
    assert group_names(["cn=Admins,ou=g,dc=x", "Plain"]) == {
        "cn=admins,ou=g,dc=x", "admins", "plain"}
    assert group_names(["=odd", "a=b=c"]) == {"=odd", "a=b=c", "b=c"}


def test_any_object_with_group_and_attributes_is_a_rule() -> None:
    """proxy.config's own ReplyRule (a dict of attributes) works as it is."""

    @dataclass(frozen=True)
    class ConfigRule:
        group: str
        attributes: dict[str, object]

    replies = ReplyAttributes([ConfigRule("ops", {"Filter-Id": "ops-acl"})], DICTIONARY)
    assert replies.for_groups(["ops"]) == encode_attribute(11, b"ops-acl")
