"""The LDAP directory for the request path: look the user up, bind as the user, without threads.

ldap3 spends about 1 ms of CPU on one search + bind; :class:`AsyncLdapDirectory`
does the same work on persistent Twisted connections
(:mod:`backends.ldap_client`, pooled by :mod:`backends.ldap_links`) with the
proxy's own LDAP codec (:mod:`backends.ldapwire`, shared with the front-end):

- the user filter is parsed once (RFC 4515, :mod:`backends.ldapwire.filters`)
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
  search, never the bind;
- groups: memberOf, read with the entry, is free; a group search (an entry
  without memberOf, ``group_base`` set) is made only when the core asks
  (:meth:`AsyncLdapDirectory.groups`: a rule for that request needs the
  groups), and its result is kept per entry DN for ``group_cache_seconds``.

``lookup()`` and ``check_password()`` (``verify()`` is the two) have two
paths. While the connections they need are open, they run as reply
callbacks (:class:`_Verify`): no coroutine, one Deferred, the entry decoded
down to the DN, the username and memberOf. Whatever is rare -- connecting,
a lost connection, a refused cached DN -- goes to the coroutines, which are
the reference behaviour. ``lookup_dn()`` (which entry
a bind DN names) takes the same way for a plain DN spelled as its entry is
(a callback on ``lookup()``'s Deferred); any other spelling is a coroutine.

Errors and results are those of :class:`backends.ldap.LdapDirectory`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote, urlsplit

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from backends.base import (
    DirectoryUnavailable,
    Identity,
    InvalidCredentials,
    UnknownUser,
    check_password_not_empty,
)
from backends.ldap_client import ConnectionLost, LdapClientProtocol, OperationTimeout, Reply
from backends.ldap_common import (
    Endpoint,
    Endpoints,
    LdapOptions,
    bind_failure,
    rdn_value,
)
from backends.ldap_links import BindLinks, Link, by_load
from backends.ldapwire.ber import BerError
from backends.ldapwire.connect import OneConnection, client_endpoint
from backends.ldapwire.filters import FilterTemplateError, compile_filter
from backends.ldapwire.messages import (
    SCOPE_BASE,
    SCOPE_SUBTREE,
    START_TLS_OID,
    ResultCode,
    SearchTemplate,
    UserEntry,
    UserEntryReader,
    bind_request,
    decode_entry,
    extended_request,
)
from backends.ldapwire.tls import ClientTls

log = Logger(namespace="mfa_proxy.backends.ldap_async")

T = TypeVar("T")

# A base read of a bind DN answered with these: the DN names no entry we may use.
DN_NAMES_NOBODY = frozenset({
    ResultCode.NO_SUCH_OBJECT, ResultCode.INVALID_DN_SYNTAX,
    ResultCode.INSUFFICIENT_ACCESS_RIGHTS, ResultCode.REFERRAL, ResultCode.ALIAS_PROBLEM,
    ResultCode.ALIAS_DEREFERENCING_PROBLEM,
})
_START_TLS = extended_request(START_TLS_OID)
# A DN with nothing a directory would have to resolve: RDNs of one plain
# attribute=value each, no spaces at all (see AsyncLdapDirectory._plain_dn_name).
_PLAIN_RDN = r"[A-Za-z][A-Za-z0-9-]*=[A-Za-z0-9._-]+"
_PLAIN_DN = re.compile(f"{_PLAIN_RDN}(?:,{_PLAIN_RDN})*")


def _plain_dn_key(dn: str) -> str:
    """A DN as the two-search path compares the entry's with the name's: case aside."""
    return dn.casefold()


class _GroupCache:
    """entry DN → the groups a group search found, for a short time, bounded."""

    def __init__(self, seconds: float, clock: Callable[[], float], limit: int = 100_000) -> None:
        self.seconds = seconds
        self._clock = clock
        self._limit = limit
        self._entries: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()
        self.hits = 0

    def get(self, dn: str) -> tuple[str, ...] | None:
        if self.seconds <= 0:
            return None
        found = self._entries.get(dn)
        if found is None or found[0] <= self._clock():
            return None
        self.hits += 1
        return found[1]

    def put(self, dn: str, groups: tuple[str, ...]) -> None:
        if self.seconds <= 0:
            return
        self._entries[dn] = (self._clock() + self.seconds, groups)
        self._entries.move_to_end(dn)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


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
    group_searches: int = 0  # (counted in searches too)


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


_SEARCH_DONE = (ResultCode.SUCCESS, ResultCode.SIZE_LIMIT_EXCEEDED)


def _search_refused(code: int, diagnostic: str, missing_ok: bool = False) -> Exception | None:
    if code in _SEARCH_DONE or (missing_ok and code == ResultCode.NO_SUCH_OBJECT):
        return None
    return DirectoryUnavailable(f"search: result {code} {diagnostic}".strip())


class _Verify:
    """One look-up or one password check, run from the reply dispatch for as long
    as all goes the common way.

    A look-up (``password`` None) searches on an open service connection; a
    password check binds on an idle (or the next released) bind connection;
    each reply drives the next step and ``result`` is the only Deferred made.
    Anything unusual -- a lost connection, a refused cached
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
        self._link: Link | None = None  # set while the bind is in flight
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
        self.result.callback(directory._remember(username, user))

    # -- the bind

    def bind(self, identity: Identity) -> None:
        """Bind as the entry on a free bind link, now or once one is released."""
        directory = self._directory
        password = self._password or ""
        try:
            self._binding = _binding(identity.username, password, identity,
                                     identity.from_cache)
            self._request = bind_request(self._binding.dn, password)
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

    def give(self, link: Link) -> None:
        assert self._binding is not None
        client = link.ready()
        if client is None:  # it must connect (or move): the coroutine's job
            self._hand_over(self._directory._finish_bind(self._binding, link, []))
            return
        self._link, self._client = link, client
        client.send(self._request, self, self._directory.options.timeout)

    def expire(self, why: DirectoryUnavailable) -> None:
        self._fail(why)

    def _bound(self, link: Link, code: int, diagnostic: str) -> None:
        binding = self._binding
        assert binding is not None
        self._directory._binders.release(link)
        if code == ResultCode.SUCCESS:
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
        # entry DN -> groups found by a group search (made only when a rule needs them)
        self.group_cache = _GroupCache(options.group_cache_seconds, reactor.seconds)
        self._time_limit = max(1, int(options.timeout))
        self._username_attribute_folded = options.username_attribute.casefold()
        self._any_entry = compile_filter("(objectClass=*)", ())  # a bind DN's base read
        self._user_search = self._template(options.user_base, SCOPE_SUBTREE,
                                           options.user_filter, ("username",),
                                           self._user_attributes(), size_limit=2)
        self._user_reader = UserEntryReader(options.username_attribute, options.use_memberof,
                                            options.mail_attribute)
        self._group_search = self._template(options.group_base, SCOPE_SUBTREE,
                                            options.group_filter, ("dn", "username"),
                                            ["1.1"])  # the DNs only
        self._service = [Link(lambda: self._connect(service=True), self.endpoints)
                         for _ in range(max(1, options.pool_size))]
        binders = [Link(lambda: self._connect(service=False), self.endpoints)
                   for _ in range(max(1, options.bind_pool_size))]
        self._binders = BindLinks(binders, options.timeout, reactor)
        self._tls = ClientTls(options.ca_file, options.tls_verify)
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
        """The entry at ``dn``: the directory reads it (resolving every spelling it
        accepts: case, aliases, options, escapes, Unicode forms), then it is looked
        up by its own name, and only when that finds this very entry is it an
        identity. So a DN outside ``user_base``, the rootdn, or one of two entries
        sharing a name is nobody. A plain DN spelled as its entry is
        (:meth:`_plain_dn_name`) takes one search instead of the two, as callbacks
        on the look-up's own Deferred (every LDAP front-end bind comes this way)."""
        if not dn:
            return defer.succeed(None)
        cached = self.dn_cache.get(dn)
        if cached is not None:
            return defer.succeed(cached)
        name = self._plain_dn_name(dn)
        if name is not None:
            return self.lookup(name).addCallback(self._found_by_name, name, dn)
        return self._run(self._lookup_dn_reading(dn))

    def _found_by_name(self, identity: Identity | None, name: str, dn: str
                       ) -> Identity | None | Deferred[Identity | None]:
        if identity is not None and self._names_this_entry(identity, name, dn):
            self._remember_dn(dn, identity)
            return identity
        return self._run(self._lookup_dn_reading(dn))

    def check_password(self, identity: Identity, password: str) -> Deferred[Identity]:
        """Bind as the entry; a refusal of an entry from the cache looks once more."""
        if not password:  # would bind anonymously
            return defer.fail(InvalidCredentials("empty password"))
        attempt = _Verify(self, identity.username, password)
        attempt.bind(identity)
        return attempt.result

    def forget(self, name: str) -> None:
        """Drop the cached entry of a name or a bind DN (the next look-up searches)."""
        self.cache.forget(name)
        self.dn_cache.forget(name)

    def verify(self, username: str, password: str) -> Deferred[Identity]:
        """lookup, then check_password (the core calls the two apart)."""
        return self._run(self._verify(username, password))

    def groups(self, identity: Identity) -> Deferred[Identity]:
        """The identity with every group it is in: as it is when its entry's memberOf
        said so (or no group_base is set), else the group search's DNs, from the
        cache while ``group_cache_seconds`` last. DirectoryUnavailable when the
        search fails: never an identity with groups missing."""
        if identity.groups_complete or not identity.dn:
            return defer.succeed(identity)
        cached = self.group_cache.get(identity.dn)
        if cached is not None:
            return defer.succeed(replace(identity, groups=cached, groups_complete=True))
        return self._run(self._with_groups(identity, identity.dn))

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

    async def _finish_bind(self, binding: _Binding, link: Link, errors: list[str]) -> Identity:
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

    async def _lookup_dn_reading(self, dn: str) -> Identity | None:
        identity = await self._lookup_dn_reading_it(dn)
        if identity is not None:
            self._remember_dn(dn, identity)
        return identity

    def _remember_dn(self, dn: str, identity: Identity) -> None:
        if self.dn_cache.seconds > 0:
            self.dn_cache.put(dn, replace(identity, from_cache=True))

    def _plain_dn_name(self, dn: str) -> str | None:
        """The name to look a bind DN up by in one search, when the DN is plain
        (ASCII letters, digits, ``.``, ``_``, ``-``; no spaces, escapes or
        multi-valued RDNs) and its first RDN is the username attribute: that
        RDN's value. None: the DN is read first (:meth:`_lookup_dn_reading_it`)."""
        if not _PLAIN_DN.fullmatch(dn):
            return None
        attribute, _, rest = dn.partition("=")
        if attribute.casefold() != self._username_attribute_folded:
            return None
        return rest.split(",", 1)[0]

    @staticmethod
    def _names_this_entry(identity: Identity, name: str, dn: str) -> bool:
        """Whether the entry the name found is the bind DN's: the directory's own
        name for it is exactly that value and its DN is this one (case aside, as
        the two-search path compares them); then reading the DN and looking its
        name up would find this same entry."""
        return (identity.username == name
                and _plain_dn_key(identity.dn or "") == _plain_dn_key(dn))

    async def _lookup_dn_reading_it(self, dn: str) -> Identity | None:
        try:
            request = SearchTemplate.build(dn, SCOPE_BASE, self._any_entry,
                                           [self.options.username_attribute], 1,
                                           self._time_limit).encode()
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
        return identity

    async def _find_user(self, username: str) -> Identity | None:
        if not username:
            return None
        reply = await self._search(self._user_search.encode(username=username))
        return await self._identity_of(username, self._users_in(reply))

    async def _identity_of(self, username: str, users: list[UserEntry]) -> Identity | None:
        if not self._only_one(len(users)):
            return None
        return self._remember(username, users[0])

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

    def _remember(self, username: str, user: UserEntry) -> Identity | None:
        """The entry's identity under its own name; one without a name (or a DN,
        which would bind anonymously) is nobody. Its groups are those its
        memberOf names: complete unless it names none and a group search could
        find some (made only when asked, :meth:`groups`)."""
        if not user.name or not user.dn:
            return None
        if user.member_of:
            groups, complete = tuple(sorted(set(user.member_of))), True
        else:
            groups, complete = (), not self.options.group_base
        identity = Identity(user.name, user.dn, groups, mail=user.mail,
                            groups_complete=complete)
        if self.cache.seconds > 0:
            self.cache.put(username, replace(identity, from_cache=True))
        return identity

    # -- groups

    async def _with_groups(self, identity: Identity, dn: str) -> Identity:
        groups = await self._search_groups(dn, identity.username)
        self.group_cache.put(dn, groups)
        return replace(identity, groups=groups, groups_complete=True)

    async def _search_groups(self, dn: str, username: str) -> tuple[str, ...]:
        """The DNs of the groups under group_base that the filter finds for the entry."""
        self.stats.group_searches += 1
        reply = await self._search(self._group_search.encode(dn=dn, username=username))
        return tuple(sorted({g.dn for g in reply.entries if g.dn}))

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

    async def _bind_on(self, link: Link, dn: str, password: str, errors: list[str]) -> None:
        """A user bind on an acquired ``link``, which is released here."""
        try:
            reply = await self._on_link(link.get, bind_request(dn, password), errors)
        finally:
            self._binders.release(link)
        if reply.code != ResultCode.SUCCESS:
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

    def _least_loaded(self) -> Link:
        return min(self._service, key=by_load)

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
        tcp = client_endpoint(self.reactor, host, url.port or (636 if ldaps else 389),
                              self.options.connect_timeout,
                              self._tls_creator(host) if ldaps else None)
        client = LdapClientProtocol(self.reactor, endpoint)
        handshake = client.wait_for_handshake(self.options.timeout) if ldaps else None
        try:
            await tcp.connect(OneConnection(client))
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
        reply = await client.request(_START_TLS, self.options.timeout)
        if reply.code != ResultCode.SUCCESS:
            raise DirectoryUnavailable(f"StartTLS refused: result {reply.code} {reply.diagnostic}")
        await client.start_tls(self._tls_creator(host), self.options.timeout)

    async def _service_bind(self, client: LdapClientProtocol) -> None:
        request = bind_request(self.options.bind_dn, self.options.bind_password)
        reply = await client.request(request, self.options.timeout)
        if reply.code != ResultCode.SUCCESS:
            raise DirectoryUnavailable(f"service bind as {self.options.bind_dn!r} failed: "
                                       f"result {reply.code} {reply.diagnostic}".strip())

    def _tls_creator(self, host: str) -> Any:
        try:
            return self._tls.creator(host)
        except ValueError as bad:  # a CA file without a certificate (OSError: unreadable)
            raise DirectoryUnavailable(f"ca_file: {bad}") from None

    def _template(self, base: str, scope: int, template: str, placeholders: Sequence[str],
                  attributes: Sequence[str], size_limit: int = 0) -> SearchTemplate:
        return SearchTemplate.build(base, scope, compile_filter(template, placeholders),
                                    attributes, size_limit, self._time_limit)


def _describe(failed: BaseException) -> str:
    text = str(failed) or type(failed).__name__
    return text if len(text) < 300 else text[:297] + "..."

