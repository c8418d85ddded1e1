"""The RADIUS front-end: datagrams in, a decision asked for, datagrams out.

Shaped like ``twisted.names.server``: :class:`RadiusServer` owns the
collaborators every listener shares (client table, core, duplicate cache,
challenge store, reply rules, metrics) and builds every reply; the
``DatagramProtocol`` at the end (:class:`RadiusPort`) only passes bytes in and out.  It
never decides: an Access-Request becomes an :class:`AuthRequest` for the
injected ``authenticate`` and its :class:`Decision` becomes the reply.

Per datagram: check lengths → client by source → Message-Authenticator →
duplicate cache → by code.  Anything dropped is counted by reason; nothing
raises out of here, and a failing core is answered with an Access-Reject.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure

from backends.base import Identity
from policy.decision import (
    Authenticate,
    AuthRequest,
    Decision,
    Outcome,
    Reason,
    new_request_id,
)
from policy.engine import DECISION_LINE
from policy.escaping import escape_controls
from policy.usernames import MAX_USERNAME
from proxy.logs import LogLimiter
from proxy.radius.challenge import ChallengeStore
from proxy.radius.clients import ClientTable, EnrollmentNotice, RadiusClientConfig, ReplyRuleLike
from proxy.radius.duplicates import DuplicateCache, DuplicateKey, Seen, duplicate_key
from proxy.radius.events import DropReason, LocalReason, NoEvents, RadiusEvents
from proxy.radius.openvpn import parse_static_challenge
from proxy.radius.packet import (
    Attr,
    Code,
    Packet,
    access_accept,
    access_challenge,
    access_reject,
    accounting_response,
    decode_user_password,
    message_authenticator_problem,
    parse_datagram,
    status_server_reply,
    verify_accounting_request,
)
from proxy.radius.replies import ReplyAttributes

if TYPE_CHECKING:
    from pyrad.dictionary import Dictionary
    from twisted.internet.interfaces import IListeningPort

log = logging.getLogger("mfa_proxy.radius")

Send = Callable[[bytes], None]


class ReactorTime(Protocol):
    """The part of ``IReactorTime`` used here (a reactor, or ``task.Clock`` in tests)."""

    def seconds(self) -> float: ...


class UDPReactor(Protocol):
    """The part of ``IReactorUDP`` used by :meth:`RadiusServer.listen`."""

    def listenUDP(self, port: int, protocol: DatagramProtocol,  # noqa: N802
                  interface: str = "", maxPacketSize: int = 8192) -> IListeningPort: ...  # noqa: N803


@dataclass(frozen=True)
class ServerSettings:
    """The ``[radius]`` settings that are not per client."""

    challenge_timeout: float = 120.0
    duplicate_window: float = 30.0
    max_pending_challenges: int = 100_000
    max_cached_answers: int = 100_000
    reply_rules: tuple[ReplyRuleLike, ...] = ()  # [[radius.reply]], before each client's own
    unknown_client_log_interval: float = 60.0


@dataclass(frozen=True, slots=True)  # one per pending challenge
class CodeRound:
    """Pending after NEED_CODE: the password was verified, the code comes next."""

    identity: Identity | None


@dataclass(frozen=True, slots=True)  # one per pending challenge
class NoticeRound:
    """Pending after an enrollment-notice challenge: any answer gets this accept."""

    decision: Decision


@dataclass
class _Exchange:
    """One Access-Request on its way to an answer."""

    packet: Packet
    client: RadiusClientConfig
    host: str
    key: DuplicateKey
    send: Send
    started: float
    username: str = ""
    # One id for every log line of this exchange, the core's included.
    request_id: str = field(default_factory=new_request_id)


class RadiusServer:
    """Shared by every RADIUS listener; :meth:`auth_protocol` and
    :meth:`accounting_protocol` make the Twisted side."""

    def __init__(self, clients: ClientTable, authenticate: Authenticate,
                 dictionary: Dictionary, *, events: RadiusEvents | None = None,
                 clock: ReactorTime | None = None,
                 settings: ServerSettings | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = cast(ReactorTime, reactor)
        self.clients = clients
        self.authenticate = authenticate
        self.dictionary = dictionary
        self.events: RadiusEvents = events or NoEvents()
        self.settings = settings or ServerSettings()
        self._clock = clock
        self.duplicates = DuplicateCache(self.settings.duplicate_window,
                                         self.settings.max_cached_answers, clock.seconds)
        self.challenges: ChallengeStore[CodeRound | NoticeRound] = ChallengeStore(
            self.settings.challenge_timeout, self.settings.max_pending_challenges, clock.seconds)
        # Encoded now, so a bad rule fails at start, naming the attribute.
        self._replies = {c.name: ReplyAttributes(self.settings.reply_rules + c.reply_rules,
                                                 dictionary) for c in clients}
        self._unknown_sources = LogLimiter(clock.seconds,
                                           self.settings.unknown_client_log_interval)
        # False once the process drains (SIGTERM): new requests get no answer, so
        # the NAS fails over; those being decided are still answered.
        self.accepting = True

    def stop_accepting(self) -> None:
        self.accepting = False

    def reconfigure(self, clients: ClientTable,
                    reply_rules: tuple[ReplyRuleLike, ...] | None = None) -> None:
        """New clients (secrets, modes...) and reply rules from the next datagram
        on (SIGHUP). Everything is built before anything is swapped: a bad rule
        raises ValueError and leaves the running ones. A request being decided
        keeps the client it came in with."""
        rules = self.settings.reply_rules if reply_rules is None else tuple(reply_rules)
        replies = {c.name: ReplyAttributes(rules + c.reply_rules, self.dictionary)
                   for c in clients}
        self.settings = replace(self.settings, reply_rules=rules)
        self.clients, self._replies = clients, replies

    # --- Twisted side ----------------------------------------------------

    def auth_protocol(self) -> RadiusPort:
        return RadiusPort(self.handle_auth)

    def accounting_protocol(self) -> RadiusPort:
        return RadiusPort(self.handle_accounting)

    def listen(self, reactor: UDPReactor, auth: Iterable[tuple[str, int]] = (),
               accounting: Iterable[tuple[str, int]] = ()) -> list[IListeningPort]:
        """Listen on every (host, port); IPv6 hosts without brackets."""
        ports = [reactor.listenUDP(port, self.auth_protocol(), interface=host)
                 for host, port in auth]
        ports += [reactor.listenUDP(port, self.accounting_protocol(), interface=host)
                  for host, port in accounting]
        return ports

    # --- entry points: bytes in, replies through ``send`` ----------------

    def handle_auth(self, data: bytes, addr: tuple[Any, ...], send: Send) -> None:
        self._guarded(self._auth, data, addr, send)

    def handle_accounting(self, data: bytes, addr: tuple[Any, ...], send: Send) -> None:
        self._guarded(self._accounting, data, addr, send)

    def _guarded(self, handler: Callable[[bytes, tuple[Any, ...], Send], None],
                 data: bytes, addr: tuple[Any, ...], send: Send) -> None:
        try:
            handler(data, addr, send)
        except Exception:  # a bug: never let it reach the reactor
            log.exception("RADIUS: unexpected error on a datagram from %s", addr[0])
            self.events.dropped(DropReason.INTERNAL_ERROR)

    def _checked(self, data: bytes, host: str) -> tuple[Packet, RadiusClientConfig] | None:
        packet = parse_datagram(data)
        if isinstance(packet, DropReason):
            self.events.dropped(packet)
            return None
        client = self.clients.lookup(host)
        if client is None:
            if self._unknown_sources.allow(host):
                log.warning("RADIUS: dropped a packet from %s, which is no configured client "
                            "(logged once a minute per source)", host)
            self.events.dropped(DropReason.UNKNOWN_CLIENT)
            return None
        return packet, client

    def _auth(self, data: bytes, addr: tuple[Any, ...], send: Send) -> None:
        checked = self._checked(data, addr[0])
        if checked is None:
            return
        packet, client = checked
        if packet.code == Code.STATUS_SERVER:
            if self.accepting:  # draining: "not alive", so the NAS fails over
                self._status_server(packet, client, send, accounting=False)
            else:
                self.events.dropped(DropReason.SHUTTING_DOWN)
        elif packet.code != Code.ACCESS_REQUEST:
            self.events.dropped(DropReason.UNSUPPORTED_CODE)
        else:
            self._access_request(packet, client, addr, send)

    def _status_server(self, packet: Packet, client: RadiusClientConfig, send: Send,
                       accounting: bool) -> None:
        # RFC 5997 §3: a Status-Server without a Message-Authenticator is discarded.
        problem = message_authenticator_problem(packet, client.nas_secret, required=True)
        if problem is not None:
            self.events.dropped(problem)
            return
        send(status_server_reply(packet, client.nas_secret, accounting=accounting))

    def _access_request(self, packet: Packet, client: RadiusClientConfig,
                        addr: tuple[Any, ...], send: Send) -> None:
        problem = message_authenticator_problem(packet, client.nas_secret,
                                                client.require_message_authenticator)
        if problem is not None:
            self.events.dropped(problem)
            return
        key = duplicate_key(client.name, packet.identifier, packet.authenticator)
        seen = self.duplicates.begin(key)
        if seen is Seen.IN_PROGRESS:
            self.events.dropped(DropReason.DUPLICATE_IN_PROGRESS)
        elif isinstance(seen, bytes):
            self.events.retransmission(client.name)
            send(seen)
        elif not self.accepting:
            # Draining: copies of requests decided already were answered above;
            # a new one gets nothing, so the NAS retries another server.
            self.duplicates.forget(key)
            self.events.dropped(DropReason.SHUTTING_DOWN)
        else:
            self._answer(_Exchange(packet, client, addr[0], key, send, self._clock.seconds()))

    # --- Access-Request: to an AuthRequest ---------------------------------

    def _answer(self, ex: _Exchange) -> None:
        prepared = self._prepare(ex)
        if isinstance(prepared, LocalReason):
            self._finish(ex, self._reject_locally(ex, prepared))
        elif isinstance(prepared, Decision):
            self._finish(ex, self._accept(ex, prepared, notice_shown=True))
        else:
            try:
                decided = self.authenticate(prepared)
            except Exception:
                self._completed(Failure(), ex)  # type: ignore[no-untyped-call]
                return
            # One callback for both outcomes: this is per request, and each
            # extra Deferred callback costs about as much as verifying the packet.
            decided.addBoth(self._completed, ex)

    def _completed(self, result: Decision | Failure, ex: _Exchange) -> None:
        try:
            if isinstance(result, Failure):
                reply = self._core_failed(result, ex)
            else:
                try:
                    reply = self._decided(result, ex)
                except Exception:  # e.g. reply attributes too long for one packet
                    reply = self._core_failed(Failure(), ex)  # type: ignore[no-untyped-call]
            self._finish(ex, reply)
        except Exception:
            self._lost(Failure(), ex)  # type: ignore[no-untyped-call]

    def _prepare(self, ex: _Exchange) -> AuthRequest | Decision | LocalReason:
        """What to ask the core; or a stored accept; or why to reject at once."""
        packet, client = ex.packet, ex.client
        if packet.uses_unsupported_auth():
            return LocalReason.UNSUPPORTED_AUTH
        username = _text(packet.first(Attr.USER_NAME))
        if not username:
            return LocalReason.MISSING_USERNAME
        ex.username = username
        hidden = packet.first(Attr.USER_PASSWORD)
        if hidden is None:
            return LocalReason.MISSING_PASSWORD
        password = _text(decode_user_password(hidden, client.nas_secret, packet.authenticator))
        if password is None:
            return LocalReason.MALFORMED_PASSWORD
        state = packet.first(Attr.STATE)
        if state is not None:
            return self._second_round(ex, state, password)
        return self._first_round(ex, password)

    def _first_round(self, ex: _Exchange, password: str) -> AuthRequest:
        static = parse_static_challenge(password)
        if static is not None:
            password, code = static
            return self._auth_request(ex, password, code or None)
        return self._auth_request(ex, password, None)

    def _second_round(self, ex: _Exchange, state: bytes,
                      answer: str) -> AuthRequest | Decision | LocalReason:
        pending = self.challenges.take(state, ex.client.name, ex.username)
        if pending is None:
            return LocalReason.BAD_STATE
        if isinstance(pending, NoticeRound):
            return pending.decision
        # The password was checked in the first round and is not kept; the
        # core takes the verified identity instead of asking the directory.
        return self._auth_request(ex, "", answer.strip(), pending.identity)

    def _auth_request(self, ex: _Exchange, password: str, code: str | None,
                      identity: Identity | None = None) -> AuthRequest:
        c = ex.client
        return AuthRequest(
            username=ex.username, password=password, protocol="radius", client=c.name,
            mfa=c.mfa, split=c.mode, separator=c.separator, code=code,
            verified_identity=identity, repeat_window_seconds=c.repeat_window_seconds,
            source=ex.host, request_id=ex.request_id,
            needs_groups=self._replies[c.name].uses_groups)

    # --- a Decision: to a reply ------------------------------------------

    def _decided(self, decision: Decision, ex: _Exchange) -> bytes:
        if decision.outcome is Outcome.ACCEPT:
            return self._accept(ex, decision)
        if decision.outcome is Outcome.NEED_CODE:
            return self._ask_for_code(ex, decision)
        reply = access_reject(ex.packet, ex.client.nas_secret, decision.message)
        self._count(ex, "reject", decision.reason)
        return reply

    def _accept(self, ex: _Exchange, decision: Decision, notice_shown: bool = False) -> bytes:
        notice = ex.client.enrollment_notice
        tell_days_left = decision.days_left is not None and not notice_shown
        if tell_days_left and notice is EnrollmentNotice.CHALLENGE:
            return self._challenge(ex, NoticeRound(decision), decision.message, decision)
        message = ""
        if tell_days_left and notice is EnrollmentNotice.REPLY_MESSAGE:
            message = decision.message
        groups = decision.identity.groups if decision.identity else ()
        attributes = self._replies[ex.client.name].for_groups(groups)
        reply = access_accept(ex.packet, ex.client.nas_secret, message, attributes)
        self._count(ex, "accept", decision.reason)
        return reply

    def _ask_for_code(self, ex: _Exchange, decision: Decision) -> bytes:
        # Every text the user sees is the core's (policy/engine.py), for every front-end.
        return self._challenge(ex, CodeRound(decision.identity), decision.message, decision)

    def _challenge(self, ex: _Exchange, pending: CodeRound | NoticeRound, message: str,
                   decision: Decision) -> bytes:
        state = self.challenges.issue(ex.client.name, ex.username, pending)
        reply = access_challenge(ex.packet, ex.client.nas_secret, state, message)
        self._count(ex, "challenge", decision.reason)
        return reply

    def _reject_locally(self, ex: _Exchange, reason: LocalReason) -> bytes:
        self._log_reject(ex, reason)
        reply = access_reject(ex.packet, ex.client.nas_secret)
        self._count(ex, "reject", reason)
        return reply

    def _core_failed(self, failure: Failure, ex: _Exchange) -> bytes:
        log.error("RADIUS: answering %r from client %s failed; answered with a reject\n%s",
                  ex.username, ex.client.name, failure.getTraceback())
        self._log_reject(ex, LocalReason.INTERNAL_ERROR)
        reply = access_reject(ex.packet, ex.client.nas_secret)
        self._count(ex, "reject", LocalReason.INTERNAL_ERROR)
        return reply

    def _log_reject(self, ex: _Exchange, reason: LocalReason) -> None:
        """A reject the core never saw, in the core's decision-line format."""
        elapsed = max(0.0, self._clock.seconds() - ex.started) * 1000.0
        log.info(DECISION_LINE, escape_controls(ex.username[:MAX_USERNAME]) or "-", "radius",
                 ex.client.name, ex.host, "reject", reason.value, f"{elapsed:.1f}",
                 ex.request_id)

    def _lost(self, failure: Failure, ex: _Exchange) -> None:
        """Not even a reject could be built or sent: drop, and let a retry be decided."""
        log.error("RADIUS: no answer for client %s\n%s", ex.client.name,
                  failure.getTraceback())
        self.duplicates.forget(ex.key)
        self.events.dropped(DropReason.INTERNAL_ERROR)

    def _finish(self, ex: _Exchange, reply: bytes) -> None:
        """Every answered Access-Request ends here: rejected locally, answered from
        a stored challenge round or decided by the core, it is timed the same way."""
        elapsed = max(0.0, self._clock.seconds() - ex.started)  # a wall clock may step back
        self.events.decision_seconds(elapsed)
        if ex.client.nas_timeout and elapsed > ex.client.nas_timeout:
            log.warning("RADIUS: deciding for client %s took %.1f s, longer than its "
                        "nas_timeout (%.1f s)", ex.client.name, elapsed, ex.client.nas_timeout)
        self.duplicates.complete(ex.key, reply)
        ex.send(reply)

    def _count(self, ex: _Exchange, result: str, reason: Reason | LocalReason) -> None:
        self.events.request(ex.client.name, result, reason.value)

    # --- accounting ------------------------------------------------------

    def _accounting(self, data: bytes, addr: tuple[Any, ...], send: Send) -> None:
        checked = self._checked(data, addr[0])
        if checked is None:
            return
        packet, client = checked
        if packet.code == Code.STATUS_SERVER:
            self._status_server(packet, client, send, accounting=True)
        elif packet.code != Code.ACCOUNTING_REQUEST:
            self.events.dropped(DropReason.UNSUPPORTED_CODE)
        elif not verify_accounting_request(packet, client.nas_secret):
            # The Request Authenticator signs the whole packet (a
            # Message-Authenticator too): a wrong secret fails here.
            self.events.dropped(DropReason.BAD_REQUEST_AUTHENTICATOR)
        else:
            self._log_accounting(packet, client)
            self.events.accounting(client.name)
            send(accounting_response(packet, client.nas_secret))

    def _log_accounting(self, packet: Packet, client: RadiusClientConfig) -> None:
        status = packet.first(Attr.ACCT_STATUS_TYPE)
        log.info("RADIUS accounting from client %s: %s user=%r session=%r", client.name,
                 self._status_name(status), _text(packet.first(Attr.USER_NAME)),
                 _text(packet.first(Attr.ACCT_SESSION_ID)))

    def _status_name(self, raw: bytes | None) -> str:
        if raw is None or len(raw) != 4:
            return "(no status)"
        attr = self.dictionary.attributes.get("Acct-Status-Type")
        if attr is not None and attr.values.HasBackward(raw):  # VALUEs are kept encoded
            return str(attr.values.GetBackward(raw))
        return str(int.from_bytes(raw, "big"))


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


class RadiusPort(DatagramProtocol):
    """One UDP port: datagrams to ``handle`` (RadiusServer.handle_auth or
    handle_accounting), replies back to their sender."""

    noisy = False  # no "Starting protocol" line per port: serve logs what it listens on

    def __init__(self, handle: Callable[[bytes, tuple[Any, ...], Send], None]) -> None:
        self.handle = handle

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:  # noqa: N802
        self.handle(datagram, addr, partial(self._send, addr))

    def _send(self, addr: Any, reply: bytes) -> None:
        _write(self.transport, reply, addr)


def _write(transport: Any, reply: bytes, addr: Any) -> None:
    if transport is None:
        return  # the listener stopped while the core was deciding
    try:
        transport.write(reply, addr)
    except Exception as exc:  # a full socket buffer, a vanished route: the NAS retries
        log.warning("RADIUS: could not send to %s: %s", addr[0], exc)
