"""LDAP messages (RFC 4511), for both sides: the directory client and the front-end.

What each side needs of a message is small, so nothing here builds a message
object. The envelope is read where it lies (:func:`read_envelope` for the
directory's replies, :func:`peek` for a client's requests, stricter, and
:func:`peek_id_and_tag` for responses relayed unread); only what someone
acts on is decoded further: a BindRequest, an LDAPResult, the name of an
ExtendedRequest, a search entry (whole, or down to what a sign-in needs with
:class:`UserEntryReader`). Requests are encoded as protocolOps
(:func:`bind_request`, :func:`extended_request`, :class:`SearchTemplate`,
whose filter is pre-encoded around its placeholder) that
:func:`ldap_message` puts in an envelope; the ``encode_*`` functions make
whole messages.

Every decoder raises :class:`BerError` (and nothing else) on any input it
cannot read, so a caller has one thing to catch: a malformed message.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from backends.ldapwire.ber import (
    ENUMERATED,
    INTEGER,
    OCTET_STRING,
    SEQUENCE,
    SET,
    BerError,
    boolean,
    expect,
    integer,
    read_header,
    read_integer,
    tlv,
)
from backends.ldapwire.filters import CompiledFilter, Slot

# protocolOp tags: [APPLICATION n], constructed unless noted.
BIND_REQUEST = 0x60
BIND_RESPONSE = 0x61
UNBIND_REQUEST = 0x42  # primitive NULL
SEARCH_REQUEST = 0x63
SEARCH_RESULT_ENTRY = 0x64
SEARCH_RESULT_DONE = 0x65
MODIFY_REQUEST = 0x66
MODIFY_RESPONSE = 0x67
ADD_REQUEST = 0x68
ADD_RESPONSE = 0x69
DEL_REQUEST = 0x4A  # primitive LDAPDN
DEL_RESPONSE = 0x6B
MODDN_REQUEST = 0x6C
MODDN_RESPONSE = 0x6D
COMPARE_REQUEST = 0x6E
COMPARE_RESPONSE = 0x6F
ABANDON_REQUEST = 0x50  # primitive MessageID
SEARCH_RESULT_REFERENCE = 0x73
EXTENDED_REQUEST = 0x77
EXTENDED_RESPONSE = 0x78
INTERMEDIATE_RESPONSE = 0x79

CONTROLS = 0xA0  # [0] Controls, after the protocolOp

# Context tags inside operations.
AUTH_SIMPLE = 0x80  # [0] OCTET STRING
AUTH_SASL = 0xA3  # [3] SaslCredentials
EXTENDED_REQUEST_NAME = 0x80  # [0] LDAPOID
EXTENDED_REQUEST_VALUE = 0x81  # [1] OCTET STRING
EXTENDED_RESPONSE_NAME = 0x8A  # [10] LDAPOID

START_TLS_OID = b"1.3.6.1.4.1.1466.20037"
NOTICE_OF_DISCONNECTION_OID = b"1.3.6.1.4.1.1466.20036"
WHO_AM_I_OID = b"1.3.6.1.4.1.4203.1.11.3"
PASSWORD_MODIFY_OID = b"1.3.6.1.4.1.4203.1.11.1"

MAX_MESSAGE_ID = 2**31 - 1

# SearchRequest fields.
SCOPE_BASE, SCOPE_SUBTREE = 0, 2
NEVER_DEREF_ALIASES = 0

# The response that ends each request (a search ends with SearchResultDone;
# entries, references and intermediate responses come before it).
FINAL_RESPONSE = {
    BIND_REQUEST: BIND_RESPONSE,
    SEARCH_REQUEST: SEARCH_RESULT_DONE,
    MODIFY_REQUEST: MODIFY_RESPONSE,
    ADD_REQUEST: ADD_RESPONSE,
    DEL_REQUEST: DEL_RESPONSE,
    MODDN_REQUEST: MODDN_RESPONSE,
    COMPARE_REQUEST: COMPARE_RESPONSE,
    EXTENDED_REQUEST: EXTENDED_RESPONSE,
}
FINAL_RESPONSES = frozenset(FINAL_RESPONSE.values())
REQUESTS = frozenset((*FINAL_RESPONSE, UNBIND_REQUEST, ABANDON_REQUEST))

# Bounded names for metrics, by protocolOp tag.
OPERATION_NAMES = {
    BIND_REQUEST: "bind",
    UNBIND_REQUEST: "unbind",
    SEARCH_REQUEST: "search",
    MODIFY_REQUEST: "modify",
    ADD_REQUEST: "add",
    DEL_REQUEST: "delete",
    MODDN_REQUEST: "modify_dn",
    COMPARE_REQUEST: "compare",
    ABANDON_REQUEST: "abandon",
    EXTENDED_REQUEST: "extended",
}


class ResultCode(enum.IntEnum):
    """The LDAPResult codes either side produces or reads (RFC 4511 §4.1.9)."""

    SUCCESS = 0
    OPERATIONS_ERROR = 1
    PROTOCOL_ERROR = 2
    TIME_LIMIT_EXCEEDED = 3
    SIZE_LIMIT_EXCEEDED = 4
    AUTH_METHOD_NOT_SUPPORTED = 7
    REFERRAL = 10
    ADMIN_LIMIT_EXCEEDED = 11
    SASL_BIND_IN_PROGRESS = 14
    CONSTRAINT_VIOLATION = 19
    NO_SUCH_OBJECT = 32
    ALIAS_PROBLEM = 33
    INVALID_DN_SYNTAX = 34
    ALIAS_DEREFERENCING_PROBLEM = 36
    INAPPROPRIATE_AUTHENTICATION = 48
    INVALID_CREDENTIALS = 49
    INSUFFICIENT_ACCESS_RIGHTS = 50
    BUSY = 51
    UNAVAILABLE = 52
    UNWILLING_TO_PERFORM = 53
    OTHER = 80


def _text(raw: bytes) -> str:
    """What the directory says (a DN, a diagnostic): shown, never trusted."""
    return raw.decode("utf-8", errors="replace")


def _ldap_string(raw: bytes) -> str:
    """An LDAPString a client sent: UTF-8 (RFC 4511 §4.1.2); anything else is malformed."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BerError("LDAPString is not UTF-8") from None


# ================================================================ the envelope


def read_envelope(buf: bytes, pos: int, end: int) -> tuple[int, int, int, int]:
    """(message ID, protocolOp tag, op content start, op content end) of the
    LDAPMessage at ``buf[pos:end]``, read in place (the directory's replies:
    what comes after the protocolOp is not looked at)."""
    start, end = expect(buf, pos, end, SEQUENCE)
    id_start, id_end = expect(buf, start, end, INTEGER)
    message_id = int.from_bytes(buf[id_start:id_end], "big", signed=True)
    tag, op_start, op_end = read_header(buf, id_end, end)
    return message_id, tag, op_start, op_end


def decode_envelope(message: bytes) -> tuple[int, int, int, int]:
    """:func:`read_envelope` of one whole message."""
    return read_envelope(message, 0, len(message))


class MessageHeader(NamedTuple):
    """Where the parts of one LDAPMessage are, found without decoding it."""

    message_id: int
    op_tag: int
    op_start: int  # content of the protocolOp
    op_end: int  # == start of the controls, if any


def peek(message: bytes) -> MessageHeader:
    """Read the envelope of one whole LDAPMessage a client sent (as the framer returns it).

    Checks the structure around the protocolOp: a message ID in range, one
    protocolOp element, then nothing or exactly one Controls element.
    """
    end = len(message)
    tag, pos, stop = read_header(message, 0, end)
    if tag != SEQUENCE or stop != end:
        raise BerError("not a single LDAPMessage")
    id_start, id_end = expect(message, pos, end, INTEGER)
    message_id = read_integer(message, id_start, id_end)
    if message_id < 0:
        raise BerError("negative message ID")
    op_tag, op_start, op_end = read_header(message, id_end, end)
    if op_end < end:
        controls_tag, _, controls_end = read_header(message, op_end, end)
        if controls_tag != CONTROLS or controls_end != end:
            raise BerError("unexpected element after the protocolOp")
    return MessageHeader(message_id, op_tag, op_start, op_end)


def peek_id_and_tag(message: bytes) -> tuple[int, int]:
    """Message ID and protocolOp tag of a whole message, with no more checks
    than reading them needs: the fast path for responses relayed unread."""
    try:
        first = message[1]
        pos = 2 if first < 0x80 else 2 + (first & 0x7F)
        size = message[pos + 1]
        if message[pos] != INTEGER or not 0 < size <= 4:
            raise BerError("bad message ID")
        start = pos + 2
        return int.from_bytes(message[start : start + size], "big", signed=True), message[
            start + size
        ]
    except IndexError:
        raise BerError("truncated LDAPMessage") from None


def ldap_message(message_id: int, op: bytes, controls: bytes = b"") -> bytes:
    """LDAPMessage ::= SEQUENCE { messageID, protocolOp, controls } around an
    encoded protocolOp (and raw Controls)."""
    return tlv(SEQUENCE, integer(message_id) + op + controls)


def response_for(request_tag: int) -> int | None:
    """The tag of the response that answers a request (None: unbind, abandon)."""
    return FINAL_RESPONSE.get(request_tag)


# ================================================================ bind


@dataclass(frozen=True)
class BindRequest:
    """A decoded BindRequest (RFC 4511 §4.2). Exactly one of ``password`` and
    ``sasl_mechanism`` is set."""

    message_id: int
    version: int
    name: str
    password: bytes | None = None
    sasl_mechanism: str | None = None
    sasl_credentials: bytes | None = None
    controls: bytes = b""  # the raw Controls element, if any

    @property
    def is_simple(self) -> bool:
        return self.password is not None

    @property
    def is_anonymous(self) -> bool:
        return self.password == b"" and self.name == ""


def decode_bind_request(message: bytes, header: MessageHeader | None = None) -> BindRequest:
    header = header or peek(message)
    if header.op_tag != BIND_REQUEST:
        raise BerError("not a BindRequest")
    end = header.op_end
    start, stop = expect(message, header.op_start, end, INTEGER)
    version = read_integer(message, start, stop)
    name_start, name_end = expect(message, stop, end, OCTET_STRING)
    name = _ldap_string(message[name_start:name_end])
    auth_tag, auth_start, auth_end = read_header(message, name_end, end)
    if auth_end != end:
        raise BerError("unexpected element after the authentication choice")
    controls = message[header.op_end :]
    if auth_tag == AUTH_SIMPLE:
        return BindRequest(
            header.message_id,
            version,
            name,
            password=message[auth_start:auth_end],
            controls=controls,
        )
    if auth_tag == AUTH_SASL:
        mechanism, credentials = _sasl_credentials(message, auth_start, auth_end)
        return BindRequest(
            header.message_id,
            version,
            name,
            sasl_mechanism=mechanism,
            sasl_credentials=credentials,
            controls=controls,
        )
    raise BerError(f"unknown authentication choice {auth_tag:#04x}")


def _sasl_credentials(message: bytes, pos: int, end: int) -> tuple[str, bytes | None]:
    start, stop = expect(message, pos, end, OCTET_STRING)
    mechanism = _ldap_string(message[start:stop])
    if stop == end:
        return mechanism, None
    cred_start, cred_end = expect(message, stop, end, OCTET_STRING)
    if cred_end != end:
        raise BerError("unexpected element after SASL credentials")
    return mechanism, message[cred_start:cred_end]


_VERSION_3 = integer(3)


def bind_request(name: str | bytes, password: str | bytes) -> bytes:
    """A simple BindRequest, LDAPv3 (the protocolOp; text is sent as UTF-8)."""
    raw_name = name.encode() if isinstance(name, str) else name
    raw_password = password.encode() if isinstance(password, str) else password
    return tlv(BIND_REQUEST, _VERSION_3 + tlv(OCTET_STRING, raw_name)
               + tlv(AUTH_SIMPLE, raw_password))


def encode_bind_request(
    message_id: int, name: str | bytes, password: bytes, controls: bytes = b""
) -> bytes:
    return ldap_message(message_id, bind_request(name, password), controls)


def encode_bind_response(message_id: int, code: int, diagnostic: str = "") -> bytes:
    return encode_result(message_id, BIND_RESPONSE, code, diagnostic)


UNBIND = tlv(UNBIND_REQUEST, b"")  # the protocolOp


# ================================================================ results


class LdapResult(NamedTuple):
    code: int
    matched_dn: str
    diagnostic: str


def read_result(message: bytes, start: int, end: int) -> tuple[int, str, str]:
    """(resultCode, matchedDN, diagnosticMessage) of the LDAPResult that opens
    any response (bind, extended, search done, ...), read in place from the
    protocolOp's content ``message[start:end]``."""
    code_start, code_end = expect(message, start, end, ENUMERATED)
    code = read_integer(message, code_start, code_end)
    dn_start, dn_end = expect(message, code_end, end, OCTET_STRING)
    diag_start, diag_end = expect(message, dn_end, end, OCTET_STRING)
    return (code, _text(message[dn_start:dn_end]) if dn_end > dn_start else "",
            _text(message[diag_start:diag_end]) if diag_end > diag_start else "")


def decode_result(message: bytes, header: MessageHeader | None = None) -> LdapResult:
    """The LDAPResult of one whole response message."""
    header = header or peek(message)
    return LdapResult._make(read_result(message, header.op_start, header.op_end))


def encode_result(
    message_id: int,
    op_tag: int,
    code: int,
    diagnostic: str = "",
    matched_dn: str = "",
    extra: bytes = b"",
) -> bytes:
    """Any response made of an LDAPResult (plus optional trailing elements)."""
    body = (
        integer(code, ENUMERATED)
        + tlv(OCTET_STRING, matched_dn.encode())
        + tlv(OCTET_STRING, diagnostic.encode())
        + extra
    )
    return ldap_message(message_id, tlv(op_tag, body))


# ================================================================ extended operations


def extended_request(oid: bytes, value: bytes | None = None) -> bytes:
    """An ExtendedRequest (the protocolOp)."""
    body = tlv(EXTENDED_REQUEST_NAME, oid)
    if value is not None:
        body += tlv(EXTENDED_REQUEST_VALUE, value)
    return tlv(EXTENDED_REQUEST, body)


def encode_extended_request(message_id: int, oid: bytes, value: bytes | None = None) -> bytes:
    return ldap_message(message_id, extended_request(oid, value))


def encode_extended_response(
    message_id: int, code: int, diagnostic: str = "", name: bytes | None = None
) -> bytes:
    extra = tlv(EXTENDED_RESPONSE_NAME, name) if name is not None else b""
    return encode_result(message_id, EXTENDED_RESPONSE, code, diagnostic, extra=extra)


def encode_notice_of_disconnection(code: int, diagnostic: str) -> bytes:
    """The unsolicited notification a server sends before closing (RFC 4511 §4.4.1)."""
    return encode_extended_response(0, code, diagnostic, NOTICE_OF_DISCONNECTION_OID)


def extended_request_name(message: bytes, header: MessageHeader | None = None) -> bytes:
    """The requestName OID of an ExtendedRequest (RFC 4511 §4.12)."""
    header = header or peek(message)
    if header.op_tag != EXTENDED_REQUEST:
        raise BerError("not an ExtendedRequest")
    start, stop = expect(message, header.op_start, header.op_end, EXTENDED_REQUEST_NAME)
    return message[start:stop]


def extended_response_name(message: bytes, header: MessageHeader | None = None) -> bytes | None:
    """The responseName OID of an ExtendedResponse, if present."""
    header = header or peek(message)
    end = header.op_end
    pos = header.op_start
    for _ in range(3):  # resultCode, matchedDN, diagnosticMessage
        _, _, pos = read_header(message, pos, end)
    while pos < end:
        tag, start, stop = read_header(message, pos, end)
        if tag == EXTENDED_RESPONSE_NAME:
            return message[start:stop]
        pos = stop
    return None


# ================================================================ abandon


def abandoned_message_id(message: bytes, header: MessageHeader | None = None) -> int:
    """The MessageID an AbandonRequest names (its content is the INTEGER)."""
    header = header or peek(message)
    if header.op_tag != ABANDON_REQUEST:
        raise BerError("not an AbandonRequest")
    return read_integer(message, header.op_start, header.op_end)


# ================================================================ search


@dataclass(frozen=True)
class SearchTemplate:
    """A search request with everything but the filter's placeholders encoded once."""

    head: bytes  # baseObject .. typesOnly
    filter: CompiledFilter
    tail: bytes  # attributes
    slot: Slot | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.filter.slot is not None:  # the whole request, not only the filter, in one go
            object.__setattr__(self, "slot",
                               self.filter.slot.inside(SEARCH_REQUEST, self.head, self.tail))

    @classmethod
    def build(cls, base: str, scope: int, compiled: CompiledFilter,
              attributes: Sequence[str], size_limit: int, time_limit: int) -> SearchTemplate:
        head = (tlv(OCTET_STRING, base.encode()) + integer(scope, ENUMERATED)
                + integer(NEVER_DEREF_ALIASES, ENUMERATED) + integer(size_limit)
                + integer(time_limit) + boolean(False))
        tail = tlv(SEQUENCE, b"".join(tlv(OCTET_STRING, a.encode()) for a in attributes))
        return cls(head, compiled, tail)

    def encode(self, **values: str) -> bytes:
        """The SearchRequest protocolOp with ``values`` in the filter's placeholders."""
        if self.slot is not None:
            return self.slot.encode(values[self.slot.name].encode("utf-8"))
        return tlv(SEARCH_REQUEST, self.head + self.filter.encode(**values) + self.tail)


@dataclass(frozen=True)
class SearchEntry:
    """A SearchResultEntry, decoded whole (attribute names folded to lower case)."""

    dn: str
    attributes: dict[str, list[str]]

    def values(self, name: str) -> list[str]:
        return self.attributes.get(name.lower(), [])

    def first(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None


def decode_entry(message: bytes, start: int, end: int) -> SearchEntry:
    """The SearchResultEntry whose content is ``message[start:end]``."""
    dn_start, dn_end = expect(message, start, end, OCTET_STRING)
    attrs_start, attrs_end = expect(message, dn_end, end, SEQUENCE)
    attributes: dict[str, list[str]] = {}
    pos = attrs_start
    while pos < attrs_end:
        one_start, one_end = expect(message, pos, attrs_end, SEQUENCE)
        type_start, type_end = expect(message, one_start, one_end, OCTET_STRING)
        vals_start, vals_end = expect(message, type_end, one_end, SET)
        values = _values(message, vals_start, vals_end)
        attributes[_text(message[type_start:type_end]).lower()] = values
        pos = one_end
    return SearchEntry(_text(message[dn_start:dn_end]), attributes)


def _values(message: bytes, pos: int, end: int) -> list[str]:
    """The values of one attribute: SET OF OCTET STRING."""
    values = []
    while pos < end:
        start, pos = expect(message, pos, end, OCTET_STRING)
        values.append(_text(message[start:pos]))
    return values


class UserEntry(NamedTuple):
    """What a sign-in needs of the user's entry."""

    dn: str
    name: str | None  # the first value of the username attribute
    member_of: list[str]  # empty unless memberOf is used
    mail: str | None = None  # the first value of the mail attribute


class UserEntryReader:
    """Decodes a user's search entry down to a :class:`UserEntry`.

    The search asks for these attributes only; any other one is skipped whole
    rather than decoded, which is what keeps this cheaper than decode_entry.
    """

    def __init__(self, username_attribute: str, use_memberof: bool,
                 mail_attribute: str = "") -> None:
        # Attribute types are ASCII, so bytes.lower() is str.lower() here.
        self._name = username_attribute.lower().encode()
        self._member_of = b"memberof" if use_memberof else None
        self._mail = mail_attribute.lower().encode() or None

    def read(self, message: bytes, start: int, end: int) -> UserEntry:
        dn_start, dn_end = expect(message, start, end, OCTET_STRING)
        attrs_start, attrs_end = expect(message, dn_end, end, SEQUENCE)
        name: str | None = None
        mail: str | None = None
        member_of: list[str] = []
        pos = attrs_start
        while pos < attrs_end:
            one_start, pos = expect(message, pos, attrs_end, SEQUENCE)
            type_start, type_end = expect(message, one_start, pos, OCTET_STRING)
            vals_start, vals_end = expect(message, type_end, pos, SET)
            kind = message[type_start:type_end].lower()
            if kind == self._name:  # a repeated attribute: the last one counts, as in a dict
                values = _values(message, vals_start, vals_end)
                name = values[0] if values else None
            if kind == self._member_of:
                member_of = _values(message, vals_start, vals_end)
            if kind == self._mail:
                mails = _values(message, vals_start, vals_end)
                mail = mails[0] if mails else None
        return UserEntry(_text(message[dn_start:dn_end]), name, member_of, mail)
