"""TOTP (RFC 6238) codes, windows and replay, on top of pyotp.

A code is matched to the time step it was made for; the store remembers the
last accepted step per user, and a code for that step or an earlier one is a
replay (RFC 6238 §5.2: "the verifier MUST NOT accept the second attempt").
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import pyotp


class NotATotpKey(ValueError):
    pass


@dataclass(frozen=True)
class TotpParams:
    digits: int = 6
    period: int = 30
    window: int = 1

    def step_at(self, now: float) -> int:
        return int(now // self.period)


def new_totp_key() -> str:
    """A 160-bit key (RFC 4226 §4 recommends 160), base32 without padding."""
    return base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")


# RFC 4226 §4 (R6): "The length of the shared secret MUST be at least 128 bits";
# pyotp refuses shorter ones too. Keys made here are 160 bits.
MIN_KEY_BYTES = 16


def normalize_totp_key(raw: str) -> str:
    """Accept what people paste (spaces, lower case, padding); refuse what is no key
    or a key under 128 bits."""
    s = "".join(raw.split()).upper().rstrip("=")
    if not s:
        raise NotATotpKey("empty secret")
    try:
        key = base64.b32decode(s + "=" * (-len(s) % 8))
    except (binascii.Error, ValueError):
        raise NotATotpKey("not base32") from None
    if len(key) < MIN_KEY_BYTES:
        raise NotATotpKey(f"shorter than 128 bits ({len(key) * 8} given; RFC 4226 §4: at "
                          "least 128, 160 recommended)")
    return s


def code_for_step(totp_key: str, step: int, params: TotpParams) -> str:
    return pyotp.TOTP(totp_key, digits=params.digits, interval=params.period).generate_otp(step)


_BASE32_AS_DIGITS = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567",
                                  "0123456789abcdefghijklmnopqrstuv")
_BASE32_TEXT = re.compile("[A-Z2-7]*")


def decode_key(totp_key: str) -> bytes:
    """RFC 4648 base32 (any case, padding optional) to the key's bytes.

    Per request: ``base64.b32decode`` is pure Python and cost ~17 µs, a tenth
    of a decision; read as one base-32 number (``int(..., 32)``) it is ~1 µs.
    """
    text = totp_key.upper().rstrip("=")
    bits = len(text) * 5
    # 1, 3 or 6 characters past a full 8-character group encode no whole byte.
    if not _BASE32_TEXT.fullmatch(text) or bits % 8 >= 5:
        raise binascii.Error("not base32")
    size = bits // 8
    value = int(text.translate(_BASE32_AS_DIGITS), 32) if text else 0
    return (value >> (bits - size * 8)).to_bytes(size, "big")


def _hotp(key: bytes, counter: int, digits: int) -> str:
    """RFC 4226 §5.3 (HMAC-SHA-1, dynamic truncation); the key decoded once per
    request rather than once per candidate step."""
    mac = hmac.digest(key, counter.to_bytes(8, "big"), "sha1")
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def match_step(totp_key: str, code: str, now: float, params: TotpParams) -> int | None:
    """The time step (within the window) this code belongs to, or None.

    Every candidate is compared in constant time; a wrong code is compared
    with all of them, so its timing says nothing. A right code stops at its
    step: which step matched is all its timing tells, and only to someone
    who already holds a valid code.
    """
    # isascii(): str.isdigit() accepts other scripts' digits, which
    # hmac.compare_digest refuses (TypeError) — such a code is just wrong.
    if len(code) != params.digits or not (code.isascii() and code.isdigit()):
        return None
    key = decode_key(totp_key)
    current = params.step_at(now)
    # Newest first: when two steps give the same code, take the later one so the
    # replay marker moves as far as it can.
    for step in range(current + params.window, current - params.window - 1, -1):
        if hmac.compare_digest(_hotp(key, step, params.digits), code):
            return step
    return None


def provisioning_uri(totp_key: str, account: str, issuer: str, params: TotpParams) -> str:
    """otpauth:// URI (Google Authenticator key URI format)."""
    label = quote(f"{issuer}:{account}", safe="@:")
    query = urlencode({"secret": totp_key, "issuer": issuer, "algorithm": "SHA1",
                       "digits": params.digits, "period": params.period}, quote_via=quote)
    return f"otpauth://totp/{label}?{query}"
