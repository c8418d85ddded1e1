"""The LDAP front-end: an LDAP server that puts MFA on simple binds and
forwards everything else, byte for byte, to the real directory.

Shape (after twisted.names.server and h11): :class:`LdapProxyFactory` owns
what every connection shares — settings, the core's ``start``, TLS
options, the bind rules (exempt DNs, ``user_base``, bind-cache windows),
events, the per-address and buffer limits — and builds one thin
:class:`LdapProxyProtocol` per client. The protocol decides nothing: it feeds
what happens (bytes from the client, messages from its own upstream
connection, the core's answers, a timer) into its
:class:`~proxy.ldap.session.LdapSession` and carries out the actions that
come back (write to either side, ask the core -- start, then finish or
abandon the password check it hands back --, connect, start TLS, close).
The sequencing invariants (RFC 4511 message IDs, a bind waits for quiet and
holds what follows it, only a BindResponse answers the proxy's own bind, a
possibly bound session is reset before a failed bind is answered) are
documented and kept in :mod:`proxy.ldap.session`; the bind flow's steps are
:mod:`proxy.ldap.bind`; the upstream session's bookkeeping is
:mod:`proxy.ldap.upstream_session`, its bytes :mod:`proxy.ldap.upstream`.

Actions run in order. An action may make something happen at once (a core
or a test directory that answers synchronously): the event is fed to the
session at once, and the actions it returns run after the ones already
queued, so effects keep the order in which the session decided them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet import interfaces
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from backends.ldapwire import tls
from backends.ldapwire.messages import ResultCode, encode_notice_of_disconnection
from backends.ldapwire.transport import set_no_delay, write_sequence_now
from policy.decision import AuthRequest, Decision
from policy.engine import PasswordCheck, StartSignIn
from proxy.ldap import upstream
from proxy.ldap.bind import is_expected_error
from proxy.ldap.config import LdapFrontendConfig, parse_listen, parse_upstream
from proxy.ldap.dn import DnSuffixMap, normalize_dn
from proxy.ldap.events import LdapEvents, NullLdapEvents
from proxy.ldap.session import Action, Do, LdapSession, LogLine, Timer
from proxy.logs import LogLimiter

log = Logger()


# How a connection reaches its directory (tests pass a fake).
UpstreamConnector = Callable[
    [Any, upstream.UpstreamSettings, upstream.UpstreamOwner], upstream.UpstreamConnection
]


class LdapProxyFactory(ServerFactory):
    """Everything the connections share. ``listen()`` starts the listeners."""

    noisy = False

    def __init__(
        self,
        config: LdapFrontendConfig,
        start_sign_in: StartSignIn,
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
        self.start_sign_in = start_sign_in
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
        self.transport.write(encode_notice_of_disconnection(ResultCode.BUSY, self._diagnostic))
        self.transport.loseConnection()


class LdapProxyProtocol(Protocol):
    """One client connection and its own upstream connection: the Twisted side
    of an :class:`~proxy.ldap.session.LdapSession`."""

    factory: LdapProxyFactory
    # ITCPTransport, possibly under TLS; zope interfaces do not type-check well.
    transport: Any

    def __init__(self, factory: LdapProxyFactory, source: str = "") -> None:
        self.factory = factory
        self.config = factory.config
        self.events = factory.events
        self._clock = factory.reactor
        self.session = LdapSession(
            self.config,
            rules=factory,
            buffers=factory,
            events=factory.events,
            clock=factory.reactor.seconds,
            start_tls_available=factory.server_tls is not None,
        )
        self._source = source  # the address counted against max_connections_per_source
        self._counted = False
        self._upstream: upstream.UpstreamConnection | None = None
        # The core's answer waited for: start's (cancelled when no longer wanted),
        # or finish's (only forgotten: the core ends the sign-in either way).
        self._core_call: Deferred[Any] | None = None
        self._core_finishing = False
        self._timers: dict[Timer, Any] = {}  # IDelayedCall
        self._backlog: list[Action] = []  # actions that came while others ran
        self._running = False

    # ------------------------------------------------------------ events in

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.factory.connections.add(self)
        self.factory.sources[self._source] += 1
        self._counted = True
        self.events.connection_opened()
        set_no_delay(self.transport)
        peer = str(getattr(self.transport.getPeer(), "host", ""))
        tls_from_start = bool(interfaces.ISSLTransport.providedBy(self.transport))
        self._feed(self.session.start, peer, tls_from_start)

    def dataReceived(self, data: bytes) -> None:
        try:
            actions = self.session.data_received(data)
        except Exception:
            actions = self._crashed()
        self._run(actions)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self in self.factory.connections:
            self.factory.connections.discard(self)
            self.events.connection_closed()
        if self._counted:
            self._counted = False
            sources = self.factory.sources
            sources[self._source] -= 1
            if sources[self._source] <= 0:
                del sources[self._source]
        self._feed(self.session.connection_lost)
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        self._close_upstream(abort=False)

    def abort_session(self, code: int, diagnostic: str) -> None:
        """Close both sides, telling the client why with a Notice of Disconnection."""
        self._feed(self.session.abort, code, diagnostic)

    # The upstream connection's owner (upstream.UpstreamOwner):

    def upstream_messages(self, messages: list[bytes]) -> None:
        """Responses from the directory (the session relays all but its own binds')."""
        try:
            actions = self.session.upstream_messages(messages)
        except Exception:
            actions = self._crashed()
        self._run(actions)

    def upstream_lost(self, reason: Failure) -> None:
        """The directory connection ended after it was ready."""
        if self._upstream is None:
            return  # one we closed ourselves
        self._upstream = None
        self._feed(self.session.upstream_lost, getattr(reason.value, "label", "connection_lost"))

    def _feed(self, event: Callable[..., list[Action]], *args: Any) -> None:
        try:
            actions = event(*args)
        except Exception:
            actions = self._crashed()
        self._run(actions)

    def _crashed(self) -> list[Action]:
        log.failure("LDAP front-end error")
        return self.session.crashed()

    # ------------------------------------------------------------ actions out

    def _run(self, actions: list[Action]) -> None:
        if self._running:  # an action made something happen at once: after the rest
            self._backlog.extend(actions)
            return
        self._running = True
        try:
            while True:
                for do, argument in actions:
                    if do is _SEND_UPSTREAM:
                        if self._upstream is not None:
                            self._upstream.write(argument)
                    elif do is _SEND_CLIENT:
                        write_sequence_now(self.transport, argument)
                    else:
                        self._do(do, argument)
                if not self._backlog:
                    break
                actions, self._backlog = self._backlog, []
        finally:
            self._running = False

    def _do(self, do: Do, argument: Any) -> None:
        """Every action but the two of the forwarding path."""
        if do is Do.LOG:
            self._log(argument)
        elif do is Do.START_TIMER:
            timer, seconds = argument
            self._cancel_timer(timer)
            self._timers[timer] = self._clock.callLater(seconds, self._timer_fired, timer)
        elif do is Do.CANCEL_TIMER:
            self._cancel_timer(argument)
        elif do is Do.PAUSE_READING:
            self.transport.pauseProducing()
        elif do is Do.RESUME_READING:
            self.transport.resumeProducing()
        elif do is Do.ASK_CORE:
            self._ask_core(argument)
        elif do is Do.FINISH_CHECK:
            self._finish_check(*argument)
        elif do is Do.CHECK_IN_CORE:
            self._call_core(maybeDeferred(argument.check_here), finishing=True)
        elif do is Do.ABANDON_CHECK:
            check, reason = argument
            check.abandon(reason)
        elif do is Do.CANCEL_CORE:
            call, self._core_call = self._core_call, None
            if call is not None and not self._core_finishing:
                call.cancel()  # the core abandons the check it would have handed back
        elif do is Do.CONNECT_UPSTREAM:
            self._connect_upstream()
        elif do is Do.CLOSE_UPSTREAM:
            self._close_upstream(abort=argument)
        elif do is Do.CLOSE_CLIENT:
            self.transport.loseConnection()
        elif do is Do.START_TLS:
            self.transport.startTLS(self.factory.server_tls)
        else:  # pragma: no cover - every Do is handled
            raise AssertionError(do)

    def _log(self, line: LogLine) -> None:
        if line.limit_key:
            self.factory.log_limited(line.limit_key, line.text, **line.fields)
        else:
            log.emit(_LOG_LEVELS[line.level], line.text, **line.fields)

    def _cancel_timer(self, timer: Timer) -> None:
        call = self._timers.pop(timer, None)
        if call is not None and call.active():
            call.cancel()

    def _timer_fired(self, timer: Timer) -> None:
        self._timers.pop(timer, None)
        self._feed(self.session.timer_fired, timer)

    # ------------------------------------------------------------ the core

    def _ask_core(self, request: AuthRequest) -> None:
        self._call_core(maybeDeferred(self.factory.start_sign_in, request), finishing=False)

    def _finish_check(self, check: PasswordCheck, verdict: Any) -> None:
        self._call_core(maybeDeferred(check.finish, verdict), finishing=True)

    def _call_core(self, call: Deferred[Any], finishing: bool) -> None:
        self._core_call, self._core_finishing = call, finishing
        call.addCallbacks(self._core_answered, self._core_failed,
                          callbackArgs=(call,), errbackArgs=(call,))

    def _core_answered(self, answer: Decision | PasswordCheck, call: Deferred[Any]) -> None:
        if call is not self._core_call:  # no longer wanted: the bind was answered without it
            if isinstance(answer, PasswordCheck):
                answer.abandon()  # never keep an identity's turn
            return
        self._core_call = None
        if isinstance(answer, PasswordCheck):
            self._feed(self.session.core_check, answer)
        else:
            self._feed(self.session.core_decided, answer)

    def _core_failed(self, failure: Failure, call: Deferred[Any]) -> None:
        if call is not self._core_call:
            return
        self._core_call = None
        if not is_expected_error(failure.value):
            log.failure("LDAP bind failed unexpectedly", failure)
        self._feed(self.session.core_failed, failure.value)

    # ------------------------------------------------------------ the upstream connection

    def _connect_upstream(self) -> None:
        connection = self.factory.connect_upstream(self._clock, self.factory.upstream, self)
        self._upstream = connection
        connection.ready.addCallbacks(
            self._upstream_ready,
            self._upstream_failed,
            callbackArgs=(connection,),
            errbackArgs=(connection,),
        )

    def _upstream_ready(self, _: None, connection: upstream.UpstreamConnection) -> None:
        if connection is not self._upstream:  # given up meanwhile
            connection.close()
            return
        set_no_delay(connection.transport)
        self._link_flow_control(connection)
        self._feed(self.session.upstream_ready)

    def _link_flow_control(self, connection: upstream.UpstreamConnection) -> None:
        """Each side stops reading while the other cannot keep up with writes
        (a slow client reading a large search must not make the proxy buffer it)."""
        assert self.transport is not None and connection.transport is not None
        connection.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(connection.transport, True)

    def _upstream_failed(self, failure: Failure, connection: upstream.UpstreamConnection) -> None:
        if connection is not self._upstream:
            return
        self._upstream = None
        log.info(
            "LDAP upstream {host}:{port} unavailable: {error}",
            host=self.factory.upstream.host,
            port=self.factory.upstream.port,
            error=failure.getErrorMessage(),
        )
        self._feed(self.session.upstream_unreachable,
                   getattr(failure.value, "label", "connect_failed"))

    def _close_upstream(self, abort: bool) -> None:
        connection, self._upstream = self._upstream, None
        if connection is None:
            return
        if not connection.is_ready:
            connection.give_up()  # still connecting: the attempt ends here
        elif abort:
            connection.abort()
        else:
            connection.close(unbind=not self.session.client_unbound)


_SEND_UPSTREAM = Do.SEND_UPSTREAM
_SEND_CLIENT = Do.SEND_CLIENT
_LOG_LEVELS = {"info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}
