"""Distinguished names, only as far as the front-end needs them (RFC 4514).

One use: whether a DN is one of, or lies under, configured DNs (exempt
service accounts, ``user_base``, bind-cache rules), seeing through the
plain spellings of one DN (ASCII case, spaces, escapes, OIDs for the common
types). Which entry a bind DN names is never decided here: the core asks the
directory, which knows every spelling it accepts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Generic, TypeVar

Rdn = tuple[tuple[str, str], ...]  # ((attribute type, value), ...) of one RDN

_SEPARATORS = ",+;"  # ";" is RFC 1779's old RDN separator; slapd still accepts it
_BAD_TYPE = re.compile(r'[,+;"\\<>=# ]')
# Short names of the OIDs a DN may spell instead (RFC 4519).
_TYPE_ALIASES = {
    "0.9.2342.19200300.100.1.1": "uid",
    "2.5.4.3": "cn",
    "0.9.2342.19200300.100.1.25": "dc",
    "2.5.4.11": "ou",
    "2.5.4.10": "o",
    "1.2.840.113549.1.9.1": "email",
}


def parse_dn(dn: str) -> list[Rdn]:
    """The RDNs of ``dn``, first (leftmost) first; ValueError when it is not a DN.

    Attribute types are lower-cased (and OIDs mapped to their short names);
    values are unescaped but keep their case.
    """
    if dn.isascii() and not _NOT_PLAIN.search(dn):
        return _parse_plain(dn)
    return _parse_any(dn)


# What only the full parser reads: escapes, quotes, multi-valued RDNs, ";".
_NOT_PLAIN = re.compile(r'[\\"+;]')


def _parse_plain(dn: str) -> list[Rdn]:
    """:func:`_parse_any` for an ASCII DN with none of ``\\ " + ;`` (what
    applications send): the same RDNs, by splitting. Every bind of a DN not
    seen lately parses one, so this is the front-end's hot path."""
    rdns: list[Rdn] = []
    if not dn.strip():
        return rdns
    for part in dn.split(","):
        attribute, equals, value = part.partition("=")
        if not equals:
            raise ValueError("attribute without a value")
        attribute = attribute.strip().lower()
        if not attribute or _BAD_TYPE.search(attribute):
            raise ValueError(f"bad attribute type {attribute!r}")
        rdns.append(((_TYPE_ALIASES.get(attribute, attribute), value.strip(" ")),))
    return rdns


def _parse_any(dn: str) -> list[Rdn]:
    rdns: list[Rdn] = []
    if not dn.strip():
        return rdns
    avas: list[tuple[str, str]] = []
    pos = 0
    while True:
        equals = dn.find("=", pos)
        if equals < 0:
            raise ValueError("attribute without a value")
        attribute = dn[pos:equals].strip().lower()
        if not attribute or _BAD_TYPE.search(attribute):
            raise ValueError(f"bad attribute type {attribute!r}")
        value, pos = _read_value(dn, equals + 1)
        avas.append((_TYPE_ALIASES.get(attribute, attribute), value))
        if pos >= len(dn):
            rdns.append(tuple(avas))
            return rdns
        separator = dn[pos]
        pos += 1
        if separator != "+":
            rdns.append(tuple(avas))
            avas = []


def _read_value(dn: str, pos: int) -> tuple[str, int]:
    """An attribute value starting at ``pos``: (unescaped value, separator position)."""
    end = len(dn)
    while pos < end and dn[pos] == " ":
        pos += 1
    if pos < end and dn[pos] == '"':
        return _read_quoted(dn, pos + 1)
    raw = bytearray()
    keep = 0  # length of `raw` up to the last character that is not an unescaped space
    while pos < end and dn[pos] not in _SEPARATORS:
        char = dn[pos]
        if char == "\\":
            decoded, pos = _read_escape(dn, pos + 1)
            raw += decoded
            keep = len(raw)
            continue
        raw += char.encode()
        if char != " ":
            keep = len(raw)
        pos += 1
    try:
        return bytes(raw[:keep]).decode("utf-8"), pos
    except UnicodeDecodeError:
        raise ValueError("escaped value is not UTF-8") from None


def _read_escape(dn: str, pos: int) -> tuple[bytes, int]:
    """After a backslash: two hex digits (one byte) or one escaped character."""
    pair = dn[pos : pos + 2]
    if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
        return bytes.fromhex(pair), pos + 2
    if pos >= len(dn):
        raise ValueError("dangling backslash")
    return dn[pos].encode(), pos + 1


def _read_quoted(dn: str, pos: int) -> tuple[str, int]:
    """A legacy quoted value (RFC 2253 accepted them); returns after the closing quote."""
    out = []
    while pos < len(dn):
        char = dn[pos]
        if char == "\\" and pos + 1 < len(dn):
            out.append(dn[pos + 1])
            pos += 2
            continue
        if char == '"':
            pos += 1
            while pos < len(dn) and dn[pos] == " ":
                pos += 1
            if pos < len(dn) and dn[pos] not in _SEPARATORS:
                raise ValueError("text after a quoted value")
            return "".join(out), pos
        out.append(char)
        pos += 1
    raise ValueError("unterminated quoted value")


@lru_cache(maxsize=4096)
def _parsed(name: str) -> tuple[Rdn, ...] | None:
    """parse_dn, remembered: applications bind with the same DNs over and over."""
    try:
        return tuple(parse_dn(name))
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def normalize_dn(dn: str) -> tuple[Rdn, ...] | None:
    """A comparable form (values with ASCII letters lower-cased, AVAs sorted);
    None when not a DN.

    Remembered like :func:`_parsed`: one bind asks for it three or four times
    (exempt, user_base, bind-cache rules).

    Only ASCII case folds: the directory folds more (Unicode case and
    compatibility forms), so every DN this calls equal is one the directory
    calls equal too, never the reverse. An exempt rule can thus be dodged only
    towards the MFA path (which resolves the entry), never widened onto
    another entry.
    """
    if dn.isascii() and not _NOT_PLAIN.search(dn):
        # What applications send (a new one with every user who binds): one AVA per
        # RDN and ASCII values, so nothing to sort and str.lower is _ascii_lower.
        try:
            return tuple(((t, v.lower()),) for ((t, v),) in _parse_plain(dn))
        except ValueError:
            return None
    rdns = _parsed(dn)
    if rdns is None:
        return None
    return tuple(tuple(sorted((t, _ascii_lower(v)) for t, v in rdn)) for rdn in rdns)


def _ascii_lower(value: str) -> str:
    return value.encode("utf-8", "surrogateescape").lower().decode("utf-8", "surrogateescape")


T = TypeVar("T")


class DnSuffixMap(Generic[T]):
    """Maps DNs and DN suffixes to values; a DN gets the longest match.

    A suffix matches whole RDNs only: ``ou=svc,dc=example,dc=org`` covers
    ``cn=jenkins,ou=svc,dc=example,dc=org`` but not ``ou=xsvc,dc=example,dc=org``.
    Entries that are not DNs (``svc@example.org``, ``EXAMPLE\\svc``: AD bind
    names) match that exact name, case-insensitively.
    """

    def __init__(self, entries: Iterable[tuple[str, T]]) -> None:
        self._by_dn: dict[tuple[Rdn, ...], T] = {}
        self._by_name: dict[str, T] = {}
        for dn, value in entries:
            normal = normalize_dn(dn)
            if normal:
                self._by_dn[normal] = value
            elif dn.strip():
                self._by_name[_ascii_lower(dn.strip())] = value
        self._lengths = sorted({len(k) for k in self._by_dn}, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._by_dn or self._by_name)

    def lookup(self, dn: str) -> T | None:
        if self._by_name:
            found = self._by_name.get(_ascii_lower(dn.strip()))
            if found is not None:
                return found
        if not self._by_dn:
            return None
        normal = normalize_dn(dn)
        if not normal:
            return None
        for length in self._lengths:
            if length <= len(normal):
                found = self._by_dn.get(normal[len(normal) - length :])
                if found is not None:
                    return found
        return None
