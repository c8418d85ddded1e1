"""Helpers for tests and tools: the NAS side of the exchange, and a recorder.

Shipped with the package (like ``twisted.internet.testing``) so that the
unit tests, the end-to-end tests and the benchmark build requests the
same way.  Nothing in the server imports this module.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.radius.events import DropReason
from proxy.radius.packet import (
    HEADER_LENGTH,
    ZERO_AUTHENTICATOR,
    Attr,
    Code,
    encode_attribute,
    hide_user_password,
    hmac_md5,
    md5_digest,
    parse_datagram,
    verify_message_authenticator,
)


def build_request(code: int, identifier: int, nas_secret: bytes,
                  attributes: Sequence[tuple[int, bytes]], *,
                  authenticator: bytes | None = None,
                  message_authenticator: bool = True) -> bytes:
    """An Access-Request or Status-Server as a NAS sends it.

    Values are raw: hide a User-Password with :func:`access_request` or
    :func:`~proxy.radius.packet.hide_user_password` first.  The
    Message-Authenticator goes last, as most NAS put it.
    """
    auth = authenticator if authenticator is not None else os.urandom(16)
    body = b"".join(encode_attribute(t, v) for t, v in attributes)
    if message_authenticator:
        body += encode_attribute(Attr.MESSAGE_AUTHENTICATOR, ZERO_AUTHENTICATOR)
    head = bytes((code, identifier)) + (HEADER_LENGTH + len(body)).to_bytes(2, "big")
    if message_authenticator:
        body = body[:-16] + hmac_md5(nas_secret, head + auth + body)
    return head + auth + body


def access_request(nas_secret: bytes, username: str, password: str | None, *,
                   identifier: int = 1, state: bytes | None = None,
                   extra: Sequence[tuple[int, bytes]] = (),
                   authenticator: bytes | None = None,
                   message_authenticator: bool = True) -> bytes:
    """A PAP Access-Request (``password`` None: no User-Password at all)."""
    auth = authenticator if authenticator is not None else os.urandom(16)
    attributes: list[tuple[int, bytes]] = [(Attr.USER_NAME, username.encode())]
    if password is not None:
        attributes.append((Attr.USER_PASSWORD,
                           hide_user_password(password.encode(), nas_secret, auth)))
    if state is not None:
        attributes.append((Attr.STATE, state))
    attributes.extend(extra)
    return build_request(Code.ACCESS_REQUEST, identifier, nas_secret, attributes,
                         authenticator=auth, message_authenticator=message_authenticator)


def accounting_request(nas_secret: bytes, attributes: Sequence[tuple[int, bytes]], *,
                       identifier: int = 1) -> bytes:
    """An Accounting-Request signed per RFC 2866 §3."""
    body = b"".join(encode_attribute(t, v) for t, v in attributes)
    head = bytes((Code.ACCOUNTING_REQUEST, identifier)) + (
        HEADER_LENGTH + len(body)).to_bytes(2, "big")
    return head + md5_digest(head + ZERO_AUTHENTICATOR + body + nas_secret) + body


def verify_reply(reply: bytes, request: bytes, nas_secret: bytes) -> bool:
    """The checks a NAS makes: Response Authenticator, and the
    Message-Authenticator (required first) for replies to Access-Request
    and Status-Server."""
    parsed = parse_datagram(reply)
    if isinstance(parsed, DropReason) or parsed.identifier != request[1]:
        return False
    request_auth = request[4:20]
    expected = md5_digest(parsed.raw[:4] + request_auth + parsed.raw[HEADER_LENGTH:] + nas_secret)
    if expected != parsed.authenticator:
        return False
    if request[0] not in (Code.ACCESS_REQUEST, Code.STATUS_SERVER):
        return True
    if parsed.message_authenticators != (HEADER_LENGTH + 2,):
        return False
    return verify_message_authenticator(parsed, nas_secret, vector=request_auth)


@dataclass
class RecordingEvents:
    """A :class:`~proxy.radius.events.RadiusEvents` that remembers everything."""

    requests: list[tuple[str, str, str]] = field(default_factory=list)
    drops: Counter[str] = field(default_factory=Counter)
    decisions: list[float] = field(default_factory=list)
    accountings: list[str] = field(default_factory=list)
    retransmissions: list[str] = field(default_factory=list)

    def request(self, client: str, result: str, reason: str) -> None:
        self.requests.append((client, result, reason))

    def dropped(self, reason: str) -> None:
        self.drops[str(reason)] += 1

    def decision_seconds(self, seconds: float) -> None:
        self.decisions.append(seconds)

    def accounting(self, client: str) -> None:
        self.accountings.append(client)

    def retransmission(self, client: str) -> None:
        self.retransmissions.append(client)
