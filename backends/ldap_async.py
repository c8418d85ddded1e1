"""A Twisted-native LDAP client for the hot path: search the user, bind as the user.

ldap3 spends about 1 ms of CPU on one search + bind; this client does the
same work with a small BER codec over persistent connections, without
threads:

- the user filter is parsed once (RFC 4515, :mod:`backends.ldap_filter`)
  into pre-encoded BER where only the assertion values holding
  ``{username}`` are re-encoded per request. The username goes in as raw
  bytes of an assertion value, so it can never become filter syntax;
- service-account connections carry the searches, many at once
  (message-id multiplexing);
- user binds go over a separate pool of connections, one bind at a time
  per connection (RFC 4511 §4.2.1: nothing else may be in flight during a
  bind), re-binding on the same connection each time;
- every operation has a timeout, kept as a deadline: one timer per
  connection (and one for the bind queue) serves every request on it; URLs
  are tried in order with the same "remember it as down" failover as
  :mod:`backends.ldap`;
- an optional username → identity cache (``dn_cache_seconds``) saves the
  search, never the bind.

``verify()`` has two paths. While the connections it needs are open, it runs
as reply callbacks (:class:`_Verify`): no coroutine, one Deferred, the entry
decoded down to the DN, the username and memberOf. Whatever is rare --
connecting, a lost connection, a group search, a refused cached DN -- goes
to the coroutines, which are the reference behaviour.

Errors and results are those of :class:`backends.ldap.LdapDirectory`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any, NamedTuple, TypeVar
from typing import Protocol as Interface  # (Protocol is Twisted's, below)
from urllib.parse import unquote, urlsplit

from twisted.internet import defer, error, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from backends.base import (
    DirectoryUnavailable,
    Identity,
    InvalidCredentials,
    UnknownUser,
    check_password_not_empty,
)
from backends.ber import (  # noqa: F401 (re-exported for callers and tests)
    BOOLEAN,
    ENUMERATED,
    INTEGER,
    OCTET_STRING,
    SEQUENCE,
    SET,
    BerError,
    boolean,
    encode_length,
    expect,
    integer,
    ldap_message,
    read_header,
    tlv,
)
from backends.ldap_common import (
    NO_SUCH_OBJECT,
    SIZE_LIMIT_EXCEEDED,
    SUCCESS,
    Endpoint,
    Endpoints,
    LdapOptions,
    bind_failure,
    rdn_value,
)
from backends.ldap_filter import (  # noqa: F401 (re-exported for callers and tests)
    CompiledFilter,
    FilterTemplateError,
    SearchTemplate,
    compile_filter,
)

log = Logger(namespace="mfa_proxy.backends.ldap_async")

T = TypeVar("T")

# ================================================================ LDAP messages the client needs

BIND_REQUEST, BIND_RESPONSE, UNBIND_REQUEST = 0x60, 0x61, 0x42
SEARCH_REQUEST, SEARCH_RESULT_ENTRY, SEARCH_RESULT_DONE = 0x63, 0x64, 0x65
SEARCH_RESULT_REFERENCE, EXTENDED_REQUEST, EXTENDED_RESPONSE = 0x73, 0x77, 0x78
INTERMEDIATE_RESPONSE = 0x79
AUTH_SIMPLE = 0x80
START_TLS_OID = b"1.3.6.1.4.1.1466.20037"
SCOPE_BASE, SCOPE_SUBTREE = 0, 2
NEVER_DEREF_ALIASES = 0
MAX_MESSAGE = 64 * 1024 * 1024  # a larger answer is an error, not a memory exhaustion
_FINAL_REPLIES = (SEARCH_RESULT_DONE, BIND_RESPONSE, EXTENDED_RESPONSE)
# A base read of a bind DN answered with these: the DN names no entry we may use
# (noSuchObject, invalidDNSyntax, insufficientAccessRights, referral, aliasProblem).
DN_NAMES_NOBODY = frozenset({32, 34, 50, 10, 33, 36})
_IGNORED_REPLIES = (SEARCH_RESULT_REFERENCE, INTERMEDIATE_RESPONSE)


def frame_size(buf: bytes | bytearray, pos: int) -> int | None:
    """Size of the complete LDAPMessage at ``pos``, or None while more bytes are due."""
    available = len(buf) - pos
    if available < 2:
        return None
    if buf[pos] != SEQUENCE:
        raise BerError("an LDAPMessage is a SEQUENCE")
    first = buf[pos + 1]
    header = 2
    if first >= 0x80:
        count = first & 0x7F
        if not 0 < count <= 4:
            raise BerError("bad message length")
        if available < 2 + count:
            return None
        first = int.from_bytes(buf[pos + 2 : pos + 2 + count], "big")
        header += count
    if first > MAX_MESSAGE:
        raise BerError("message too large")
    return header + first if available >= header + first else None


@dataclass(frozen=True)
class Reply:
    """The final answer to one request (and the entries a search returned)."""

    code: int
    diagnostic: str = ""
    entries: list[SearchEntry] = field(default_factory=list)


@dataclass(frozen=True)
class SearchEntry:
    dn: str
    attributes: dict[str, list[str]]

    def values(self, name: str) -> list[str]:
        return self.attributes.get(name.lower(), [])

    def first(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def decode_envelope(message: bytes) -> tuple[int, int, int, int]:
    """(message id, protocolOp tag, op content start, op content end)."""
    return _envelope(message, 0, len(message))


def _envelope(buf: bytes, pos: int, end: int) -> tuple[int, int, int, int]:
    """:func:`decode_envelope` of the message at ``buf[pos:end]``, without copying it."""
    start, end = _expect(buf, pos, end, SEQUENCE)
    id_start, id_end = _expect(buf, start, end, INTEGER)
    message_id = int.from_bytes(buf[id_start:id_end], "big", signed=True)
    tag, op_start, op_end = _read_header(buf, id_end, end)
    return message_id, tag, op_start, op_end


# The two BER readers with the short length form (nearly every element of a reply)
# inline: about half the calls per element. Anything else, errors included, is left
# to backends.ber, so the results and the errors are the same.


def _read_header(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    if pos + 2 <= end:
        tag, size = buf[pos], buf[pos + 1]
        if size < 0x80 and pos + 2 + size <= end and tag & 0x1F != 0x1F:
            return tag, pos + 2, pos + 2 + size
    return read_header(buf, pos, end)


def _expect(buf: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    if pos + 2 <= end and buf[pos] == tag:
        size = buf[pos + 1]
        if size < 0x80 and pos + 2 + size <= end:
            return pos + 2, pos + 2 + size
    return expect(buf, pos, end, tag)


def decode_result(message: bytes, start: int, end: int) -> tuple[int, str]:
    """resultCode and diagnosticMessage of an LDAPResult (RFC 4511 §4.1.9)."""
    code_start, code_end = _expect(message, start, end, ENUMERATED)
    _dn_start, dn_end = _expect(message, code_end, end, OCTET_STRING)
    diag_start, diag_end = _expect(message, dn_end, end, OCTET_STRING)
    code = int.from_bytes(message[code_start:code_end], "big", signed=True)
    return code, _text(message[diag_start:diag_end]) if diag_end > diag_start else ""


def decode_entry(message: bytes, start: int, end: int) -> SearchEntry:
    dn_start, dn_end = _expect(message, start, end, OCTET_STRING)
    attrs_start, attrs_end = _expect(message, dn_end, end, SEQUENCE)
    attributes: dict[str, list[str]] = {}
    pos = attrs_start
    while pos < attrs_end:
        one_start, one_end = _expect(message, pos, attrs_end, SEQUENCE)
        type_start, type_end = _expect(message, one_start, one_end, OCTET_STRING)
        vals_start, vals_end = _expect(message, type_end, one_end, SET)
        values = _values(message, vals_start, vals_end)
        attributes[_text(message[type_start:type_end]).lower()] = values
        pos = one_end
    return SearchEntry(_text(message[dn_start:dn_end]), attributes)


def _values(message: bytes, pos: int, end: int) -> list[str]:
    """The values of one attribute: SET OF OCTET STRING."""
    values = []
    while pos < end:
        start, pos = _expect(message, pos, end, OCTET_STRING)
        values.append(_text(message[start:pos]))
    return values


class UserEntry(NamedTuple):
    """What a verify needs of the user's entry."""

    dn: str
    name: str | None  # the first value of the username attribute
    member_of: list[str]  # empty unless memberOf is used
    mail: str | None = None  # the first value of the mail attribute


class UserEntryReader:
    """Decodes a user's search entry down to a :class:`UserEntry`.

    The search asks for these attributes only; any other one is skipped whole
    rather than decoded, which is what keeps this cheaper than decode_entry.
    """

    def __init__(self, username_attribute: str, use_memberof: bool,
                 mail_attribute: str = "") -> None:
        # Attribute types are ASCII, so bytes.lower() is str.lower() here.
        self._name = username_attribute.lower().encode()
        self._member_of = b"memberof" if use_memberof else None
        self._mail = mail_attribute.lower().encode() or None

    def read(self, message: bytes, start: int, end: int) -> UserEntry:
        dn_start, dn_end = _expect(message, start, end, OCTET_STRING)
        attrs_start, attrs_end = _expect(message, dn_end, end, SEQUENCE)
        name: str | None = None
        mail: str | None = None
        member_of: list[str] = []
        pos = attrs_start
        while pos < attrs_end:
            one_start, pos = _expect(message, pos, attrs_end, SEQUENCE)
            type_start, type_end = _expect(message, one_start, pos, OCTET_STRING)
            vals_start, vals_end = _expect(message, type_end, pos, SET)
            kind = message[type_start:type_end].lower()
            if kind == self._name:  # a repeated attribute: the last one counts, as in a dict
                values = _values(message, vals_start, vals_end)
                name = values[0] if values else None
            if kind == self._member_of:
                member_of = _values(message, vals_start, vals_end)
            if kind == self._mail:
                mails = _values(message, vals_start, vals_end)
                mail = mails[0] if mails else None
        return UserEntry(_text(message[dn_start:dn_end]), name, member_of, mail)


_BIND_VERSION = integer(3)


def encode_bind(dn: str, password: str) -> bytes:
    return tlv(BIND_REQUEST, _BIND_VERSION + tlv(OCTET_STRING, dn.encode())
               + tlv(AUTH_SIMPLE, password.encode()))


def encode_start_tls() -> bytes:
    return tlv(EXTENDED_REQUEST, tlv(0x80, START_TLS_OID))


UNBIND = tlv(UNBIND_REQUEST, b"")


# ================================================================ the connection


class ConnectionLost(Exception):
    """The connection broke (or never answered) before the reply."""


class OperationTimeout(ConnectionLost):
    """No reply within the operation timeout."""


class _Waiter(Interface):
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

    Timeouts: each request has a deadline and one timer per connection is armed
    for the earliest one, lazily -- a reply does not cancel it; when it fires,
    the requests past their deadline fail and it is armed for the next one.
    Under load that is one timer every ``timeout`` seconds, not one per request.
    """

    def __init__(self, reactor: Any, endpoint: Endpoint) -> None:
        self.reactor = reactor  # IReactorTime; Any because zope interfaces confuse mypy
        self.endpoint = endpoint
        self.pending: dict[int, _Waiter] = {}
        self.is_connected = False
        self.lost: Deferred[None] = Deferred()
        self._handshake: Deferred[None] | None = None
        self._buffer = bytearray()
        self._next_id = 1
        self._aborted = False
        self._timer: Any = None  # IDelayedCall, due at or before every pending deadline
        self._timer_due = 0.0

    # -- requests

    def request(self, operation: bytes, timeout: float) -> Deferred[Reply]:
        collect = _Collect()
        self.send(operation, collect, timeout)
        return collect.deferred

    def send(self, operation: bytes, waiter: _Waiter, timeout: float) -> None:
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
        self._transport.write(ldap_message(message_id, operation))

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

    def handshakeCompleted(self) -> None:  # noqa: N802 - Twisted's name
        handshake, self._handshake = self._handshake, None
        if handshake is not None and not handshake.called:  # not timed out meanwhile
            handshake.callback(None)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        pos = 0
        try:
            if self._buffer:  # the rest of a message that came in pieces
                self._buffer += data
                if frame_size(self._buffer, 0) is None:
                    return
                data = bytes(self._buffer)  # one copy per completed message, not per piece
                self._buffer.clear()
            # Messages are decoded where they lie in ``data``: no copy of each one.
            while (size := frame_size(data, pos)) is not None:
                self._dispatch(data, pos, pos + size)
                pos += size
        except BerError as bad:
            self.abort(f"undecodable reply: {bad}")
            return
        if pos < len(data):
            self._buffer += memoryview(data)[pos:]

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
        message_id, tag, op_start, op_end = _envelope(message, start, end)
        if message_id == 0:  # Notice of Disconnection (RFC 4511 §4.4.1)
            self.abort("notice of disconnection")
            return
        waiting = self.pending.get(message_id)
        if waiting is None:
            return  # a late reply to a request that timed out
        if tag == SEARCH_RESULT_ENTRY:
            waiting.on_entry(message, op_start, op_end)
        elif tag in _FINAL_REPLIES:
            code, diagnostic = decode_result(message, op_start, op_end)
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


class _OneConnection(Factory):
    """Hands one prepared protocol to an endpoint, quietly (connects are frequent in outages)."""

    noisy = False

    def __init__(self, client: LdapClientProtocol) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> LdapClientProtocol:  # noqa: N802 - Twisted's name
        return self.client


# ================================================================ links and pools


class _Link:
    """One persistent connection slot: connects on demand, shared by concurrent callers."""

    def __init__(self, opener: Callable[[], Deferred[LdapClientProtocol]],
                 endpoints: Endpoints) -> None:
        self._opener = opener
        self._endpoints = endpoints
        self.client: LdapClientProtocol | None = None
        self._waiters: list[Deferred[LdapClientProtocol]] | None = None

    @property
    def load(self) -> int:
        """Requests in flight; -1 when not connected, so idle slots get connected first."""
        client = self.client
        return len(client.pending) if client is not None and client.is_connected else -1

    def ready(self) -> LdapClientProtocol | None:
        """The connection, when :meth:`get` would hand it over as it is (no side effect)."""
        client = self.client
        if client is not None and client.is_connected and not self._should_move(client):
            return client
        return None

    def get(self) -> Deferred[tuple[LdapClientProtocol, bool]]:
        """The connection and whether it was already open (it may have gone stale)."""
        client = self.client
        if client is not None and client.is_connected:
            if not self._should_move(client):
                return defer.succeed((client, True))
            client.close()
        waiter: Deferred[LdapClientProtocol] = Deferred()
        if self._waiters is None:
            self._waiters = [waiter]
            self._opener().addBoth(self._opened)
        else:
            self._waiters.append(waiter)
        return waiter.addCallback(lambda fresh: (fresh, False))

    def _should_move(self, client: LdapClientProtocol) -> bool:
        """True when a preferred URL may be back: leave the fallback once it is idle."""
        order = self._endpoints.all
        if len(order) < 2:
            return False  # nowhere else to go
        preferred = self._endpoints.preferred()
        if preferred is None or preferred is client.endpoint:
            return False
        return order.index(preferred) < order.index(client.endpoint) and not client.pending

    def _opened(self, result: LdapClientProtocol | Failure) -> None:
        waiters, self._waiters = self._waiters or [], None
        if isinstance(result, LdapClientProtocol):
            self.client = result
            for waiter in waiters:
                waiter.callback(result)
        else:
            for waiter in waiters:
                waiter.errback(result)

    def close(self) -> Deferred[None]:
        client, self.client = self.client, None
        return client.close() if client is not None else defer.succeed(None)


_load = attrgetter("load")  # of a _Link (a key function without a Python frame)


class _LinkWaiter(Interface):
    """A caller queued for a bind link: given one, or told the wait is over."""

    def give(self, link: _Link) -> None: ...

    def expire(self, why: DirectoryUnavailable) -> None: ...


class _QueuedDeferred:
    """A coroutine's place in the bind queue."""

    __slots__ = ("deferred",)

    def __init__(self, links: _BindLinks) -> None:
        self.deferred: Deferred[_Link] = Deferred(lambda _: links.forget(self))

    def give(self, link: _Link) -> None:
        self.deferred.callback(link)

    def expire(self, why: DirectoryUnavailable) -> None:
        self.deferred.errback(why)


class _BindLinks:
    """Links for user binds: each carries one bind at a time; callers queue for one.

    A caller waits ``timeout`` at most. The queue is in arrival order, hence in
    deadline order, so one timer, due for the head of the queue, serves all.
    """

    def __init__(self, links: list[_Link], timeout: float, reactor: Any) -> None:
        self.links = links
        self._idle = list(links)
        self._queue: deque[tuple[float, _LinkWaiter]] = deque()
        self._timeout = timeout
        self._reactor = reactor
        self._timer: Any = None

    def take(self) -> _Link | None:
        """An idle link, if any, now."""
        return self._idle.pop() if self._idle else None

    def wait(self, waiter: _LinkWaiter) -> None:
        """Queue ``waiter`` for the next link released."""
        self._queue.append((self._reactor.seconds() + self._timeout, waiter))
        if self._timer is None:
            self._arm()

    def acquire(self) -> Deferred[_Link]:
        """A link, now or once one is released; fails with DirectoryUnavailable in time."""
        link = self.take()
        if link is not None:
            return defer.succeed(link)
        queued = _QueuedDeferred(self)
        self.wait(queued)
        return queued.deferred

    def release(self, link: _Link) -> None:
        if self._queue:
            self._queue.popleft()[1].give(link)
        else:
            self._idle.append(link)

    def forget(self, waiter: _LinkWaiter) -> None:
        """Take a cancelled waiter out of the queue."""
        for queued in self._queue:
            if queued[1] is waiter:
                self._queue.remove(queued)
                return

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        delay = self._queue[0][0] - self._reactor.seconds()
        self._timer = self._reactor.callLater(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._reactor.seconds()
        while self._queue and self._queue[0][0] <= now:
            self._queue.popleft()[1].expire(DirectoryUnavailable(
                f"no free bind connection within {self._timeout:g}s"))
        if self._queue:  # (expire may have queued more: arm for the head, whoever it is)
            self._arm()


# ================================================================ the directory


class _DnCache:
    """username → Identity for a short time: saves the search, never the bind."""

    def __init__(self, seconds: float, clock: Callable[[], float], limit: int = 100_000) -> None:
        self.seconds = seconds
        self._clock = clock
        self._limit = limit
        self._entries: OrderedDict[str, tuple[float, Identity]] = OrderedDict()
        self.hits = 0

    def get(self, username: str) -> Identity | None:
        if self.seconds <= 0:
            return None
        found = self._entries.get(username)
        if found is None or found[0] < self._clock():
            return None
        self.hits += 1
        return found[1]

    def put(self, username: str, identity: Identity) -> None:
        if self.seconds <= 0:
            return
        self._entries[username] = (self._clock() + self.seconds, identity)
        self._entries.move_to_end(username)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def forget(self, username: str) -> None:
        self._entries.pop(username, None)


@dataclass
class Stats:
    """Counters for benchmarks and logs (not metrics: those live in proxy/metrics.py)."""

    searches: int = 0
    binds: int = 0
    connects: int = 0


class _Binding(NamedTuple):
    """A user bind to make, and what a refusal means (a cached DN may be stale)."""

    username: str
    password: str
    identity: Identity
    dn: str  # identity.dn, known not to be empty
    cached: bool


def _binding(username: str, password: str, identity: Identity | None,
             cached: bool) -> _Binding:
    if identity is None or not identity.dn:  # an empty DN would bind anonymously
        raise UnknownUser(f"no such user: {username!r}")
    return _Binding(username, password, identity, identity.dn, cached)


def _search_refused(code: int, diagnostic: str, missing_ok: bool = False) -> Exception | None:
    if code in (SUCCESS, SIZE_LIMIT_EXCEEDED) or (missing_ok and code == NO_SUCH_OBJECT):
        return None
    return DirectoryUnavailable(f"search: result {code} {diagnostic}".strip())


class _Verify:
    """One look-up or one password check, run from the reply dispatch for as long
    as all goes the common way.

    A look-up (``password`` None) searches on an open service connection; a
    password check binds on an idle (or the next released) bind connection;
    each reply drives the next step and ``result`` is the only Deferred made.
    Anything unusual -- a lost connection, a group search, a refused cached
    DN, a link that must (re)connect -- hands the rest to the coroutines of
    :class:`AsyncLdapDirectory` from the step reached, so errors, retries and
    failover stay theirs.
    """

    __slots__ = ("_binding", "_client", "_directory", "_link", "_matches", "_password",
                 "_request", "_user", "_username", "deadline", "result", "timeout")

    def __init__(self, directory: AsyncLdapDirectory, username: str,
                 password: str | None = None) -> None:
        self.result: Deferred[Any] = Deferred()
        self._directory = directory
        self._username = username
        self._password = password
        self._request = b""
        self._client: LdapClientProtocol | None = None  # carrying the current request
        self._user: UserEntry | None = None
        self._matches = 0
        self._binding: _Binding | None = None
        self._link: _Link | None = None  # set while the bind is in flight
        self.deadline = self.timeout = 0.0  # of the request in flight (set by send)

    # -- the search

    def search(self, client: LdapClientProtocol) -> None:
        directory = self._directory
        try:
            self._request = directory._user_search.encode(username=self._username)
        except UnicodeError:  # text that is not UTF-8: fail where the coroutine always did
            self._hand_over(directory._find_user(self._username))
            return
        directory.stats.searches += 1
        self._client = client
        client.send(self._request, self, directory.options.timeout)

    def _searched(self, code: int, diagnostic: str) -> None:
        directory, username = self._directory, self._username
        refused = _search_refused(code, diagnostic)
        if refused is not None:
            self._fail(refused)
            return
        user = self._user
        if not directory._only_one(self._matches) or user is None:
            self.result.callback(None)
            return
        groups = directory._memberof_groups(user)
        if groups is None:  # a group search: left to the coroutines
            self._hand_over(directory._identity_of(username, [user]))
            return
        self.result.callback(directory._remember(username, user, groups))

    # -- the bind

    def bind(self, identity: Identity) -> None:
        """Bind as the entry on a free bind link, now or once one is released."""
        directory = self._directory
        password = self._password or ""
        try:
            self._binding = _binding(identity.username, password, identity,
                                     identity.from_cache)
            self._request = encode_bind(self._binding.dn, password)
        except (UnknownUser, InvalidCredentials) as refused:
            self._fail(refused)
            return
        except UnicodeError:  # text that is not UTF-8: fail where the coroutine always did
            self._hand_over(directory._bind_user(identity, password))
            return
        directory.stats.binds += 1
        link = directory._binders.take()
        if link is None:
            directory._binders.wait(self)
        else:
            self.give(link)

    def give(self, link: _Link) -> None:
        assert self._binding is not None
        client = link.ready()
        if client is None:  # it must connect (or move): the coroutine's job
            self._hand_over(self._directory._finish_bind(self._binding, link, []))
            return
        self._link, self._client = link, client
        client.send(self._request, self, self._directory.options.timeout)

    def expire(self, why: DirectoryUnavailable) -> None:
        self._fail(why)

    def _bound(self, link: _Link, code: int, diagnostic: str) -> None:
        binding = self._binding
        assert binding is not None
        self._directory._binders.release(link)
        if code == SUCCESS:
            self.result.callback(binding.identity)
            return
        refused = bind_failure(code, diagnostic)
        if binding.cached and isinstance(refused, InvalidCredentials):
            self._hand_over(self._directory._retry_stale(binding, refused))
        else:
            self._fail(refused)

    # -- replies (_Waiter)

    def on_entry(self, message: bytes, start: int, end: int) -> None:
        if self._link is not None:  # an entry in answer to a bind: checked, ignored
            decode_entry(message, start, end)
            return
        user = self._directory._user_reader.read(message, start, end)
        self._matches += 1
        if self._user is None:
            self._user = user

    def on_result(self, code: int, diagnostic: str) -> None:
        try:
            link, self._link = self._link, None
            if link is None:
                self._searched(code, diagnostic)
            else:
                self._bound(link, code, diagnostic)
        except Exception as bug:  # fail this request, as a coroutine would, not the connection
            self._fail(bug)

    def on_lost(self, why: ConnectionLost) -> None:
        """Move on as the coroutines do: the request again, bounded by the URL count."""
        directory = self._directory
        if isinstance(why, OperationTimeout) and self._client is not None:
            directory.endpoints.mark_down(self._client.endpoint, str(why))
        link, self._link = self._link, None
        if link is None:
            self._hand_over(directory._lookup_searching(self._username, self._request,
                                                        [str(why)]))
        else:
            assert self._binding is not None
            self._hand_over(directory._finish_bind(self._binding, link, [str(why)]))

    # -- the end

    def _hand_over(self, rest: Coroutine[Deferred[Any], Any, Any]) -> None:
        self._directory._run(rest).chainDeferred(self.result)

    def _fail(self, why: Exception | Failure) -> None:
        if not self.result.called:  # (cancelled by the caller meanwhile)
            self.result.errback(why)


class AsyncLdapDirectory:
    """The :class:`backends.base.AsyncDirectory` of an LDAP server, without threads."""

    name = "ldap"

    def __init__(self, options: LdapOptions, reactor: Any) -> None:
        self.options = options
        self.reactor = reactor
        self.endpoints = Endpoints(options.urls, options.down_seconds, clock=reactor.seconds)
        self.stats = Stats()
        self.cache = _DnCache(options.dn_cache_seconds, reactor.seconds)
        # bind DN as sent -> identity: saves the base read and the name search
        self.dn_cache = _DnCache(options.dn_cache_seconds, reactor.seconds)
        self._time_limit = max(1, int(options.timeout))
        self._user_search = self._template(options.user_base, SCOPE_SUBTREE,
                                           options.user_filter, ("username",),
                                           self._user_attributes(), size_limit=2)
        self._user_reader = UserEntryReader(options.username_attribute, options.use_memberof,
                                            options.mail_attribute)
        self._group_search = self._template(options.group_base, SCOPE_SUBTREE,
                                            options.group_filter, ("dn",),
                                            [options.group_name_attribute])
        self._service = [_Link(lambda: self._connect(service=True), self.endpoints)
                         for _ in range(max(1, options.pool_size))]
        binders = [_Link(lambda: self._connect(service=False), self.endpoints)
                   for _ in range(max(1, options.bind_pool_size))]
        self._binders = _BindLinks(binders, options.timeout, reactor)
        self._trust: Any = None
        self._closed = False

    # -- AsyncDirectory

    def lookup(self, username: str) -> Deferred[Identity | None]:
        """The entry the user filter finds for ``username`` (None: no single one)."""
        if not username:
            return defer.succeed(None)
        cached = self.cache.get(username)
        if cached is not None:
            return defer.succeed(cached)
        client = self._least_loaded().ready()
        if client is None:  # connecting (or moving back to a preferred URL) first
            return self._run(self._find_user(username))
        attempt = _Verify(self, username)
        attempt.search(client)
        return attempt.result

    def lookup_dn(self, dn: str) -> Deferred[Identity | None]:
        return self._run(self._lookup_dn(dn))

    def check_password(self, identity: Identity, password: str) -> Deferred[Identity]:
        """Bind as the entry; a refusal of an entry from the cache looks once more."""
        if not password:  # would bind anonymously
            return defer.fail(InvalidCredentials("empty password"))
        attempt = _Verify(self, identity.username, password)
        attempt.bind(identity)
        return attempt.result

    def verify(self, username: str, password: str) -> Deferred[Identity]:
        """lookup, then check_password (the core calls the two apart)."""
        return self._run(self._verify(username, password))

    def group_members(self, group: str) -> Deferred[list[str]]:
        return self._run(self._group_members(group))

    def ping(self) -> Deferred[None]:
        return self._run(self._ping())

    def close(self) -> Deferred[None]:
        self._closed = True
        links = self._service + self._binders.links
        closing = [link.close() for link in links]
        return defer.gatherResults(closing).addCallback(lambda _: None)

    @staticmethod
    def _run(coroutine: Coroutine[Deferred[Any], Any, T]) -> Deferred[T]:
        return Deferred.fromCoroutine(coroutine)

    # -- users: the coroutines (everything verify's fast path hands over)

    async def _verify(self, username: str, password: str) -> Identity:
        check_password_not_empty(password)
        identity = await self.lookup(username)
        if identity is None:
            raise UnknownUser(f"no such user: {username!r}")
        return await self.check_password(identity, password)

    async def _lookup_searching(self, username: str, request: bytes,
                                errors: list[str]) -> Identity | None:
        """The rest of a look-up whose search was lost after ``errors``."""
        reply = await self._search_on(request, errors)
        return await self._identity_of(username, self._users_in(reply))

    async def _bind_user(self, identity: Identity, password: str) -> Identity:
        binding = _binding(identity.username, password, identity, identity.from_cache)
        self.stats.binds += 1
        return await self._finish_bind(binding, await self._binders.acquire(), [])

    async def _finish_bind(self, binding: _Binding, link: _Link, errors: list[str]) -> Identity:
        """Bind on ``link`` (released here) after ``errors``; a refused cached DN is retried."""
        try:
            await self._bind_on(link, binding.dn, binding.password, errors)
        except InvalidCredentials as refused:
            if not binding.cached:
                raise
            return await self._retry_stale(binding, refused)
        return binding.identity

    async def _retry_stale(self, binding: _Binding, refused: InvalidCredentials) -> Identity:
        """The cached DN may be stale (renamed, deleted): look again, bind again only
        if the DN changed, so a wrong password still costs exactly one bind."""
        self.cache.forget(binding.username)
        fresh = await self._find_user(binding.username)
        if fresh is None or not fresh.dn:
            raise UnknownUser(f"no such user: {binding.username!r}") from None
        if fresh.dn == binding.dn:
            raise refused
        self.stats.binds += 1
        await self._bind_on(await self._binders.acquire(), fresh.dn, binding.password, [])
        return fresh

    async def _lookup_dn(self, dn: str) -> Identity | None:
        """Read the entry at ``dn`` (the directory resolves every spelling it
        accepts: case, aliases, options, escapes, Unicode forms), then look it up
        by its own name: only when that finds this very entry is it an identity.
        So a DN outside ``user_base``, the rootdn, or one of two entries sharing
        a name is nobody."""
        if not dn:
            return None
        cached = self.dn_cache.get(dn)
        if cached is not None:
            return cached
        try:
            request = self._template(dn, SCOPE_BASE, "(objectClass=*)", (),
                                     [self.options.username_attribute], size_limit=1).encode()
        except (UnicodeError, FilterTemplateError, BerError):
            return None
        self.stats.searches += 1
        reply = await self._on_link(lambda: self._least_loaded().get(), request, [])
        if reply.code in DN_NAMES_NOBODY:
            return None
        refused = _search_refused(reply.code, reply.diagnostic)
        if refused is not None:
            raise refused
        if len(reply.entries) != 1:
            return None
        entry = reply.entries[0]
        name = entry.first(self.options.username_attribute)
        if not name:
            return None
        identity = await self.lookup(name)
        if identity is None or (identity.dn or "").casefold() != entry.dn.casefold():
            if identity is not None:
                log.warn("bind DN {dn!r} is not the entry its name finds", dn=entry.dn)
            return None
        self.dn_cache.put(dn, replace(identity, from_cache=True))
        return identity

    async def _find_user(self, username: str) -> Identity | None:
        if not username:
            return None
        reply = await self._search(self._user_search.encode(username=username))
        return await self._identity_of(username, self._users_in(reply))

    async def _identity_of(self, username: str, users: list[UserEntry]) -> Identity | None:
        if not self._only_one(len(users)):
            return None
        groups = self._memberof_groups(users[0])
        if groups is None:
            groups = await self._search_groups(users[0].dn)
        return self._remember(username, users[0], groups)

    def _users_in(self, reply: Reply) -> list[UserEntry]:
        member_of = self.options.use_memberof
        mail = self.options.mail_attribute
        return [UserEntry(e.dn, e.first(self.options.username_attribute),
                          e.values("memberOf") if member_of else [],
                          e.first(mail) if mail else None) for e in reply.entries]

    def _user_attributes(self) -> list[str]:
        names = [self.options.username_attribute]
        if self.options.mail_attribute:
            names.append(self.options.mail_attribute)
        return names + ["memberOf"] if self.options.use_memberof else names

    # -- users: what both paths share

    def _only_one(self, matches: int) -> bool:
        if matches > 1:
            log.warn("user filter matches several entries for one username")
        return matches == 1

    def _memberof_groups(self, user: UserEntry) -> tuple[str, ...] | None:
        """The groups memberOf names; None when a group search must tell."""
        if user.member_of:
            names = [rdn_value(dn, self.options.group_name_attribute) for dn in user.member_of]
            return tuple(sorted({n for n in names if n is not None}))
        return None if self.options.group_base else ()

    def _remember(self, username: str, user: UserEntry, groups: tuple[str, ...]
                  ) -> Identity | None:
        """The entry's identity under its own name; one without a name (or a DN,
        which would bind anonymously) is nobody."""
        if not user.name or not user.dn:
            return None
        identity = Identity(user.name, user.dn, groups, mail=user.mail)
        self.cache.put(username, replace(identity, from_cache=True))
        return identity

    # -- groups

    async def _search_groups(self, dn: str) -> tuple[str, ...]:
        reply = await self._search(self._group_search.encode(dn=dn))
        found = [g.first(self.options.group_name_attribute) for g in reply.entries]
        return tuple(sorted({n for n in found if n}))

    async def _group_members(self, group: str) -> list[str]:
        base = self.options.group_base or self.options.user_base
        search = self._template(base, SCOPE_SUBTREE,
                                f"({self.options.group_name_attribute}={{group}})", ("group",),
                                ["member", "uniqueMember"], size_limit=2)
        reply = await self._search(search.encode(group=group))
        if len(reply.entries) != 1:
            raise UnknownUser(f"no such group: {group!r}" if not reply.entries else
                              f"group name {group!r} is ambiguous")
        entry = reply.entries[0]
        names = [await self._username_of(dn) for dn in entry.values("member")
                 + entry.values("uniqueMember")]
        return sorted({n for n in names if n is not None})

    async def _username_of(self, dn: str) -> str | None:
        name = rdn_value(dn, self.options.username_attribute)
        if name is not None:
            return name
        search = self._template(dn, SCOPE_BASE, "(objectClass=*)", (),
                                [self.options.username_attribute])
        reply = await self._search(search.encode(), missing_ok=True)
        return reply.entries[0].first(self.options.username_attribute) if reply.entries else None

    async def _ping(self) -> None:
        search = self._template("", SCOPE_BASE, "(objectClass=*)", (), ["1.1"])
        await self._search(search.encode())

    # -- operations with retry and failover

    async def _search(self, request: bytes, missing_ok: bool = False) -> Reply:
        self.stats.searches += 1
        return await self._search_on(request, [], missing_ok)

    async def _search_on(self, request: bytes, errors: list[str],
                         missing_ok: bool = False) -> Reply:
        """A search on the service links, after ``errors`` (attempts already lost)."""
        reply = await self._on_link(lambda: self._least_loaded().get(), request, errors)
        refused = _search_refused(reply.code, reply.diagnostic, missing_ok)
        if refused is not None:
            raise refused
        return reply

    async def _bind_on(self, link: _Link, dn: str, password: str, errors: list[str]) -> None:
        """A user bind on an acquired ``link``, which is released here."""
        try:
            reply = await self._on_link(link.get, encode_bind(dn, password), errors)
        finally:
            self._binders.release(link)
        if reply.code != SUCCESS:
            raise bind_failure(reply.code, reply.diagnostic)

    async def _on_link(self, get: Callable[[], Deferred[tuple[LdapClientProtocol, bool]]],
                       request: bytes, errors: list[str]) -> Reply:
        """Send ``request``; on a broken connection move on (bounded by the URL count,
        attempts already lost -- ``errors`` -- included)."""
        errors = list(errors)
        for _attempt in range(len(self.endpoints.all) + 1 - len(errors)):
            client, reused = await get()
            try:
                return await client.request(request, self.options.timeout)
            except ConnectionLost as lost:
                errors.append(str(lost))
                if isinstance(lost, OperationTimeout) or not reused:
                    self.endpoints.mark_down(client.endpoint, str(lost))
        raise DirectoryUnavailable(f"directory unavailable ({'; '.join(errors)})")

    def _least_loaded(self) -> _Link:
        return min(self._service, key=_load)

    # -- connecting

    def _connect(self, service: bool) -> Deferred[LdapClientProtocol]:
        return self._run(self._connect_any(service))

    async def _connect_any(self, service: bool) -> LdapClientProtocol:
        if self._closed:
            raise DirectoryUnavailable("directory closed")
        errors: list[str] = []
        for endpoint in self.endpoints.in_order():
            try:
                client = await self._open(endpoint, service)
            except (ConnectionLost, DirectoryUnavailable, error.ConnectError,
                    defer.TimeoutError, OSError) as failed:
                why = _describe(failed)
                errors.append(f"{endpoint.url}: {why}")
                self.endpoints.mark_down(endpoint, why)
                continue
            self.endpoints.mark_up(endpoint)
            self.stats.connects += 1
            return client
        raise DirectoryUnavailable(f"directory unavailable ({'; '.join(errors)})")

    async def _open(self, endpoint: Endpoint, service: bool) -> LdapClientProtocol:
        url = urlsplit(endpoint.url)
        host = unquote(url.hostname or "")
        ldaps = url.scheme.lower() == "ldaps"
        tcp: Any = HostnameEndpoint(self.reactor, host, url.port or (636 if ldaps else 389),
                                    timeout=self.options.connect_timeout)
        if ldaps:
            tcp = wrapClientTLS(self._tls_creator(host), tcp)
        client = LdapClientProtocol(self.reactor, endpoint)
        handshake = client.wait_for_handshake(self.options.timeout) if ldaps else None
        try:
            await tcp.connect(_OneConnection(client))
        except BaseException:
            if handshake is not None:  # nobody will wait for it now
                handshake.addErrback(lambda _: None)
                handshake.cancel()
            raise
        try:
            if handshake is not None:
                await handshake
            elif self.options.start_tls:
                await self._start_tls(client, host)
            if service and self.options.bind_dn:
                await self._service_bind(client)
        except BaseException:
            client.abort("connection setup failed")
            raise
        return client

    async def _start_tls(self, client: LdapClientProtocol, host: str) -> None:
        reply = await client.request(encode_start_tls(), self.options.timeout)
        if reply.code != SUCCESS:
            raise DirectoryUnavailable(f"StartTLS refused: result {reply.code} {reply.diagnostic}")
        await client.start_tls(self._tls_creator(host), self.options.timeout)

    async def _service_bind(self, client: LdapClientProtocol) -> None:
        request = encode_bind(self.options.bind_dn, self.options.bind_password)
        reply = await client.request(request, self.options.timeout)
        if reply.code != SUCCESS:
            raise DirectoryUnavailable(f"service bind as {self.options.bind_dn!r} failed: "
                                       f"result {reply.code} {reply.diagnostic}".strip())

    def _tls_creator(self, host: str) -> Any:
        if not self.options.tls_verify:
            return ssl.CertificateOptions(verify=False)
        if self._trust is None:
            self._trust = _trust_root(self.options.ca_file)
        return ssl.optionsForClientTLS(host, trustRoot=self._trust)

    def _template(self, base: str, scope: int, template: str, placeholders: Sequence[str],
                  attributes: Sequence[str], size_limit: int = 0) -> SearchTemplate:
        return SearchTemplate.build(base, scope, compile_filter(template, placeholders),
                                    attributes, size_limit, self._time_limit)


def _trust_root(ca_file: str) -> Any:
    """The CAs of ``ca_file`` (a PEM bundle), or the system's when it is empty."""
    if not ca_file:
        return ssl.platformTrust()  # type: ignore[no-untyped-call]
    with open(ca_file, "rb") as handle:
        pem = handle.read()
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in pem.split(marker) if b"-----BEGIN" in block]
    certificates = [ssl.Certificate.loadPEM(b) for b in blocks]
    return ssl.trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]


def _describe(failed: BaseException) -> str:
    text = str(failed) or type(failed).__name__
    return text if len(text) < 300 else text[:297] + "..."

