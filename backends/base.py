"""The Directory interface: where the first factor (the password) is checked.

A backend answers three questions about a user, synchronously; the reactor
never calls these directly but through :class:`AsyncDirectory`, which runs
them in a thread pool (a backend with a natively asynchronous path may
override the ``*_async`` methods instead).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


@dataclass(frozen=True)
class Identity:
    """A directory entry: the MFA identity.

    ``username`` is the entry's own name (the username attribute's value as
    stored, not as a client typed it); the core keys every piece of state by
    its normalised form. ``from_cache``: found in a short-lived look-up cache
    (a refused password may then mean a stale entry, worth one fresh look).
    ``mail``: the entry's mail address, if it has one (``[directory]
    mail_attribute``; ``email`` in the local users file) -- an attribute of
    the entry, not part of who it is.

    ``groups``: the entry's groups -- their DNs for an LDAP directory, the
    names in the local users file (:func:`group_names` is how rules match
    them). ``groups_complete`` False: the entry named none of its groups
    (no memberOf) and only a group search can tell; the core asks for one
    (:meth:`AsyncDirectory.groups`) only when a rule for the request needs
    the groups.
    """

    username: str
    dn: str | None = None
    groups: tuple[str, ...] = field(default_factory=tuple)
    from_cache: bool = field(default=False, compare=False, repr=False)
    mail: str | None = field(default=None, compare=False, repr=False)
    groups_complete: bool = field(default=True, compare=False, repr=False)


_DN_SPACES = re.compile(r"\s*([,=+])\s*")
_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+")


def group_key(name: str) -> str:
    """How a configured group name (a rule's, ``require_groups``') is compared:
    case-insensitively, and for a DN without the spaces around its separators."""
    return _DN_SPACES.sub(r"\1", name.casefold().strip())


def group_names(groups: Iterable[str]) -> set[str]:
    """The names a rule may match an entry's groups by: each group as given
    (a full DN) and, for a DN, its first RDN value (``cn=VPN Users,ou=groups,...``
    → ``vpn users``); both through :func:`group_key`."""
    names = set()
    for group in groups:
        names.add(group_key(group))
        value = first_rdn_value(group)
        if value:
            names.add(group_key(value))
    return names


def first_rdn_value(dn: str) -> str | None:
    r"""The value of a DN's first RDN, its escapes undone (``cn=a\,b,ou=x`` → ``a,b``);
    None when the text does not start like a DN (``attribute=value``)."""
    end, escaped = len(dn), False
    for i, char in enumerate(dn):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in ",+":
            end = i
            break
    attribute, equals, value = dn[:end].partition("=")
    if not equals or not _ATTRIBUTE.fullmatch(attribute.strip()) or not value.strip():
        return None
    return _unescape(value.strip())


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    out, i = bytearray(), 0
    while i < len(value):
        pair = value[i + 1 : i + 3]
        if value[i] == "\\" and len(pair) == 2 and all(c in "0123456789abcdefABCDEF"
                                                       for c in pair):
            out.append(int(pair, 16))
            i += 3
        elif value[i] == "\\" and i + 1 < len(value):
            out += value[i + 1].encode()
            i += 2
        else:
            out += value[i].encode()
            i += 1
    return out.decode("utf-8", errors="replace")


class DirectoryError(Exception):
    """Base of every failure a backend reports."""

    reason = "directory_error"


class InvalidCredentials(DirectoryError):
    """Wrong password (or an empty one: never sent to a directory)."""

    reason = "bad_password"


class UnknownUser(InvalidCredentials):
    """No such user. Reads as a bad password to the client."""

    reason = "unknown_user"


class DirectoryUnavailable(DirectoryError):
    """The directory could not be asked (down, timeout, TLS failure, bad service bind).

    Never the user's fault: it does not count as a failure and is never an accept.
    """

    reason = "directory_unavailable"


@runtime_checkable
class Directory(Protocol):
    """Synchronous view of a directory; every method may block."""

    name: str

    def verify(self, username: str, password: str) -> Identity:
        """Look up and check the password; the identity or a DirectoryError."""

    def lookup(self, username: str) -> Identity | None:
        """Find a user without a password (None when unknown)."""

    def check_password(self, identity: Identity, password: str) -> Identity:
        """Check the password of an entry ``lookup`` found; the identity
        (refreshed when the entry moved) or a DirectoryError."""

    def group_members(self, group: str) -> list[str]:
        """Usernames in a directory group (raises UnknownUser for an unknown group)."""

    def ping(self) -> None:
        """Raise DirectoryUnavailable unless the directory answers."""

    def close(self) -> None:
        """Release connections."""


class AsyncDirectory(Protocol):
    """What the core uses on the reactor side: every call returns a Deferred.

    The core first resolves a name (``lookup``) or a bind DN (``lookup_dn``)
    to the entry, with the service account; only then, once the entry's lock
    has been checked, is its password tried (``check_password``).
    """

    def lookup(self, username: str) -> Deferred[Identity | None]: ...

    def lookup_dn(self, dn: str) -> Deferred[Identity | None]:
        """The entry at ``dn`` -- any spelling the directory accepts -- if it is
        exactly the entry ``lookup`` finds for its own name; else None."""

    def check_password(self, identity: Identity, password: str) -> Deferred[Identity]: ...

    def forget(self, name: str) -> None:
        """The next ``lookup`` of this name, or ``lookup_dn`` of this DN, asks the
        directory itself: an entry from the cache was refused, and may be stale."""

    def groups(self, identity: Identity) -> Deferred[Identity]:
        """The identity with all its groups: as it is when ``groups_complete``,
        else after the group search (which may be served from a short cache);
        DirectoryUnavailable when that search fails."""

    def ping(self) -> Deferred[None]: ...


def check_password_not_empty(password: str) -> None:
    """An empty password is never sent to a directory: many servers treat a
    simple bind with an empty password as an anonymous bind that "succeeds"."""
    if not password:
        raise InvalidCredentials("empty password")
