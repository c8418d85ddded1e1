"""One LDAP client session as a state machine: events in, actions out, no I/O.

After h11's ``_state.py``: :class:`State` names where a session is, and
:data:`TRANSITIONS` is every move it may make; :class:`LdapSession` takes
events (bytes read from the client, messages read from the directory, the
core's answers, a timer, the upstream ready or lost) and returns what to do
about them as a list of :data:`Action` — ``(Do.X, argument)`` tuples the
Twisted protocol (:mod:`proxy.ldap.server`) carries out in order. It never
touches a socket, a reactor or a Deferred, so a test can drive every
interleaving directly.

Requests other than binds go upstream as the bytes the client sent and
responses come back the same way, message IDs untouched; only the responses
to the binds the proxy sends itself are intercepted, and those reuse the
message ID of the client's bind.

Sequencing — the invariants this module keeps (RFC 4511 §4.1.1.1, §4.2.1):

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
3. The proxy's own upstream requests (the user's bind, which is the
   password check of an MFA bind; a relayed bind; the anonymous reset) are
   answered only by a response with their message ID AND their type, a
   BindResponse. Any other response with that ID while one is in flight,
   or a BindResponse the proxy did not wait for, is a directory protocol
   violation: both connections close.
4. The upstream session counts as possibly bound from the moment any bind
   is sent on it until an anonymous bind on it succeeds. A bind that does
   not succeed (for any reason, the front-end's own refusals included)
   while the session is possibly bound is answered only after an anonymous
   bind has reset it; if the reset fails, the client gets no bind answer:
   both connections close. A bind that times out (the core or the
   directory may still act on it) gets 52, and both connections close.
5. The core's turn for an identity (its gate, see :mod:`policy.engine`) is
   held from the core's :class:`~policy.engine.PasswordCheck` until the check
   is finished or abandoned; every path out of the states that hold one
   (an answer, a timeout, either connection lost, a bug) ends it.

How they are kept: (1) ``_admit`` takes every ID as it is read, and only a
final answer (relayed, answered here, or abandoned) frees it; (2) a bind
moves the session out of ``READY`` and requests are only dispatched in
``READY``: everything read meanwhile waits in the queue, with reading
paused; (3) :class:`~proxy.ldap.upstream_session.UpstreamSession` records the
proxy's own bind in flight, and ``upstream_messages`` takes only a
BindResponse with its ID for the answer; (4) ``UpstreamSession.bound`` is
MAYBE from any bind sent until an anonymous bind succeeds, and ``_settle``
sends the reset before a failed answer while it is; (5) ``_Bind.check`` is
the check held, and each way out of BIND_UPSTREAM finishes it (the upstream
bind's answer) or abandons it (``_bind_timed_out``, ``_close``).

An MFA bind (:mod:`proxy.ldap.bind` has its steps): the core's ``start``
decides what needs no password check (locked, unknown, ...) and is answered
at once; otherwise it hands back a password check. When the second factor
checked out (``binds_session``) that check is made as the client's upstream
session bind as the resolved entry (the one bind as the user per sign-in),
and its BindResponse is the verdict the core's ``finish`` decides on; when
the attempt fails whatever the password (a wrong, missing or used code, an
expired enrollment) the core makes the check itself (``CHECK_IN_CORE``), on
its own connection. Either way the front-end's rules for the entry (``[ldap]
user_base``) come first. So the session is bound as a user only when both
factors checked out; a reject after that bind succeeded (the code used
meanwhile by another instance, a lock from elsewhere) is answered after the
reset (invariant 4).

The moves (:data:`TRANSITIONS`, by :class:`Step`)::

    CONNECTING             --upstream settled-->  READY
    READY                  --needs upstream---->  REACHING --upstream settled--> READY
    READY                  --bind read--------->  BIND_WAITING_FOR_QUIET
    BIND_WAITING_FOR_QUIET --quiet------------->  BIND_DECIDING
    BIND_DECIDING          --needs upstream---->  BIND_REACHING --upstream settled--> BIND_DECIDING
    BIND_DECIDING          --bind sent--------->  BIND_UPSTREAM   (a relayed bind, or the
                                                  password check the core handed back)
    BIND_UPSTREAM          --verdict----------->  BIND_FINISHING  (the core decides the rest)
    BIND_DECIDING          --core checks------->  BIND_FINISHING  (a check that must not
                                                  bind the session: the core makes it)
    BIND_DECIDING, BIND_UPSTREAM, BIND_FINISHING --reset sent-->  RESETTING
    BIND_DECIDING, BIND_UPSTREAM, BIND_FINISHING, RESETTING --answered--> READY
    every state but CLOSED --close------------->  CLOSED

Requests are dispatched only in READY; in every other state what the client
sends is admitted (its ID checked and taken) and queued.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from backends.ldapwire.ber import BerError
from backends.ldapwire.framing import MessageFramer
from backends.ldapwire.messages import (
    ABANDON_REQUEST,
    BIND_REQUEST,
    BIND_RESPONSE,
    EXTENDED_REQUEST,
    FINAL_RESPONSE,
    FINAL_RESPONSES,
    MAX_MESSAGE_ID,
    OPERATION_NAMES,
    REQUESTS,
    START_TLS_OID,
    UNBIND_REQUEST,
    BindRequest,
    MessageHeader,
    ResultCode,
    abandoned_message_id,
    decode_bind_request,
    encode_bind_response,
    encode_extended_response,
    encode_notice_of_disconnection,
    encode_result,
    extended_request_name,
    peek,
    peek_id_and_tag,
    response_for,
)
from policy.decision import Decision, Reason
from proxy.ldap.bind import (
    DIRECTORY_DOWN,
    INTERNAL_ERROR,
    MFA_BIND,
    OUTSIDE_USER_BASE,
    TIMED_OUT,
    UNAVAILABLE,
    BindReply,
    BindRules,
    EntryBind,
    Relay,
    core_request,
    entry_bind,
    password_verdict,
    plan_bind,
    reply_for_decision,
    reply_for_error,
    reply_for_relayed_bind,
)
from proxy.ldap.config import LdapFrontendConfig
from proxy.ldap.events import LdapEvents
from proxy.ldap.upstream_session import Bound, Link, SessionBug, UpstreamSession

if TYPE_CHECKING:
    from policy.engine import PasswordCheck

# ------------------------------------------------------------------ states


class State(enum.Enum):
    CONNECTING = "connecting"  # the first upstream connection is being made: requests wait
    READY = "ready"  # requests are handled as they are read: forwarded, or answered here
    REACHING = "reaching"  # a request waits while a down upstream is tried again
    BIND_WAITING_FOR_QUIET = "bind_waiting_for_quiet"  # for forwarded operations to finish
    BIND_DECIDING = "bind_deciding"  # the front-end's checks, then the core's start
    BIND_REACHING = "bind_reaching"  # the bind needs a down upstream, which is tried again
    BIND_UPSTREAM = "bind_upstream"  # the proxy's own bind (the password check, or relayed)
    BIND_FINISHING = "bind_finishing"  # the core's finish: code, counters, audit
    RESETTING = "resetting"  # the anonymous bind before a failed bind's answer (invariant 4)
    CLOSED = "closed"


class Step(enum.Enum):
    """Why a session moves: the labels of :data:`TRANSITIONS`."""

    UPSTREAM_SETTLED = "upstream_settled"  # a connection attempt ended: ready, or known down
    NEEDS_UPSTREAM = "needs_upstream"  # the upstream is down and may be tried again
    BIND_READ = "bind_read"  # a bind is dispatched
    QUIET = "quiet"  # no forwarded operation is outstanding: the bind starts
    BIND_SENT = "bind_sent"  # the proxy's own bind went upstream
    VERDICT = "verdict"  # the directory answered the password check
    CORE_CHECKS = "core_checks"  # the core checks the password itself (not on the session)
    RESET_SENT = "reset_sent"  # the anonymous reset went upstream
    ANSWERED = "answered"  # the client has the bind's answer
    CLOSE = "close"


_BIND_STATES = (
    State.BIND_WAITING_FOR_QUIET,
    State.BIND_DECIDING,
    State.BIND_REACHING,
    State.BIND_UPSTREAM,
    State.BIND_FINISHING,
    State.RESETTING,
)

TRANSITIONS: dict[State, dict[Step, State]] = {
    State.CONNECTING: {Step.UPSTREAM_SETTLED: State.READY},
    State.READY: {
        Step.NEEDS_UPSTREAM: State.REACHING,
        Step.BIND_READ: State.BIND_WAITING_FOR_QUIET,
    },
    State.REACHING: {Step.UPSTREAM_SETTLED: State.READY},
    State.BIND_WAITING_FOR_QUIET: {Step.QUIET: State.BIND_DECIDING},
    State.BIND_DECIDING: {
        Step.NEEDS_UPSTREAM: State.BIND_REACHING,
        Step.BIND_SENT: State.BIND_UPSTREAM,
        Step.CORE_CHECKS: State.BIND_FINISHING,
        Step.RESET_SENT: State.RESETTING,
        Step.ANSWERED: State.READY,
    },
    State.BIND_REACHING: {Step.UPSTREAM_SETTLED: State.BIND_DECIDING},
    State.BIND_UPSTREAM: {
        Step.VERDICT: State.BIND_FINISHING,
        Step.RESET_SENT: State.RESETTING,
        Step.ANSWERED: State.READY,
    },
    State.BIND_FINISHING: {Step.RESET_SENT: State.RESETTING, Step.ANSWERED: State.READY},
    State.RESETTING: {Step.ANSWERED: State.READY},
    State.CLOSED: {},
}
for _state in State:
    if _state is not State.CLOSED:
        TRANSITIONS[_state][Step.CLOSE] = State.CLOSED

# ------------------------------------------------------------------ actions


class Do(enum.Enum):
    """What the Twisted side does; each action is ``(Do.X, argument)``."""

    SEND_UPSTREAM = "send_upstream"  # bytes: whole messages, to the directory
    SEND_CLIENT = "send_client"  # list[bytes]: whole messages, to the client, in one write
    START_TLS = "start_tls"  # None: the client's TLS starts (after the response before it)
    PAUSE_READING = "pause_reading"  # None: stop reading from the client
    RESUME_READING = "resume_reading"  # None
    CONNECT_UPSTREAM = "connect_upstream"  # None: answer with upstream_ready/unreachable
    CLOSE_UPSTREAM = "close_upstream"  # bool: abort (drop at once) rather than close
    CLOSE_CLIENT = "close_client"  # None: after what was sent before it
    ASK_CORE = "ask_core"  # AuthRequest: the core's start; answer with core_decided
    #   (a decision), core_check (a PasswordCheck) or core_failed
    FINISH_CHECK = "finish_check"  # (PasswordCheck, verdict): answer with core_decided/core_failed
    CHECK_IN_CORE = "check_in_core"  # PasswordCheck: its check_here(); answer the same way
    ABANDON_CHECK = "abandon_check"  # (PasswordCheck, Reason): no verdict will come
    CANCEL_CORE = "cancel_core"  # None: the answer asked for is no longer wanted
    START_TIMER = "start_timer"  # (Timer, seconds): answer with timer_fired(timer)
    CANCEL_TIMER = "cancel_timer"  # Timer
    LOG = "log"  # LogLine


Action = tuple[Do, Any]


class Timer(enum.Enum):
    IDLE = "idle"  # idle_timeout: no traffic while nothing is outstanding
    UNBOUND = "unbound"  # unbound_timeout: no successful bind since connecting
    BIND_WAIT = "bind_wait"  # bind_timeout: a bind waiting for operations to finish
    BIND = "bind"  # bind_timeout: a bind's start, password check, finish and reset together


class LogLine:
    """A log line for the Twisted side; with ``limit_key``, at most one a minute
    per key (something a client may cause in a flood)."""

    __slots__ = ("fields", "level", "limit_key", "text")

    def __init__(self, level: str, text: str, limit_key: str = "", **fields: object) -> None:
        self.level, self.text, self.limit_key, self.fields = level, text, limit_key, fields

    def __repr__(self) -> str:
        return f"LogLine({self.level!r}, {self.text!r}, {self.fields!r})"


class SharedBuffers(Protocol):
    """Bytes of partial messages held from clients, all connections together."""

    buffered_bytes: int


class _FirstBind(enum.Enum):
    """unbound_timeout's view of the session."""

    PENDING = "pending"  # no bind has succeeded yet
    OVERDUE = "overdue"  # the time ran out during a bind: decided by its answer
    DONE = "done"  # a bind succeeded


class _Bind:
    """The client's bind in progress (one at a time: invariant 2)."""

    __slots__ = ("check", "core_checked", "header", "message", "read_at", "relay", "reply",
                 "request", "started")

    def __init__(self, message: bytes, header: MessageHeader, read_at: float) -> None:
        self.message, self.header, self.read_at = message, header, read_at
        self.started = read_at  # when its decision began (the bind metric's seconds)
        self.request: BindRequest | None = None
        self.relay: Relay | None = None  # a relayed bind at the directory
        self.check: PasswordCheck | None = None  # the core's, while its upstream bind runs
        self.reply: BindReply | None = None  # the answer, while the reset runs
        self.core_checked = False  # the core checked the password: the session is not the user's

    @property
    def message_id(self) -> int:
        return self.header.message_id


_SEND_UPSTREAM = Do.SEND_UPSTREAM
_LINK_READY = Link.READY
_READY = State.READY
_CLOSED = State.CLOSED
_WAITING_FOR_QUIET = State.BIND_WAITING_FOR_QUIET
# Where the core's answer is waited for (and, once closed, still counted when it comes).
_CORE_ANSWERS = (State.BIND_DECIDING, State.BIND_FINISHING, State.CLOSED)


class LdapSession:
    """The session logic of one client connection and its upstream session.

    ``config`` is the session's for its whole life (a reload changes the
    factory's, for new connections); ``rules`` (exempt DNs, ``user_base``,
    bind-cache windows) and ``buffers`` are shared with every connection;
    ``clock`` gives the time in seconds.
    """

    def __init__(
        self,
        config: LdapFrontendConfig,
        rules: BindRules,
        buffers: SharedBuffers,
        events: LdapEvents,
        clock: Callable[[], float],
        start_tls_available: bool = False,
    ) -> None:
        self.config = config
        self.rules = rules
        self.events = events
        self.upstream = UpstreamSession()
        self.state = State.CONNECTING
        self._buffers = buffers
        self._clock = clock
        self._start_tls_available = start_tls_available
        self._requires_bind = config.requires_bind
        self._framer = MessageFramer(config.max_message_size)
        self._buffered = 0  # this session's partial message, in buffers.buffered_bytes
        # Messages read but not yet handled (waiting for a bind or the upstream);
        # at most one read's worth: reading pauses while any wait.
        self._queue: deque[tuple[bytes, MessageHeader]] = deque()
        self._paused = False
        self._in_use: set[int] = set()  # invariant 1: IDs read and not finally answered
        self._outstanding: set[int] = set()  # forwarded requests awaiting their final response
        self._bind: _Bind | None = None
        self._waiting: tuple[bytes, MessageHeader] | None = None  # the request in REACHING
        self._timers: set[Timer] = set()
        self._first_bind = _FirstBind.PENDING
        self._authenticated = False  # the client's last bind succeeded (require_bind)
        self._tls = False
        self._peer = ""
        self._last_activity = 0.0
        # The client's own UnbindRequest went upstream: the upstream connection then
        # just closes (else the proxy unbinds it itself, see upstream.close).
        self.client_unbound = False

    # ------------------------------------------------------------ what tests look at

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._in_use)

    @property
    def outstanding(self) -> frozenset[int]:
        return frozenset(self._outstanding)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def buffered(self) -> int:
        """Bytes of a partial message held by this session."""
        return self._framer.buffered

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED

    @property
    def timers(self) -> frozenset[Timer]:
        return frozenset(self._timers)

    # ------------------------------------------------------------ events: lifecycle

    def start(self, peer: str = "", tls: bool = False) -> list[Action]:
        """The client connected (``tls``: under TLS from the first byte)."""
        self._peer, self._tls = peer, tls
        self._last_activity = self._clock()
        out: list[Action] = []
        if self.config.idle_timeout > 0:
            self._start_timer(out, Timer.IDLE, self.config.idle_timeout)
        if self.config.unbound_timeout > 0:
            self._start_timer(out, Timer.UNBOUND, self.config.unbound_timeout)
        self.upstream.connecting()
        out.append((Do.CONNECT_UPSTREAM, None))
        return out

    def connection_lost(self) -> list[Action]:
        """The client's connection ended."""
        out: list[Action] = []
        if self.state is not _CLOSED:
            self._close(out, None, client=False)
        return out

    def abort(self, code: int, diagnostic: str, dropped: str | None = None) -> list[Action]:
        """Close both sides, telling the client why with a Notice of Disconnection."""
        out: list[Action] = []
        self._abort(out, code, diagnostic, dropped)
        return out

    def crashed(self) -> list[Action]:
        """A bug surfaced while handling an event: close both, as an internal error."""
        if self.state is _CLOSED:
            return [(Do.CLOSE_CLIENT, None), (Do.CLOSE_UPSTREAM, True)]
        return self.abort(ResultCode.OTHER, "internal error", dropped="internal_error")

    # ------------------------------------------------------------ events: the client

    def data_received(self, data: bytes) -> list[Action]:
        out: list[Action] = []
        if self.state is _CLOSED:
            return out
        self._last_activity = self._clock()
        try:
            messages = self._framer.feed(data)
        except BerError as error:
            self._drop_malformed(out, error)
            return out
        # Every message of the segment is admitted (its ID checked and taken)
        # before any is handled: what counts as outstanding is what the client
        # had sent, not what the directory happened to answer in between.
        admitted: list[tuple[bytes, MessageHeader]] = []
        for message in messages:
            header = self._admit(out, message)
            if header is None:
                return out
            admitted.append((message, header))
        if self.state is _READY and not self._queue and len(admitted) == 1:
            self._dispatch(out, *admitted[0])  # the common case, without the queue
        elif admitted:
            self._queue.extend(admitted)
        if self._account_buffers(out):
            self._drain(out)
        return out

    def _admit(self, out: list[Action], message: bytes) -> MessageHeader | None:
        """The envelope of a request just read, its ID now in use; None (and the
        session closed) when it is no request or its ID may not be used."""
        try:
            header = peek(message)
        except BerError as error:
            self._drop_malformed(out, error)
            return None
        tag, message_id = header.op_tag, header.message_id
        if tag not in REQUESTS:
            self._drop_malformed(out, BerError(f"protocolOp {tag:#04x} is not a request"))
            return None
        if message_id in self._in_use:
            self._abort(
                out,
                ResultCode.PROTOCOL_ERROR,
                f"message ID {message_id} is still outstanding",
                dropped="message_id_reused",
            )
            return None
        if not 0 < message_id <= MAX_MESSAGE_ID:
            self._abort(
                out, ResultCode.PROTOCOL_ERROR, "message ID out of range", dropped="protocol_error"
            )
            return None
        if tag in FINAL_RESPONSE:  # unbind and abandon get no response
            self._in_use.add(message_id)
        return header

    def _account_buffers(self, out: list[Action]) -> bool:
        """Bring the shared buffered_bytes up to date with this session's partial
        message; False, and the session dropped, when it would push the total
        past max_buffered_bytes (a request that arrives whole costs nothing here)."""
        held = self._framer.buffered
        grown = held - self._buffered
        if grown > 0 and self._buffers.buffered_bytes + grown > self.config.max_buffered_bytes:
            self._abort(out, ResultCode.BUSY, "server busy", dropped="buffer_limit")
            return False
        self._buffers.buffered_bytes += grown
        self._buffered = held
        return True

    def _release_buffers(self) -> None:
        """Forget everything read and not handled, and give its share back."""
        self._framer.clear()
        self._queue.clear()
        self._buffers.buffered_bytes -= self._buffered
        self._buffered = 0

    def _drain(self, out: list[Action]) -> None:
        """Handle queued messages until one makes us wait; read no more while any wait."""
        queue = self._queue
        while queue and self.state is _READY:
            self._dispatch(out, *queue.popleft())
        if self.state is _CLOSED:
            return
        if queue:
            # Every time, not once: flow control towards the upstream may have
            # resumed reading in the meantime.
            self._paused = True
            out.append((Do.PAUSE_READING, None))
        elif self._paused:
            self._paused = False
            out.append((Do.RESUME_READING, None))

    def _dispatch(self, out: list[Action], message: bytes, header: MessageHeader) -> None:
        tag = header.op_tag
        if tag == BIND_REQUEST:
            self._bind_read(out, message, header)
        elif tag == UNBIND_REQUEST:
            self._unbind(out, message)
        elif tag == EXTENDED_REQUEST and _is_start_tls(message, header):
            self._start_tls(out, header)
        elif tag == ABANDON_REQUEST:
            if self.upstream.link is _LINK_READY:
                self._forward(out, message, header)
        elif self._requires_bind and not self._authenticated:
            self._refuse(out, header, "bind_required", "bind required")
        elif self.upstream.link is _LINK_READY:
            self._forward(out, message, header)
        elif self.upstream.worth_trying(self._clock()):
            self._waiting = (message, header)  # later messages wait, so their order holds
            self._go(Step.NEEDS_UPSTREAM)
            self.upstream.connecting()
            out.append((Do.CONNECT_UPSTREAM, None))
        else:
            self._answer(out, header, ResultCode.UNAVAILABLE, UNAVAILABLE)

    def _forward(self, out: list[Action], message: bytes, header: MessageHeader) -> None:
        tag = header.op_tag
        if tag in FINAL_RESPONSE:
            self._outstanding.add(header.message_id)
        elif tag == ABANDON_REQUEST:
            try:
                abandoned = abandoned_message_id(message, header)
            except BerError as error:
                self._drop_malformed(out, error)
                return
            if abandoned in self._outstanding:  # not a bind, nor a request still queued
                self._outstanding.discard(abandoned)
                self._in_use.discard(abandoned)
        out.append((_SEND_UPSTREAM, message))
        self.events.forwarded(OPERATION_NAMES[tag])

    def _answer(self, out: list[Action], header: MessageHeader, code: int, diagnostic: str) -> None:
        """Answer a request here, with the response type it expects."""
        self._in_use.discard(header.message_id)
        response = response_for(header.op_tag)
        if response is not None:
            self._send_client(out, encode_result(header.message_id, response, code, diagnostic))

    def _refuse(self, out: list[Action], header: MessageHeader, reason: str,
                diagnostic: str) -> None:
        """An operation the proxy will not forward: 50, counted and logged."""
        operation = OPERATION_NAMES[header.op_tag]
        self.events.refused(operation, reason)
        out.append((Do.LOG, LogLine(
            "info", "LDAP: refused {operation} from {peer}: {reason}",
            f"refused {reason} {self._peer}", operation=operation, peer=self._peer, reason=reason,
        )))
        self._answer(out, header, ResultCode.INSUFFICIENT_ACCESS_RIGHTS, diagnostic)

    def _unbind(self, out: list[Action], message: bytes) -> None:
        if self.upstream.ready:
            out.append((_SEND_UPSTREAM, message))
            self.events.forwarded("unbind")
            self.client_unbound = True
        self._close(out, None, upstream=None)  # the upstream closes with the client's connection

    def _start_tls(self, out: list[Action], header: MessageHeader) -> None:
        """Answered here, never forwarded: the proxy terminates the client's TLS."""
        message_id = header.message_id
        if self._tls:
            code, diagnostic = ResultCode.OPERATIONS_ERROR, "TLS already started"
        elif not self._start_tls_available:
            code, diagnostic = ResultCode.UNAVAILABLE, "StartTLS is not configured"
        elif self._outstanding or self._queue or self._framer.buffered:
            code, diagnostic = ResultCode.OPERATIONS_ERROR, "operations outstanding"
        else:
            code, diagnostic = ResultCode.SUCCESS, ""
        self._in_use.discard(message_id)
        self._send_client(out, encode_extended_response(message_id, code, diagnostic,
                                                        START_TLS_OID))
        if code == ResultCode.SUCCESS:
            out.append((Do.START_TLS, None))
            self._tls = True

    # ------------------------------------------------------------ events: the directory

    def upstream_ready(self) -> list[Action]:
        """The connection asked for with CONNECT_UPSTREAM is ready."""
        out: list[Action] = []
        if self.state is not _CLOSED:
            self.upstream.connected()
            self._upstream_settled(out, True)
        return out

    def upstream_unreachable(self, label: str) -> list[Action]:
        """The connection asked for with CONNECT_UPSTREAM could not be made ready
        (``label``: a bounded reason, e.g. "connect_failed")."""
        out: list[Action] = []
        if self.state is not _CLOSED:
            self.upstream.failed(self._clock())
            self.events.upstream_error(label)
            self._upstream_settled(out, False)
        return out

    def _upstream_settled(self, out: list[Action], ready: bool) -> None:
        state = self.state
        if state is State.CONNECTING:
            self._go(Step.UPSTREAM_SETTLED)
            self._drain(out)
        elif state is State.REACHING:
            waiting, self._waiting = self._waiting, None
            assert waiting is not None
            if ready:
                self._forward(out, *waiting)
            else:
                self._answer(out, waiting[1], ResultCode.UNAVAILABLE, UNAVAILABLE)
            if self.state is State.REACHING:
                self._go(Step.UPSTREAM_SETTLED)
                self._drain(out)
        elif state is State.BIND_REACHING:
            self._go(Step.UPSTREAM_SETTLED)
            self._bind_reachable(out, ready)

    def upstream_messages(self, messages: list[bytes]) -> list[Action]:
        """Responses from the directory: relay them, except answers to our own binds."""
        out: list[Action] = []
        if self.state is _CLOSED:
            return out
        self._last_activity = self._clock()
        upstream = self.upstream
        outstanding = self._outstanding
        in_use = self._in_use
        relay: list[bytes] = []
        for message in messages:
            try:
                message_id, tag = peek_id_and_tag(message)
            except BerError:
                self._upstream_broken(out, "malformed_response")
                return out
            own = upstream.own
            if own is not None and own.message_id == message_id:
                if tag != BIND_RESPONSE:  # invariant 3
                    self._upstream_violation(out, f"response {tag:#04x} to the proxy's own bind")
                    return out
                if relay:  # keep the client's view in order
                    out.append((Do.SEND_CLIENT, relay))
                    relay = []
                self._own_bind_answered(out, message)
                if self.state is _CLOSED:
                    return out
                continue
            if tag == BIND_RESPONSE:  # every bind upstream is one of ours
                self._upstream_violation(out, "a BindResponse the proxy did not wait for")
                return out
            if tag in FINAL_RESPONSES:
                if message_id == 0:
                    upstream.notice_relayed = True  # Notice of Disconnection
                outstanding.discard(message_id)
                in_use.discard(message_id)
            relay.append(message)
        if relay:
            out.append((Do.SEND_CLIENT, relay))
        if self.state is _WAITING_FOR_QUIET and not outstanding:
            self._bind_quiet(out)
        return out

    def upstream_lost(self, label: str) -> list[Action]:
        """The directory connection ended after it was ready: the session is gone."""
        out: list[Action] = []
        self.upstream.failed(self._clock())
        if self.state is not _CLOSED:
            self.events.upstream_error(label)
            self._abort(out, ResultCode.UNAVAILABLE, "directory connection lost",
                        dropped="upstream_lost", notify=not self.upstream.notice_relayed)
        return out

    def _upstream_broken(self, out: list[Action], label: str) -> None:
        out.append((Do.CLOSE_UPSTREAM, True))
        out.extend(self.upstream_lost(label))

    def _upstream_violation(self, out: list[Action], detail: str) -> None:
        """The directory answered what the proxy cannot have asked: the session is
        no longer known, so neither side of it is used again (what it sent before
        in the same read is not relayed either)."""
        out.append((Do.LOG, LogLine(
            "warn", "LDAP upstream protocol violation on the connection from {peer}: {detail}",
            peer=self._peer, detail=detail,
        )))
        self.events.upstream_error("protocol_violation")
        self._abort(out, ResultCode.UNAVAILABLE, "directory protocol violation",
                    dropped="upstream_protocol_violation", abort_upstream=True)

    # ------------------------------------------------------------ events: timers

    def timer_fired(self, timer: Timer) -> list[Action]:
        out: list[Action] = []
        self._timers.discard(timer)
        if self.state is _CLOSED:
            return out
        if timer is Timer.IDLE:
            self._check_idle(out)
        elif timer is Timer.UNBOUND:
            self._unbound_timeout(out)
        elif timer is Timer.BIND_WAIT:
            if self.state is State.BIND_WAITING_FOR_QUIET:
                self._bind_wait_expired(out)
        elif self.state in _BIND_STATES:
            self._bind_timed_out(out)
        return out

    def _check_idle(self, out: list[Action]) -> None:
        """A session waiting on a bind or an operation (a long search) is not idle."""
        timeout = self.config.idle_timeout
        idle_for = self._clock() - self._last_activity
        if self.state is not _READY or self._outstanding:
            self._start_timer(out, Timer.IDLE, timeout)
        elif idle_for >= timeout:
            self._abort(out, ResultCode.ADMIN_LIMIT_EXCEEDED, "idle timeout",
                        dropped="idle_timeout")
        else:
            self._start_timer(out, Timer.IDLE, timeout - idle_for)

    def _unbound_timeout(self, out: list[Action]) -> None:
        """No successful bind within unbound_timeout of connecting: an idle or
        trickling socket costs a connection here and one at the directory."""
        if self._first_bind is _FirstBind.DONE:
            return
        if self.state in _BIND_STATES:
            self._first_bind = _FirstBind.OVERDUE  # decided when its answer has gone out
            return
        self._drop_unbound(out)

    def _drop_unbound(self, out: list[Action]) -> None:
        self._abort(out, ResultCode.ADMIN_LIMIT_EXCEEDED, "no successful bind in time",
                    dropped="unbound_timeout")

    # ------------------------------------------------------------ the bind flow

    def _bind_read(self, out: list[Action], message: bytes, header: MessageHeader) -> None:
        """Invariant 2: a bind starts once every forwarded operation has finished
        (RFC 4511 §4.2.1), and nothing read after it is handled before its answer."""
        self._go(Step.BIND_READ)
        self._bind = _Bind(message, header, self._clock())
        self._authenticated = False  # whatever the outcome, the old identity ends here
        if not self._outstanding:
            self._bind_quiet(out)
        elif self.config.bind_timeout > 0:
            self._start_timer(out, Timer.BIND_WAIT, self.config.bind_timeout)

    def _bind_wait_expired(self, out: list[Action]) -> None:
        bind = self._bind
        assert bind is not None
        self._bind = None
        self.events.bind("reject", "operations_outstanding", self._clock() - bind.read_at)
        self._in_use.discard(bind.message_id)
        self._send_client(out, encode_bind_response(
            bind.message_id, ResultCode.UNAVAILABLE, "earlier operations still outstanding"))
        self._abort(out, ResultCode.UNAVAILABLE, "bind waited too long for outstanding operations",
                    dropped="bind_wait_timeout")

    def _bind_quiet(self, out: list[Action]) -> None:
        bind = self._bind
        assert bind is not None
        self._cancel_timer(out, Timer.BIND_WAIT)
        self._go(Step.QUIET)
        try:
            request = decode_bind_request(bind.message, bind.header)
        except BerError as error:
            self._bind = None
            self._drop_malformed(out, error)
            return
        bind.request = request
        bind.started = self._clock()
        plan = plan_bind(request, self.config, self.rules)
        if isinstance(plan, BindReply):
            if plan.reason == "sasl_not_supported":
                out.append((Do.LOG, LogLine(
                    "info", "LDAP: refused a SASL bind from {peer} (sasl_passthrough is off)",
                    f"sasl {self._peer}", peer=self._peer,
                )))
            self._settle(out, plan)
            return
        if isinstance(plan, Relay):
            bind.relay = plan
        assert plan is MFA_BIND or bind.relay is not None
        if self.upstream.ready:
            self._bind_reachable(out, True)  # the hot path
        elif self.upstream.worth_trying(self._clock()):
            self._go(Step.NEEDS_UPSTREAM)
            self.upstream.connecting()
            out.append((Do.CONNECT_UPSTREAM, None))
        else:
            self._bind_reachable(out, False)
        # The core, the password check and the reset together: bind_timeout
        # (not for a bind answered already, nor for the next one the answer let in).
        if self._bind is bind and self.state in _BIND_STATES and self.config.bind_timeout > 0:
            self._start_timer(out, Timer.BIND, self.config.bind_timeout)

    def _bind_reachable(self, out: list[Action], ready: bool) -> None:
        """The upstream is ready (or known down): relay the bind, or ask the core."""
        bind = self._bind
        assert bind is not None and bind.request is not None
        if not ready:
            self._settle(out, DIRECTORY_DOWN)
        elif bind.relay is not None:
            self.events.forwarded("bind")
            request = bind.request
            sent = self.upstream.relay_bind(bind.message_id, bind.message, request.is_anonymous)
            self._go(Step.BIND_SENT)
            out.append((_SEND_UPSTREAM, sent))
        else:
            window = self.rules.cache_window(bind.request.name)
            out.append((Do.ASK_CORE,
                        core_request(bind.request, self.config, self._peer, window)))

    def core_decided(self, decision: Decision) -> list[Action]:
        """The core's decision: start's, without a password check (BIND_DECIDING),
        or finish's (BIND_FINISHING); on a bind whose session closed meanwhile,
        only counted."""
        out: list[Action] = []
        bind = self._bind
        state = self.state
        if bind is None or state not in _CORE_ANSWERS:
            return out
        reply = reply_for_decision(decision)
        if reply.success and (state is not State.BIND_FINISHING or bind.core_checked):
            if state is _CLOSED:
                reply = DIRECTORY_DOWN  # the session it was for is gone
            else:  # the upstream session is not bound as the entry
                out.append((Do.LOG, LogLine(
                    "error", "core accepted an LDAP bind without its password check")))
                reply = INTERNAL_ERROR
        self._settle(out, reply)
        return out

    def core_check(self, check: PasswordCheck) -> list[Action]:
        """The core's start handed back the password check: the upstream session
        bind as the resolved entry is that check (invariant 5: from here on the
        check is finished or abandoned, whatever happens)."""
        out: list[Action] = []
        bind = self._bind
        if bind is None or self.state is not State.BIND_DECIDING:
            # Nobody waits for it (the session closed, or a bug): give the turn back.
            out.append((Do.ABANDON_CHECK, (check, Reason.DIRECTORY_UNAVAILABLE)))
            if bind is not None and self.state is _CLOSED:
                self._settle(out, DIRECTORY_DOWN)  # counted, never sent
            return out
        entry = entry_bind(check, self.rules)
        if not isinstance(entry, EntryBind) or not self.upstream.ready:
            # An entry this front-end does not serve is nobody's here: audited as such.
            reason = (Reason.OUTSIDE_USER_BASE if entry is OUTSIDE_USER_BASE
                      else Reason.DIRECTORY_UNAVAILABLE)
            out.append((Do.ABANDON_CHECK, (check, reason)))
            if entry is None:
                out.append((Do.LOG, LogLine(
                    "error", "core handed back an LDAP password check without an entry")))
                self._settle(out, INTERNAL_ERROR)
            else:  # outside user_base, or the upstream gone
                self._settle(out, entry if isinstance(entry, BindReply) else DIRECTORY_DOWN)
            return out
        if not check.binds_session:  # it fails whatever the password: never on the session
            bind.core_checked = True
            self._go(Step.CORE_CHECKS)
            out.append((Do.CHECK_IN_CORE, check))
            return out
        assert bind.request is not None
        bind.check = check
        sent = self.upstream.bind_as(bind.message_id, entry.dn, entry.password,
                                     bind.request.controls)
        self._go(Step.BIND_SENT)
        out.append((_SEND_UPSTREAM, sent))
        return out

    def core_failed(self, error: BaseException) -> list[Action]:
        """The core's Deferred failed (the Twisted side logs one that is a bug)."""
        out: list[Action] = []
        if self._bind is None or self.state not in _CORE_ANSWERS:
            return out
        self._settle(out, reply_for_error(error) or INTERNAL_ERROR)
        return out

    def _own_bind_answered(self, out: list[Action], response: bytes) -> None:
        result = self.upstream.own_answered(response)
        bind = self._bind
        assert bind is not None
        if self.state is State.RESETTING:
            if result is None or result.code != ResultCode.SUCCESS:
                detail = ("malformed response from the directory" if result is None
                          else f"anonymous bind answered {result.code}: {result.diagnostic}")
                self._reset_failed(out, detail)
                return
            assert bind.reply is not None
            self._answer_bind(out, bind.reply)
        elif bind.relay is not None:
            assert bind.request is not None
            self._settle(out, reply_for_relayed_bind(result, response, bind.relay.reason,
                                                     bind.request.is_anonymous))
        else:
            check, bind.check = bind.check, None
            assert check is not None
            self._go(Step.VERDICT)
            out.append((Do.FINISH_CHECK, (check, password_verdict(result, check.identity))))

    def _settle(self, out: list[Action], reply: BindReply) -> None:
        """Invariant 4: make the upstream session match the answer before giving it."""
        bind = self._bind
        assert bind is not None
        if self.state is _CLOSED:  # a late decision: counted, never sent
            self._bind = None
            self._count_bind(bind, reply)
            return
        upstream = self.upstream
        if (upstream.bound is not Bound.MAYBE or reply.success
                or reply.code == ResultCode.SASL_BIND_IN_PROGRESS):
            # Anonymous (nothing was ever bound on it, or the last reset held),
            # or unknown (a bind timed out: the answer goes, then the session closes).
            self._answer_bind(out, reply)
            return
        if not upstream.ready:
            bind.reply = reply
            self._go(Step.RESET_SENT)
            self._reset_failed(out, "directory not connected")
            return
        bind.reply = reply
        sent = upstream.reset(bind.message_id)
        self._go(Step.RESET_SENT)
        out.append((_SEND_UPSTREAM, sent))

    def _reset_failed(self, out: list[Action], detail: str) -> None:
        """The session may still be bound as someone: the client gets no answer
        to its bind, only a Notice of Disconnection (the bind is counted as closing)."""
        self.events.upstream_error("reset_failed")
        out.append((Do.LOG, LogLine(
            "warn", "LDAP: could not reset the upstream session of {peer}: {error}",
            peer=self._peer, error=detail,
        )))
        self._abort(out, ResultCode.UNAVAILABLE, "session could not be reset",
                    dropped="reset_failed")

    def _answer_bind(self, out: list[Action], reply: BindReply) -> None:
        bind = self._bind
        assert bind is not None
        self._bind = None
        self._cancel_timer(out, Timer.BIND)
        self._count_bind(bind, reply)
        self._authenticated = reply.authenticated
        if reply.raw is not None:
            self._send_client(out, reply.raw)
        else:
            self._send_client(out, encode_bind_response(bind.message_id, reply.code,
                                                        reply.diagnostic))
        if self.upstream.bound is Bound.UNKNOWN:  # a late answer could still bind it
            self._abort(out, ResultCode.UNAVAILABLE, "bind timed out", dropped="bind_timeout")
            return
        if reply.success:
            self._first_bind = _FirstBind.DONE
            self._cancel_timer(out, Timer.UNBOUND)
        elif self._first_bind is _FirstBind.OVERDUE:
            self._drop_unbound(out)
            return
        self._go(Step.ANSWERED)
        self._drain(out)

    def _count_bind(self, bind: _Bind, reply: BindReply) -> None:
        self._in_use.discard(bind.message_id)
        if reply.result:
            self.events.bind(reply.result, reply.reason, self._clock() - bind.started)

    def _bind_timed_out(self, out: list[Action]) -> None:
        """bind_timeout passed: the core or the directory may still act on this
        bind (a late verify, a late BindResponse), so it gets 52 and the session
        is not used again after its answer."""
        state = self.state
        if state is State.BIND_REACHING:
            out.append((Do.CLOSE_UPSTREAM, True))  # the connection attempt is given up
            self.upstream.failed(self._clock())
            self.events.upstream_error("connect_failed")
            self.upstream.abandon()
            self._go(Step.UPSTREAM_SETTLED)
            self._settle(out, DIRECTORY_DOWN)
        elif state is State.BIND_DECIDING:
            out.append((Do.CANCEL_CORE, None))
            self.upstream.abandon()
            self._settle(out, TIMED_OUT)
        elif state is State.BIND_UPSTREAM:
            self._abandon_check(out)
            self.upstream.abandon()
            self._settle(out, TIMED_OUT)
        elif state is State.BIND_FINISHING:
            out.append((Do.CANCEL_CORE, None))  # the core still ends its turn itself
            self.upstream.abandon()
            self._settle(out, TIMED_OUT)
        elif state is State.RESETTING:
            self.upstream.abandon()
            self._reset_failed(out, "timed out")

    def _abandon_check(self, out: list[Action]) -> None:
        """Invariant 5: the password check held ends without a verdict."""
        bind = self._bind
        if bind is not None and bind.check is not None:
            out.append((Do.ABANDON_CHECK, (bind.check, Reason.DIRECTORY_UNAVAILABLE)))
            bind.check = None

    # ------------------------------------------------------------ closing

    def _drop_malformed(self, out: list[Action], error: BerError) -> None:
        reason = "oversize" if error.oversize else "malformed"
        diagnostic = "message too large" if error.oversize else f"malformed message: {error}"
        self._abort(out, ResultCode.PROTOCOL_ERROR, diagnostic, dropped=reason)

    def _abort(self, out: list[Action], code: int, diagnostic: str, dropped: str | None = None,
               notify: bool = True, abort_upstream: bool = False) -> None:
        if self.state is _CLOSED:
            return
        if dropped:
            self.events.dropped(dropped)
            out.append((Do.LOG, LogLine(
                "info", "LDAP: closed the connection from {peer} ({reason}): {diagnostic}",
                f"{dropped} {self._peer}", peer=self._peer, reason=dropped, diagnostic=diagnostic,
            )))
        notice = encode_notice_of_disconnection(code, diagnostic) if notify else None
        self._close(out, notice, upstream=abort_upstream)

    def _close(self, out: list[Action], notice: bytes | None, client: bool = True,
               upstream: bool | None = False) -> None:
        """CLOSED, after the bind in progress is accounted for; ``upstream``: abort
        (True), close (False) or leave it to the client connection's end (None)."""
        state = self.state
        self._go(Step.CLOSE)
        self._release_buffers()
        self._waiting = None
        bind = self._bind
        if bind is not None and state not in _CORE_ANSWERS:  # (the core's answer still counts)
            self._abandon_check(out)
            self._bind = None
            if state is State.RESETTING and bind.reply is not None:
                self._count_bind(bind, bind.reply)
            elif state in (State.BIND_REACHING, State.BIND_UPSTREAM):
                self._count_bind(bind, DIRECTORY_DOWN)
        for timer in sorted(self._timers, key=_timer_order):
            out.append((Do.CANCEL_TIMER, timer))
        self._timers.clear()
        if client:
            if notice is not None:
                self._send_client(out, notice)
            out.append((Do.CLOSE_CLIENT, None))
        if upstream is not None:
            out.append((Do.CLOSE_UPSTREAM, upstream))

    # ------------------------------------------------------------ small things

    def _go(self, step: Step) -> None:
        try:
            self.state = TRANSITIONS[self.state][step]
        except KeyError:
            raise SessionBug(f"no step {step.value} from {self.state.value}") from None

    def _send_client(self, out: list[Action], data: bytes) -> None:
        out.append((Do.SEND_CLIENT, [data]))

    def _start_timer(self, out: list[Action], timer: Timer, seconds: float) -> None:
        self._timers.add(timer)
        out.append((Do.START_TIMER, (timer, seconds)))

    def _cancel_timer(self, out: list[Action], timer: Timer) -> None:
        if timer in self._timers:
            self._timers.discard(timer)
            out.append((Do.CANCEL_TIMER, timer))


def _is_start_tls(message: bytes, header: MessageHeader) -> bool:
    try:
        return extended_request_name(message, header) == START_TLS_OID
    except BerError:
        return False  # forwarded: the directory answers what it makes of it


def _timer_order(timer: Timer) -> str:
    return timer.value
