"""RFC 5080 §2.2.2 duplicate detection.

A NAS that hears nothing retransmits the same packet (same Identifier and
Request Authenticator).  Deciding it again would count a second failure or
consume a code twice, so: while the first copy is being decided a
retransmission gets nothing (the answer is on its way), and for ``window``
seconds after it the cached answer bytes are sent again.

The key is the RADIUS client (its configured name), the Identifier and the
Request Authenticator, and deliberately not the source address or port, which
RFC 5080 lists too.  The Request Authenticator is a 16-byte random value that
RFC 2865 requires to be unique, so the same one under the same client is the
same request: a NAS that retransmits from a new socket, or an attacker who
replays a captured Access-Request from new source ports (or another address
of the same client), gets the answer already given.  Keyed by port, such a
replay was decided again, refused as a replayed code, and counted as the
user's failure until the user was locked out.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeAlias

# How long an undecided entry blocks retransmissions when the window is
# shorter: a decision that never finishes must not block a NAS forever.
MIN_IN_PROGRESS_SECONDS = 30.0


# One bytes object per entry: at a few thousand requests a second a 30-second
# window holds tens of thousands of entries, and a tuple of its parts cost
# ~100 bytes more each (measured ~440 → ~340 bytes per entry with its answer).
DuplicateKey: TypeAlias = bytes


def duplicate_key(client: str, identifier: int, authenticator: bytes) -> DuplicateKey:
    """Request Authenticator and Identifier at fixed widths, then the client's name
    (whatever source address and port of that client the copy came from)."""
    return authenticator + bytes((identifier,)) + client.encode()


class Seen(enum.Enum):
    NEW = "new"  # first copy: decide it, then call complete()
    IN_PROGRESS = "in_progress"  # a copy is being decided: send nothing


class _Entry:
    __slots__ = ("expires", "response")

    def __init__(self, expires: float, response: bytes | None) -> None:
        self.expires = expires
        self.response = response


class DuplicateCache:
    """Bounded; entries expire ``window`` seconds after their answer."""

    def __init__(self, window: float = 30.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[DuplicateKey, _Entry] = OrderedDict()

    def begin(self, key: DuplicateKey) -> Seen | bytes:
        """NEW (and now in progress), IN_PROGRESS, or the cached answer."""
        now = self._clock()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is not None and entry.expires > now:
            return Seen.IN_PROGRESS if entry.response is None else entry.response
        self._entries.pop(key, None)
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)  # the oldest goes first
        self._entries[key] = _Entry(now + max(self.window, MIN_IN_PROGRESS_SECONDS), None)
        return Seen.NEW

    def complete(self, key: DuplicateKey, response: bytes) -> None:
        """Cache the answer sent for ``key`` for ``window`` seconds."""
        if self.window <= 0:
            self._entries.pop(key, None)
            return
        expires = self._clock() + self.window
        entry = self._entries.get(key)
        if entry is None:  # evicted while deciding, under a flood
            self._entries[key] = _Entry(expires, response)
            return
        entry.expires, entry.response = expires, response
        self._entries.move_to_end(key)

    def forget(self, key: DuplicateKey) -> None:
        """The first copy got no answer: let a retransmission be decided."""
        self._entries.pop(key, None)

    def _expire(self, now: float) -> None:
        # Entries sit roughly in expiry order (answers move to the end), so
        # dropping expired ones from the front is cheap; a stray later one
        # is still checked in begin() and aged out by the size bound.
        entries = self._entries
        while entries:
            first = next(iter(entries.values()))
            if first.expires > now:
                break
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
