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
import math
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import TypeAlias

# How long an undecided entry blocks retransmissions when the window is
# shorter: a decision that never finishes must not block a NAS forever.
MIN_IN_PROGRESS_SECONDS = 30.0

# How often the (normally small) table of requests being decided is swept for
# entries whose decision never finished.
DECIDING_SWEEP_SECONDS = 1.0


# One bytes object per entry: at a few thousand requests a second a 30-second
# window holds tens of thousands of entries, and a tuple of its parts cost
# ~100 bytes more each (measured ~440 → ~340 bytes per entry with its answer).
DuplicateKey: TypeAlias = bytes

# An answer is stored as its bytes followed by its expiry (a double): one
# object per answer instead of an answer, an entry object and a float.
_EXPIRY = struct.Struct("<d")
_EXPIRY_SIZE = _EXPIRY.size


def duplicate_key(client: str, identifier: int, authenticator: bytes) -> DuplicateKey:
    """Request Authenticator and Identifier at fixed widths, then the client's name
    (whatever source address and port of that client the copy came from)."""
    return authenticator + bytes((identifier,)) + client.encode()


class Seen(enum.Enum):
    NEW = "new"  # first copy: decide it, then call complete()
    IN_PROGRESS = "in_progress"  # a copy is being decided: send nothing


# Answers per generation (see DuplicateCache): 2/3 of a 2**16-slot dict table,
# the most such a table holds before it grows.
GENERATION_ENTRIES = 43_690


_unpack_from = _EXPIRY.unpack_from


def _expiry(stored: bytes) -> float:
    return _unpack_from(stored, len(stored) - _EXPIRY_SIZE)[0]  # type: ignore[no-any-return]


class DuplicateCache:
    """Bounded (answers and requests being decided together: ``max_entries``, the
    oldest answer goes first); answers expire ``window`` seconds after they are sent.

    Sized for a full window at thousands of requests a second. Per answer: its
    key, one bytes object (the answer and its expiry), a slot in a dict and one
    in a deque: ~200 bytes of RSS where an OrderedDict of entry objects took
    ~360 (``python -m bench.radius_cache_memory``: 100,000 answers of 38 bytes,
    under steady load). Answers all live ``window`` seconds, so they expire in
    the order they were stored: the deque is that order and holds every stored
    answer's key exactly once. They are stored in generations of dicts, each
    only added to while it is the newest and dropped whole once emptied: one
    dict taking as many deletions as insertions grows its table to three times
    the entries it holds at each resize (~100 bytes an entry instead of ~30).
    Requests being decided are few (the decisions in flight) and kept apart.
    """

    def __init__(self, window: float = 30.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic, *,
                 generation_entries: int = GENERATION_ENTRIES) -> None:
        self.window = window
        self.max_entries = max_entries
        self._clock = clock
        self._generation_entries = generation_entries
        # Oldest first; answers go into the last. Each answer + _EXPIRY.
        self._generations: deque[dict[DuplicateKey, bytes]] = deque()
        self._answer_order: deque[DuplicateKey] = deque()  # oldest first, each key once
        self._deciding: dict[DuplicateKey, float] = {}  # blocks retransmissions until then
        self._last_sweep = -math.inf
        self._blocks_for = max(window, MIN_IN_PROGRESS_SECONDS)  # a request being decided
        self._expired_here: set[DuplicateKey] = set()  # see begin(); normally empty

    def begin(self, key: DuplicateKey) -> Seen | bytes:
        """NEW (and now in progress), IN_PROGRESS, or the cached answer."""
        now = self._clock()
        self._expire(now)
        for generation in self._generations:
            stored = generation.get(key)
            if stored is not None:
                if _expiry(stored) > now:
                    return stored[:-_EXPIRY_SIZE]
                # Expired, still here behind a later answer (the clock stepped
                # back): it counts as gone, and its next answer replaces it in place.
                self._expired_here.add(key)
                break
        deciding = self._deciding
        until = deciding.get(key)
        if until is not None and until > now:
            return Seen.IN_PROGRESS
        if until is None and len(self._answer_order) + len(deciding) >= self.max_entries:
            self._make_room()
        deciding[key] = now + self._blocks_for
        return Seen.NEW

    def complete(self, key: DuplicateKey, response: bytes) -> None:
        """Cache the answer sent for ``key`` for ``window`` seconds."""
        deciding = self._deciding.pop(key, None) is not None
        if self.window <= 0:
            return
        stored = response + _EXPIRY.pack(self._clock() + self.window)
        if self._expired_here and key in self._expired_here:
            self._expired_here.discard(key)
            if self._replace(key, stored):
                return
        if not deciding:  # evicted while deciding, under a flood
            self._make_room()
        generations = self._generations
        if not generations or len(generations[-1]) >= self._generation_entries:
            generations.append({})
        generations[-1][key] = stored
        self._answer_order.append(key)

    def forget(self, key: DuplicateKey) -> None:
        """The first copy got no answer: let a retransmission be decided."""
        self._deciding.pop(key, None)
        stored = self._stored(key)
        if stored is not None:  # stored, then not sent: expired where it stands
            self._replace(key, stored[:-_EXPIRY_SIZE] + _EXPIRY.pack(-math.inf))

    def _stored(self, key: DuplicateKey) -> bytes | None:
        for generation in self._generations:
            stored = generation.get(key)
            if stored is not None:
                return stored
        return None

    def _replace(self, key: DuplicateKey, stored: bytes) -> bool:
        for generation in self._generations:
            if key in generation:
                generation[key] = stored
                return True
        return False

    def _drop_oldest_answer(self) -> None:
        key = self._answer_order.popleft()
        if self._expired_here:
            self._expired_here.discard(key)
        generations = self._generations
        for generation in generations:  # the first, nearly always
            if generation.pop(key, None) is not None:
                break
        while generations and not generations[0]:
            generations.popleft()

    def _make_room(self) -> None:
        """Room for one more entry: the oldest answers go first, then the oldest
        requests being decided."""
        order, deciding = self._answer_order, self._deciding
        while len(order) + len(deciding) >= self.max_entries:
            if order:
                self._drop_oldest_answer()
            elif deciding:
                del deciding[next(iter(deciding))]
            else:
                break  # max_entries <= 0

    def _expire(self, now: float) -> None:
        order, generations = self._answer_order, self._generations
        while order:
            oldest = generations[0].get(order[0])
            if oldest is None:  # not in the first generation: never, but look everywhere
                oldest = self._stored(order[0])
            if oldest is not None and _unpack_from(oldest, len(oldest) - _EXPIRY_SIZE)[0] > now:
                break  # a stray expired one behind it is checked in begin()
            self._drop_oldest_answer()
        if not 0 <= now - self._last_sweep < DECIDING_SWEEP_SECONDS:  # or the clock stepped back
            self._last_sweep = now
            stale = [key for key, until in self._deciding.items() if until <= now]
            for key in stale:
                del self._deciding[key]

    def __len__(self) -> int:
        return len(self._answer_order) + len(self._deciding)
