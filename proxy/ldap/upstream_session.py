"""The proxy's own session with the directory, for one client connection: pure
bookkeeping, no sockets (the bytes travel over :mod:`proxy.ldap.upstream`).

It knows three things the client session must never guess at:

- whether the connection is usable (:class:`Link`), and when a down one may be
  tried again (at most every ``RECONNECT_BACKOFF`` seconds, so a dead directory
  costs each request one refused connect, not a storm);
- which of the directory's responses answers the proxy's own bind — the user's
  bind as the resolved entry, a relayed exempt/anonymous/SASL bind, or the
  anonymous reset (invariant 3 of :mod:`proxy.ldap.session`);
- as whom the session may be bound (:class:`Bound`, invariant 4).
"""

from __future__ import annotations

import enum

from backends.ldapwire.ber import BerError
from backends.ldapwire.messages import (
    BIND_RESPONSE,
    LdapResult,
    ResultCode,
    decode_result,
    encode_bind_request,
)

RECONNECT_BACKOFF = 1.0  # seconds between attempts to reach a down upstream, per connection


class Link(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    DOWN = "down"  # never became ready, or was lost; a later request may try again


class Bound(enum.Enum):
    """As whom the upstream session may be bound."""

    ANONYMOUS = "anonymous"  # nothing was bound on it, or the last anonymous bind succeeded
    MAYBE = "maybe"  # a bind was sent and no anonymous bind has succeeded since
    UNKNOWN = "unknown"  # a bind of ours was abandoned (timed out): never trusted again


class OwnBind:
    """The proxy's bind in flight: only a BindResponse with its ID answers it."""

    __slots__ = ("anonymous", "message_id")

    def __init__(self, message_id: int, anonymous: bool) -> None:
        self.message_id = message_id
        self.anonymous = anonymous  # its success leaves the session anonymous


class UpstreamSession:
    __slots__ = ("bound", "link", "notice_relayed", "own", "_failed_at")

    EXPECT = BIND_RESPONSE  # the only response type that answers an own bind

    def __init__(self) -> None:
        self.link = Link.CONNECTING
        self.bound = Bound.ANONYMOUS
        self.own: OwnBind | None = None
        self.notice_relayed = False  # the directory's Notice of Disconnection reached the client
        self._failed_at = float("-inf")

    # -------------------------------------------------------- the connection

    @property
    def ready(self) -> bool:
        return self.link is Link.READY

    def connecting(self) -> None:
        """A new connection is being made: a new session, anonymous."""
        self.link = Link.CONNECTING
        if self.bound is not Bound.UNKNOWN:
            self.bound = Bound.ANONYMOUS

    def connected(self) -> None:
        self.link = Link.READY

    def failed(self, now: float) -> None:
        """Not reachable (connect failed), or the connection was lost."""
        self.link = Link.DOWN
        self._failed_at = now
        self.own = None

    def worth_trying(self, now: float) -> bool:
        """Whether a request that needs the directory may (re)connect now; False
        while a failure is younger than the backoff (the request gets 52)."""
        return self.link is not Link.DOWN or now - self._failed_at >= RECONNECT_BACKOFF

    # -------------------------------------------------------- the proxy's own binds

    def relay_bind(self, message_id: int, message: bytes, anonymous: bool) -> bytes:
        """The client's own bind (exempt, anonymous, SASL passthrough), as it is."""
        return self._send(message_id, message, anonymous)

    def bind_as(self, message_id: int, dn: str, password: bytes, controls: bytes) -> bytes:
        """The user's bind, as the entry the core resolved and with the password it checked."""
        return self._send(
            message_id, encode_bind_request(message_id, dn, password, controls), False
        )

    def reset(self, message_id: int) -> bytes:
        """The anonymous bind that makes a possibly bound session anonymous again."""
        return self._send(message_id, encode_bind_request(message_id, "", b""), True)

    def _send(self, message_id: int, message: bytes, anonymous: bool) -> bytes:
        if not self.ready or self.own is not None:
            raise SessionBug(f"own bind {message_id} with the upstream {self.link.value} "
                             f"and {'one' if self.own else 'none'} in flight")
        self.own = OwnBind(message_id, anonymous)
        if self.bound is Bound.ANONYMOUS:
            self.bound = Bound.MAYBE  # invariant 4: until an anonymous bind succeeds
        return message

    def own_answered(self, response: bytes) -> LdapResult | None:
        """The BindResponse to the own bind in flight: its result (None when
        malformed); an anonymous bind that succeeded leaves the session anonymous."""
        own, self.own = self.own, None
        try:
            result = decode_result(response)
        except BerError:
            return None
        if (own is not None and own.anonymous and result.code == ResultCode.SUCCESS
                and self.bound is Bound.MAYBE):
            self.bound = Bound.ANONYMOUS
        return result

    def abandon(self) -> None:
        """The own bind in flight is given up (timed out): its answer may still
        come and change the session, which is therefore never used again."""
        self.own = None
        self.bound = Bound.UNKNOWN


class SessionBug(Exception):
    """A step the session logic must never take (a bug: the connection closes
    with an internal error)."""
