"""The LDAP front-end: an LDAP server that puts MFA on simple binds and
forwards everything else, byte for byte, to the real directory.

Shape (after twisted.names.server): :class:`LdapProxyFactory` owns what
every connection shares — settings, the core's ``authenticate``, TLS
options, the bind cache, events, the per-address and buffer limits — and
builds one thin :class:`LdapProxyProtocol` per client, which opens its own
upstream connection. Requests other than binds go upstream as the bytes the
client sent and responses come back the same way, message IDs untouched;
only the responses to the binds the proxy sends itself are intercepted, and
those reuse the message ID of the client's bind.

Sequencing — the invariant this module keeps (RFC 4511 §4.1.1.1, §4.2.1):

1. A message ID is in use from the moment its request is read until the
   client has its final answer (for a forwarded request: until the
   directory's final response is relayed, or an abandon of it forwarded).
   A request that reuses an ID in use (or uses ID 0) is a protocol error:
   a Notice of Disconnection, and both connections close.
2. A bind starts only once no forwarded operation is outstanding (it waits
   at most ``bind_timeout``, then gets 52 and both connections close), and
   nothing the client sent after it is handled before the client has the
   bind's answer: no client operation reaches the directory between the
   proxy's upstream bind and that answer.
3. The proxy's own upstream requests (the user's bind, a relayed bind, the
   anonymous reset) are answered only by a response with their message ID
   AND their type, a BindResponse. Any other response with that ID while
   one is in flight, or a BindResponse the proxy did not wait for, is a
   directory protocol violation: both connections close.
4. The upstream session counts as possibly bound from the moment any bind
   is sent on it until an anonymous bind on it succeeds. A bind that does
   not succeed (for any reason, the front-end's own refusals included)
   while the session is possibly bound is answered only after an anonymous
   bind has reset it; if the reset fails, the client gets no bind answer:
   both connections close. A bind that times out (the core or the
   directory may still act on it) gets 52, and both connections close.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import interfaces
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from backends.base import DirectoryUnavailable
from backends.ldapwire import framing, messages, tls
from backends.ldapwire.ber import BerError
from backends.ldapwire.messages import ResultCode
from policy.decision import AuthRequest, Decision, Reason, SplitMode
from proxy.ldap import upstream
from proxy.ldap.bind import (
    INVALID_CREDENTIALS,
    UNAVAILABLE,
    UPSTREAM_REFUSALS,
    BindReply,
    refuse,
    reply_for_decision,
    reply_for_error,
)
from proxy.ldap.config import LdapFrontendConfig, parse_listen, parse_upstream
from proxy.ldap.dn import DnSuffixMap, normalize_dn
from proxy.ldap.events import LdapEvents, NullLdapEvents
from proxy.ldap.transport import set_no_delay, write_now, write_sequence_now
from proxy.logs import LogLimiter

log = Logger()

RECONNECT_BACKOFF = 1.0  # seconds between attempts to reach a down upstream, per connection


class Authenticate(TypingProtocol):
    """The core's entry point, as the front-end calls it."""

    def __call__(self, request: AuthRequest) -> Deferred[Decision]: ...


# How a connection reaches its directory (tests pass a fake).
UpstreamConnector = Callable[
    [Any, upstream.UpstreamSettings, upstream.UpstreamOwner], upstream.UpstreamConnection
]


class UpstreamState(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    DOWN = "down"  # never became ready; a later request may try again


class LdapProxyFactory(ServerFactory):
    """Everything the connections share. ``listen()`` starts the listeners."""

    noisy = False

    def __init__(
        self,
        config: LdapFrontendConfig,
        authenticate: Authenticate,
        events: LdapEvents | None = None,
        reactor: Any = None,
        connect_upstream: UpstreamConnector = upstream.connect,
    ) -> None:
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.authenticate = authenticate
        self.events: LdapEvents = events or NullLdapEvents()
        self.reactor = reactor
        self.connect_upstream = connect_upstream
        self.exempt = DnSuffixMap((dn, True) for dn in config.exempt)
        self.user_base = DnSuffixMap([(config.user_base, True)] if config.user_base else [])
        self.cache_windows = DnSuffixMap((r.dn, r.seconds) for r in config.bind_cache_rules)
        self.server_tls = (
            tls.server_options(config.cert_file, config.key_file) if config.cert_file else None
        )
        self.upstream = _upstream_settings(config)
        self.connections: set[LdapProxyProtocol] = set()
        self.sources: Counter[str] = Counter()  # open connections by client address
        self.buffered_bytes = 0  # held from clients, all connections together
        self._log_limiter = LogLimiter(reactor.seconds)

    def buildProtocol(self, addr: interfaces.IAddress | None) -> Protocol:
        if len(self.connections) >= self.config.max_connections:
            return _Refuse(self, "max_connections", "too many connections")
        source = str(getattr(addr, "host", ""))
        if self.sources[source] >= self.config.max_connections_per_source:
            return _Refuse(
                self, "max_connections_per_source", "too many connections from this address"
            )
        protocol = LdapProxyProtocol(self, source)
        protocol.factory = self
        return protocol

    def log_limited(self, key: str, message: str, **fields: object) -> None:
        """A log line for something a client may cause in a flood: at most one a
        minute per ``key`` (the metrics count every one)."""
        if self._log_limiter.allow(key):
            log.info(message + " (logged at most once a minute)", **fields)

    def listen(self) -> list[Any]:
        """Start every configured listener (plain with StartTLS, and ldaps)."""
        ports: list[Any] = []  # IListeningPort
        try:
            for address in self.config.listen:
                host, port = parse_listen(address)
                ports.append(self.reactor.listenTCP(port, self, interface=host))
            for address in self.config.ldaps_listen:
                host, port = parse_listen(address)
                ports.append(self.reactor.listenSSL(port, self, self.server_tls, interface=host))
        except Exception:
            for port in ports:
                port.stopListening()
            raise
        return ports

    def disconnect_all(self) -> None:
        """Close every client connection (with a Notice of Disconnection)."""
        for protocol in list(self.connections):
            protocol.abort_session(ResultCode.UNAVAILABLE, "server shutting down")

    def is_exempt(self, bind_name: str) -> bool:
        return bool(self.exempt.lookup(bind_name))

    def outside_user_base(self, bind_name: str, unparsable_is_outside: bool = False) -> bool:
        """A DN not under ``user_base`` (when one is set): not a user entry.

        A bind name that does not parse (AD's user@realm, or a spelling only
        the directory understands) is left to the core, which resolves it to
        an entry; the entry's own DN (``unparsable_is_outside``) must parse."""
        if not self.user_base:
            return False
        if normalize_dn(bind_name) is None:
            return unparsable_is_outside
        return not self.user_base.lookup(bind_name)

    def cache_window(self, bind_name: str) -> float:
        rule = self.cache_windows.lookup(bind_name)
        return float(rule if rule is not None else self.config.bind_cache_seconds)


def _upstream_settings(config: LdapFrontendConfig) -> upstream.UpstreamSettings:
    target = parse_upstream(config.upstream)
    uses_tls = target.tls or config.upstream_start_tls
    return upstream.UpstreamSettings(
        host=target.host,
        port=target.port,
        tls=target.tls,
        start_tls=config.upstream_start_tls,
        tls_options=(
            tls.client_options(target.host, config.ca_file, config.tls_verify)
            if uses_tls
            else None
        ),
        connect_timeout=config.connect_timeout,
        max_message_size=config.max_response_size,
    )


class _Refuse(Protocol):
    """Over a connection limit: a Notice of Disconnection, then close."""

    transport: Any

    def __init__(self, factory: LdapProxyFactory, reason: str, diagnostic: str) -> None:
        self._factory = factory
        self._reason = reason
        self._diagnostic = diagnostic

    def connectionMade(self) -> None:
        assert self.transport is not None
        self._factory.events.dropped(self._reason)
        peer = str(getattr(self.transport.getPeer(), "host", ""))
        self._factory.log_limited(
            f"{self._reason} {peer}",
            "LDAP: refused a connection from {peer}: {reason}",
            peer=peer,
            reason=self._reason,
        )
        notice = messages.encode_notice_of_disconnection(ResultCode.BUSY, self._diagnostic)
        self.transport.write(notice)
        self.transport.loseConnection()


@dataclass(slots=True)
class _Injected:
    """One of the proxy's own upstream requests, waiting for its response."""

    response: Deferred[bytes]
    expect: int  # the protocolOp tag of the only response that answers it
    anonymous: bool  # an anonymous bind: its success leaves the session anonymous


class LdapProxyProtocol(Protocol):
    """One client connection and its own upstream connection."""

    factory: LdapProxyFactory
    # ITCPTransport, possibly under TLS; zope interfaces do not type-check well.
    transport: Any

    def __init__(self, factory: LdapProxyFactory, source: str = "") -> None:
        self.factory = factory
        self.config = factory.config
        self.events = factory.events
        self._clock = factory.reactor
        self._source = source  # the address counted against max_connections_per_source
        self._counted = False
        self._framer = framing.MessageFramer(self.config.max_message_size)
        # Messages read but not yet handled (waiting for a bind or the upstream);
        # at most one read's worth: reading pauses while any wait.
        self._queue: deque[tuple[bytes, messages.MessageHeader]] = deque()
        self._buffered = 0  # this connection's partial message, in factory.buffered_bytes
        self._busy = True  # until the upstream is ready; again during each bind
        self._paused = False
        self._closing = False
        self._tls = False
        self._peer = ""
        self._upstream: upstream.UpstreamConnection | None = None
        self._upstream_state = UpstreamState.CONNECTING
        self._last_connect_failure = float("-inf")
        # Invariant 4: a bind was sent on the upstream session and no anonymous
        # bind has succeeded on it since.
        self._upstream_maybe_bound = False
        self._upstream_uncertain = False  # a bind timed out: the session cannot be trusted
        self._upstream_notice_relayed = False
        self._close_after_reply = False
        self._authenticated = False  # the client's last bind succeeded (require_bind)
        self._in_use: set[int] = set()  # invariant 1: IDs read and not finally answered
        self._outstanding: set[int] = set()  # forwarded requests awaiting their final response
        self._injected: dict[int, _Injected] = {}  # our own requests, by message ID
        self._binding = False  # from reading a bind until its answer is written
        self._bind_id = -1  # the message ID of that bind
        self._waiting_bind: tuple[bytes, messages.MessageHeader, float] | None = None
        self._wait_call: Any = None
        self._bound_once = False  # a bind has succeeded on this connection
        self._unbound_expired = False  # unbound_timeout passed during a bind
        self._unbound_call: Any = None
        self._last_activity = 0.0
        self._idle_call: Any = None

    # ------------------------------------------------------------ lifecycle

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.factory.connections.add(self)
        self.factory.sources[self._source] += 1
        self._counted = True
        self.events.connection_opened()
        self._peer = str(getattr(self.transport.getPeer(), "host", ""))
        set_no_delay(self.transport)
        self._tls = interfaces.ISSLTransport.providedBy(self.transport)
        self._last_activity = self._clock.seconds()
        self._schedule_idle_check(self.config.idle_timeout)
        if self.config.unbound_timeout > 0:
            self._unbound_call = self._clock.callLater(
                self.config.unbound_timeout, self._unbound_timeout
            )
        self._connect_upstream().addCallback(lambda _: self._resume())

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closing = True
        if self in self.factory.connections:
            self.factory.connections.discard(self)
            self.events.connection_closed()
        if self._counted:
            self._counted = False
            sources = self.factory.sources
            sources[self._source] -= 1
            if sources[self._source] <= 0:
                del sources[self._source]
        self._release_buffers()
        for call in (self._idle_call, self._unbound_call, self._wait_call):
            if call is not None and call.active():
                call.cancel()
        self._waiting_bind = None
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None
        self._fail_injected(DirectoryUnavailable("client connection closed"))

    def abort_session(
        self, code: int, diagnostic: str, dropped: str | None = None, notify: bool = True
    ) -> None:
        """Close both sides, telling the client why with a Notice of Disconnection."""
        if self._closing:
            return
        self._closing = True
        self._release_buffers()
        if dropped:
            self.events.dropped(dropped)
            self.factory.log_limited(
                f"{dropped} {self._peer}",
                "LDAP: closed the connection from {peer} ({reason}): {diagnostic}",
                peer=self._peer,
                reason=dropped,
                diagnostic=diagnostic,
            )
        assert self.transport is not None
        if notify:
            self.transport.write(messages.encode_notice_of_disconnection(code, diagnostic))
        self.transport.loseConnection()
        if self._upstream is not None:
            self._upstream.close()

    def _write(self, data: bytes) -> None:
        if not self._closing:
            write_now(self.transport, data)

    # ------------------------------------------------------------ client → proxy

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_activity = self._clock.seconds()
        try:
            received = self._framer.feed(data)
        except BerError as error:
            self._drop_malformed(error)
            return
        # Every message of the segment is admitted (its ID checked and taken)
        # before any is handled: what counts as outstanding is what the client
        # had sent, not what the directory happened to answer in between.
        admitted: list[tuple[bytes, messages.MessageHeader]] = []
        for message in received:
            header = self._admit(message)
            if header is None:
                return
            admitted.append((message, header))
        if not self._busy and not self._queue and len(admitted) == 1:
            self._dispatch(*admitted[0])  # the common case, without the queue
        elif admitted:
            self._queue.extend(admitted)
        if self._account_buffers():
            self._drain()

    def _admit(self, message: bytes) -> messages.MessageHeader | None:
        """The envelope of a request just read, its ID now in use; None (and the
        session closed) when it is no request or its ID may not be used."""
        try:
            header = messages.peek(message)
        except BerError as error:
            self._drop_malformed(error)
            return None
        tag, message_id = header.op_tag, header.message_id
        if tag not in messages.REQUESTS:
            self._drop_malformed(BerError(f"protocolOp {tag:#04x} is not a request"))
            return None
        if message_id in self._in_use:
            self.abort_session(
                ResultCode.PROTOCOL_ERROR,
                f"message ID {message_id} is still outstanding",
                dropped="message_id_reused",
            )
            return None
        if not 0 < message_id <= messages.MAX_MESSAGE_ID:
            self.abort_session(
                ResultCode.PROTOCOL_ERROR, "message ID out of range", dropped="protocol_error"
            )
            return None
        if tag in messages.FINAL_RESPONSE:  # unbind and abandon get no response
            self._in_use.add(message_id)
        return header

    def _account_buffers(self) -> bool:
        """Bring factory.buffered_bytes up to date with this connection's partial
        message; False, and the connection dropped, when it would push the total
        past max_buffered_bytes (a request that arrives whole costs nothing here)."""
        held = self._framer.buffered
        grown = held - self._buffered
        if grown > 0 and self.factory.buffered_bytes + grown > self.config.max_buffered_bytes:
            self.abort_session(ResultCode.BUSY, "server busy", dropped="buffer_limit")
            return False
        self.factory.buffered_bytes += grown
        self._buffered = held
        return True

    def _release_buffers(self) -> None:
        """Forget everything read and not handled, and give its share back."""
        self._framer.clear()
        self._queue.clear()
        self.factory.buffered_bytes -= self._buffered
        self._buffered = 0

    def _drain(self) -> None:
        """Handle queued messages until one makes us wait; read no more while any wait."""
        queue = self._queue
        while queue and not self._busy and not self._closing:
            self._dispatch(*queue.popleft())
        if self._closing or self.transport is None:
            return
        if queue:
            # Every time, not once: flow control towards the upstream may have
            # resumed reading in the meantime.
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def _resume(self) -> None:
        self._busy = False
        self._drain()

    def _dispatch(self, message: bytes, header: messages.MessageHeader) -> None:
        tag = header.op_tag
        if tag == messages.BIND_REQUEST:
            self._bind_when_quiet(message, header)
        elif tag == messages.UNBIND_REQUEST:
            self._unbind(message)
        elif tag == messages.EXTENDED_REQUEST and self._is_start_tls(message, header):
            self._start_tls(header)
        elif tag == messages.ABANDON_REQUEST:
            if self._upstream_state is UpstreamState.READY:
                self._forward(message, header)
        elif self.config.requires_bind and not self._authenticated:
            self._refuse(header, "bind_required", "bind required")
        elif self._upstream_state is UpstreamState.READY:
            self._forward(message, header)
        else:
            self._forward_when_reachable(message, header)

    def _forward(self, message: bytes, header: messages.MessageHeader) -> None:
        assert self._upstream is not None
        tag = header.op_tag
        if tag in messages.FINAL_RESPONSE:
            self._outstanding.add(header.message_id)
        elif tag == messages.ABANDON_REQUEST:
            try:
                abandoned = messages.abandoned_message_id(message, header)
            except BerError as error:
                self._drop_malformed(error)
                return
            if abandoned in self._outstanding:  # not a bind, nor a request still queued
                self._outstanding.discard(abandoned)
                self._in_use.discard(abandoned)
        self._upstream.write(message)
        self.events.forwarded(messages.OPERATION_NAMES[tag])

    def _forward_or_refuse(
        self, message: bytes, header: messages.MessageHeader, ready: bool
    ) -> None:
        if self._closing:
            return
        if ready:
            self._forward(message, header)
        else:
            self._answer(header, ResultCode.UNAVAILABLE, UNAVAILABLE)

    def _answer(self, header: messages.MessageHeader, code: int, diagnostic: str) -> None:
        """Answer a request locally, with the response type it expects."""
        self._in_use.discard(header.message_id)
        response = messages.response_for(header.op_tag)
        if response is not None:
            self._write(messages.encode_result(header.message_id, response, code, diagnostic))

    def _refuse(self, header: messages.MessageHeader, reason: str, diagnostic: str) -> None:
        """An operation the proxy will not forward: 50, counted and logged."""
        operation = messages.OPERATION_NAMES[header.op_tag]
        self.events.refused(operation, reason)
        self.factory.log_limited(
            f"refused {reason} {self._peer}",
            "LDAP: refused {operation} from {peer}: {reason}",
            operation=operation,
            peer=self._peer,
            reason=reason,
        )
        self._answer(header, ResultCode.INSUFFICIENT_ACCESS_RIGHTS, diagnostic)

    def _unbind(self, message: bytes) -> None:
        if self._upstream is not None and self._upstream_state is UpstreamState.READY:
            self._upstream.write(message)
            self.events.forwarded("unbind")
        self._closing = True
        self._release_buffers()
        assert self.transport is not None
        self.transport.loseConnection()

    def _drop_malformed(self, error: BerError) -> None:
        reason = "oversize" if error.oversize else "malformed"
        diagnostic = "message too large" if error.oversize else f"malformed message: {error}"
        self.abort_session(ResultCode.PROTOCOL_ERROR, diagnostic, dropped=reason)

    # ------------------------------------------------------------ StartTLS (client side)

    def _is_start_tls(self, message: bytes, header: messages.MessageHeader) -> bool:
        try:
            return messages.extended_request_name(message, header) == messages.START_TLS_OID
        except BerError:
            return False  # forwarded: the directory answers what it makes of it

    def _start_tls(self, header: messages.MessageHeader) -> None:
        """Answered here, never forwarded: the proxy terminates the client's TLS."""
        message_id = header.message_id
        if self._tls:
            code, diagnostic = ResultCode.OPERATIONS_ERROR, "TLS already started"
        elif self.factory.server_tls is None:
            code, diagnostic = ResultCode.UNAVAILABLE, "StartTLS is not configured"
        elif self._outstanding or self._queue or self._framer.buffered:
            code, diagnostic = ResultCode.OPERATIONS_ERROR, "operations outstanding"
        else:
            code, diagnostic = ResultCode.SUCCESS, ""
        self._in_use.discard(message_id)
        self._write(
            messages.encode_extended_response(message_id, code, diagnostic, messages.START_TLS_OID)
        )
        if code == ResultCode.SUCCESS:
            assert self.transport is not None
            self.transport.startTLS(self.factory.server_tls)
            self._tls = True

    # ------------------------------------------------------------ timeouts

    def _schedule_idle_check(self, delay: float) -> None:
        if self.config.idle_timeout > 0:
            self._idle_call = self._clock.callLater(delay, self._check_idle)

    def _check_idle(self) -> None:
        """A connection waiting on a bind or an operation (a long search) is not idle."""
        if self._closing:
            return
        timeout = self.config.idle_timeout
        idle_for = self._clock.seconds() - self._last_activity
        if self._busy or self._outstanding:
            self._schedule_idle_check(timeout)
        elif idle_for >= timeout:
            self.abort_session(
                ResultCode.ADMIN_LIMIT_EXCEEDED, "idle timeout", dropped="idle_timeout"
            )
        else:
            self._schedule_idle_check(timeout - idle_for)

    def _unbound_timeout(self) -> None:
        """No successful bind within unbound_timeout of connecting: an idle or
        trickling socket costs a connection here and one at the directory."""
        self._unbound_call = None
        if self._closing or self._bound_once:
            return
        if self._binding:
            self._unbound_expired = True  # decided when its answer has gone out
            return
        self._drop_unbound()

    def _drop_unbound(self) -> None:
        self.abort_session(
            ResultCode.ADMIN_LIMIT_EXCEEDED, "no successful bind in time", dropped="unbound_timeout"
        )

    # ------------------------------------------------------------ upstream

    def _connect_upstream(self) -> Deferred[None]:
        """Fires (never fails) once the upstream is ready or known to be down."""
        self._upstream_state = UpstreamState.CONNECTING
        self._upstream_maybe_bound = False  # a new session: anonymous
        connection = self.factory.connect_upstream(self._clock, self.factory.upstream, self)
        self._upstream = connection
        ready = connection.ready
        ready.addCallbacks(
            self._upstream_ready,
            self._upstream_failed,
            callbackArgs=(connection,),
            errbackArgs=(connection,),
        )
        return ready

    def _upstream_ready(self, _: None, connection: upstream.UpstreamConnection) -> None:
        if self._closing:
            connection.close()
            return
        self._upstream_state = UpstreamState.READY
        set_no_delay(connection.transport)
        self._link_flow_control(connection)

    def _link_flow_control(self, connection: upstream.UpstreamConnection) -> None:
        """Each side stops reading while the other cannot keep up with writes
        (a slow client reading a large search must not make the proxy buffer it)."""
        assert self.transport is not None and connection.transport is not None
        connection.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(connection.transport, True)

    def _upstream_failed(self, failure: Failure, connection: upstream.UpstreamConnection) -> None:
        if self._upstream is connection:
            self._upstream = None
        self._upstream_state = UpstreamState.DOWN
        self._last_connect_failure = self._clock.seconds()
        self.events.upstream_error(getattr(failure.value, "label", "connect_failed"))
        log.info(
            "LDAP upstream {host}:{port} unavailable: {error}",
            host=self.factory.upstream.host,
            port=self.factory.upstream.port,
            error=failure.getErrorMessage(),
        )

    def _reach_upstream(self) -> Deferred[bool]:
        """Whether the upstream is ready, reconnecting first if it is down
        (at most every RECONNECT_BACKOFF seconds, so a dead directory costs
        each request one refused connect, not a storm)."""
        if self._upstream_state is UpstreamState.READY:
            return succeed(True)
        since_failure = self._clock.seconds() - self._last_connect_failure
        if self._upstream_state is UpstreamState.DOWN and since_failure < RECONNECT_BACKOFF:
            return succeed(False)
        return self._connect_upstream().addCallback(self._is_ready)

    def _is_ready(self, _: object = None) -> bool:
        return self._upstream_state is UpstreamState.READY

    def _forward_when_reachable(self, message: bytes, header: messages.MessageHeader) -> None:
        self._busy = True  # later messages wait, so their order holds
        reached = self._reach_upstream()
        reached.addCallback(partial(self._forward_or_refuse, message, header))
        reached.addCallback(lambda _: self._resume())
        reached.addErrback(self._crashed)

    def upstream_messages(self, responses: list[bytes]) -> None:
        """Responses from the directory: relay them, except answers to our own requests."""
        self._last_activity = self._clock.seconds()
        injected = self._injected
        outstanding = self._outstanding
        in_use = self._in_use
        relay: list[bytes] = []
        for message in responses:
            try:
                message_id, tag = messages.peek_id_and_tag(message)
            except BerError:
                self._upstream_broken("malformed_response")
                return
            waiting = injected.get(message_id) if injected else None
            if waiting is not None:
                if tag != waiting.expect:  # invariant 3
                    self._upstream_violation(f"response {tag:#04x} to the proxy's own bind")
                    return
                self._relay(relay)  # keep the client's view in order
                relay = []
                del injected[message_id]
                self._injected_answered(waiting, message)
                continue
            if tag == messages.BIND_RESPONSE:  # every bind upstream is one of ours
                self._upstream_violation("a BindResponse the proxy did not wait for")
                return
            if tag in messages.FINAL_RESPONSES:
                if message_id == 0:
                    self._upstream_notice_relayed = True  # Notice of Disconnection
                outstanding.discard(message_id)
                in_use.discard(message_id)
            relay.append(message)
        self._relay(relay)
        if self._waiting_bind is not None and not outstanding:
            self._start_waiting_bind()

    def _relay(self, responses: list[bytes]) -> None:
        if responses and not self._closing:
            write_sequence_now(self.transport, responses)

    def upstream_lost(self, reason: Failure) -> None:
        """The directory connection ended after it was ready: the session is gone."""
        self._upstream = None
        self._upstream_state = UpstreamState.DOWN
        self._last_connect_failure = self._clock.seconds()
        if not self._closing:
            self.events.upstream_error(getattr(reason.value, "label", "connection_lost"))
            self.abort_session(
                ResultCode.UNAVAILABLE,
                "directory connection lost",
                dropped="upstream_lost",
                notify=not self._upstream_notice_relayed,
            )
        self._fail_injected(DirectoryUnavailable("directory connection lost"))

    def _upstream_broken(self, label: str) -> None:
        if self._upstream is not None:
            self._upstream.abort()
        self.upstream_lost(Failure(upstream.UpstreamFailed(label)))  # type: ignore[no-untyped-call]

    def _upstream_violation(self, detail: str) -> None:
        """The directory answered what the proxy cannot have asked: the session is
        no longer known, so neither side of it is used again."""
        log.warn(
            "LDAP upstream protocol violation on the connection from {peer}: {detail}",
            peer=self._peer,
            detail=detail,
        )
        self.events.upstream_error("protocol_violation")
        if self._upstream is not None:
            self._upstream.abort()
        self.abort_session(
            ResultCode.UNAVAILABLE,
            "directory protocol violation",
            dropped="upstream_protocol_violation",
        )
        self._fail_injected(DirectoryUnavailable("directory protocol violation"))

    def _upstream_request(
        self, message: bytes, message_id: int, anonymous: bool = False
    ) -> Deferred[bytes]:
        """Send a bind of our own; the Deferred gets its BindResponse.

        Only for the bind in progress, with its message ID (invariants 1 and 2):
        a late call, for a bind already answered, sends nothing.
        """
        if self._upstream is None or self._upstream_state is not UpstreamState.READY:
            return fail(DirectoryUnavailable("directory not connected"))
        if not self._binding or message_id != self._bind_id or self._closing:
            return fail(DirectoryUnavailable("no bind with this message ID in progress"))
        if message_id in self._injected:
            return fail(DirectoryUnavailable("a bind is already in flight"))
        response: Deferred[bytes] = Deferred(canceller=partial(self._abandon_injected, message_id))
        self._injected[message_id] = _Injected(response, messages.BIND_RESPONSE, anonymous)
        self._upstream_maybe_bound = True  # invariant 4: until an anonymous bind succeeds
        self._upstream.write(message)
        return response

    def _injected_answered(self, waiting: _Injected, response: bytes) -> None:
        if waiting.anonymous:
            try:
                succeeded = messages.decode_result(response).code == ResultCode.SUCCESS
            except BerError:
                succeeded = False
            if succeeded:
                self._upstream_maybe_bound = False
        waiting.response.callback(response)

    def _abandon_injected(self, message_id: int, _: Deferred[bytes]) -> None:
        # Its answer may still come and change the upstream session: never reuse it.
        self._injected.pop(message_id, None)
        self._upstream_uncertain = True

    def _fail_injected(self, error: Exception) -> None:
        pending, self._injected = self._injected, {}
        for waiting in pending.values():
            waiting.response.errback(error)

    # ------------------------------------------------------------ binds

    def _bind_when_quiet(self, message: bytes, header: messages.MessageHeader) -> None:
        """Invariant 2: a bind starts once every forwarded operation has finished
        (RFC 4511 §4.2.1), and nothing read after it is handled before its answer."""
        self._busy = True
        self._binding = True
        self._bind_id = header.message_id
        self._authenticated = False  # whatever the outcome, the old identity ends here
        if not self._outstanding:
            self._bind(message, header)
            return
        self._waiting_bind = (message, header, self._clock.seconds())
        if self.config.bind_timeout > 0:
            self._wait_call = self._clock.callLater(
                self.config.bind_timeout, self._bind_wait_expired
            )

    def _start_waiting_bind(self) -> None:
        if self._closing or self._waiting_bind is None:
            return
        message, header, _ = self._waiting_bind
        self._waiting_bind = None
        if self._wait_call is not None and self._wait_call.active():
            self._wait_call.cancel()
        self._wait_call = None
        self._bind(message, header)

    def _bind_wait_expired(self) -> None:
        self._wait_call = None
        if self._closing or self._waiting_bind is None:
            return
        _, header, started = self._waiting_bind
        self._waiting_bind = None
        self.events.bind("reject", "operations_outstanding", self._clock.seconds() - started)
        self._in_use.discard(header.message_id)
        self._write(
            messages.encode_bind_response(
                header.message_id, ResultCode.UNAVAILABLE, "earlier operations still outstanding"
            )
        )
        self.abort_session(
            ResultCode.UNAVAILABLE,
            "bind waited too long for outstanding operations",
            dropped="bind_wait_timeout",
        )

    def _bind(self, message: bytes, header: messages.MessageHeader) -> None:
        try:
            request = messages.decode_bind_request(message, header)
        except BerError as error:
            self._drop_malformed(error)
            return
        started = self._clock.seconds()
        decided: Deferred[BindReply] = maybeDeferred(self._decide_bind, message, request)  # type: ignore[call-overload]
        decided.addErrback(self._bind_error)
        decided.addCallback(self._settle_upstream, request.message_id)
        if self.config.bind_timeout > 0 and (not decided.called or decided.paused):
            # The decision and the reset together. Cancelling runs _bind_error (or
            # _reset_failed) with CancelledError: the bind gets 52, or no answer
            # when the reset did not finish; either way the session closes.
            timer = self._clock.callLater(self.config.bind_timeout, self._bind_timed_out, decided)
            decided.addBoth(_stop_timer, timer)
            decided.addErrback(self._bind_error)
        decided.addCallback(self._send_bind_reply, request.message_id, started)
        decided.addErrback(self._crashed)

    def _bind_timed_out(self, decided: Deferred[BindReply]) -> None:
        # The core or the directory may still act on this bind (a late verify, a
        # late BindResponse): the session is not used again after its answer.
        self._upstream_uncertain = True
        decided.cancel()

    def _decide_bind(
        self, message: bytes, request: messages.BindRequest
    ) -> BindReply | Deferred[BindReply]:
        if request.version != 3:
            return refuse(ResultCode.PROTOCOL_ERROR, "only LDAPv3 is supported", "protocol_error")
        if not request.is_simple:
            # The bind name means nothing to a SASL mechanism (PLAIN carries its
            # own authcid): being exempt is no reason to relay one.
            if self.config.sasl_passthrough:
                return self._relay_bind(message, request, "sasl_passthrough")
            self.factory.log_limited(
                f"sasl {self._peer}",
                "LDAP: refused a SASL bind from {peer} (sasl_passthrough is off)",
                peer=self._peer,
            )
            return refuse(
                ResultCode.AUTH_METHOD_NOT_SUPPORTED,
                "SASL binds are not supported: use a simple bind with password and code",
                "sasl_not_supported",
            )
        exempt = self.factory.is_exempt(request.name)
        if request.is_anonymous:
            if self.config.allow_anonymous:
                return self._relay_bind(message, request, "anonymous")
            return refuse(
                ResultCode.INAPPROPRIATE_AUTHENTICATION,
                "anonymous bind not allowed",
                "anonymous_refused",
            )
        if not request.password:
            # RFC 4513 §5.1.2: an "unauthenticated" bind would succeed as anonymous.
            return refuse(
                ResultCode.UNWILLING_TO_PERFORM,
                "unauthenticated bind (name without password) not allowed",
                Reason.EMPTY_PASSWORD.value,
            )
        if not request.name:
            return refuse(
                ResultCode.INVALID_CREDENTIALS, INVALID_CREDENTIALS, Reason.INVALID_USERNAME.value
            )
        if exempt:
            return self._relay_bind(message, request, "exempt")
        if self.factory.outside_user_base(request.name):
            return refuse(
                ResultCode.INVALID_CREDENTIALS, INVALID_CREDENTIALS, "outside_user_base"
            )
        return self._when_reachable(self._mfa_bind, request)

    def _when_reachable(
        self, step: Callable[..., BindReply | Deferred[BindReply]], *args: Any
    ) -> BindReply | Deferred[BindReply]:
        """``step(ready, *args)``: at once when the upstream is ready (the hot
        path, without a Deferred), else after trying to reach it."""
        if self._upstream_state is UpstreamState.READY:
            return step(True, *args)
        return self._reach_upstream().addCallback(step, *args)

    def _relay_bind(
        self, message: bytes, request: messages.BindRequest, reason: str
    ) -> BindReply | Deferred[BindReply]:
        """Exempt and anonymous binds: the client's request and the directory's
        answer, both as they are."""
        return self._when_reachable(self._send_relayed_bind, message, request, reason)

    def _send_relayed_bind(
        self, ready: bool, message: bytes, request: messages.BindRequest, reason: str
    ) -> BindReply | Deferred[BindReply]:
        if not ready:
            return refuse(ResultCode.UNAVAILABLE, UNAVAILABLE, Reason.DIRECTORY_UNAVAILABLE.value)
        self.events.forwarded("bind")
        sent = self._upstream_request(message, request.message_id, request.is_anonymous)
        return sent.addCallback(self._relayed_bind_answer, reason, request.is_anonymous)

    def _relayed_bind_answer(self, response: bytes, reason: str, anonymous: bool) -> BindReply:
        code, _, diagnostic = _result(response)
        success = code == ResultCode.SUCCESS
        if success:
            return BindReply(
                code, diagnostic, "accept", reason, authenticated=not anonymous, raw=response
            )
        if code == ResultCode.SASL_BIND_IN_PROGRESS:
            return BindReply(code, diagnostic, "", reason, raw=response)
        refused = (
            "bad_password" if code in UPSTREAM_REFUSALS else Reason.DIRECTORY_UNAVAILABLE.value
        )
        return BindReply(code, diagnostic, "reject", refused, raw=response)

    def _mfa_bind(
        self, ready: bool, request: messages.BindRequest
    ) -> BindReply | Deferred[BindReply]:
        """Both factors first, through the core; only then is this client's
        upstream session bound, as the entry the core resolved (never the DN as
        the client spelled it) and with the password the core checked."""
        if not ready:
            return refuse(ResultCode.UNAVAILABLE, UNAVAILABLE, Reason.DIRECTORY_UNAVAILABLE.value)
        assert request.password is not None
        name = request.name
        auth = AuthRequest(
            username=name,
            # surrogateescape: a password that is not UTF-8 survives the round trip
            secret=request.password.decode("utf-8", "surrogateescape"),
            protocol="ldap",
            client=self.config.client_name,
            mfa=self.config.mfa,
            split=SplitMode.APPEND,
            separator=self.config.separator,
            source=self._peer,
            # A DN names an entry (the directory resolves its spellings); anything
            # else (AD's user@realm, DOMAIN\\user) is a name for the user filter.
            bind_dn=name if "=" in name else None,
            repeat_window_seconds=int(self.factory.cache_window(name)),
        )
        decided = maybeDeferred(self.factory.authenticate, auth)
        return decided.addCallback(self._decided, request)

    def _decided(self, decision: Decision, request: messages.BindRequest
                 ) -> BindReply | Deferred[BindReply]:
        reply = reply_for_decision(decision)
        if not reply.success:
            return reply
        identity = decision.identity
        if identity is None or not identity.dn or not decision.password:
            log.error("core accepted an LDAP bind without an entry to bind as")
            return refuse(ResultCode.OTHER, "internal error", "internal_error")
        if self.factory.outside_user_base(identity.dn, unparsable_is_outside=True):
            return refuse(ResultCode.INVALID_CREDENTIALS, INVALID_CREDENTIALS,
                          "outside_user_base")
        raw = decision.password.encode("utf-8", "surrogateescape")
        bind = messages.encode_bind_request(request.message_id, identity.dn, raw, request.controls)
        self.events.forwarded("bind")
        sent = self._upstream_request(bind, request.message_id)
        return sent.addCallback(self._session_bound, reply)

    def _session_bound(self, response: bytes, reply: BindReply) -> BindReply:
        code, _, diagnostic = _result(response)
        if code == ResultCode.SUCCESS:
            return reply
        # The directory took this password a moment ago on the core's own bind.
        log.warn("session bind refused after the core accepted: {code} {diagnostic}",
                 code=code, diagnostic=diagnostic)
        if code in UPSTREAM_REFUSALS:
            return refuse(ResultCode.INVALID_CREDENTIALS, INVALID_CREDENTIALS, "bad_password")
        return refuse(ResultCode.UNAVAILABLE, UNAVAILABLE, Reason.DIRECTORY_UNAVAILABLE.value)

    def _bind_error(self, failure: Failure) -> BindReply:
        reply = reply_for_error(failure.value)
        if reply is not None:
            return reply
        log.failure("LDAP bind failed unexpectedly", failure)
        return refuse(ResultCode.OTHER, "internal error", "internal_error")

    def _settle_upstream(
        self, reply: BindReply, message_id: int
    ) -> BindReply | Deferred[BindReply]:
        """Invariant 4: make the upstream session match the answer before giving it."""
        if self._closing:
            return reply
        if self._upstream_uncertain:
            self._close_after_reply = True  # a late answer could still bind it
            return reply
        if reply.success or reply.code == ResultCode.SASL_BIND_IN_PROGRESS:
            return reply
        if not self._upstream_maybe_bound:
            return reply  # nothing was ever bound on it, or the last reset held
        anonymous = messages.encode_bind_request(message_id, "", b"")
        reset = self._upstream_request(anonymous, message_id, anonymous=True)
        return reset.addCallback(self._reset_done, reply).addErrback(self._reset_failed, reply)

    def _reset_done(self, response: bytes, reply: BindReply) -> BindReply:
        code, _, diagnostic = _result(response)
        if code != ResultCode.SUCCESS:
            raise DirectoryUnavailable(f"anonymous bind answered {code}: {diagnostic}")
        return reply

    def _reset_failed(self, failure: Failure, reply: BindReply) -> BindReply:
        """The session may still be bound as someone: the client gets no answer
        to its bind, only a Notice of Disconnection."""
        if self._closing:
            return reply
        self.events.upstream_error("reset_failed")
        log.warn(
            "LDAP: could not reset the upstream session of {peer}: {error}",
            peer=self._peer,
            error=failure.getErrorMessage(),
        )
        self.abort_session(
            ResultCode.UNAVAILABLE, "session could not be reset", dropped="reset_failed"
        )
        return reply

    def _send_bind_reply(self, reply: BindReply, message_id: int, started: float) -> None:
        self._binding = False
        self._in_use.discard(message_id)
        if reply.result:
            self.events.bind(reply.result, reply.reason, self._clock.seconds() - started)
        if self._closing:
            return
        self._authenticated = reply.authenticated
        if reply.raw is not None:
            self._write(reply.raw)
        else:
            self._write(messages.encode_bind_response(message_id, reply.code, reply.diagnostic))
        if self._close_after_reply:
            self.abort_session(ResultCode.UNAVAILABLE, "bind timed out", dropped="bind_timeout")
            return
        if reply.success:
            self._bound_once = True
            if self._unbound_call is not None and self._unbound_call.active():
                self._unbound_call.cancel()
            self._unbound_call = None
        elif self._unbound_expired:
            self._drop_unbound()
            return
        self._resume()

    def _crashed(self, failure: Failure) -> None:
        log.failure("LDAP front-end error", failure)
        self.abort_session(ResultCode.OTHER, "internal error", dropped="internal_error")


def _stop_timer(result: object, timer: Any) -> object:
    if timer.active():
        timer.cancel()
    return result


def _result(response: bytes) -> messages.LdapResult:
    try:
        return messages.decode_result(response)
    except BerError as error:
        raise DirectoryUnavailable(f"malformed response from the directory: {error}") from None
