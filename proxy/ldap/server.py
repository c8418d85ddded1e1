"""The LDAP front-end: an LDAP server that puts MFA on simple binds and
forwards everything else, byte for byte, to the real directory.

Shape (after twisted.names.server): :class:`LdapProxyFactory` owns what
every connection shares — settings, the core's ``authenticate``, TLS
options, the bind cache, events — and builds one thin
:class:`LdapProxyProtocol` per client, which opens its own upstream
connection. Requests other than binds go upstream as the bytes the client
sent and responses come back the same way, message IDs untouched; only the
responses to binds the proxy sent itself are intercepted, and those reuse
the client's bind message ID, which the client may not reuse before it has
its answer (RFC 4511 §4.1.1.1).

A bind is answered only once the upstream session matches the answer: on
success it is bound as the user; on any failure it is anonymous — when the
password was right but the code was not, an anonymous bind resets it first,
and if even that fails both connections are closed.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import interfaces
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from backends.base import DirectoryUnavailable
from policy.decision import AuthRequest, Decision, Reason, SplitMode
from proxy.ldap import ber, tls, upstream
from proxy.ldap.ber import ResultCode
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

    def buildProtocol(self, addr: interfaces.IAddress | None) -> Protocol:
        if len(self.connections) >= self.config.max_connections:
            return _Refuse(self.events)
        protocol = LdapProxyProtocol(self)
        protocol.factory = self
        return protocol

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
            tls.upstream_options(target.host, config.ca_file, config.tls_verify)
            if uses_tls
            else None
        ),
        connect_timeout=config.connect_timeout,
        max_message_size=config.max_response_size,
    )


class _Refuse(Protocol):
    """Over max_connections: a Notice of Disconnection, then close."""

    transport: Any

    def __init__(self, events: LdapEvents) -> None:
        self._events = events

    def connectionMade(self) -> None:
        self._events.dropped("max_connections")
        assert self.transport is not None
        self.transport.write(
            ber.encode_notice_of_disconnection(ResultCode.BUSY, "too many connections")
        )
        self.transport.loseConnection()


class LdapProxyProtocol(Protocol):
    """One client connection and its own upstream connection."""

    factory: LdapProxyFactory
    # ITCPTransport, possibly under TLS; zope interfaces do not type-check well.
    transport: Any

    def __init__(self, factory: LdapProxyFactory) -> None:
        self.factory = factory
        self.config = factory.config
        self.events = factory.events
        self._clock = factory.reactor
        self._framer = ber.MessageFramer(self.config.max_message_size)
        self._queue: deque[bytes] = deque()  # messages waiting for a bind or the upstream
        self._busy = True  # until the upstream is ready; again during each bind
        self._paused = False
        self._closing = False
        self._tls = False
        self._peer = ""
        self._upstream: upstream.UpstreamConnection | None = None
        self._upstream_state = UpstreamState.CONNECTING
        self._last_connect_failure = float("-inf")
        self._upstream_authenticated = False  # the upstream session is bound as someone
        self._upstream_uncertain = False  # an injected request was abandoned: state unknown
        self._upstream_notice_relayed = False
        self._close_after_reply = False
        self._authenticated = False  # the client's last bind succeeded (require_bind)
        self._outstanding: set[int] = set()  # forwarded requests awaiting their final response
        self._injected: dict[int, Deferred[bytes]] = {}  # our own requests, by message ID
        self._last_activity = 0.0
        self._idle_call: Any = None

    # ------------------------------------------------------------ lifecycle

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.factory.connections.add(self)
        self.events.connection_opened()
        self._peer = str(getattr(self.transport.getPeer(), "host", ""))
        set_no_delay(self.transport)
        self._tls = interfaces.ISSLTransport.providedBy(self.transport)
        self._last_activity = self._clock.seconds()
        self._schedule_idle_check(self.config.idle_timeout)
        self._connect_upstream().addCallback(lambda _: self._resume())

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closing = True
        if self in self.factory.connections:
            self.factory.connections.discard(self)
            self.events.connection_closed()
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
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
        if dropped:
            self.events.dropped(dropped)
        assert self.transport is not None
        if notify:
            self.transport.write(ber.encode_notice_of_disconnection(code, diagnostic))
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
            messages = self._framer.feed(data)
        except ber.BerError as error:
            self._drop_malformed(error)
            return
        if not self._busy and not self._queue and len(messages) == 1:
            self._dispatch(messages[0])  # the common case, without the queue
        else:
            self._queue.extend(messages)
        self._drain()

    def _drain(self) -> None:
        """Handle queued messages until one makes us wait; read no more while any wait."""
        queue = self._queue
        while queue and not self._busy and not self._closing:
            self._dispatch(queue.popleft())
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

    def _dispatch(self, message: bytes) -> None:
        try:
            header = ber.peek(message)
        except ber.BerError as error:
            self._drop_malformed(error)
            return
        tag = header.op_tag
        if tag == ber.BIND_REQUEST:
            self._bind(message, header)
        elif tag not in ber.REQUESTS:
            self._drop_malformed(ber.BerError(f"protocolOp {tag:#04x} is not a request"))
        elif tag == ber.UNBIND_REQUEST:
            self._unbind(message)
        elif tag == ber.EXTENDED_REQUEST and self._is_start_tls(message, header):
            self._start_tls(header)
        elif tag == ber.ABANDON_REQUEST:
            if self._upstream_state is UpstreamState.READY:
                self._forward(message, header)
        elif self.config.require_bind and not self._authenticated:
            self._answer(header, ResultCode.INSUFFICIENT_ACCESS_RIGHTS, "bind required")
        elif self._upstream_state is UpstreamState.READY:
            self._forward(message, header)
        else:
            self._forward_when_reachable(message, header)

    def _forward(self, message: bytes, header: ber.MessageHeader) -> None:
        assert self._upstream is not None
        tag = header.op_tag
        if tag in ber.FINAL_RESPONSE:
            self._outstanding.add(header.message_id)
        elif tag == ber.ABANDON_REQUEST:
            try:
                self._outstanding.discard(ber.abandoned_message_id(message, header))
            except ber.BerError as error:
                self._drop_malformed(error)
                return
        self._upstream.write(message)
        self.events.forwarded(ber.OPERATION_NAMES[tag])

    def _forward_or_refuse(self, message: bytes, header: ber.MessageHeader, ready: bool) -> None:
        if self._closing:
            return
        if ready:
            self._forward(message, header)
        else:
            self._answer(header, ResultCode.UNAVAILABLE, UNAVAILABLE)

    def _answer(self, header: ber.MessageHeader, code: int, diagnostic: str) -> None:
        """Answer a request locally, with the response type it expects."""
        response = ber.response_for(header.op_tag)
        if response is not None:
            self._write(ber.encode_result(header.message_id, response, code, diagnostic))

    def _unbind(self, message: bytes) -> None:
        if self._upstream is not None and self._upstream_state is UpstreamState.READY:
            self._upstream.write(message)
            self.events.forwarded("unbind")
        self._closing = True
        assert self.transport is not None
        self.transport.loseConnection()

    def _drop_malformed(self, error: ber.BerError) -> None:
        reason = "oversize" if error.oversize else "malformed"
        diagnostic = "message too large" if error.oversize else f"malformed message: {error}"
        self.abort_session(ResultCode.PROTOCOL_ERROR, diagnostic, dropped=reason)

    # ------------------------------------------------------------ StartTLS (client side)

    def _is_start_tls(self, message: bytes, header: ber.MessageHeader) -> bool:
        try:
            return ber.extended_request_name(message, header) == ber.START_TLS_OID
        except ber.BerError:
            return False  # forwarded: the directory answers what it makes of it

    def _start_tls(self, header: ber.MessageHeader) -> None:
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
        self._write(ber.encode_extended_response(message_id, code, diagnostic, ber.START_TLS_OID))
        if code == ResultCode.SUCCESS:
            assert self.transport is not None
            self.transport.startTLS(self.factory.server_tls)
            self._tls = True

    # ------------------------------------------------------------ idle timeout

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

    # ------------------------------------------------------------ upstream

    def _connect_upstream(self) -> Deferred[None]:
        """Fires (never fails) once the upstream is ready or known to be down."""
        self._upstream_state = UpstreamState.CONNECTING
        self._upstream_authenticated = False
        self._upstream_uncertain = False
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

    def _forward_when_reachable(self, message: bytes, header: ber.MessageHeader) -> None:
        self._busy = True  # later messages wait, so their order holds
        reached = self._reach_upstream()
        reached.addCallback(partial(self._forward_or_refuse, message, header))
        reached.addCallback(lambda _: self._resume())
        reached.addErrback(self._crashed)

    def upstream_messages(self, messages: list[bytes]) -> None:
        """Responses from the directory: relay them, except answers to our own requests."""
        self._last_activity = self._clock.seconds()
        injected = self._injected
        outstanding = self._outstanding
        relay: list[bytes] = []
        for message in messages:
            try:
                message_id, tag = ber.peek_id_and_tag(message)
            except ber.BerError:
                self._upstream_broken("malformed_response")
                return
            if tag in ber.FINAL_RESPONSES:
                if message_id in injected and tag in (ber.BIND_RESPONSE, ber.EXTENDED_RESPONSE):
                    self._relay(relay)  # keep the client's view in order
                    relay = []
                    injected.pop(message_id).callback(message)
                    continue
                if message_id == 0:
                    self._upstream_notice_relayed = True  # Notice of Disconnection
                outstanding.discard(message_id)
            relay.append(message)
        self._relay(relay)

    def _relay(self, messages: list[bytes]) -> None:
        if messages and not self._closing:
            write_sequence_now(self.transport, messages)

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

    def _upstream_request(self, message: bytes, message_id: int) -> Deferred[bytes]:
        """Send a request of our own; the Deferred gets its response message."""
        if self._upstream is None or self._upstream_state is not UpstreamState.READY:
            return fail(DirectoryUnavailable("directory not connected"))
        if message_id in self._injected:
            return fail(DirectoryUnavailable("a bind is already in flight"))
        response: Deferred[bytes] = Deferred(canceller=partial(self._abandon_injected, message_id))
        self._injected[message_id] = response
        self._upstream.write(message)
        return response

    def _abandon_injected(self, message_id: int, _: Deferred[bytes]) -> None:
        # Its answer may still come and change the upstream session: never reuse it.
        self._injected.pop(message_id, None)
        self._upstream_uncertain = True

    def _fail_injected(self, error: Exception) -> None:
        pending, self._injected = self._injected, {}
        for waiting in pending.values():
            waiting.errback(error)

    # ------------------------------------------------------------ binds

    def _bind(self, message: bytes, header: ber.MessageHeader) -> None:
        try:
            request = ber.decode_bind_request(message, header)
        except ber.BerError as error:
            self._drop_malformed(error)
            return
        self._busy = True
        self._authenticated = False  # whatever the outcome, the old identity ends here
        started = self._clock.seconds()
        decided: Deferred[BindReply] = maybeDeferred(self._decide_bind, message, request)  # type: ignore[call-overload]
        if self.config.bind_timeout > 0 and (not decided.called or decided.paused):
            # Cancelling runs _bind_error with CancelledError: the bind gets 52.
            timer = self._clock.callLater(self.config.bind_timeout, decided.cancel)
            decided.addBoth(_stop_timer, timer)
        decided.addErrback(self._bind_error)
        decided.addCallback(self._settle_upstream, request.message_id)
        decided.addCallback(self._send_bind_reply, request.message_id, started)
        decided.addErrback(self._crashed)

    def _decide_bind(
        self, message: bytes, request: ber.BindRequest
    ) -> BindReply | Deferred[BindReply]:
        if request.version != 3:
            return refuse(ResultCode.PROTOCOL_ERROR, "only LDAPv3 is supported", "protocol_error")
        exempt = self.factory.is_exempt(request.name)
        if not request.is_simple:
            if exempt:
                return self._relay_bind(message, request, "exempt")
            return refuse(
                ResultCode.AUTH_METHOD_NOT_SUPPORTED,
                "SASL binds are not supported: use a simple bind with password and code",
                "sasl_not_supported",
            )
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
        self, message: bytes, request: ber.BindRequest, reason: str
    ) -> BindReply | Deferred[BindReply]:
        """Exempt and anonymous binds: the client's request and the directory's
        answer, both as they are."""
        return self._when_reachable(self._send_relayed_bind, message, request, reason)

    def _send_relayed_bind(
        self, ready: bool, message: bytes, request: ber.BindRequest, reason: str
    ) -> BindReply | Deferred[BindReply]:
        if not ready:
            return refuse(ResultCode.UNAVAILABLE, UNAVAILABLE, Reason.DIRECTORY_UNAVAILABLE.value)
        self.events.forwarded("bind")
        sent = self._upstream_request(message, request.message_id)
        return sent.addCallback(self._relayed_bind_answer, reason, request.is_anonymous)

    def _relayed_bind_answer(self, response: bytes, reason: str, anonymous: bool) -> BindReply:
        code, _, diagnostic = _result(response)
        success = code == ResultCode.SUCCESS
        self._upstream_authenticated = success and not anonymous
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

    def _mfa_bind(self, ready: bool, request: ber.BindRequest) -> BindReply | Deferred[BindReply]:
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

    def _decided(self, decision: Decision, request: ber.BindRequest
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
        bind = ber.encode_bind_request(request.message_id, identity.dn, raw, request.controls)
        self.events.forwarded("bind")
        sent = self._upstream_request(bind, request.message_id)
        return sent.addCallback(self._session_bound, reply)

    def _session_bound(self, response: bytes, reply: BindReply) -> BindReply:
        code, _, diagnostic = _result(response)
        self._upstream_authenticated = code == ResultCode.SUCCESS
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
        """Make the upstream session match the answer before giving it."""
        if self._closing:
            return reply
        if self._upstream_uncertain:
            self._close_after_reply = True  # a late answer could still bind it
            return reply
        if reply.success or reply.code == ResultCode.SASL_BIND_IN_PROGRESS:
            return reply
        if not self._upstream_authenticated:
            return reply
        anonymous = ber.encode_bind_request(message_id, "", b"")
        reset = self._upstream_request(anonymous, message_id)
        return reset.addCallback(self._reset_done, reply).addErrback(self._reset_failed, reply)

    def _reset_done(self, response: bytes, reply: BindReply) -> BindReply:
        code, _, diagnostic = _result(response)
        if code != ResultCode.SUCCESS:
            raise DirectoryUnavailable(f"anonymous bind answered {code}: {diagnostic}")
        self._upstream_authenticated = False
        return reply

    def _reset_failed(self, failure: Failure, reply: BindReply) -> BindReply:
        self.events.upstream_error("reset_failed")
        log.warn("could not reset the upstream session: {error}", error=failure.getErrorMessage())
        self._close_after_reply = True
        return reply

    def _send_bind_reply(self, reply: BindReply, message_id: int, started: float) -> None:
        if self._closing:
            return
        self._authenticated = reply.authenticated
        if reply.raw is not None:
            self._write(reply.raw)
        else:
            self._write(ber.encode_bind_response(message_id, reply.code, reply.diagnostic))
        if reply.result:
            self.events.bind(reply.result, reply.reason, self._clock.seconds() - started)
        if self._close_after_reply:
            self.abort_session(
                ResultCode.UNAVAILABLE, "session could not be reset", dropped="upstream_lost"
            )
            return
        self._resume()

    def _crashed(self, failure: Failure) -> None:
        log.failure("LDAP front-end error", failure)
        self.abort_session(ResultCode.OTHER, "internal error")


def _stop_timer(result: object, timer: Any) -> object:
    if timer.active():
        timer.cancel()
    return result


def _result(response: bytes) -> ber.LdapResult:
    try:
        return ber.decode_result(response)
    except ber.BerError as error:
        raise DirectoryUnavailable(f"malformed response from the directory: {error}") from None
