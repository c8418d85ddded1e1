"""RFC 4515 filter templates, compiled once to BER.

A filter such as ``(&(objectClass=person)(uid={username}))`` is parsed once;
only the assertion values that hold a placeholder are encoded per request,
and the username goes in as the raw bytes of an assertion value, so it can
never become filter syntax (the BER form of RFC 4515 escaping). A filter with
one placeholder is pre-encoded around it (:class:`Slot`): per request only
the lengths are computed. :class:`backends.ldapwire.messages.SearchTemplate`
puts a compiled filter in a whole search request the same way; the config
checks (:mod:`backends.ldap_common`) use the parser to validate templates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from backends.ldapwire.ber import OCTET_STRING, SEQUENCE, encode_length, tlv


class FilterTemplateError(ValueError):
    """A filter template that is not an RFC 4515 filter."""


class _Node:
    """A filter element; static elements are encoded once at compile time."""

    static: bytes | None = None

    def encode(self, values: Mapping[str, bytes]) -> bytes:
        raise NotImplementedError


class _Static(_Node):
    def __init__(self, encoded: bytes) -> None:
        self.static = encoded

    def encode(self, values: Mapping[str, bytes]) -> bytes:
        assert self.static is not None
        return self.static


class _Value(_Node):
    """An assertion value with placeholders: literal bytes and names, in order."""

    def __init__(self, tag: int, pieces: list[bytes | str]) -> None:
        self.tag = tag
        self.pieces = pieces

    def encode(self, values: Mapping[str, bytes]) -> bytes:
        return tlv(self.tag, b"".join(p if isinstance(p, bytes) else values[p]
                                      for p in self.pieces))


class _Constructed(_Node):
    def __init__(self, tag: int, children: list[_Node]) -> None:
        self.tag = tag
        self.children = children

    def encode(self, values: Mapping[str, bytes]) -> bytes:
        return tlv(self.tag, b"".join(c.encode(values) for c in self.children))


def _constructed(tag: int, children: list[_Node]) -> _Node:
    """Collapse to pre-encoded bytes when nothing below depends on a placeholder."""
    if all(c.static is not None for c in children):
        return _Static(tlv(tag, b"".join(c.static or b"" for c in children)))
    return _Constructed(tag, children)


class Slot:
    """Where the only placeholder of a template sits, with everything around it encoded.

    ``levels`` run from the outermost element in: (tag, bytes before, bytes after)
    the element holding the placeholder, ending with the one holding its value.
    Only the lengths depend on the value, so an encode is a few length headers
    and one join instead of a walk over the tree.
    """

    def __init__(self, name: str, levels: list[tuple[int, bytes, bytes]]) -> None:
        self.name = name
        self.levels = levels
        self._inner_first = [(tag, before, len(before) + len(after))
                             for tag, before, after in reversed(levels)]
        self._suffix = b"".join(after for _tag, _before, after in reversed(levels))

    def inside(self, tag: int, before: bytes, after: bytes) -> Slot:
        """The same slot, inside one more element (``tag`` wraps everything)."""
        return Slot(self.name, [(tag, before, after), *self.levels])

    def encode(self, value: bytes) -> bytes:
        heads: list[bytes] = []
        size = len(value)
        for tag, before, static_size in self._inner_first:
            size += static_size
            head = bytes((tag, size)) if size < 0x80 else bytes((tag,)) + encode_length(size)
            heads.append(head + before)
            size += len(head)
        heads.reverse()
        heads.append(value)
        heads.append(self._suffix)
        return b"".join(heads)


def _slot_of(node: _Node) -> Slot | None:
    """The slot of a filter with exactly one placeholder occurrence, else None."""
    if isinstance(node, _Value):
        names = [i for i, piece in enumerate(node.pieces) if isinstance(piece, str)]
        if len(names) != 1:
            return None
        at = names[0]
        name = node.pieces[at]
        assert isinstance(name, str)
        return Slot(name, [(node.tag, _literal(node.pieces[:at]), _literal(node.pieces[at + 1:]))])
    if isinstance(node, _Constructed):
        dynamic = [i for i, child in enumerate(node.children) if child.static is None]
        inner = _slot_of(node.children[dynamic[0]]) if len(dynamic) == 1 else None
        if inner is None:
            return None
        at = dynamic[0]
        return inner.inside(node.tag, b"".join(c.static or b"" for c in node.children[:at]),
                            b"".join(c.static or b"" for c in node.children[at + 1:]))
    return None


def _literal(pieces: list[bytes | str]) -> bytes:
    return b"".join(p for p in pieces if isinstance(p, bytes))


@dataclass(frozen=True)
class CompiledFilter:
    """A filter template parsed once; ``encode`` substitutes raw placeholder values."""

    template: str
    root: _Node
    placeholders: frozenset[str]
    slot: Slot | None = None  # the fast encoding, when one placeholder occurs once

    def encode(self, **values: str) -> bytes:
        if self.slot is not None:
            return self.slot.encode(values[self.slot.name].encode("utf-8"))
        return self.root.encode({k: v.encode("utf-8") for k, v in values.items()})


def compile_filter(template: str, placeholders: Sequence[str] = ("username",)) -> CompiledFilter:
    """Parse an RFC 4515 filter whose values may hold ``{name}`` placeholders."""
    parser = _FilterParser(template.strip(), frozenset(placeholders))
    root = parser.filter()
    if parser.pos != len(parser.text):
        raise FilterTemplateError(f"unexpected text after the filter at {parser.pos}")
    return CompiledFilter(template, root, frozenset(parser.used), _slot_of(root))


class _FilterParser:
    def __init__(self, text: str, placeholders: frozenset[str]) -> None:
        self.text = text
        self.pos = 0
        self.placeholders = placeholders
        self.used: set[str] = set()

    def filter(self) -> _Node:
        self._expect("(")
        char = self._peek()
        if char in "&|":
            self.pos += 1
            node = self._list(0xA0 if char == "&" else 0xA1)
        elif char == "!":
            self.pos += 1
            node = _constructed(0xA2, [self.filter()])
        else:
            node = self._item()
        self._expect(")")
        return node

    def _list(self, tag: int) -> _Node:
        children = []
        while self._peek() == "(":
            children.append(self.filter())
        if not children:
            raise FilterTemplateError("empty & or | filter")
        return _constructed(tag, children)

    def _item(self) -> _Node:
        end = self.text.find(")", self.pos)
        if end < 0:
            raise FilterTemplateError("unterminated filter item")
        item = self.text[self.pos : end]
        self.pos = end
        if ":=" in item:
            return self._extensible(item)
        for operator, tag in (("~=", 0xA8), (">=", 0xA5), ("<=", 0xA6)):
            if operator in item:
                attribute, value = item.split(operator, 1)
                return self._assertion(tag, attribute, value)
        attribute, equals, value = item.partition("=")
        if not equals:
            raise FilterTemplateError(f"no operator in {item!r}")
        if value == "*":
            return _Static(tlv(0x87, self._attribute(attribute)))
        if "*" in value:
            return self._substrings(attribute, value)
        return self._assertion(0xA3, attribute, value)

    def _assertion(self, tag: int, attribute: str, value: str) -> _Node:
        return _constructed(tag, [_Static(tlv(OCTET_STRING, self._attribute(attribute))),
                                  self._value(OCTET_STRING, value)])

    def _substrings(self, attribute: str, value: str) -> _Node:
        parts = value.split("*")
        pieces: list[_Node] = []
        for index, part in enumerate(parts):
            if not part:
                continue
            tag = 0x80 if index == 0 else 0x82 if index == len(parts) - 1 else 0x81
            pieces.append(self._value(tag, part))
        return _constructed(0xA4, [_Static(tlv(OCTET_STRING, self._attribute(attribute))),
                                   _constructed(SEQUENCE, pieces)])

    def _extensible(self, item: str) -> _Node:
        left, value = item.split(":=", 1)
        parts = left.split(":")
        attribute, options = parts[0], parts[1:]
        children: list[_Node] = []
        rule = next((o for o in options if o.lower() != "dn"), None)
        if rule:
            children.append(_Static(tlv(0x81, rule.encode())))
        if attribute:
            children.append(_Static(tlv(0x82, self._attribute(attribute))))
        children.append(self._value(0x83, value))
        if any(o.lower() == "dn" for o in options):
            children.append(_Static(tlv(0x84, b"\xff")))
        return _constructed(0xA9, children)

    def _attribute(self, name: str) -> bytes:
        if not name or not all(c.isalnum() or c in "-.;" for c in name):
            raise FilterTemplateError(f"bad attribute description {name!r}")
        return name.encode()

    def _value(self, tag: int, value: str) -> _Node:
        pieces: list[bytes | str] = []
        rest = value
        while rest:
            start = rest.find("{")
            end = rest.find("}", start)
            name = rest[start + 1 : end] if start >= 0 and end > start else None
            if name not in self.placeholders:
                pieces.append(_unescape(rest))
                break
            assert name is not None
            if start:
                pieces.append(_unescape(rest[:start]))
            pieces.append(name)
            self.used.add(name)
            rest = rest[end + 1 :]
        if all(isinstance(p, bytes) for p in pieces):
            return _Static(tlv(tag, b"".join(p for p in pieces if isinstance(p, bytes))))
        return _Value(tag, pieces)

    def _peek(self) -> str:
        if self.pos >= len(self.text):
            raise FilterTemplateError("filter ends too early")
        return self.text[self.pos]

    def _expect(self, char: str) -> None:
        if self._peek() != char:
            raise FilterTemplateError(f"expected {char!r} at {self.pos}")
        self.pos += 1


def _unescape(value: str) -> bytes:
    r"""RFC 4515 value: ``\XX`` is one byte; everything else is UTF-8 text."""
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == "\\":
            pair = value[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
                raise FilterTemplateError(f"bad escape in {value!r}")
            out.append(int(pair, 16))
            i += 3
        else:
            out += value[i].encode()
            i += 1
    return bytes(out)
