"""The Twisted-native LDAP client's BER codec, compiled filters and protocol (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ldap3.operation.search import compile_filter as ldap3_compile_filter
from ldap3.operation.search import parse_filter as ldap3_parse_filter
from pyasn1.codec.ber import encoder as pyasn1_encoder
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from backends.ldap import Endpoint, user_search_filter
from backends.ldap_async import (
    BIND_RESPONSE,
    ENUMERATED,
    OCTET_STRING,
    SCOPE_SUBTREE,
    SEARCH_RESULT_DONE,
    SEARCH_RESULT_ENTRY,
    SEQUENCE,
    SET,
    BerError,
    ConnectionLost,
    FilterTemplateError,
    LdapClientProtocol,
    OperationTimeout,
    Reply,
    SearchTemplate,
    compile_filter,
    decode_entry,
    decode_envelope,
    encode_bind,
    frame_size,
    integer,
    ldap_message,
    tlv,
)


def ldap3_encoding(string_filter: str) -> bytes:
    """What ldap3 (pyasn1) sends for a string filter: the reference encoding."""
    node = ldap3_parse_filter(string_filter, None, True, True, None, False)
    return bytes(pyasn1_encoder.encode(ldap3_compile_filter(node.elements[0])))


TEMPLATES = [
    "(uid={username})",
    "(&(objectClass=inetOrgPerson)(|(uid={username})(mail={username})))",
    "(sAMAccountName={username})",
    "(userPrincipalName={username})",
    "(uid={username}*)",
    "(cn=*{username}*x)",
    "(!(cn=a\\2ab))",
    "(cn:caseExactMatch:={username})",
    "(objectClass=*)",
    "(cn>={username})",
    "(cn<=a)",
    "(cn~={username})",
    "(cn=a*b*c)",
    "(&(uid={username})(!(pwdAccountLockedTime=*)))",
]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("username", ["alice", "a*b(c)\\d", "zoë", "", "user@realm"])
def test_compiled_filter_matches_ldap3(template: str, username: str) -> None:
    if not username and ("{username}*" in template or "*{username}" in template):
        pytest.skip("an empty username never reaches a search")
    ours = compile_filter(template).encode(username=username)
    assert ours == ldap3_encoding(user_search_filter(template, username))


@settings(max_examples=300)
@given(st.text(min_size=1, max_size=40))
def test_any_username_encodes_like_an_escaped_string_filter(username: str) -> None:
    template = "(&(objectClass=person)(uid={username}))"
    ours = compile_filter(template).encode(username=username)
    assert ours == ldap3_encoding(user_search_filter(template, username))


def test_static_filters_are_encoded_once() -> None:
    assert compile_filter("(&(objectClass=person)(cn=x))").root.static is not None
    compiled = compile_filter("(&(objectClass=person)(uid={username}))")
    assert compiled.root.static is None and compiled.placeholders == {"username"}


def test_dn_attributes_flag() -> None:
    # ldap3 encodes BOOLEAN TRUE as 0x01; DER (and we) use 0xff. Both are valid BER.
    encoded = compile_filter("(uid:dn:2.5.13.5:={username})").encode(username="q")
    assert encoded == bytes.fromhex("a9158108322e352e31332e3582037569648301718401ff")


def test_unknown_braces_stay_literal() -> None:
    assert compile_filter("(cn={other})").encode(username="x") == ldap3_encoding("(cn={other})")


@pytest.mark.parametrize(
    "template",
    ["uid={username}", "(uid={username}", "(&)", "((uid=x))", "(u id=x)", "(uid=\\zz)",
     "(uid=x))", "(uid)", ""],
)
def test_bad_templates(template: str) -> None:
    with pytest.raises(FilterTemplateError):
        compile_filter(template)


# ---------------------------------------------------------------- BER


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, "020100"), (3, "020103"), (127, "02017f"), (128, "02020080"), (256, "02020100"),
     (-1, "0201ff"), (0x7FFFFFFF, "02047fffffff")],
)
def test_integer(value: int, encoded: str) -> None:
    assert integer(value).hex() == encoded


def test_long_lengths() -> None:
    assert tlv(OCTET_STRING, b"x" * 200)[:3] == bytes((0x04, 0x81, 200))
    assert tlv(OCTET_STRING, b"x" * 300)[:4] == bytes((0x04, 0x82, 0x01, 0x2C))


def test_bind_request_known_answer() -> None:
    # RFC 4511 BindRequest, version 3, simple: what ldapwhoami -x -D cn=a -w b sends.
    expected = "3011" "020101" "600c" "020103" "0404636e3d61" "800162"
    assert ldap_message(1, encode_bind("cn=a", "b")).hex() == expected


def test_frame_size() -> None:
    message = ldap_message(7, tlv(0x42, b""))
    assert frame_size(message, 0) == len(message)
    assert frame_size(message[:-1], 0) is None
    assert frame_size(b"", 0) is None
    assert frame_size(b"\x30\x84\x00", 0) is None
    with pytest.raises(BerError):
        frame_size(b"\x04\x00", 0)
    with pytest.raises(BerError):
        frame_size(b"\x30\x80", 0)  # indefinite length is not LDAP


def test_search_template() -> None:
    search = SearchTemplate.build("ou=people", SCOPE_SUBTREE, compile_filter("(uid={username})"),
                                  ["uid", "memberOf"], size_limit=2, time_limit=5)
    message = ldap_message(2, search.encode(username="bob"))
    message_id, tag, _start, _end = decode_envelope(message)
    assert (message_id, tag) == (2, 0x63)


def entry_message(message_id: int, dn: str, attributes: dict[str, list[str]]) -> bytes:
    encoded = b"".join(
        tlv(SEQUENCE, tlv(OCTET_STRING, name.encode())
            + tlv(SET, b"".join(tlv(OCTET_STRING, v.encode()) for v in values)))
        for name, values in attributes.items())
    body = tlv(OCTET_STRING, dn.encode()) + tlv(SEQUENCE, encoded)
    return ldap_message(message_id, tlv(SEARCH_RESULT_ENTRY, body))


def result_message(message_id: int, tag: int, code: int, diagnostic: str = "") -> bytes:
    body = integer(code, ENUMERATED) + tlv(OCTET_STRING, b"") + tlv(OCTET_STRING,
                                                                        diagnostic.encode())
    return ldap_message(message_id, tlv(tag, body))


def test_decode_entry() -> None:
    message = entry_message(3, "uid=zoë,ou=people", {"uid": ["zoë"], "memberOf": ["cn=a", "cn=b"]})
    _id, _tag, start, end = decode_envelope(message)
    entry = decode_entry(message, start, end)
    assert entry.dn == "uid=zoë,ou=people"
    assert entry.values("MEMBEROF") == ["cn=a", "cn=b"] and entry.first("uid") == "zoë"


# ---------------------------------------------------------------- the protocol


def connected_client() -> tuple[LdapClientProtocol, StringTransport, Clock]:
    clock = Clock()
    client = LdapClientProtocol(clock, Endpoint("ldap://test"))
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport, clock


def test_replies_are_matched_by_message_id_and_may_arrive_in_pieces() -> None:
    client, transport, _clock = connected_client()
    replies: list[Any] = []
    client.request(encode_bind("cn=a", "pw"), 5).addCallback(replies.append)
    client.request(b"\x63\x00", 5).addCallback(replies.append)
    assert transport.value().startswith(ldap_message(1, encode_bind("cn=a", "pw")))
    stream = (entry_message(2, "uid=a", {"uid": ["a"]}) + result_message(1, BIND_RESPONSE, 49)
              + result_message(2, SEARCH_RESULT_DONE, 0))
    for i in range(len(stream)):
        client.dataReceived(stream[i : i + 1])
    assert [r.code for r in replies] == [49, 0]
    assert replies[1].entries[0].dn == "uid=a"
    assert client.pending == {}


def test_timeout_fails_the_request_and_drops_the_connection() -> None:
    client, transport, clock = connected_client()
    failures: list[Any] = []
    client.request(b"\x63\x00", 2).addErrback(failures.append)
    clock.advance(2)
    assert failures[0].check(OperationTimeout)
    assert transport.disconnecting or getattr(transport, "disconnected", False)


def test_garbage_drops_the_connection_and_fails_pending_requests() -> None:
    client, transport, _clock = connected_client()
    failures: list[Any] = []
    client.request(b"\x63\x00", 5).addErrback(failures.append)
    client.dataReceived(b"\x04\x03abc")
    assert transport.disconnecting or getattr(transport, "disconnected", False)
    client.connectionLost(Failure(Exception("aborted")))
    assert failures[0].check(ConnectionLost)


def test_notice_of_disconnection() -> None:
    client, transport, _clock = connected_client()
    client.dataReceived(result_message(0, 0x78, 52, "shutting down"))
    assert transport.disconnecting or getattr(transport, "disconnected", False)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_never_raise(data: bytes) -> None:
    client, _transport, _clock = connected_client()
    replies: list[Reply] = []
    client.request(b"\x63\x00", 5).addBoth(replies.append)
    client.dataReceived(data)
    client.dataReceived(data)


def test_handshake_timeout_then_connection_lost() -> None:
    client, _transport, clock = connected_client()
    failures: list[Any] = []
    client.wait_for_handshake(1).addErrback(failures.append)
    clock.advance(1)
    client.connectionLost(Failure(Exception("gone")))  # must not fire the handshake twice
    assert len(failures) == 1
