"""OpenVPN's static challenge (``static-challenge`` in the client config).

The client sends the password field as ``SCRV1:<base64 password>:<base64
response>``; the response is the code the user typed at the second prompt.
"""

from __future__ import annotations

import base64
import binascii

PREFIX = "SCRV1:"


def parse_static_challenge(field: str) -> tuple[str, str] | None:
    """(password, code) from an SCRV1 field; None when it is not one.

    Anything malformed is None, so it is checked as a plain password: a
    password that happens to start with ``SCRV1:`` still works.
    """
    if not field.startswith(PREFIX):
        return None
    parts = field.split(":")
    if len(parts) != 3:
        return None
    try:
        password = base64.b64decode(parts[1], validate=True).decode("utf-8")
        code = base64.b64decode(parts[2], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password, code.strip()
