"""RADIUS wire format: RFC known answers, radclient's bytes, pyrad as a second opinion."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from pyrad.dictionary import Dictionary
from pyrad.packet import AuthPacket
from pyrad.packet import Packet as PyradPacket

from proxy.radius.events import DropReason
from proxy.radius.packet import (
    SHIPPED_DICTIONARY,
    Attr,
    Code,
    Packet,
    access_accept,
    access_challenge,
    access_reject,
    accounting_response,
    decode_user_password,
    encode_attribute,
    encode_named,
    encode_reply,
    encode_text,
    encode_vendor_attribute,
    hide_user_password,
    hmac_md5,
    load_dictionary,
    message_authenticator_problem,
    parse_datagram,
    status_server_reply,
    verify_accounting_request,
    verify_message_authenticator,
)
from proxy.radius.testing import access_request, accounting_request, verify_reply

DICTIONARY_PATH = SHIPPED_DICTIONARY

# RFC 2865 §7.1 "User Telnet to Specified Host": the Access-Request from NAS
# 192.168.1.16 port 3 for user nemo, password "arctangent", secret "xyzzy5461".
RFC_SECRET = b"xyzzy5461"
RFC_REQUEST_AUTHENTICATOR = bytes.fromhex("0f403f9473978057bd83d5cb98f4227a")
RFC_HIDDEN_PASSWORD = bytes.fromhex("0dbe708d93d413ce3196e43f782a0aee")
RFC_REQUEST = bytes.fromhex(
    "01000038" "0f403f9473978057bd83d5cb98f4227a"
    "01066e656d6f" "02120dbe708d93d413ce3196e43f782a0aee" "0406c0a80110" "050600000003")
# ... and the Access-Accept: Service-Type Login, Login-Service Telnet, Login-IP-Host 192.168.1.3
RFC_ACCEPT_ATTRIBUTES = bytes.fromhex("060600000001" "0f0600000000" "0e06c0a80103")
RFC_ACCEPT = bytes.fromhex("02000026" "86fe220e7624ba2a1005f6bf9b55e0b2") + RFC_ACCEPT_ATTRIBUTES


@pytest.fixture(scope="module")
def dictionary() -> Dictionary:
    return load_dictionary(str(DICTIONARY_PATH))


def parsed(data: bytes) -> Packet:
    packet = parse_datagram(data)
    assert isinstance(packet, Packet), packet
    return packet


# --- RFC 2865 §7.1 ---------------------------------------------------------


def test_rfc2865_request_parses() -> None:
    packet = parsed(RFC_REQUEST)
    assert (packet.code, packet.identifier) == (Code.ACCESS_REQUEST, 0)
    assert packet.authenticator == RFC_REQUEST_AUTHENTICATOR
    assert packet.first(Attr.USER_NAME) == b"nemo"
    assert packet.first(Attr.USER_PASSWORD) == RFC_HIDDEN_PASSWORD
    assert packet.message_authenticators == ()


def test_rfc2865_user_password_hiding_known_answer() -> None:
    hidden = hide_user_password(b"arctangent", RFC_SECRET, RFC_REQUEST_AUTHENTICATOR)
    assert hidden == RFC_HIDDEN_PASSWORD
    assert decode_user_password(hidden, RFC_SECRET, RFC_REQUEST_AUTHENTICATOR) == b"arctangent"


def test_rfc2865_response_authenticator_known_answer() -> None:
    reply = encode_reply(Code.ACCESS_ACCEPT, parsed(RFC_REQUEST), RFC_SECRET,
                         RFC_ACCEPT_ATTRIBUTES, message_authenticator=False)
    assert reply == RFC_ACCEPT


@pytest.mark.parametrize("password", [b"", b"x", b"exactly16octets!", b"a" * 17,
                                      "pässwörd,123456".encode(), b"z" * 128])
def test_user_password_multi_block_agrees_with_pyrad(password: bytes) -> None:
    secret, auth = b"s3cret-shared", os.urandom(16)
    hidden = hide_user_password(password, secret, auth)
    assert len(hidden) == max(16, -(-len(password) // 16) * 16)
    assert hidden == AuthPacket(secret=secret, authenticator=auth).PwCrypt(password)
    assert decode_user_password(hidden, secret, auth) == password


@pytest.mark.parametrize("hidden", [b"", b"x" * 15, b"x" * 17, b"x" * 144])
def test_user_password_with_impossible_length_is_none(hidden: bytes) -> None:
    assert decode_user_password(hidden, b"secret", bytes(16)) is None


def test_user_password_too_long_to_hide() -> None:
    with pytest.raises(ValueError):
        hide_user_password(b"x" * 129, b"secret", bytes(16))


# --- Message-Authenticator against radclient --------------------------------


# An Access-Request recorded from FreeRADIUS 3.2.1's radclient (secret
# "xyzzy5461"; User-Name alice, User-Password "arctangent,123456",
# NAS-Identifier vpn-1, Proxy-State 0x0102, Message-Authenticator = 0x00).
# tests/integration/test_radius_protocol.py checks a live radclient too.
RADCLIENT_REQUEST = bytes.fromhex(
    "012d005af57666b0ed286ee1bb49b24bb7e82c910107616c69636502222631bdbe0972b0bcc314719ce0"
    "729565ebc23007ef9f2cc9efbccb15a33fe5fe200776706e2d31210401025012bfeba90a2bdb7116175b"
    "63de36ed51b0")


@pytest.fixture
def radclient_request() -> bytes:
    return RADCLIENT_REQUEST


def test_radclient_message_authenticator_verifies(radclient_request: bytes) -> None:
    packet = parsed(radclient_request)
    assert len(packet.message_authenticators) == 1
    assert verify_message_authenticator(packet, RFC_SECRET)
    assert message_authenticator_problem(packet, RFC_SECRET, required=True) is None
    password = decode_user_password(packet.first(Attr.USER_PASSWORD) or b"", RFC_SECRET,
                                    packet.authenticator)
    assert password == b"arctangent,123456"


def test_our_message_authenticator_matches_radclients(radclient_request: bytes) -> None:
    packet = parsed(radclient_request)
    offset = packet.message_authenticators[0]
    zeroed = radclient_request[:offset] + bytes(16) + radclient_request[offset + 16:]
    assert hmac_md5(RFC_SECRET, zeroed) == radclient_request[offset:offset + 16]


def test_wrong_secret_is_a_bad_message_authenticator(radclient_request: bytes) -> None:
    packet = parsed(radclient_request)
    assert not verify_message_authenticator(packet, b"not-the-secret")
    assert (message_authenticator_problem(packet, b"not-the-secret", required=False)
            is DropReason.BAD_MESSAGE_AUTHENTICATOR)


def test_any_flipped_bit_breaks_the_message_authenticator(radclient_request: bytes) -> None:
    for position in (1, 5, 25, len(radclient_request) - 1):
        tampered = bytearray(radclient_request)
        tampered[position] ^= 0x01
        packet = parse_datagram(bytes(tampered))
        assert isinstance(packet, Packet)
        assert not verify_message_authenticator(packet, RFC_SECRET)


@pytest.mark.parametrize("secret", [b"k", b"x" * 64, b"y" * 65, os.urandom(200)])
def test_hmac_md5_is_rfc2104(secret: bytes) -> None:
    data = os.urandom(100)
    assert hmac_md5(secret, data) == hmac.new(secret, data, hashlib.md5).digest()


def test_missing_message_authenticator() -> None:
    packet = parsed(access_request(b"s", "alice", "pw", message_authenticator=False))
    assert (message_authenticator_problem(packet, b"s", required=True)
            is DropReason.MISSING_MESSAGE_AUTHENTICATOR)
    assert message_authenticator_problem(packet, b"s", required=False) is None


def test_two_message_authenticators_never_verify() -> None:
    good = access_request(b"s", "alice", "pw")
    extra = encode_attribute(Attr.MESSAGE_AUTHENTICATOR, good[-16:])
    doubled = bytearray(good + extra)
    doubled[2:4] = len(doubled).to_bytes(2, "big")
    assert not verify_message_authenticator(parsed(bytes(doubled)), b"s")


def test_short_message_authenticator_never_verifies() -> None:
    data = bytearray(access_request(b"s", "alice", "pw", message_authenticator=False))
    data += encode_attribute(Attr.MESSAGE_AUTHENTICATOR, b"short")
    data[2:4] = len(data).to_bytes(2, "big")
    assert not verify_message_authenticator(parsed(bytes(data)), b"s")


# --- replies ---------------------------------------------------------------


def pyrad_verifies(reply: bytes, request: bytes, secret: bytes, dictionary: Dictionary) -> bool:
    """pyrad's client-side check, with the Message-Authenticator required."""
    sent = AuthPacket(packet=request, secret=secret, dict=dictionary)
    received = PyradPacket(packet=reply, secret=secret, dict=dictionary)
    return bool(sent.VerifyReply(received, reply, enforce_ma=True))


@pytest.mark.parametrize("build", [
    lambda p, s: access_accept(p, s, "Welcome", encode_attribute(25, b"admins")),
    lambda p, s: access_reject(p, s, "Wrong password or code"),
    lambda p, s: access_challenge(p, s, b"state-123", "Enter your verification code"),
    lambda p, s: status_server_reply(p, s),
])
def test_reply_starts_with_message_authenticator_and_verifies(build, dictionary) -> None:
    secret = b"a-long-shared-secret"
    request = access_request(secret, "alice", "pw", identifier=42)
    reply = build(parsed(request), secret)
    assert reply[1] == 42
    assert reply[20] == Attr.MESSAGE_AUTHENTICATOR and reply[21] == 18
    assert verify_reply(reply, request, secret)
    assert pyrad_verifies(reply, request, secret, dictionary)
    assert not verify_reply(reply, request, b"another-secret")


def test_reply_to_radclient_verifies_with_pyrad(radclient_request: bytes, dictionary) -> None:
    reply = access_accept(parsed(radclient_request), RFC_SECRET)
    assert pyrad_verifies(reply, radclient_request, RFC_SECRET, dictionary)


def test_proxy_states_are_copied_back_in_order() -> None:
    request = access_request(b"s", "alice", "pw", extra=[(Attr.PROXY_STATE, b"first"),
                                                         (Attr.PROXY_STATE, b"second")])
    reply = parsed(access_reject(parsed(request), b"s", "no"))
    assert reply.all(Attr.PROXY_STATE) == [b"first", b"second"]
    assert reply.attributes[0][0] == Attr.MESSAGE_AUTHENTICATOR
    assert verify_reply(reply.raw, request, b"s")


def test_challenge_carries_state_and_message() -> None:
    reply = parsed(access_challenge(parsed(access_request(b"s", "a", "pw")), b"s",
                                    b"0123abcd", "Enter your verification code"))
    assert reply.code == Code.ACCESS_CHALLENGE
    assert reply.first(Attr.STATE) == b"0123abcd"
    assert reply.first(Attr.REPLY_MESSAGE) == b"Enter your verification code"


def test_long_text_is_split_without_cutting_a_character() -> None:
    text = "é" * 300  # 600 octets of two-octet characters
    data = bytes(20) + encode_text(Attr.REPLY_MESSAGE, text)
    packet = parsed(with_length(data, len(data)))
    parts = packet.all(Attr.REPLY_MESSAGE)
    assert len(parts) == 3 and all(len(p) <= 253 for p in parts)
    assert "".join(p.decode("utf-8") for p in parts) == text
    assert encode_text(Attr.REPLY_MESSAGE, "") == b""


def test_reply_over_4096_octets_is_refused() -> None:
    request = parsed(access_request(b"s", "alice", "pw"))
    with pytest.raises(ValueError):
        access_reject(request, b"s", "x" * 5000)


def test_accounting_request_authenticator() -> None:
    request = accounting_request(b"acct-secret", [(Attr.USER_NAME, b"alice"),
                                                  (Attr.ACCT_STATUS_TYPE, (1).to_bytes(4, "big"))])
    packet = parsed(request)
    assert verify_accounting_request(packet, b"acct-secret")
    assert not verify_accounting_request(packet, b"wrong")
    reply = accounting_response(packet, b"acct-secret")
    assert reply[0] == Code.ACCOUNTING_RESPONSE and len(reply) == 20
    assert verify_reply(reply, request, b"acct-secret")


def test_status_server_on_the_accounting_port_gets_an_accounting_response() -> None:
    request = access_request(b"s", "x", None)
    reply = status_server_reply(parsed(request), b"s", accounting=True)
    assert reply[0] == Code.ACCOUNTING_RESPONSE and reply[20] == Attr.MESSAGE_AUTHENTICATOR


# --- malformed datagrams ----------------------------------------------------


def with_length(data: bytes, length: int) -> bytes:
    return data[:2] + length.to_bytes(2, "big") + data[4:]


VALID = bytes.fromhex("01070018") + bytes(16) + encode_attribute(1, b"ab")


@pytest.mark.parametrize(("data", "reason"), [
    (b"", DropReason.TOO_SHORT),
    (VALID[:19], DropReason.TOO_SHORT),
    (with_length(VALID, 19), DropReason.BAD_LENGTH),
    (with_length(VALID, 30), DropReason.BAD_LENGTH),  # Length beyond the datagram
    (with_length(VALID + bytes(5000), 4097), DropReason.TOO_LONG),
    (with_length(VALID[:20] + b"\x01\x00" + b"ab", 24), DropReason.BAD_ATTRIBUTE_LENGTH),  # zero
    (with_length(VALID[:20] + b"\x01\x01" + b"ab", 24), DropReason.BAD_ATTRIBUTE_LENGTH),  # one
    (with_length(VALID[:20] + b"\x01\x09" + b"ab", 24), DropReason.BAD_ATTRIBUTE_LENGTH),  # overrun
    (with_length(VALID + b"\x01", 25), DropReason.BAD_ATTRIBUTE_LENGTH),  # half a header
])
def test_malformed_datagrams_give_their_drop_reason(data: bytes, reason: DropReason) -> None:
    assert parse_datagram(data) is reason


def test_padding_after_length_is_ignored() -> None:
    packet = parsed(VALID + b"\x00garbage")
    assert packet.raw == VALID and packet.first(Attr.USER_NAME) == b"ab"


def test_a_header_alone_is_a_packet() -> None:
    assert parsed(VALID[:4].replace(b"\x00\x18", b"\x00\x14") + bytes(16)).attributes == ()


# --- what kind of authentication --------------------------------------------


@pytest.mark.parametrize(("attributes", "unsupported"), [
    ([(Attr.USER_PASSWORD, bytes(16))], False),
    ([(Attr.CHAP_PASSWORD, bytes(17))], True),
    ([(Attr.EAP_MESSAGE, b"\x02\x01\x00\x05\x01")], True),
    ([(26, (311).to_bytes(4, "big") + b"\x19\x34" + bytes(50))], True),  # MS-CHAP2-Response
    ([(26, (311).to_bytes(4, "big") + b"\x0b\x0a" + bytes(8))], True),  # MS-CHAP-Challenge
    ([(26, (12356).to_bytes(4, "big") + b"\x01\x05abc")], False),  # a Fortinet VSA
    ([(26, (311).to_bytes(4, "big") + b"\x19\xff")], False),  # broken VSA: opaque
])
def test_unsupported_auth_is_recognised(attributes, unsupported: bool) -> None:
    data = bytes(20) + b"".join(encode_attribute(t, v) for t, v in attributes)
    assert parsed(with_length(data, len(data))).uses_unsupported_auth() is unsupported


def test_vendor_attributes_are_split() -> None:
    vsa = encode_vendor_attribute(9, 1, b"shell:priv-lvl=15")
    data = bytes(20) + vsa
    assert list(parsed(with_length(data, len(data))).vendor_attributes()) == [
        (9, 1, b"shell:priv-lvl=15")]


# --- the dictionary and by-name encoding -------------------------------------


def test_shipped_dictionary_has_what_the_proxy_needs(dictionary: Dictionary) -> None:
    for name in ("User-Name", "User-Password", "CHAP-Password", "Reply-Message", "State",
                 "Class", "Filter-Id", "Session-Timeout", "Proxy-State", "EAP-Message",
                 "Message-Authenticator", "Acct-Status-Type", "NAS-IPv6-Address",
                 "Framed-IPv6-Prefix", "Event-Timestamp", "Tunnel-Private-Group-Id",
                 "MS-CHAP2-Response", "MS-CHAP-Challenge", "Fortinet-Group-Name",
                 "Cisco-AVPair", "PaloAlto-User-Group", "ASA-Group-Policy"):
        assert name in dictionary, name
    assert dictionary["Fortinet-Group-Name"].code == 1
    assert dictionary.vendors.GetForward("Fortinet") == 12356
    assert dictionary.vendors.GetForward("PaloAlto") == 25461
    assert dictionary.vendors.GetForward("Microsoft") == 311
    assert dictionary["PaloAlto-User-Group"].code == 5
    assert not dictionary.skipped_attributes


def test_encode_named_by_type_value_name_tag_and_vendor(dictionary: Dictionary) -> None:
    encoded = encode_named(dictionary, [
        ("Class", "admins"), ("Session-Timeout", 3600), ("Service-Type", "Administrative-User"),
        ("Tunnel-Private-Group-Id:1", "100"), ("Fortinet-Group-Name", "vpn-admins"),
        ("Cisco-AVPair", ["shell:priv-lvl=15", "shell:roles=network-admin"]),
        ("Filter-Id", "full-access"), ("PaloAlto-User-Group", "gp-users"),
    ])
    packet = parsed(with_length(bytes(20) + encoded, 20 + len(encoded)))
    assert packet.first(25) == b"admins"
    assert packet.first(27) == (3600).to_bytes(4, "big")
    assert packet.first(6) == (6).to_bytes(4, "big")
    assert packet.first(81) == b"\x01100"
    assert list(packet.vendor_attributes()) == [
        (12356, 1, b"vpn-admins"), (9, 1, b"shell:priv-lvl=15"),
        (9, 1, b"shell:roles=network-admin"), (25461, 5, b"gp-users")]
    assert packet.first(11) == b"full-access"


@pytest.mark.parametrize(("pairs", "message"), [
    ([("No-Such-Attribute", "x")], "No-Such-Attribute: not in the RADIUS dictionary"),
    ([("Session-Timeout", "an hour")], "Session-Timeout = 'an hour'"),
    ([("State", b"x")], "State: written by the proxy itself"),
    ([("Message-Authenticator", b"x")], "written by the proxy"),
    ([("MS-MPPE-Send-Key", b"x")], "encrypted"),
    ([("Class", "x" * 300)], "Class"),
])
def test_encode_named_errors_name_the_attribute(dictionary, pairs, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        encode_named(dictionary, pairs)


def test_what_we_parse_pyrad_reads_by_name(radclient_request: bytes,
                                           dictionary: Dictionary) -> None:
    from pyrad.packet import AuthPacket

    view = AuthPacket(packet=parsed(radclient_request).raw, dict=dictionary, secret=RFC_SECRET)
    assert view["User-Name"] == ["alice"]
    assert view["NAS-Identifier"] == ["vpn-1"]
