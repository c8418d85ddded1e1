"""TOTP codes (RFC 6238 known answers), windows, secrets and otpauth:// URIs."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.totp import (
    NotATotpKey,
    TotpParams,
    code_for_step,
    decode_key,
    match_step,
    new_totp_key,
    normalize_totp_key,
    provisioning_uri,
)

# RFC 6238 Appendix B: the SHA-1 seed is the ASCII string "12345678901234567890".
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()
RFC_PARAMS = TotpParams(digits=8, period=30, window=1)
RFC_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
K128 = "JBSWY3DPEHPK3PXPJBSWY3DPEH"  # 26 base32 characters: 16 bytes
PARAMS = TotpParams(digits=6, period=30, window=1)
T0 = 1_700_000_010.0  # 10 s into a time step


def test_rfc_secret_is_the_ascii_seed() -> None:
    assert RFC_SECRET == "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"


@pytest.mark.parametrize(("t", "code"), RFC_VECTORS)
def test_rfc6238_appendix_b_sha1_code_for_step(t: int, code: str) -> None:
    assert code_for_step(RFC_SECRET, t // 30, RFC_PARAMS) == code


@pytest.mark.parametrize(("t", "code"), RFC_VECTORS)
def test_rfc6238_appendix_b_sha1_match_step(t: int, code: str) -> None:
    assert match_step(RFC_SECRET, code, t, RFC_PARAMS) == t // 30


@pytest.mark.parametrize(("t", "code"), RFC_VECTORS)
def test_rfc6238_vector_refused_far_from_its_time(t: int, code: str) -> None:
    assert match_step(RFC_SECRET, code, t + 10 * 30, RFC_PARAMS) is None


def test_six_digit_code_is_the_low_digits_of_the_eight_digit_one() -> None:
    # RFC 4226 truncation: the 6-digit code is the 8-digit value mod 10^6.
    six = TotpParams(digits=6, period=30)
    for t, code in RFC_VECTORS:
        assert code_for_step(RFC_SECRET, t // 30, six) == code[-6:]


def test_step_at() -> None:
    p = TotpParams(period=30)
    assert p.step_at(0) == 0
    assert p.step_at(29.999) == 0
    assert p.step_at(30) == 1
    assert p.step_at(59) == 1


@pytest.mark.parametrize("window", [0, 1, 2, 3])
def test_window_edges(window: int) -> None:
    params = TotpParams(digits=6, period=30, window=window)
    now_step = params.step_at(T0)
    for offset in range(-window, window + 1):
        code = code_for_step(SECRET, now_step + offset, params)
        assert match_step(SECRET, code, T0, params) == now_step + offset, offset
    for offset in (-window - 1, window + 1, -window - 2, window + 2):
        code = code_for_step(SECRET, now_step + offset, params)
        # A code from outside the window must not match (unless by coincidence the
        # same six digits belong to a step inside it; not the case for this key).
        assert match_step(SECRET, code, T0, params) is None, offset


def test_window_follows_the_step_boundary() -> None:
    """At the last instant of step s, the next step s+1 is in the window; one
    second later s-1 has dropped out."""
    params = TotpParams(digits=6, period=30, window=1)
    s = params.step_at(T0)
    end_of_s = (s + 1) * 30 - 0.001
    old = code_for_step(SECRET, s - 1, params)
    assert match_step(SECRET, old, end_of_s, params) == s - 1
    assert match_step(SECRET, old, end_of_s + 0.002, params) is None


@pytest.mark.parametrize("code", ["", "12345", "1234567", "abcdef", "12345a", " 123456",
                                  "١٢٣٤٥٦", "-12345"])
def test_malformed_codes_never_match(code: str) -> None:
    assert match_step(SECRET, code, T0, PARAMS) is None


def test_code_for_step_matches_pyotp_now() -> None:
    totp = pyotp.TOTP(SECRET)
    assert code_for_step(SECRET, PARAMS.step_at(T0), PARAMS) == totp.at(int(T0))


def test_new_secret_is_160_bits_of_base32_and_random() -> None:
    secrets = {new_totp_key() for _ in range(50)}
    assert len(secrets) == 50
    for s in secrets:
        assert len(base64.b32decode(s + "=" * (-len(s) % 8))) == 20
        assert normalize_totp_key(s) == s


@pytest.mark.parametrize(("raw", "clean"), [
    ("JBSW Y3DP EHPK 3PXP JBSW Y3DP EH", K128),
    (K128.lower(), K128),
    (K128 + "======", K128),
    ("  " + K128[:8].lower() + "\t" + K128[8:].lower() + "\n", K128),
])
def test_normalize_secret_accepts_what_people_paste(raw: str, clean: str) -> None:
    assert normalize_totp_key(raw) == clean


@pytest.mark.parametrize("raw", ["", "   ", "not base32!", "JBSWY3DP1", "AAAA", "JBSWY3DP",
                                 "JBSWY3DPEHPK3PXP", K128[:-2]])
def test_normalize_secret_refuses_non_keys(raw: str) -> None:
    with pytest.raises(NotATotpKey):
        normalize_totp_key(raw)


def test_keys_under_128_bits_are_refused_saying_so() -> None:
    """RFC 4226 §4: at least 128 bits; the old floor (80) let pyotp-refused keys in."""
    with pytest.raises(NotATotpKey) as e:
        normalize_totp_key("JBSWY3DPEHPK3PXP")  # 80 bits
    assert str(e.value) == ("shorter than 128 bits (80 given; RFC 4226 §4: at least 128, "
                            "160 recommended)")
    assert len(base64.b32decode(K128 + "======")) == 16
    assert normalize_totp_key(K128) == K128


def test_provisioning_uri_has_issuer_account_and_parameters() -> None:
    uri = provisioning_uri(SECRET, "alice", "Example Corp", PARAMS)
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth"
    assert parts.netloc == "totp"
    assert unquote(parts.path) == "/Example Corp:alice"
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert q == {"secret": SECRET, "issuer": "Example Corp", "algorithm": "SHA1",
                 "digits": "6", "period": "30"}


def test_provisioning_uri_round_trips_through_pyotp() -> None:
    params = TotpParams(digits=8, period=60)
    uri = provisioning_uri(SECRET, "bob@example.org", "ACME & Co", params)
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert parsed.name == "bob@example.org"
    assert parsed.issuer == "ACME & Co"
    assert parsed.digits == 8 and parsed.interval == 60
    assert parsed.at(int(T0)) == code_for_step(SECRET, params.step_at(T0), params)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=40), st.booleans(), st.booleans())
def test_decode_key_agrees_with_b32decode(key: bytes, lower: bool, padded: bool) -> None:
    text = base64.b32encode(key).decode()
    text = text if padded else text.rstrip("=")
    assert decode_key(text.lower() if lower else text) == key


@pytest.mark.parametrize("text", ["A", "ABC", "ABCDEF", "ABCDEFGHA", "AB1C", "AB8C", "AB C",
                                  "ÄBCD", "AB=CD"])
def test_decode_key_refuses_what_b32decode_refuses(text: str) -> None:
    with pytest.raises(ValueError):  # binascii.Error, a ValueError, for most
        base64.b32decode(text + "=" * (-len(text) % 8))
    with pytest.raises(ValueError):
        decode_key(text)
