"""The Directory interface: where the first factor (the password) is checked.

A backend answers three questions about a user, synchronously; the reactor
never calls these directly but through :class:`AsyncDirectory`, which runs
them in a thread pool (a backend with a natively asynchronous path may
override the ``*_async`` methods instead).
"""

from __future__ import annotations

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
    """

    username: str
    dn: str | None = None
    groups: tuple[str, ...] = field(default_factory=tuple)
    from_cache: bool = field(default=False, compare=False, repr=False)
    mail: str | None = field(default=None, compare=False, repr=False)


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

    def ping(self) -> Deferred[None]: ...


def check_password_not_empty(password: str) -> None:
    """An empty password is never sent to a directory: many servers treat a
    simple bind with an empty password as an anonymous bind that "succeeds"."""
    if not password:
        raise InvalidCredentials("empty password")
