"""What the admin service (policy/admin.py) tells listeners about a change: the
hook mail attaches to. Kept apart from the service and the store so that
whatever only names the hook (the mail config, the engine's types) loads no
SQLAlchemy: `mfa-proxy --version` and `check-config` start without it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class AccountEvents(Protocol):
    """What changed, told inside the change's own store transaction
    (:meth:`AdminStore.transaction`), never for a refusal.

    Whatever a listener writes to the store commits with the change or not at
    all; a listener that raises undoes the change. This is where mail hooks in
    (policy/mail.py, ``OutboxEvents``): ``required``, ``extended`` and
    ``reset`` give the new deadline (Unix time), ``enrolled`` and
    ``setup_confirmed`` are the security notices; the mail is queued in the
    outbox here and sent later by ``serve``, never inline.
    """

    def required(self, username: str, deadline: int, notify: bool = True) -> None:
        """MFA required, with an enrollment period ending at ``deadline``;
        ``notify`` False: the admin asked that the user not be told (--no-mail)."""

    def enrolled(self, username: str) -> None:
        """A new key is active (made or imported by an admin)."""

    def reset(self, username: str, deadline: int) -> None:
        """An admin cleared the key and opened a period ending at ``deadline``."""

    def extended(self, username: str, deadline: int) -> None:
        """An admin extended or reopened the period, to ``deadline``."""

    def setup_confirmed(self, username: str, replaced: bool, source: str = "") -> None:
        """The user set up a key (the portal) and it is active now; ``replaced``: it
        took the place of an older key (a reset by the user); ``source``: the
        client's address. The security notice."""

    def unrequired(self, username: str) -> None:
        """MFA no longer required (the key, if any, is kept)."""

    def unlocked(self, username: str) -> None:
        """The failure counter and any lockout were cleared."""

    def bypass_changed(self, username: str, on: bool) -> None:
        """Password-only sign-in turned on or off."""

    def imported(self, enrolled: Sequence[str], required: Sequence[tuple[str, int]]) -> None:
        """A bulk import: users with a key now, and users required without one
        (with their deadlines)."""


class NoAccountEvents:
    """The default: nobody listens."""

    def required(self, username: str, deadline: int, notify: bool = True) -> None:
        pass

    def enrolled(self, username: str) -> None:
        pass

    def reset(self, username: str, deadline: int) -> None:
        pass

    def extended(self, username: str, deadline: int) -> None:
        pass

    def setup_confirmed(self, username: str, replaced: bool, source: str = "") -> None:
        pass

    def unrequired(self, username: str) -> None:
        pass

    def unlocked(self, username: str) -> None:
        pass

    def bypass_changed(self, username: str, on: bool) -> None:
        pass

    def imported(self, enrolled: Sequence[str], required: Sequence[tuple[str, int]]) -> None:
        pass
