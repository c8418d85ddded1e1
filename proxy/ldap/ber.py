"""LDAP's BER, only as much as the proxy needs (RFC 4511 §5.1, X.690).

The proxy forwards every operation but a bind as the bytes it received, so
the hot path never decodes a whole message: :class:`MessageFramer` cuts a
byte stream into LDAPMessages by reading their outer headers, and
:func:`peek` reads the message ID and the protocolOp tag. Only the messages
the proxy acts on are decoded further (BindRequest, LDAPResult, the name of
an ExtendedRequest), and only the few it writes itself are encoded here.

Every decoder raises :class:`BerError` (and nothing else) on any input it
cannot read, so the server has one thing to catch: a malformed message.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from backends.ber import (  # noqa: F401 (re-exported: the front-end's one BER module)
    ENUMERATED,
    INTEGER,
    OCTET_STRING,
    SEQUENCE,
    BerError,
    encode_length,
    expect,
    integer,
    read_header,
    read_integer,
    tlv,
)

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
EXTENDED_RESPONSE_NAME = 0x8A  # [10] LDAPOID

START_TLS_OID = b"1.3.6.1.4.1.1466.20037"
NOTICE_OF_DISCONNECTION_OID = b"1.3.6.1.4.1.1466.20036"
WHO_AM_I_OID = b"1.3.6.1.4.1.4203.1.11.3"
PASSWORD_MODIFY_OID = b"1.3.6.1.4.1.4203.1.11.1"

MAX_MESSAGE_ID = 2**31 - 1

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
    """The LDAPResult codes the proxy produces or reads (RFC 4511 §4.1.9)."""

    SUCCESS = 0
    OPERATIONS_ERROR = 1
    PROTOCOL_ERROR = 2
    AUTH_METHOD_NOT_SUPPORTED = 7
    ADMIN_LIMIT_EXCEEDED = 11
    SASL_BIND_IN_PROGRESS = 14
    CONSTRAINT_VIOLATION = 19
    NO_SUCH_OBJECT = 32
    INVALID_DN_SYNTAX = 34
    INAPPROPRIATE_AUTHENTICATION = 48
    INVALID_CREDENTIALS = 49
    INSUFFICIENT_ACCESS_RIGHTS = 50
    BUSY = 51
    UNAVAILABLE = 52
    UNWILLING_TO_PERFORM = 53
    OTHER = 80


class MessageFramer:
    """Cuts a byte stream into whole LDAPMessages.

    Feed it what the transport delivers; it returns the complete messages
    (as bytes, in order) and keeps the rest. A message split over many
    segments is joined once, when its last byte arrives; several messages in
    one segment come out together. A message whose header announces more
    than ``max_size`` bytes is refused as soon as the header is read.

    The rest is kept in one bytearray, not as the segments it came in: a
    peer trickling a message a byte at a time costs its bytes, not a Python
    object per segment. ``clear()`` gives the memory back.
    """

    __slots__ = ("max_size", "_pending", "_need")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._pending = bytearray()  # the start of an incomplete message
        self._need = 0  # size of the incomplete message, once its header is known

    @property
    def buffered(self) -> int:
        """Bytes held back, waiting for the rest of a message."""
        return len(self._pending)

    def clear(self) -> None:
        self._pending = bytearray()  # a new one: the old buffer is freed, not kept
        self._need = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Raises BerError on a malformed or oversized message."""
        if self._pending:
            self._pending += data
            if self._need and len(self._pending) < self._need:
                return []  # the common wait for the rest of a large message
            data = bytes(self._pending)
            self.clear()
        messages: list[bytes] = []
        pos = 0
        end = len(data)
        while pos < end:
            size = self._message_size(data, pos, end)
            if size < 0 or pos + size > end:
                break
            messages.append(data if size == end and pos == 0 else data[pos : pos + size])
            pos += size
        if pos < end:
            self._pending = bytearray(memoryview(data)[pos:])
            self._need = max(size, 0)
        return messages

    def _message_size(self, buf: bytes, pos: int, end: int) -> int:
        """Whole size of the message starting at ``pos``; -1 if its header is incomplete."""
        if buf[pos] != SEQUENCE:
            raise BerError("not an LDAPMessage")
        if pos + 2 > end:
            return -1
        first = buf[pos + 1]
        if first < 0x80:
            size = 2 + first
        else:
            count = first & 0x7F
            if count == 0 or count > 4:
                raise BerError("unsupported length form")
            if pos + 2 + count > end:
                return -1
            size = 2 + count + int.from_bytes(buf[pos + 2 : pos + 2 + count], "big")
        if size > self.max_size:
            raise BerError(f"message of {size} bytes exceeds {self.max_size}", oversize=True)
        return size


class MessageHeader(NamedTuple):
    """Where the parts of one LDAPMessage are, found without decoding it."""

    message_id: int
    op_tag: int
    op_start: int  # content of the protocolOp
    op_end: int  # == start of the controls, if any


def peek(message: bytes) -> MessageHeader:
    """Read the envelope of one whole LDAPMessage (as the framer returns it).

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


def _text(raw: bytes) -> str:
    """An LDAPString: UTF-8 (RFC 4511 §4.1.2); anything else is malformed."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BerError("LDAPString is not UTF-8") from None


def decode_bind_request(message: bytes, header: MessageHeader | None = None) -> BindRequest:
    header = header or peek(message)
    if header.op_tag != BIND_REQUEST:
        raise BerError("not a BindRequest")
    end = header.op_end
    start, stop = expect(message, header.op_start, end, INTEGER)
    version = read_integer(message, start, stop)
    name_start, name_end = expect(message, stop, end, OCTET_STRING)
    name = _text(message[name_start:name_end])
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
    mechanism = _text(message[start:stop])
    if stop == end:
        return mechanism, None
    cred_start, cred_end = expect(message, stop, end, OCTET_STRING)
    if cred_end != end:
        raise BerError("unexpected element after SASL credentials")
    return mechanism, message[cred_start:cred_end]


class LdapResult(NamedTuple):
    code: int
    matched_dn: str
    diagnostic: str


def decode_result(message: bytes, header: MessageHeader | None = None) -> LdapResult:
    """The LDAPResult that opens any response (bind, extended, done, ...)."""
    header = header or peek(message)
    end = header.op_end
    start, stop = expect(message, header.op_start, end, ENUMERATED)
    code = read_integer(message, start, stop)
    dn_start, dn_end = expect(message, stop, end, OCTET_STRING)
    diag_start, diag_end = expect(message, dn_end, end, OCTET_STRING)
    return LdapResult(
        code,
        message[dn_start:dn_end].decode("utf-8", "replace"),
        message[diag_start:diag_end].decode("utf-8", "replace"),
    )


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


def abandoned_message_id(message: bytes, header: MessageHeader | None = None) -> int:
    """The MessageID an AbandonRequest names (its content is the INTEGER)."""
    header = header or peek(message)
    if header.op_tag != ABANDON_REQUEST:
        raise BerError("not an AbandonRequest")
    return read_integer(message, header.op_start, header.op_end)


# ---------------------------------------------------------------- writing


def message(message_id: int, op: bytes, controls: bytes = b"") -> bytes:
    """An LDAPMessage around an encoded protocolOp (and raw Controls)."""
    return tlv(SEQUENCE, integer(message_id) + op + controls)


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
    return message(message_id, tlv(op_tag, body))


def encode_bind_response(message_id: int, code: int, diagnostic: str = "") -> bytes:
    return encode_result(message_id, BIND_RESPONSE, code, diagnostic)


def encode_extended_response(
    message_id: int, code: int, diagnostic: str = "", name: bytes | None = None
) -> bytes:
    extra = tlv(EXTENDED_RESPONSE_NAME, name) if name is not None else b""
    return encode_result(message_id, EXTENDED_RESPONSE, code, diagnostic, extra=extra)


def encode_notice_of_disconnection(code: int, diagnostic: str) -> bytes:
    """The unsolicited notification a server sends before closing (RFC 4511 §4.4.1)."""
    return encode_extended_response(0, code, diagnostic, NOTICE_OF_DISCONNECTION_OID)


def encode_bind_request(
    message_id: int, name: str | bytes, password: bytes, controls: bytes = b""
) -> bytes:
    raw_name = name.encode() if isinstance(name, str) else name
    body = integer(3) + tlv(OCTET_STRING, raw_name) + tlv(AUTH_SIMPLE, password)
    return message(message_id, tlv(BIND_REQUEST, body), controls)


def encode_extended_request(message_id: int, oid: bytes, value: bytes | None = None) -> bytes:
    body = tlv(EXTENDED_REQUEST_NAME, oid)
    if value is not None:
        body += tlv(0x81, value)
    return message(message_id, tlv(EXTENDED_REQUEST, body))


def response_for(request_tag: int) -> int | None:
    """The tag of the response that answers a request (None: unbind, abandon)."""
    return FINAL_RESPONSE.get(request_tag)


def peek_id_and_tag(message: bytes) -> tuple[int, int]:
    """Message ID and protocolOp tag of a whole message, with no more checks
    than reading them needs: the fast path for the directory's responses."""
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
