"""OpenVPN static challenge: SCRV1:<base64 password>:<base64 response>."""

from __future__ import annotations

import base64

import pytest

from proxy.radius.openvpn import parse_static_challenge


def scrv1(password: str, code: str) -> str:
    b64 = base64.b64encode
    return f"SCRV1:{b64(password.encode()).decode()}:{b64(code.encode()).decode()}"


def test_password_and_code_are_decoded() -> None:
    assert parse_static_challenge(scrv1("s3cret", "123456")) == ("s3cret", "123456")


def test_colons_and_non_ascii_in_the_password_survive() -> None:
    assert parse_static_challenge(scrv1("a:b:ç", "654321")) == ("a:b:ç", "654321")


def test_empty_response() -> None:
    assert parse_static_challenge(scrv1("pw", "")) == ("pw", "")


def test_whitespace_around_the_code_is_dropped() -> None:
    assert parse_static_challenge(scrv1("pw", " 123456\n")) == ("pw", "123456")


@pytest.mark.parametrize("field", [
    "plain-password",
    "SCRV1:",
    "SCRV1:cHc=",  # no response part
    "SCRV1:cHc=:MTIz:extra",
    "SCRV1:not base64!:MTIz",
    "SCRV1:cHc:MTIz",  # bad padding
    "SCRV1:" + base64.b64encode(b"\xff\xfe").decode() + ":MTIz",  # not UTF-8
    "scrv1:cHc=:MTIz",  # the prefix is case-sensitive
])
def test_malformed_is_a_plain_password(field: str) -> None:
    assert parse_static_challenge(field) is None
