"""Access-Challenge State: what a second round needs to finish the first.

A State is random (128 bits, sent as 32 hex characters: some NAS treat it
as a C string), single-use, bound to the client and the user it was given
to, and expires.  Whatever the lookup's outcome the State is spent, so it
cannot be guessed at by trying users or clients one after the other.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def new_state() -> bytes:
    return secrets.token_hex(16).encode("ascii")


@dataclass(frozen=True, slots=True)  # one per pending challenge: no __dict__
class _Pending(Generic[T]):
    client: str
    username: str
    expires: float
    payload: T


class ChallengeStore(Generic[T]):
    """Bounded: when full, the oldest pending challenge is forgotten."""

    def __init__(self, timeout: float = 120.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic,
                 make_state: Callable[[], bytes] = new_state) -> None:
        self.timeout = timeout
        self.max_entries = max_entries
        self._clock = clock
        self._make_state = make_state
        self._pending: OrderedDict[bytes, _Pending[T]] = OrderedDict()

    def issue(self, client: str, username: str, payload: T) -> bytes:
        """A new State for (client, username), holding ``payload``."""
        now = self._clock()
        self._expire(now)
        while len(self._pending) >= self.max_entries:
            self._pending.popitem(last=False)
        state = self._make_state()
        while state in self._pending:  # 128 random bits: only a test's generator collides
            state = self._make_state()
        self._pending[state] = _Pending(client, username, now + self.timeout, payload)
        return state

    def take(self, state: bytes, client: str, username: str) -> T | None:
        """The payload, if the State is known, unexpired and theirs; spent either way."""
        now = self._clock()
        self._expire(now)
        pending = self._pending.pop(state, None)
        if pending is None or pending.expires <= now:
            return None
        if pending.client != client or pending.username != username:
            return None
        return pending.payload

    def _expire(self, now: float) -> None:
        # One timeout for all: insertion order is expiry order.
        pending = self._pending
        while pending:
            first = next(iter(pending.values()))
            if first.expires > now:
                break
            pending.popitem(last=False)

    def __len__(self) -> int:
        return len(self._pending)
