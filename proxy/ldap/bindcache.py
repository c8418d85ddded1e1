"""The bind cache: a short window in which a repeated successful bind is
accepted without consuming a new code.

Why: many applications (web apps, PAM stacks) bind again with the same
credential for every request; with MFA, the second bind would carry an
already used code and be refused as a replay. Within the window, the same
full credential (password and code) from the same client address for the
same bind DN is accepted again — the proxy still binds upstream with the
password, so a changed password or a disabled account is still refused.

Trade-off (why it is off by default): anyone who captures the credential
and connects from the same address can reuse it until the window ends, and
a lockout decided elsewhere (say, over RADIUS) does not end a window that
has already started. Keep windows short, and prefer per-application rules.

Only a keyed hash of the credential is kept (HMAC-SHA256 under a random key
made per process), never the password; only successes are cached, and any
failed bind for a user drops every entry of that user.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from proxy.ldap.dn import normalize_dn


@dataclass(frozen=True)
class CachedBind:
    username: str  # canonical, as the core named it
    names: frozenset[str]  # every name a failed bind may drop it by (case-folded)
    password_length: int  # where the password ends in the credential (the code follows)
    diagnostic: str  # what the first successful bind told the client
    expires: float


def _part(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


class BindCache:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
        secret: bytes | None = None,
    ) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._secret = secret or os.urandom(32)
        self._entries: dict[bytes, CachedBind] = {}
        self._by_user: dict[str, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, bind_name: str, credential: bytes, client_address: str) -> bytes:
        """The keyed hash that stands for (bind DN, full credential, client address)."""
        normal = normalize_dn(bind_name)
        name = repr(normal) if normal else bind_name.strip().casefold()
        data = _part(name.encode()) + _part(credential) + _part(client_address.encode())
        return hmac.new(self._secret, data, hashlib.sha256).digest()

    def get(self, key: bytes) -> CachedBind | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._remove(key)
            return None
        return entry

    def put(
        self,
        key: bytes,
        username: str,
        password_length: int,
        diagnostic: str,
        seconds: float,
        aliases: Iterable[str] = (),
    ) -> None:
        """Remember a success, under the canonical username and any aliases
        (such as the name taken from the DN) a failed bind may drop it by."""
        if seconds <= 0:
            return
        names = frozenset(name.casefold() for name in (username, *aliases) if name)
        self._remove(key)
        self._make_room()
        entry = CachedBind(username, names, password_length, diagnostic, self._clock() + seconds)
        self._entries[key] = entry
        for name in names:
            self._by_user.setdefault(name, set()).add(key)

    def forget_user(self, *usernames: str) -> None:
        """A failed bind for this user: drop all of its entries."""
        for name in usernames:
            for key in list(self._by_user.get(name.casefold(), ())):
                self._remove(key)

    def _remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for name in entry.names:
            keys = self._by_user.get(name)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_user[name]

    def _make_room(self) -> None:
        """Drop expired entries, then the oldest, so the cache stays bounded
        (a tenth at a time, so a full cache is not swept on every insert)."""
        if len(self._entries) < self._max_entries:
            return
        now = self._clock()
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            self._remove(key)
        target = self._max_entries - max(1, self._max_entries // 10)
        while len(self._entries) > target:
            self._remove(next(iter(self._entries)))
