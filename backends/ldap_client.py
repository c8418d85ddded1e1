"""One LDAP connection to the directory: requests out, replies matched to them by message ID.

The directory backend (:mod:`backends.ldap_async`) runs its searches and
binds on these connections, held by the links of :mod:`backends.ldap_links`.
A connection carries many requests at once (message-ID multiplexing); the
replies are cut out of the stream by the shared
:class:`~backends.ldapwire.framing.MessageFramer` and decoded where they lie
(:mod:`backends.ldapwire.messages`), and each request's :class:`Waiter`
hears its entries, then its result or the loss of the connection.

Timeouts: each request has a deadline and one timer per connection is armed
for the earliest one, lazily -- a reply does not cancel it; when it fires,
the requests past their deadline fail and it is armed for the next one.
A request that times out drops the connection: nothing else on it can be
trusted. A Notice of Disconnection, or a reply that does not decode, drops
it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as Interface  # (Protocol is Twisted's, below)

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from backends.ldap_common import Endpoint
from backends.ldapwire.ber import BerError
from backends.ldapwire.framing import MAX_MESSAGE, MessageFramer
from backends.ldapwire.messages import (
    BIND_RESPONSE,
    EXTENDED_RESPONSE,
    INTERMEDIATE_RESPONSE,
    SEARCH_RESULT_DONE,
    SEARCH_RESULT_ENTRY,
    SEARCH_RESULT_REFERENCE,
    UNBIND,
    SearchEntry,
    decode_entry,
    ldap_message,
    read_envelope,
    read_result,
)
from backends.ldapwire.transport import set_no_delay, write_now

log = Logger(namespace="mfa_proxy.backends.ldap_client")

# The replies that end a request the directory client sends; the others are
# ignored, and anything else is a protocol error.
_FINAL_REPLIES = (SEARCH_RESULT_DONE, BIND_RESPONSE, EXTENDED_RESPONSE)
_IGNORED_REPLIES = (SEARCH_RESULT_REFERENCE, INTERMEDIATE_RESPONSE)


@dataclass(frozen=True)
class Reply:
    """The final answer to one request (and the entries a search returned)."""

    code: int
    diagnostic: str = ""
    entries: list[SearchEntry] = field(default_factory=list)


class ConnectionLost(Exception):
    """The connection broke (or never answered) before the reply."""


class OperationTimeout(ConnectionLost):
    """No reply within the operation timeout."""


class Waiter(Interface):
    """Who hears the replies to one request: its entries, then its result or its loss.

    ``deadline`` and ``timeout`` are set by :meth:`LdapClientProtocol.send`.
    """

    deadline: float
    timeout: float

    def on_entry(self, message: bytes, start: int, end: int) -> None: ...

    def on_result(self, code: int, diagnostic: str) -> None: ...

    def on_lost(self, why: ConnectionLost) -> None: ...


class _Collect:
    """A request answered as one :class:`Reply` (every request but verify's fast ones)."""

    __slots__ = ("deadline", "deferred", "entries", "timeout")

    def __init__(self) -> None:
        self.deferred: Deferred[Reply] = Deferred()
        self.entries: list[SearchEntry] = []
        self.deadline = self.timeout = 0.0

    def on_entry(self, message: bytes, start: int, end: int) -> None:
        self.entries.append(decode_entry(message, start, end))

    def on_result(self, code: int, diagnostic: str) -> None:
        self.deferred.callback(Reply(code, diagnostic, self.entries))

    def on_lost(self, why: ConnectionLost) -> None:
        self.deferred.errback(why)


@implementer(IHandshakeListener)
class LdapClientProtocol(Protocol):
    """One LDAP connection: frames replies, matches them to requests by message id.

    One timer serves every request on the connection: under load that is one
    timer every ``timeout`` seconds, not one per request.
    """

    def __init__(self, reactor: Any, endpoint: Endpoint) -> None:
        self.reactor = reactor  # IReactorTime; Any because zope interfaces confuse mypy
        self.endpoint = endpoint
        self.pending: dict[int, Waiter] = {}
        self.is_connected = False
        self.lost: Deferred[None] = Deferred()
        self._handshake: Deferred[None] | None = None
        self._framer = MessageFramer(MAX_MESSAGE)
        self._next_id = 1
        self._aborted = False
        self._timer: Any = None  # IDelayedCall, due at or before every pending deadline
        self._timer_due = 0.0

    # -- requests

    def request(self, operation: bytes, timeout: float) -> Deferred[Reply]:
        collect = _Collect()
        self.send(operation, collect, timeout)
        return collect.deferred

    def send(self, operation: bytes, waiter: Waiter, timeout: float) -> None:
        """Send ``operation``; ``waiter`` hears the replies (or the loss, maybe at once)."""
        if not self.is_connected:
            waiter.on_lost(ConnectionLost("connection closed"))
            return
        message_id = self._next_id
        self._next_id = message_id + 1 if message_id < 0x7FFFFFFF else 1
        waiter.deadline = deadline = self.reactor.seconds() + timeout
        waiter.timeout = timeout
        self.pending[message_id] = waiter
        if self._timer is None or deadline < self._timer_due:
            self._arm(deadline)
        write_now(self._transport, ldap_message(message_id, operation))

    def start_tls(self, creator: Any, timeout: float) -> Deferred[None]:
        """Switch to TLS now; fires once the handshake (and verification) succeeded."""
        handshake = self.wait_for_handshake(timeout)
        self._transport.startTLS(creator)
        return handshake

    def wait_for_handshake(self, timeout: float) -> Deferred[None]:
        self._handshake = Deferred()
        return self._handshake.addTimeout(timeout, self.reactor)

    def close(self) -> Deferred[None]:
        if self.is_connected and self.transport is not None:
            self._transport.write(ldap_message(self._next_id, UNBIND))
            self._transport.loseConnection()
        return self.lost

    def abort(self, why: str) -> None:
        if self._aborted or self.transport is None:
            return
        self._aborted = True
        log.info("dropping connection to {url}: {why}", url=self.endpoint.url, why=why)
        self._transport.abortConnection()

    @property
    def _transport(self) -> Any:
        """The TCP (or TLS) transport: ITransport plus startTLS and abortConnection."""
        return self.transport

    # -- Protocol

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        self.is_connected = True
        # Many small requests in flight on one connection: Nagle would hold one
        # back until the directory acknowledged the one before.
        set_no_delay(self.transport)

    def handshakeCompleted(self) -> None:  # noqa: N802 - Twisted's name
        handshake, self._handshake = self._handshake, None
        if handshake is not None and not handshake.called:  # not timed out meanwhile
            handshake.callback(None)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        try:  # each reply is decoded where it lies in ``data``: no copy of each one
            self._framer.dispatch(data, self._dispatch)
        except BerError as bad:
            self.abort(f"undecodable reply: {bad}")

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.is_connected = False
        why = ConnectionLost(f"{self.endpoint.url}: {reason.getErrorMessage()}")
        handshake, self._handshake = self._handshake, None
        if handshake is not None and not handshake.called:
            handshake.errback(why)
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        pending, self.pending = self.pending, {}
        for waiting in pending.values():
            waiting.on_lost(why)
        self.lost.callback(None)

    # -- replies

    def _dispatch(self, message: bytes, start: int, end: int) -> None:
        message_id, tag, op_start, op_end = read_envelope(message, start, end)
        if message_id == 0:  # Notice of Disconnection (RFC 4511 §4.4.1)
            self.abort("notice of disconnection")
            return
        waiting = self.pending.get(message_id)
        if waiting is None:
            return  # a late reply to a request that timed out
        if tag == SEARCH_RESULT_ENTRY:
            waiting.on_entry(message, op_start, op_end)
        elif tag in _FINAL_REPLIES:
            code, _matched_dn, diagnostic = read_result(message, op_start, op_end)
            del self.pending[message_id]
            waiting.on_result(code, diagnostic)
        elif tag not in _IGNORED_REPLIES:
            raise BerError(f"unexpected protocolOp {tag:#x}")

    # -- timeouts

    def _arm(self, due: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_due = due
        self._timer = self.reactor.callLater(max(0.0, due - self.reactor.seconds()),
                                             self._expire)

    def _expire(self) -> None:
        """Fail the requests past their deadline; re-arm for the earliest one left."""
        self._timer = None
        now = self.reactor.seconds()
        late = [(mid, waiting) for mid, waiting in self.pending.items() if waiting.deadline <= now]
        for message_id, waiting in late:
            if self.pending.pop(message_id, None) is None:
                continue  # failed meanwhile, by a connectionLost that an on_lost caused
            waiting.on_lost(OperationTimeout(
                f"{self.endpoint.url}: no answer within {waiting.timeout:g}s"))
        if late:
            # The server is stuck or the link is: nothing else on it can be trusted.
            self.abort("operation timed out")
        if self.pending:  # (on_lost may have sent more: arm for the earliest of all)
            self._arm(min(waiting.deadline for waiting in self.pending.values()))
