"""Recovery codes: single-use stand-ins for a TOTP code (a lost phone, a flat battery).

A code is 10 characters of Crockford's base32 alphabet (digits and lower-case
letters without i, l, o, u), printed in groups as ``abcd-efgh-jk``: 50 random
bits, and guesses at them count in the failure counter like wrong codes. Each
has at least one letter and is longer than any TOTP code, so it never reads
as one. Only a keyed hash is stored (HMAC-SHA-256 under a key derived from
the state's key file, bound to the user): a copy of the database holds none.

How one is read:

- **alone** (a RADIUS challenge answer, OpenVPN's static-challenge code, the
  portal's code field): case, spaces and hyphens do not matter, and ``o``,
  ``i``, ``l`` read as ``0``, ``1``, ``1`` (Crockford's rule);
- **at the end of the password field** (append mode, LDAP binds): only in its
  printed form, ``xxxx-xxxx-xx``, after the separator (``password,abcd-efgh-jk``)
  or, with ``separator = ""``, as the field's last 12 characters -- as a TOTP
  code there must be exactly ``digits`` digits, so a password is read one way.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
LENGTH = 10  # characters, 50 bits
COUNT = 10  # codes per `user recovery-codes`
GROUPS = (4, 4, 2)
PRINTED_LENGTH = LENGTH + len(GROUPS) - 1  # with the hyphens: 12

_CONFUSABLE = str.maketrans({"o": "0", "i": "1", "l": "1"})
_TYPED = "[0-9a-tv-z]"  # the alphabet, and o, i, l (they read as digits)
_PRINTED = re.compile("-".join(f"{_TYPED}{{{n}}}" for n in GROUPS), re.IGNORECASE)
_IGNORED = re.compile(r"[\s-]+")
_VALID = frozenset(ALPHABET)
_LETTERS = frozenset(ALPHABET[10:])


def new_codes(count: int = COUNT) -> list[str]:
    """``count`` new codes, distinct, in their printed form."""
    codes: list[str] = []
    while len(codes) < count:
        raw = "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))
        if _LETTERS.isdisjoint(raw) or raw in codes:
            continue  # all digits (one in ~100,000): never a code
        codes.append(printed(raw))
    return codes


def printed(code: str) -> str:
    """``abcdefghjk`` as ``abcd-efgh-jk``."""
    parts, at = [], 0
    for n in GROUPS:
        parts.append(code[at:at + n])
        at += n
    return "-".join(parts)


def normalize(typed: str) -> str | None:
    """The code a person typed, as stored (10 characters, no hyphens), or None
    when it cannot be a recovery code (then it is read as a TOTP code)."""
    text = _IGNORED.sub("", typed).lower().translate(_CONFUSABLE)
    if len(text) != LENGTH or not text.isascii() or not _VALID.issuperset(text):
        return None
    if _LETTERS.isdisjoint(text):
        return None
    return text


def is_printed(text: str) -> bool:
    """``text`` is a recovery code in its printed form (the end of a password field)."""
    return len(text) == PRINTED_LENGTH and _PRINTED.fullmatch(text) is not None \
        and normalize(text) is not None


def digest(key: bytes, username: str, code: str) -> bytes:
    """What is stored for ``code`` (normalised) of ``username``."""
    return hmac.new(key, f"{username}\x00{code}".encode(), hashlib.sha256).digest()


# The sub-key of the key file for the hashes (policy.keys.KeyRing.derive).
KEY_PURPOSE = b"recovery-codes"
