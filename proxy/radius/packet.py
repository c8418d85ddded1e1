"""RADIUS on the wire (RFC 2865, 2866, 3579, 5997): pure functions over bytes.

Nothing here touches a socket or a clock.  A datagram is checked before
anything else and either becomes a :class:`Packet` (the raw attributes in
order, as sent) or a :class:`~proxy.radius.events.DropReason`; nothing in
this module raises on bad input.

The hot path (one Access-Request in, one reply out) is written by hand:
decoding, verifying and answering with pyrad's ``AuthPacket`` costs several
times what this module does (``bench/radius_packet_cost.py`` measures
both; about 70 against 15 µs of CPU on the development machine).  pyrad
and the dictionary still do everything that is configured by name: reply
attributes (types, VALUE names, tags, vendor attributes) are encoded by
pyrad once, at start.  The few attribute numbers the front-end itself reads
are fixed by the RFCs; :func:`load_dictionary` (what ``serve`` and
``check-config`` call) refuses a dictionary that numbers them otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.resources import as_file
from importlib.resources.abc import Traversable
from typing import Any

from pyrad.dictionary import Dictionary
from pyrad.packet import Packet as PyradPacket

from proxy.data import DATA
from proxy.radius.events import DropReason

# The RADIUS dictionary shipped with the product, as package data (proxy/data/dictionary,
# a link to conf/dictionary in the repository): what serve loads, tests and benchmarks too.
SHIPPED_DICTIONARY: Traversable = DATA.joinpath("dictionary")

HEADER_LENGTH = 20
MAX_LENGTH = 4096  # RFC 2865 §3
MAX_VALUE_LENGTH = 253
ZERO_AUTHENTICATOR = bytes(16)


class Code:
    """Packet codes.  Plain ints, not an IntEnum: compared on every packet."""

    ACCESS_REQUEST = 1
    ACCESS_ACCEPT = 2
    ACCESS_REJECT = 3
    ACCOUNTING_REQUEST = 4
    ACCOUNTING_RESPONSE = 5
    ACCESS_CHALLENGE = 11
    STATUS_SERVER = 12


class Attr:
    """The attributes the front-end reads or writes itself (plain ints, like Code)."""

    USER_NAME = 1
    USER_PASSWORD = 2
    CHAP_PASSWORD = 3
    REPLY_MESSAGE = 18
    STATE = 24
    VENDOR_SPECIFIC = 26
    PROXY_STATE = 33
    ACCT_STATUS_TYPE = 40
    ACCT_SESSION_ID = 44
    EAP_MESSAGE = 79
    MESSAGE_AUTHENTICATOR = 80


MICROSOFT_VENDOR_ID = 311  # RFC 2548: MS-CHAP and MS-CHAPv2 live under it
_MICROSOFT = MICROSOFT_VENDOR_ID.to_bytes(4, "big")
_MS_CHAP_TYPES = frozenset({1, 3, 4, 5, 6, 11, 25, 27})  # responses, challenges, password changes

# Attributes a reply rule may not set: the proxy writes them itself (or they
# only make sense in a request) and a configured copy would break the reply.
RESERVED_REPLY_ATTRIBUTES = frozenset(
    {Attr.USER_PASSWORD, Attr.CHAP_PASSWORD, Attr.STATE, Attr.PROXY_STATE,
     Attr.EAP_MESSAGE, Attr.MESSAGE_AUTHENTICATOR}
)

_MA_ZERO = bytes((Attr.MESSAGE_AUTHENTICATOR, 18)) + ZERO_AUTHENTICATOR
_MA_HEADER = _MA_ZERO[:2]


@dataclass(frozen=True, slots=True)
class Packet:
    """A datagram that passed :func:`parse_datagram`: lengths are consistent."""

    code: int
    identifier: int
    authenticator: bytes
    raw: bytes  # exactly Length octets: padding after it is already cut off
    attributes: tuple[tuple[int, bytes], ...]  # (type, value) in order, VSAs undecoded
    message_authenticators: tuple[int, ...]  # offset in ``raw`` of each one's value

    def first(self, attr_type: int) -> bytes | None:
        for t, value in self.attributes:
            if t == attr_type:
                return value
        return None

    def all(self, attr_type: int) -> list[bytes]:
        return [value for t, value in self.attributes if t == attr_type]

    def has(self, attr_type: int) -> bool:
        return any(t == attr_type for t, _ in self.attributes)

    def vendor_attributes(self) -> Iterator[tuple[int, int, bytes]]:
        """(vendor id, vendor type, value) of every well-formed RFC 2865 §5.26 VSA."""
        for t, value in self.attributes:
            if t == Attr.VENDOR_SPECIFIC and len(value) >= 6:
                yield from _split_vsa(value)

    def uses_unsupported_auth(self) -> bool:
        """CHAP, EAP or MS-CHAP: methods whose password we never see in clear."""
        for t, value in self.attributes:
            if t == Attr.CHAP_PASSWORD or t == Attr.EAP_MESSAGE:
                return True
            if t == Attr.VENDOR_SPECIFIC and value[:4] == _MICROSOFT and any(
                    sub in _MS_CHAP_TYPES for _, sub, _ in _split_vsa(value)):
                return True
        return False


def _split_vsa(value: bytes) -> Iterator[tuple[int, int, bytes]]:
    vendor = int.from_bytes(value[:4], "big")
    pos = 4
    while pos + 2 <= len(value):
        t, n = value[pos], value[pos + 1]
        if n < 2 or pos + n > len(value):
            return  # not the recommended format: opaque to us
        yield vendor, t, value[pos + 2:pos + n]
        pos += n


def parse_datagram(data: bytes) -> Packet | DropReason:
    """Check a datagram's header and attribute lengths; never raises."""
    if len(data) < HEADER_LENGTH:
        return DropReason.TOO_SHORT
    length = int.from_bytes(data[2:4], "big")
    if length > MAX_LENGTH:
        return DropReason.TOO_LONG
    if length < HEADER_LENGTH or length > len(data):
        return DropReason.BAD_LENGTH
    raw = bytes(data[:length])  # RFC 2865 §3: octets past Length are padding
    attributes: list[tuple[int, bytes]] = []
    authenticators: list[int] = []
    pos = HEADER_LENGTH
    while pos < length:
        if pos + 2 > length:
            return DropReason.BAD_ATTRIBUTE_LENGTH
        attr_type, attr_length = raw[pos], raw[pos + 1]
        if attr_length < 2 or pos + attr_length > length:
            return DropReason.BAD_ATTRIBUTE_LENGTH
        end = pos + attr_length
        if attr_type == 80:  # Message-Authenticator: its place is needed to verify it
            authenticators.append(pos + 2)
        attributes.append((attr_type, raw[pos + 2:end]))
        pos = end
    return Packet(raw[0], raw[1], raw[4:20], raw, tuple(attributes), tuple(authenticators))


# --- authenticators -------------------------------------------------------


def md5_digest(data: bytes) -> bytes:
    return hashlib.md5(data).digest()  # noqa: S324 (RADIUS is MD5 by RFC; no choice)


@functools.lru_cache(maxsize=256)
def _hmac_md5_pads(nas_secret: bytes) -> tuple[Any, Any]:
    key = md5_digest(nas_secret) if len(nas_secret) > 64 else nas_secret
    key = key.ljust(64, b"\x00")
    inner = hashlib.md5(bytes(b ^ 0x36 for b in key))  # noqa: S324
    outer = hashlib.md5(bytes(b ^ 0x5C for b in key))  # noqa: S324
    return inner, outer


def hmac_md5(nas_secret: bytes, data: bytes) -> bytes:
    """RFC 2104 HMAC-MD5 from hash states keyed once per shared secret.

    Copying two keyed MD5 states costs under half of ``hmac.digest`` keying
    afresh, and there are only as many secrets as clients.
    """
    inner_pad, outer_pad = _hmac_md5_pads(nas_secret)
    inner = inner_pad.copy()
    inner.update(data)
    outer = outer_pad.copy()
    outer.update(inner.digest())
    return outer.digest()  # type: ignore[no-any-return]


def verify_message_authenticator(
    packet: Packet, nas_secret: bytes, vector: bytes | None = None
) -> bool:
    """RFC 3579 §3.2: HMAC-MD5 over the packet with the attribute's value zeroed.

    ``vector`` replaces the Authenticator field in the computation: the
    Request Authenticator itself for Access-Request and Status-Server (the
    default), 16 zero octets for Accounting-Request.  Exactly one
    Message-Authenticator of 16 octets is valid; none or two is not.
    """
    if len(packet.message_authenticators) != 1:
        return False
    offset = packet.message_authenticators[0]
    raw = packet.raw
    if raw[offset - 1] != 18:
        return False
    head = raw[:4] + (packet.authenticator if vector is None else vector)
    signed = head + raw[HEADER_LENGTH:offset] + ZERO_AUTHENTICATOR + raw[offset + 16:]
    expected = hmac_md5(nas_secret, signed)
    return hmac.compare_digest(expected, raw[offset:offset + 16])


def message_authenticator_problem(
    packet: Packet, nas_secret: bytes, required: bool
) -> DropReason | None:
    """Why a request must be dropped for its Message-Authenticator, or None.

    A wrong shared secret shows up here too, as a bad Message-Authenticator.
    """
    if not packet.message_authenticators:
        return DropReason.MISSING_MESSAGE_AUTHENTICATOR if required else None
    if verify_message_authenticator(packet, nas_secret):
        return None
    return DropReason.BAD_MESSAGE_AUTHENTICATOR


def verify_accounting_request(packet: Packet, nas_secret: bytes) -> bool:
    """RFC 2866 §3: the Request Authenticator is MD5(packet with zeros + shared secret)."""
    raw = packet.raw
    expected = md5_digest(raw[:4] + ZERO_AUTHENTICATOR + raw[HEADER_LENGTH:] + nas_secret)
    return hmac.compare_digest(expected, packet.authenticator)


def response_authenticator(head: bytes, request_authenticator: bytes, body: bytes,
                           nas_secret: bytes) -> bytes:
    """RFC 2865 §3: MD5(Code+Identifier+Length + Request Authenticator + attributes + secret)."""
    return md5_digest(head + request_authenticator + body + nas_secret)


# --- User-Password (RFC 2865 §5.2) ------------------------------------------


def _xor16(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(16, "big")


def decode_user_password(hidden: bytes, nas_secret: bytes, authenticator: bytes) -> bytes | None:
    """Undo RFC 2865 §5.2 hiding; None when the length cannot be a hidden password."""
    if not hidden or len(hidden) % 16 or len(hidden) > 128:
        return None
    clear = bytearray()
    previous = authenticator
    for pos in range(0, len(hidden), 16):
        block = hidden[pos:pos + 16]
        clear += _xor16(block, md5_digest(nas_secret + previous))
        previous = block
    return bytes(clear).rstrip(b"\x00")


def hide_user_password(password: bytes, nas_secret: bytes, authenticator: bytes) -> bytes:
    """RFC 2865 §5.2 hiding, as a NAS does it (tests and tools use it)."""
    if len(password) > 128:
        raise ValueError("a User-Password holds at most 128 octets")
    padded = password + bytes(-len(password) % 16 or (16 if not password else 0))
    hidden = bytearray()
    previous = authenticator
    for pos in range(0, len(padded), 16):
        previous = _xor16(padded[pos:pos + 16], md5_digest(nas_secret + previous))
        hidden += previous
    return bytes(hidden)


# --- encoding -------------------------------------------------------------


def encode_attribute(attr_type: int, value: bytes) -> bytes:
    if len(value) > MAX_VALUE_LENGTH:
        raise ValueError(f"attribute {attr_type}: {len(value)} octets, at most 253 fit")
    return bytes((attr_type, len(value) + 2)) + value


def encode_vendor_attribute(vendor_id: int, vendor_type: int, value: bytes) -> bytes:
    """An RFC 2865 §5.26 Vendor-Specific attribute holding one sub-attribute."""
    inner = bytes((vendor_type, len(value) + 2)) + value
    return encode_attribute(Attr.VENDOR_SPECIFIC, struct.pack("!L", vendor_id) + inner)


def encode_text(attr_type: int, text: str) -> bytes:
    """A text attribute, split over several when longer than one can hold.

    RFC 2865 §5.18 lets a reply carry several Reply-Messages, which clients
    show one after the other; the split never cuts a UTF-8 character.
    """
    data = text.encode("utf-8")
    parts = []
    while data:
        cut = min(len(data), MAX_VALUE_LENGTH)
        while cut < len(data) and (data[cut] & 0xC0) == 0x80:
            cut -= 1
        parts.append(encode_attribute(attr_type, data[:cut]))
        data = data[cut:]
    return b"".join(parts)


def encode_reply(code: int, request: Packet, nas_secret: bytes, attributes: bytes = b"",
                 *, message_authenticator: bool = True) -> bytes:
    """A reply to ``request``, signed.

    Layout: Message-Authenticator first (RFC 3579 §3.2; first, as the
    BlastRADIUS advisory asks, so no chosen prefix can precede it), then
    ``attributes``, then the request's Proxy-States in their order (RFC 2865
    §5.33).  The Message-Authenticator is computed over the reply with the
    Request Authenticator in place of the Response Authenticator, and the
    Response Authenticator (RFC 2865 §3) over the finished attributes.
    Raises ValueError if the reply would exceed 4096 octets.
    """
    body = attributes + b"".join(encode_attribute(Attr.PROXY_STATE, v)
                                 for v in request.all(Attr.PROXY_STATE))
    if message_authenticator:
        body = _MA_ZERO + body
    length = HEADER_LENGTH + len(body)
    if length > MAX_LENGTH:
        raise ValueError(f"reply of {length} octets exceeds {MAX_LENGTH}")
    head = bytes((code, request.identifier)) + length.to_bytes(2, "big")
    if message_authenticator:
        mac = hmac_md5(nas_secret, head + request.authenticator + body)
        body = _MA_HEADER + mac + body[len(_MA_ZERO):]
    return head + response_authenticator(head, request.authenticator, body, nas_secret) + body


def access_accept(request: Packet, nas_secret: bytes, message: str = "",
                  attributes: bytes = b"") -> bytes:
    return encode_reply(Code.ACCESS_ACCEPT, request, nas_secret,
                        encode_text(Attr.REPLY_MESSAGE, message) + attributes)


def access_reject(request: Packet, nas_secret: bytes, message: str = "") -> bytes:
    return encode_reply(Code.ACCESS_REJECT, request, nas_secret,
                        encode_text(Attr.REPLY_MESSAGE, message))


def access_challenge(request: Packet, nas_secret: bytes, state: bytes, message: str,
                     attributes: bytes = b"") -> bytes:
    return encode_reply(Code.ACCESS_CHALLENGE, request, nas_secret,
                        encode_attribute(Attr.STATE, state)
                        + encode_text(Attr.REPLY_MESSAGE, message) + attributes)


def status_server_reply(request: Packet, nas_secret: bytes, *, accounting: bool = False) -> bytes:
    """RFC 5997 §3: Access-Accept on the auth port, Accounting-Response on the other."""
    code = Code.ACCOUNTING_RESPONSE if accounting else Code.ACCESS_ACCEPT
    return encode_reply(code, request, nas_secret)


def accounting_response(request: Packet, nas_secret: bytes) -> bytes:
    """RFC 2866 §4.2; no Message-Authenticator (the Response Authenticator signs it)."""
    return encode_reply(Code.ACCOUNTING_RESPONSE, request, nas_secret, message_authenticator=False)


# --- the dictionary -------------------------------------------------------


# Vendor-Specific is left out: pyrad handles 26 itself and skips its "vsa" type.
_DICTIONARY_NAMES = {
    Attr.USER_NAME: "User-Name", Attr.USER_PASSWORD: "User-Password",
    Attr.CHAP_PASSWORD: "CHAP-Password", Attr.REPLY_MESSAGE: "Reply-Message",
    Attr.STATE: "State", Attr.PROXY_STATE: "Proxy-State",
    Attr.ACCT_STATUS_TYPE: "Acct-Status-Type", Attr.ACCT_SESSION_ID: "Acct-Session-Id",
    Attr.EAP_MESSAGE: "EAP-Message", Attr.MESSAGE_AUTHENTICATOR: "Message-Authenticator",
}


def load_dictionary(path: str | None = None) -> Dictionary:
    """A dictionary file (by default the shipped one), checked by :func:`check_dictionary`.

    The shipped one is a resource of the installed package, read by path (as_file)
    so that an ``$INCLUDE`` in it is relative to its folder, as pyrad does for files."""
    if path is None:
        with as_file(SHIPPED_DICTIONARY) as shipped:
            dictionary = Dictionary(str(shipped))
    else:
        dictionary = Dictionary(path)
    check_dictionary(dictionary)
    return dictionary


def check_dictionary(dictionary: Dictionary) -> None:
    """Raise ValueError if the dictionary numbers our fixed attributes otherwise."""
    for code, name in _DICTIONARY_NAMES.items():
        if name in dictionary and dictionary[name].code != code:
            raise ValueError(f"RADIUS dictionary: {name} is {dictionary[name].code}, "
                             f"RFC says {code}")


def encode_named(dictionary: Dictionary, pairs: Iterable[tuple[str, Any]]) -> bytes:
    """Encode attributes named in the dictionary, through pyrad.

    Types, VALUE names (``Service-Type = "Administrative-User"``), tags
    (``Tunnel-Type:1``), vendor attributes and lists of values all work as
    in pyrad.  Raises ValueError naming the attribute when it is unknown,
    reserved to the proxy, encrypted or its value does not fit its type.
    """
    out = []
    for name, value in pairs:
        base = name.partition(":")[0]
        if base not in dictionary:
            raise ValueError(f"{name}: not in the RADIUS dictionary")
        attr = dictionary[base]
        if attr.encrypt:
            raise ValueError(f"{name}: an encrypted attribute cannot be configured")
        if not attr.vendor and attr.code in RESERVED_REPLY_ATTRIBUTES:
            raise ValueError(f"{name}: written by the proxy itself")
        out.append(_encode_one(dictionary, name, value))
    return b"".join(out)


def _encode_one(dictionary: Dictionary, name: str, value: Any) -> bytes:
    holder = PyradPacket(code=Code.ACCESS_ACCEPT, id=0, secret=b"",
                         authenticator=ZERO_AUTHENTICATOR, dict=dictionary)
    try:
        holder.AddAttribute(name, list(value) if isinstance(value, (list, tuple)) else value)
        return bytes(holder.ReplyPacket()[HEADER_LENGTH:])
    except (TypeError, ValueError, KeyError, OverflowError, struct.error) as exc:
        raise ValueError(f"{name} = {value!r}: {exc}") from None
