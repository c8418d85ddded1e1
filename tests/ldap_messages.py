"""LDAP messages as a client or a directory would send them, built with the
product's own wire package (backends/ldapwire): what the LDAP front-end tests
feed the session and the protocol."""

from __future__ import annotations

from backends.ldapwire import ber, messages

BASE = "dc=example,dc=org"
UNKNOWN_OID = b"1.3.6.1.4.1.99999.1"  # an extended operation nobody implements


def bind(message_id: int, name: str, password: str | bytes) -> bytes:
    raw = password.encode() if isinstance(password, str) else password
    return messages.encode_bind_request(message_id, name, raw)


def search(message_id: int, size: int = 0) -> bytes:
    """A subtree search under BASE for (objectClass=*); ``size``: padded with
    attribute names to about that many bytes."""
    attributes = b"".join(ber.tlv(0x04, b"a" * 50) for _ in range(size // 52))
    body = (
        ber.tlv(0x04, BASE.encode())
        + ber.integer(2, ber.ENUMERATED)
        + ber.integer(0, ber.ENUMERATED)
        + ber.integer(0)
        + ber.integer(0)
        + b"\x01\x01\x00"
        + ber.tlv(0x87, b"objectClass")
        + ber.tlv(0x30, attributes)
    )
    return messages.ldap_message(message_id, ber.tlv(messages.SEARCH_REQUEST, body))


def whoami(message_id: int) -> bytes:
    return messages.encode_extended_request(message_id, messages.WHO_AM_I_OID)


def abandon(message_id: int, target: int) -> bytes:
    return messages.ldap_message(message_id, ber.integer(target, messages.ABANDON_REQUEST))


def entry(message_id: int, number: int = 0) -> bytes:
    """A SearchResultEntry: uid=userN under BASE, with cn=userN."""
    attributes = ber.tlv(
        0x30,
        ber.tlv(0x30, ber.tlv(0x04, b"cn") + ber.tlv(0x31, ber.tlv(0x04, b"user%d" % number))),
    )
    body = ber.tlv(0x04, b"uid=user%d,%s" % (number, BASE.encode())) + attributes
    return messages.ldap_message(message_id, ber.tlv(messages.SEARCH_RESULT_ENTRY, body))


def done(message_id: int, code: int = 0) -> bytes:
    """A SearchResultDone."""
    return messages.encode_result(message_id, messages.SEARCH_RESULT_DONE, code)


def bind_response(message_id: int, code: int = 0) -> bytes:
    return messages.encode_bind_response(message_id, code)
