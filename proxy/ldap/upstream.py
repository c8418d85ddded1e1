"""The proxy's connection to the real directory, one per client connection.

It connects (ldap://, optionally upgraded with StartTLS, or ldaps://), says
when it is ready through :attr:`UpstreamConnection.ready`, then hands every
whole LDAPMessage it receives to its owner, the client-side protocol, which
decides what to forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from backends.base import DirectoryUnavailable
from backends.ldapwire.ber import BerError
from backends.ldapwire.connect import OneConnection, client_endpoint
from backends.ldapwire.framing import MessageFramer
from backends.ldapwire.messages import (
    START_TLS_OID,
    UNBIND,
    ResultCode,
    decode_result,
    encode_extended_request,
    ldap_message,
)
from backends.ldapwire.transport import write_now

_START_TLS_MESSAGE_ID = 1  # nothing else is in flight before the upstream is ready
# An UnbindRequest has no response (RFC 4511 §4.3), so its ID is never matched;
# one no client is likely to have used, all the same.
_UNBIND_MESSAGE_ID = 2**31 - 1


class UpstreamFailed(DirectoryUnavailable):
    """The upstream could not be made ready; ``label`` is a bounded metric reason."""

    def __init__(self, label: str, detail: str = "") -> None:
        super().__init__(detail or label)
        self.label = label


@dataclass(frozen=True)
class UpstreamSettings:
    host: str
    port: int
    tls: bool  # ldaps://: TLS from the first byte
    start_tls: bool  # ldap:// upgraded before use
    tls_options: Any  # IOpenSSLClientConnectionCreator (None without TLS)
    connect_timeout: float
    max_message_size: int


class UpstreamOwner(TypingProtocol):
    def upstream_messages(self, messages: list[bytes]) -> None: ...

    def upstream_lost(self, reason: Failure) -> None: ...


@implementer(interfaces.IHandshakeListener)
class UpstreamConnection(Protocol):
    # ITCPTransport, possibly under TLS; zope interfaces do not type-check well.
    transport: Any

    def __init__(self, owner: UpstreamOwner, settings: UpstreamSettings) -> None:
        self.ready: Deferred[None] = Deferred()
        self._owner = owner
        self._settings = settings
        self._framer = MessageFramer(settings.max_message_size)
        self._phase = "connecting"  # → start_tls → handshake → ready | failed
        self.attempt: Deferred[Any] | None = None  # the endpoint's connect

    @property
    def is_ready(self) -> bool:
        return self._phase == "ready"

    def write(self, data: bytes) -> None:
        write_now(self.transport, data)

    def close(self, unbind: bool = True) -> None:
        """The polite end (the client left, the proxy drains): an UnbindRequest
        first when the session is up (unless the client's own went up already),
        so the directory ends it as an unbind rather than a dropped connection."""
        if self.transport is not None:
            if unbind and self._phase == "ready":
                self.write(ldap_message(_UNBIND_MESSAGE_ID, UNBIND))
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    # -------------------------------------------------------- Twisted side

    def connectionMade(self) -> None:
        if self._phase == "failed":  # connected after the timeout gave up
            self.abort()
            return
        if self._settings.start_tls:
            self._phase = "start_tls"
            self.write(encode_extended_request(_START_TLS_MESSAGE_ID, START_TLS_OID))
        elif self._settings.tls:
            self._phase = "handshake"  # ldaps://: ready once the handshake is done
        else:
            self._become_ready()

    def handshakeCompleted(self) -> None:
        if self._phase == "handshake":
            self._become_ready()

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._framer.feed(data)
        except BerError:
            self._fail(UpstreamFailed("malformed_response"))
            return
        if self._phase == "ready":
            if messages:
                self._owner.upstream_messages(messages)
        elif self._phase == "start_tls" and messages:
            self._start_tls_answered(messages[0])

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._phase == "ready":
            self._phase = "closed"
            self._owner.upstream_lost(reason)
        elif self._phase != "failed":
            label = "tls_handshake" if self._phase == "handshake" else "connection_lost"
            self._fail(UpstreamFailed(label, reason.getErrorMessage()))

    # -------------------------------------------------------- setup steps

    def connect_failed(self, reason: Failure) -> None:
        self._fail(UpstreamFailed("connect_failed", reason.getErrorMessage()))

    def give_up(self) -> None:
        """The connect timeout: not ready in time."""
        if self._phase not in ("ready", "failed", "closed"):
            self._fail(UpstreamFailed("connect_timeout"))

    def _start_tls_answered(self, message: bytes) -> None:
        try:
            result = decode_result(message)
        except BerError:
            result = None
        if result is None or result.code != ResultCode.SUCCESS:
            self._fail(UpstreamFailed("start_tls", result.diagnostic if result else ""))
            return
        self._phase = "handshake"
        assert self.transport is not None
        self.transport.startTLS(self._settings.tls_options)

    def _become_ready(self) -> None:
        self._phase = "ready"
        self.ready.callback(None)

    def _fail(self, error: UpstreamFailed) -> None:
        if self._phase in ("failed", "closed"):
            return
        was_ready = self._phase == "ready"
        self._phase = "failed"
        if self.attempt is not None and not self.attempt.called:
            self.attempt.cancel()
        self.abort()
        if was_ready:
            self._owner.upstream_lost(Failure(error))  # type: ignore[no-untyped-call]
        elif not self.ready.called:
            self.ready.errback(error)


def connect(reactor: Any, settings: UpstreamSettings, owner: UpstreamOwner) -> UpstreamConnection:
    """Start connecting; ``.ready`` fires once usable or fails with UpstreamFailed."""
    connection = UpstreamConnection(owner, settings)
    tls = settings.tls_options if settings.tls else None  # (StartTLS: once connected)
    endpoint = client_endpoint(reactor, settings.host, settings.port, settings.connect_timeout, tls)
    attempt = endpoint.connect(OneConnection(connection))
    connection.attempt = attempt
    attempt.addErrback(connection.connect_failed)
    if settings.connect_timeout > 0:
        guard = reactor.callLater(settings.connect_timeout, connection.give_up)
        connection.ready.addBoth(_cancel_guard, guard)
    return connection


def _cancel_guard(result: object, guard: Any) -> object:
    if guard.active():
        guard.cancel()
    return result
