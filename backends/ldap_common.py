"""What both LDAP clients share: options, what a result code means, escaping, endpoints.

:mod:`backends.ldap` (ldap3, for the admin commands) and
:mod:`backends.ldap_async` (Twisted-native, the request path) both build on
this module, which does not import ldap3: a ``serve`` with an LDAP directory
never loads it (~10 MB less resident memory), except to parse a quoted or
escaped first RDN.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from backends.base import DirectoryUnavailable, InvalidCredentials
from backends.ldapwire.filters import FilterTemplateError, compile_filter
from backends.ldapwire.messages import ResultCode

# stdlib logging, not twisted.logger: the admin CLI imports this (via the config)
# and should not load Twisted for it.
log = logging.getLogger("mfa_proxy.backends.ldap")

# The server cannot answer now: not the user's fault, never counted as a failure.
TRANSIENT_RESULT_CODES = frozenset({
    ResultCode.TIME_LIMIT_EXCEEDED, ResultCode.ADMIN_LIMIT_EXCEEDED, ResultCode.BUSY,
    ResultCode.UNAVAILABLE, ResultCode.OTHER,
})


# ---------------------------------------------------------------- options


@dataclass
class LdapOptions:
    """What the ``[directory]`` section says about an LDAP directory."""

    urls: list[str] = field(default_factory=lambda: ["ldap://127.0.0.1:389"])
    bind_dn: str = ""
    bind_password: str = ""
    user_base: str = ""
    user_filter: str = "(uid={username})"
    username_attribute: str = "uid"
    mail_attribute: str = "mail"  # read with the user's entry ("": none)
    group_base: str = ""
    # {dn}: the user's entry DN, {username}: its username attribute's value. One
    # attribute, so one equality index answers it ("index member eq" in slapd);
    # "(uniqueMember={dn})" for groupOfUniqueNames, "(memberUid={username})" for
    # posixGroup. A filter over an unindexed attribute makes the directory read
    # every group under group_base for each search.
    group_filter: str = "(member={dn})"
    group_name_attribute: str = "cn"
    use_memberof: bool = True
    start_tls: bool = False
    ca_file: str = ""
    tls_verify: bool = True
    connect_timeout: float = 3.0
    timeout: float = 5.0
    pool_size: int = 4  # service-account connections
    bind_pool_size: int = 8  # connections for user binds (one bind at a time each)
    # How long a URL that failed is tried last (after the others).
    down_seconds: float = 10.0
    # Cache of username -> DN (async backend only; 0 = off). The bind always happens.
    dn_cache_seconds: float = 60.0
    # Cache of entry DN -> its groups found by a group search (async backend only;
    # 0 = off): a search is made only when a rule for the request needs the groups.
    group_cache_seconds: float = 60.0

    def problems(self) -> list[str]:
        """One line per invalid option, naming the key (for check-config)."""
        found: list[str] = []
        if not self.urls:
            found.append("urls: at least one ldap:// or ldaps:// URL is required")
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
                found.append(f"urls: {url!r} is not an ldap:// or ldaps:// URL")
        found += _template_problems("user_filter", self.user_filter, "username")
        found += _template_problems("group_filter", self.group_filter, "dn", "username")
        if not self.user_base:
            found.append("user_base: required")
        for key in ("connect_timeout", "timeout"):
            if getattr(self, key) <= 0:
                found.append(f"{key}: must be greater than 0")
        for key in ("pool_size", "bind_pool_size"):
            if getattr(self, key) < 1:
                found.append(f"{key}: must be at least 1")
        return found


def _template_problems(key: str, template: str, *placeholders: str) -> list[str]:
    """Problems of a filter template that must hold one of ``placeholders``."""
    # The Twisted client's parser is the strict one (backends.ldapwire.filters).
    try:
        compiled = compile_filter(template, placeholders)
    except FilterTemplateError as bad:
        return [f"{key}: not an LDAP filter ({bad})"]
    if not compiled.placeholders:
        named = " or ".join(f"{{{p}}}" for p in placeholders)
        return [f"{key}: must contain {named} in a value"]
    return []


# ---------------------------------------------------------------- escaping

_FILTER_ESCAPES = {"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29", "\0": r"\00"}


def escape_filter_value(value: str) -> str:
    """Escape an assertion value for an LDAP string filter (RFC 4515 §3).

    The five characters the grammar reserves are escaped, and so is whitespace
    at either end (ldap3 strips it from a filter value; escaped, it is sent as
    given, as the Twisted client sends it). Other characters, non-ASCII
    included, stay as they are and are sent as UTF-8.
    """
    stripped = value.strip()
    start = value.index(stripped) if stripped else len(value)
    end = start + len(stripped)
    return (_hex_escape(value[:start])
            + "".join(_FILTER_ESCAPES.get(char, char) for char in stripped)
            + _hex_escape(value[end:]))


def _hex_escape(text: str) -> str:
    return "".join(f"\\{byte:02x}" for byte in text.encode())


def user_search_filter(template: str, username: str) -> str:
    """The template with ``{username}`` replaced (not str.format: filters may hold braces)."""
    return template.replace("{username}", escape_filter_value(username))


def group_search_filter(template: str, dn: str, username: str = "") -> str:
    """The group filter for the entry at ``dn`` whose username is ``username``."""
    return (template.replace("{dn}", escape_filter_value(dn))
            .replace("{username}", escape_filter_value(username)))


def rdn_value(dn: str, attribute: str | None = None) -> str | None:
    """The value of the DN's first RDN (when its type is ``attribute``, if given)."""
    first = _first_rdn(dn)
    if first is None:
        return None
    attr, value = first
    if attribute is not None and attr.lower() != attribute.lower():
        return None
    return _unescape_dn_value(value)


def _first_rdn(dn: str) -> tuple[str, str] | None:
    # Fast path for the common plain DN (this runs for every memberOf value on the
    # hot path); ldap3's full RFC 4514 parser for anything quoted or escaped.
    head = dn.split(",", 1)[0]
    if "\\" not in head and '"' not in head and "+" not in head:
        attr, equals, value = head.partition("=")
        return (attr.strip(), value.strip()) if equals and attr.strip() else None
    from ldap3.core.exceptions import LDAPException
    from ldap3.utils.dn import parse_dn

    try:
        attr, value, _sep = parse_dn(dn, escape=False, strip=True)[0]
    except (LDAPException, IndexError, ValueError):
        return None
    return attr, value


def _unescape_dn_value(value: str) -> str:
    r"""Undo RFC 4514 escapes (``\,`` and ``\2C``) in one attribute value."""
    if "\\" not in value:
        return value
    out = bytearray()
    i = 0
    while i < len(value):
        char = value[i]
        if char == "\\" and _is_hex(value[i + 1 : i + 3]):
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        elif char == "\\" and i + 1 < len(value):
            out += value[i + 1].encode()
            i += 2
        else:
            out += char.encode()
            i += 1
    return out.decode("utf-8", errors="replace")


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in "0123456789abcdefABCDEF" for c in text)


def bind_failure(code: int, message: str) -> Exception:
    """The error for a user bind that did not succeed, by result code."""
    if code in TRANSIENT_RESULT_CODES:
        return DirectoryUnavailable(f"user bind: result {code} {message}".strip())
    # 49 and everything else (ppolicy lockout 19/53, AD "account disabled" 49/533, ...)
    # is a refusal of these credentials: never an accept.
    return InvalidCredentials(f"bind refused: result {code}")


# ---------------------------------------------------------------- endpoints


@dataclass
class Endpoint:
    """One directory URL and when it last failed (shared by the pools)."""

    url: str
    down_until: float = 0.0

    def is_down(self, now: float) -> bool:
        return now < self.down_until


class Endpoints:
    """The URLs in preference order: configured order, URLs known to be down last."""

    def __init__(self, urls: Sequence[str], down_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.all = [Endpoint(url) for url in urls]
        self._down_seconds = down_seconds
        self._clock = clock
        self._lock = threading.Lock()

    def in_order(self) -> list[Endpoint]:
        now = self._clock()
        with self._lock:
            up = [e for e in self.all if not e.is_down(now)]
            down = sorted((e for e in self.all if e.is_down(now)), key=lambda e: e.down_until)
        return up + down

    def mark_down(self, endpoint: Endpoint, why: str) -> None:
        with self._lock:
            was_up = not endpoint.is_down(self._clock())
            endpoint.down_until = self._clock() + self._down_seconds
        if was_up:
            log.warning("directory %s marked down for %ss: %s", endpoint.url,
                        self._down_seconds, why)

    def mark_up(self, endpoint: Endpoint) -> None:
        if endpoint.down_until:
            with self._lock:
                endpoint.down_until = 0.0
            log.info("directory %s answers again", endpoint.url)

    def preferred(self) -> Endpoint | None:
        """The URL a new connection would try first (None when all are down)."""
        now = self._clock()
        return next((e for e in self.all if not e.is_down(now)), None)


def unavailable(errors: list[tuple[str, str]]) -> DirectoryUnavailable:
    text = "; ".join(f"{url}: {why}" for url, why in errors) or "no directory URL configured"
    return DirectoryUnavailable(f"directory unavailable ({text})")
