"""LDAP directory backend (ldap3, synchronous): look-up, bind, groups, failover, TLS.

How a password is checked: the service account searches ``user_base`` with
``user_filter`` (the username escaped per RFC 4515), then the user's DN binds
with the password on a *separate* connection, so the service connection is
never re-authenticated as a user.

Connections are pooled (one pool for the service account, one for user
binds); each connection is used by one thread at a time. URLs are tried in
order; a URL that fails is remembered as down for ``down_seconds`` and tried
last meanwhile, so a dead primary does not cost a timeout on every request.

The reactor never calls this class directly: it runs in a thread pool
(see :mod:`backends.base`). :mod:`backends.ldap_async` is the
Twisted-native client for the hot path; both share the options, the
escaping and the result-code mapping of :mod:`backends.ldap_common`.
"""

from __future__ import annotations

import math
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import ldap3
from ldap3.core.exceptions import (
    LDAPCommunicationError,
    LDAPException,
    LDAPResponseTimeoutError,
)
from twisted.logger import Logger

from backends.base import (
    DirectoryUnavailable,
    Identity,
    UnknownUser,
    check_password_not_empty,
)
from backends.ldap_common import (  # noqa: F401 (re-exported: callers and tests use them here)
    Endpoint,
    Endpoints,
    LdapOptions,
    bind_failure,
    escape_filter_value,
    group_search_filter,
    rdn_value,
    unavailable,
    user_search_filter,
)
from backends.ldapwire.messages import ResultCode

log = Logger(namespace="mfa_proxy.backends.ldap")

T = TypeVar("T")

# ---------------------------------------------------------------- pool


class ConnectionLost(Exception):
    """A pooled connection broke mid-operation (socket, timeout): try another one."""


@dataclass
class _Pooled:
    conn: Any  # ldap3.Connection (untyped library)
    endpoint: Endpoint
    reused: bool = False

    def close(self) -> None:
        # Already broken: nothing to release but the socket, which unbind closes.
        with suppress(LDAPException, OSError):
            self.conn.unbind()


class _Pool:
    """At most ``size`` connections of one kind, each used by one thread at a time."""

    def __init__(self, size: int, wait: float) -> None:
        self._idle: list[_Pooled] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._wait = wait
        self._closed = False

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self._wait):
            raise DirectoryUnavailable(f"no free directory connection within {self._wait}s")
        try:
            yield
        finally:
            self._slots.release()

    def take(self) -> _Pooled | None:
        with self._lock:
            pooled = self._idle.pop() if self._idle else None
        if pooled is not None:
            pooled.reused = True
        return pooled

    def give_back(self, pooled: _Pooled) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(pooled)
                return
        pooled.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self._closed = self._idle, [], True
        for pooled in idle:
            pooled.close()


# ---------------------------------------------------------------- directory


class LdapDirectory:
    """The :class:`backends.base.Directory` of an LDAP server (OpenLDAP, AD, ...)."""

    name = "ldap"

    def __init__(self, options: LdapOptions) -> None:
        self.options = options
        self.endpoints = Endpoints(options.urls, options.down_seconds)
        self._tls = _tls_settings(options)
        self._service = _Pool(options.pool_size, options.timeout)
        self._binder = _Pool(options.bind_pool_size, options.timeout)

    # -- the Directory protocol

    def verify(self, username: str, password: str) -> Identity:
        check_password_not_empty(password)
        identity = self.lookup(username)
        if identity is None:
            raise UnknownUser(f"no such user: {username!r}")
        return self.check_password(identity, password)

    def lookup(self, username: str) -> Identity | None:
        entry = self._find_user(username)
        return None if entry is None else self._identity(entry)

    def check_password(self, identity: Identity, password: str) -> Identity:
        check_password_not_empty(password)
        if not identity.dn:  # an empty DN would bind anonymously
            raise UnknownUser(f"no such user: {identity.username!r}")
        self._bind_as(identity.dn, password)
        return identity

    def group_members(self, group: str) -> list[str]:
        members = self._group_member_dns(group)
        names = [self._username_of(dn) for dn in members]
        return sorted({name for name in names if name is not None})

    def ping(self) -> None:
        self._with_service(lambda conn: self._check_search(
            conn.search("", "(objectClass=*)", ldap3.BASE, attributes=["1.1"]), conn, "ping"))

    def close(self) -> None:
        self._service.close()
        self._binder.close()

    # -- users

    def _find_user(self, username: str) -> _Entry | None:
        if not username:
            return None
        search_filter = user_search_filter(self.options.user_filter, username)
        attributes = [self.options.username_attribute]
        if self.options.use_memberof:
            attributes.append("memberOf")
        entries = self._search(self.options.user_base, search_filter, attributes, size_limit=2)
        if len(entries) > 1:
            # Two entries answer to one name: binding as either would be a guess.
            log.warn("user filter matches several entries for one username")
            return None
        return entries[0] if entries else None

    def _identity(self, entry: _Entry) -> Identity | None:
        """The entry's own name; an entry without one (or without a DN) is nobody."""
        name = entry.first(self.options.username_attribute)
        if not name or not entry.dn:
            return None
        return Identity(username=name, dn=entry.dn, groups=self._groups_of(entry, name))

    def _username_of(self, dn: str) -> str | None:
        """The username of a member DN: from the RDN when it names it, else read the entry."""
        name = rdn_value(dn, self.options.username_attribute)
        if name is not None:
            return name
        entries = self._search(dn, "(objectClass=*)", [self.options.username_attribute],
                               scope=ldap3.BASE, missing_ok=True)
        return entries[0].first(self.options.username_attribute) if entries else None

    # -- groups

    def _groups_of(self, entry: _Entry, username: str) -> tuple[str, ...]:
        """The DNs of the entry's groups: memberOf's, else a group search's (this
        client serves the admin commands: its look-ups are always complete)."""
        member_of = entry.values("memberOf") if self.options.use_memberof else []
        if member_of:
            return tuple(sorted(set(member_of)))
        if not self.options.group_base:
            return ()
        search_filter = group_search_filter(self.options.group_filter, entry.dn, username)
        groups = self._search(self.options.group_base, search_filter, ["1.1"])
        return tuple(sorted({g.dn for g in groups if g.dn}))

    def _group_member_dns(self, group: str) -> list[str]:
        base = self.options.group_base or self.options.user_base
        search_filter = f"({self.options.group_name_attribute}={escape_filter_value(group)})"
        found = self._search(base, search_filter, ["member", "uniqueMember"], size_limit=2)
        if len(found) != 1:
            raise UnknownUser(f"no such group: {group!r}" if not found else
                              f"group name {group!r} is ambiguous")
        return found[0].values("member") + found[0].values("uniqueMember")

    # -- searching with the service account

    def _search(self, base: str, search_filter: str, attributes: list[str], *,
                scope: str = ldap3.SUBTREE, size_limit: int = 0,
                missing_ok: bool = False) -> list[_Entry]:
        def run(conn: Any) -> list[_Entry]:
            ok = conn.search(base, search_filter, scope, attributes=attributes,
                             size_limit=size_limit, time_limit=max(1, int(self.options.timeout)))
            if not ok and conn.result.get("result") == ResultCode.NO_SUCH_OBJECT and missing_ok:
                return []
            self._check_search(ok, conn, f"search under {base!r}")
            return [_Entry.of(r) for r in conn.response or () if r.get("type") == "searchResEntry"]

        return self._with_service(run)

    @staticmethod
    def _check_search(ok: bool, conn: Any, what: str) -> None:
        code = conn.result.get("result")
        # ldap3 returns False for a successful search that found nothing.
        if ok or code in (ResultCode.SUCCESS, ResultCode.SIZE_LIMIT_EXCEEDED):
            return
        if code is None:  # ldap3 reports a lost socket as a missing result
            raise ConnectionLost(f"{what}: no answer")
        raise DirectoryUnavailable(f"{what}: result {code} {conn.result.get('description', '')}")

    # -- binding as the user

    def _bind_as(self, dn: str, password: str) -> None:
        def run(conn: Any) -> None:
            conn.user, conn.password, conn.authentication = dn, password, ldap3.SIMPLE
            try:
                ok = conn.bind(read_server_info=False)
            finally:
                conn.password = None  # do not keep the password around in the pool
            if ok:
                return
            code = conn.result.get("result") if conn.result else None
            if code is None:
                raise ConnectionLost("bind: no answer")
            raise bind_failure(int(code), str(conn.result.get("description", "")))

        self._with_connection(self._binder, self._open_for_binds, run)

    # -- connections

    def _with_service(self, operation: Callable[[Any], T]) -> T:
        return self._with_connection(self._service, self._open_service, operation)

    def _with_connection(self, pool: _Pool, opener: Callable[[Endpoint], Any],
                         operation: Callable[[Any], T]) -> T:
        """Run ``operation`` on a pooled connection, moving to the next URL when one breaks."""
        errors: list[tuple[str, str]] = []
        tried: set[str] = set()
        with pool.slot():
            pooled = pool.take() or self._connect(opener, tried, errors)
            while True:
                try:
                    result = self._run(pooled, operation)
                except ConnectionLost as lost:
                    pooled.close()
                    errors.append((pooled.endpoint.url, str(lost)))
                    if not pooled.reused:  # a fresh connection broke: the server is at fault
                        tried.add(pooled.endpoint.url)
                        self.endpoints.mark_down(pooled.endpoint, str(lost))
                    pooled = self._connect(opener, tried, errors)
                    continue
                except BaseException:
                    pool.give_back(pooled)  # a refusal, not a broken connection
                    raise
                self._release(pool, pooled)
                return result

    @staticmethod
    def _run(pooled: _Pooled, operation: Callable[[Any], T]) -> T:
        try:
            return operation(pooled.conn)
        except (LDAPCommunicationError, LDAPResponseTimeoutError, OSError) as error:
            raise ConnectionLost(_describe(error)) from error
        except LDAPException as error:  # a request ldap3 refuses to send (bad filter, ...)
            raise DirectoryUnavailable(f"{pooled.endpoint.url}: {_describe(error)}") from error

    def _release(self, pool: _Pool, pooled: _Pooled) -> None:
        # A connection to a fallback URL is dropped once a preferred URL may be back,
        # so traffic returns to the primary without a restart.
        preferred = self.endpoints.preferred()
        if preferred is not None and preferred is not pooled.endpoint and \
                self.endpoints.all.index(preferred) < self.endpoints.all.index(pooled.endpoint):
            pooled.close()
            return
        pool.give_back(pooled)

    def _connect(self, opener: Callable[[Endpoint], Any], tried: set[str],
                 errors: list[tuple[str, str]]) -> _Pooled:
        for endpoint in self.endpoints.in_order():
            if endpoint.url in tried:
                continue
            tried.add(endpoint.url)
            try:
                conn = opener(endpoint)
            except (LDAPException, OSError, DirectoryUnavailable) as error:
                errors.append((endpoint.url, _describe(error)))
                self.endpoints.mark_down(endpoint, _describe(error))
                continue
            self.endpoints.mark_up(endpoint)
            return _Pooled(conn, endpoint)
        raise unavailable(errors)

    def _open(self, endpoint: Endpoint) -> Any:
        conn = ldap3.Connection(
            self._server(endpoint.url),
            # ldap3 packs this into SO_RCVTIMEO as whole seconds.
            receive_timeout=max(1, math.ceil(self.options.timeout)),
            raise_exceptions=False,
            auto_referrals=False,
            read_only=True,
            return_empty_attributes=False,
        )
        conn.open(read_server_info=False)
        wants_start_tls = self.options.start_tls and not endpoint.url.lower().startswith("ldaps:")
        if wants_start_tls and not conn.start_tls(read_server_info=False):
            conn.unbind()
            raise DirectoryUnavailable(f"StartTLS refused: {conn.result}")
        return conn

    def _open_service(self, endpoint: Endpoint) -> Any:
        conn = self._open(endpoint)
        if not self.options.bind_dn:
            return conn  # anonymous look-ups
        conn.user, conn.password, conn.authentication = (
            self.options.bind_dn, self.options.bind_password, ldap3.SIMPLE)
        if not conn.bind(read_server_info=False):
            result = conn.result or {}
            conn.unbind()
            raise DirectoryUnavailable(
                f"service bind as {self.options.bind_dn!r} failed: result "
                f"{result.get('result')} {result.get('description', '')}")
        return conn

    def _open_for_binds(self, endpoint: Endpoint) -> Any:
        return self._open(endpoint)

    def _server(self, url: str) -> Any:
        # A new Server each time: ldap3 remembers failed addresses in it and then
        # refuses them ("invalid server address"); failover state is ours.
        return ldap3.Server(url, connect_timeout=self.options.connect_timeout,
                            get_info=ldap3.NONE, tls=self._tls)


def _tls_settings(options: LdapOptions) -> Any:
    """ldap3 TLS settings: verification on unless tls_verify is off; system CAs without ca_file."""
    return ldap3.Tls(
        validate=ssl.CERT_REQUIRED if options.tls_verify else ssl.CERT_NONE,
        ca_certs_file=options.ca_file or None,
        version=ssl.PROTOCOL_TLS_CLIENT,
    )


def _describe(error: BaseException) -> str:
    """A short reason for logs and DirectoryUnavailable (ldap3 never includes a password)."""
    text = str(error) or type(error).__name__
    return text if len(text) < 300 else text[:297] + "..."


@dataclass(frozen=True)
class _Entry:
    dn: str
    attributes: dict[str, list[str]]

    @classmethod
    def of(cls, response: dict[str, Any]) -> _Entry:
        attrs = {str(k).lower(): _as_list(v) for k, v in (response.get("attributes") or {}).items()}
        return cls(dn=str(response["dn"]), attributes=attrs)

    def values(self, name: str) -> list[str]:
        return self.attributes.get(name.lower(), [])

    def first(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None


def _as_list(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [] if value is None else [str(value)]
