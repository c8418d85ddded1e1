"""The BER primitives LDAP needs (X.690 subset, RFC 4511 §5.1), written once.

Definite lengths only (RFC 4511 forbids the indefinite form) and single-byte
tags (LDAP uses no others). Readers work in place: they take a buffer and
the bounds of the element to read and return offsets, never slices, so a
message is decoded where it lies. Every reader raises :class:`BerError`, and
nothing else, on input it cannot read.
"""

from __future__ import annotations

# Universal tags.
BOOLEAN, INTEGER, OCTET_STRING, ENUMERATED, SEQUENCE, SET = 0x01, 0x02, 0x04, 0x0A, 0x30, 0x31


class BerError(ValueError):
    """Input that is not well-formed BER for LDAP (or is too large)."""

    def __init__(self, message: str, *, oversize: bool = False) -> None:
        super().__init__(message)
        self.oversize = oversize


# ---------------------------------------------------------------- reading
#
# read_header and expect handle the short length form (nearly every element
# LDAP sends) inline and leave anything else, errors included, to the full
# readers below: about half the work per element, with the same results and
# the same errors.


def read_header(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """The TLV at ``pos``: (tag, content start, content end), all within ``end``."""
    if pos + 2 <= end:
        tag, size = buf[pos], buf[pos + 1]
        if size < 0x80 and pos + 2 + size <= end and tag & 0x1F != 0x1F:
            return tag, pos + 2, pos + 2 + size
    return _read_any_header(buf, pos, end)


def expect(buf: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    """Content (start, end) of the element at ``pos``, which must have ``tag``."""
    if pos + 2 <= end and buf[pos] == tag:
        size = buf[pos + 1]
        if size < 0x80 and pos + 2 + size <= end:
            return pos + 2, pos + 2 + size
    found, start, stop = _read_any_header(buf, pos, end)
    if found != tag:
        raise BerError(f"expected tag {tag:#04x}, found {found:#04x}")
    return start, stop


def _read_any_header(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    if pos + 2 > end:
        raise BerError("truncated element")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise BerError("multi-byte tag")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise BerError("unsupported length form")
        if pos + count > end:
            raise BerError("truncated length")
        length = int.from_bytes(buf[pos : pos + count], "big")
        pos += count
    if pos + length > end:
        raise BerError("element overruns its container")
    return tag, pos, pos + length


def read_integer(buf: bytes, start: int, stop: int) -> int:
    if not 0 < stop - start <= 4:
        raise BerError("integer of unsupported size")
    return int.from_bytes(buf[start:stop], "big", signed=True)


# ---------------------------------------------------------------- writing


def encode_length(size: int) -> bytes:
    if size < 0x80:
        return bytes((size,))
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:  # nearly everything LDAP writes
        return bytes((tag, size)) + content
    return bytes((tag,)) + encode_length(size) + content


def integer(value: int, tag: int = INTEGER) -> bytes:
    size = max(1, (value.bit_length() + 8) // 8)  # room for the sign bit
    return tlv(tag, value.to_bytes(size, "big", signed=True))


def boolean(value: bool) -> bytes:
    return tlv(BOOLEAN, b"\xff" if value else b"\x00")
