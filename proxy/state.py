"""Config → state objects: the store and the admin service, built the same way
for ``serve`` and the admin commands. Kept light (no Twisted) so the CLI
starts fast."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from policy.account_events import AccountEvents
from policy.admin import Accounts
from policy.clock import Clock
from policy.keys import KeyRing
from policy.schema import StoreError
from policy.store import Store
from policy.totp import TotpParams
from proxy.config import Settings, StateSettings, TotpSettings
from proxy.directories import username_rules

if TYPE_CHECKING:
    from policy.mail import MailContext


def open_store(state: StateSettings, clock: Clock = time.time,
               background_checkpoints: bool = False) -> Store:
    """The state store, ready to use: SQLite (the embedded default) is migrated on
    the spot; any other database must already be at the current schema
    (``mfa-proxy db upgrade``). Every failure is a StoreError saying why."""
    store = Store(state.url, clock, background_checkpoints=background_checkpoints)
    try:
        if store.dialect == "sqlite":
            store.upgrade()
        else:
            store.check_current()
    except StoreError:
        store.close()
        raise
    except Exception as e:  # the database is down or unreachable
        store.close()
        raise StoreError(f"state store unavailable: {type(e).__name__}: {e}") from None
    return store


def totp_params(t: TotpSettings) -> TotpParams:
    return TotpParams(t.digits, t.period, t.window)


def mail_events(settings: Settings, store: Store, origin: str,
                clock: Clock = time.time) -> AccountEvents | None:
    """The listener that queues mails in the outbox (None when ``[mail]`` is off).
    ``origin``: where admin actions come from, for the security notice."""
    if settings.mail is None:
        return None
    from policy.mail import OutboxEvents

    return OutboxEvents(store, clock, settings.mail.reminder_hours * 3600, origin)


def mail_context(settings: Settings) -> MailContext:
    """What every mail may say besides its own facts."""
    from policy.mail import MailContext

    return MailContext(settings.totp.issuer, settings.portal.public_url if settings.portal
                       else "", settings.mail.templates if settings.mail else {})


def make_accounts(settings: Settings, store: Store, keys: KeyRing | Callable[[], KeyRing],
                  clock: Clock = time.time, events: AccountEvents | None = None) -> Accounts:
    return Accounts(store, keys, totp_params(settings.totp), settings.totp.issuer,
                    settings.policy.enrollment_days, username_rules(settings.directory),
                    clock, events, max_failures=settings.policy.max_failures,
                    lockout_seconds=settings.policy.lockout_seconds,
                    recovery_codes=settings.policy.recovery_codes)


__all__ = ["mail_context", "mail_events", "make_accounts", "open_store", "totp_params"]
