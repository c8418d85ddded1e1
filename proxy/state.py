"""Config → state objects: the store, opened the same way for ``serve`` and the
admin commands. Kept light (no Twisted) so the CLI starts fast."""

from __future__ import annotations

import time

from policy.engine import Clock
from policy.store import Store, StoreError
from policy.totp import TotpParams
from proxy.config import StateSettings, TotpSettings


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


__all__ = ["open_store", "totp_params"]
