"""Text from the outside made safe for one-line records (log lines, audit rows).

A RADIUS User-Name or an LDAP bind DN is chosen by whoever sends it.  Written
as it came, a newline in it starts a forged log line; an ANSI escape sequence
rewrites an operator's terminal; U+2028 ends a line for some log viewers.
:func:`escape_controls` turns every such character into a visible escape, so
one record stays one line and shows what was sent.
"""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def is_control(char: str) -> bool:
    """Unicode "Other" (Cc, Cf, Cs, Co, Cn: NUL, ESC, DEL, U+0085, bidi overrides,
    lone surrogates, unassigned) or a line/paragraph separator (U+2028, U+2029)."""
    category = unicodedata.category(char)
    return category[0] == "C" or category in ("Zl", "Zp")


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    n = ord(char)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character (see :func:`is_control`) written as
    ``\\n``, ``\\r``, ``\\t``, ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``; every
    other character, backslashes included, is left as it is."""
    # str.isprintable() is False exactly for the categories C* and Z* (but the
    # ASCII space): a C-speed check that lets ordinary text through untouched.
    if text.isprintable():
        return text
    return "".join(_escape(c) if is_control(c) else c for c in text)
