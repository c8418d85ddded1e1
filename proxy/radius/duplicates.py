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
from array import array
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


def duplicate_key(client: str, identifier: int, authenticator: bytes) -> DuplicateKey:
    """Request Authenticator and Identifier at fixed widths, then the client's name
    (whatever source address and port of that client the copy came from)."""
    return authenticator + bytes((identifier,)) + client.encode()


class Seen(enum.Enum):
    NEW = "new"  # first copy: decide it, then call complete()
    IN_PROGRESS = "in_progress"  # a copy is being decided: send nothing


# Answers per generation (see DuplicateCache): its index has twice as many slots.
GENERATION_ENTRIES = 32_768

# A stored answer: key length, answer length, expiry, then the key and the answer.
_RECORD = struct.Struct("<IHd")
_HEADER = _RECORD.size
_KEY_LENGTH = struct.Struct("<I")  # the record's first field
_EXPIRY_AT = 6  # offset of the expiry in a record
_EXPIRY = struct.Struct("<d")
_EMPTY = -1
_TAG_BITS = 24  # an index slot: record offset << _TAG_BITS | 24 bits of the key's hash (32-55)
_TAG_MASK = (1 << _TAG_BITS) - 1


class _Generation:
    """Answers stored one after the other in one log, with an open-addressing index
    (linear probing, half full at most) from the key's hash to the record.

    Records are never removed one by one: the oldest are swept by moving
    ``start`` past them (their index slots stay, so probing goes on past them),
    and the generation is dropped whole once swept to its end.
    """

    __slots__ = ("log", "index", "mask", "records", "start", "swept")

    def __init__(self, entries: int) -> None:
        size = 4
        while size < 2 * entries:
            size *= 2
        self.log = bytearray()
        self.index = array("q", [_EMPTY]) * size
        self.mask = size - 1
        self.records = 0  # appended
        self.swept = 0  # of them, behind start
        self.start = 0

    def find(self, key: bytes, h: int) -> int:
        """The offset of key's record, or -1."""
        index, mask, start = self.index, self.mask, self.start
        tag, klen = (h >> 32) & _TAG_MASK, len(key)
        i = h & mask
        while True:
            slot = index[i]
            if slot == _EMPTY:
                return -1
            if slot & _TAG_MASK == tag:
                off = slot >> _TAG_BITS
                if off >= start and self._holds(off, key, klen):
                    return off
            i = (i + 1) & mask

    def _holds(self, off: int, key: bytes, klen: int) -> bool:
        log = self.log
        return (log[off + _HEADER:off + _HEADER + klen] == key
                and _KEY_LENGTH.unpack_from(log, off)[0] == klen)

    def append(self, key: bytes, h: int, answer: bytes, expiry: float) -> None:
        """Store key's answer; the index then leads to it, not to an older one."""
        log, index, mask, start = self.log, self.index, self.mask, self.start
        tag, klen = (h >> 32) & _TAG_MASK, len(key)
        i = h & mask
        while True:
            slot = index[i]
            if slot == _EMPTY:
                break
            if slot & _TAG_MASK == tag:
                off = slot >> _TAG_BITS
                if off >= start and self._holds(off, key, klen):
                    break  # this slot leads to the new record from now on
            i = (i + 1) & mask
        index[i] = len(log) << _TAG_BITS | tag
        log += _RECORD.pack(klen, len(answer), expiry)
        log += key
        log += answer
        self.records += 1

    def answer(self, off: int) -> tuple[float, bytes]:
        klen, alen, expiry = _RECORD.unpack_from(self.log, off)
        begin = off + _HEADER + klen
        return expiry, bytes(self.log[begin:begin + alen])

    def expiry(self, off: int) -> float:
        return _RECORD.unpack_from(self.log, off)[2]  # type: ignore[no-any-return]

    def expire(self, off: int) -> None:
        _EXPIRY.pack_into(self.log, off + _EXPIRY_AT, -math.inf)

    def sweep_one(self) -> None:
        klen, alen, _ = _RECORD.unpack_from(self.log, self.start)
        self.start += _HEADER + klen + alen
        self.swept += 1

    def __len__(self) -> int:
        return self.records - self.swept


class DuplicateCache:
    """Bounded (answers and requests being decided together: ``max_entries``, the
    oldest answer goes first); answers expire ``window`` seconds after they are sent.

    Sized for a full window at thousands of requests a second: an answer is
    one record in a bytearray (its key, its expiry, its bytes) and two slots of
    an index, ~100 bytes of RSS where an OrderedDict of entry objects took ~360
    and plain dicts of bytes ~200 (``python -m bench.radius_cache_memory``:
    100,000 answers of 38 bytes under steady load). Answers all live ``window``
    seconds, so they expire in the order they were stored: generations of
    ``generation_entries`` records, the newest last, each swept from its
    start and dropped once swept to its end. A key is looked up newest
    generation first, and within one the index leads to its newest record: a
    key answered again (after its answer expired, or was forgotten) finds its
    new answer. Requests being decided are few (the decisions in flight) and
    kept apart, in a dict.
    """

    def __init__(self, window: float = 30.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic, *,
                 generation_entries: int = GENERATION_ENTRIES) -> None:
        self.window = window
        self.max_entries = max_entries
        self._clock = clock
        self._generation_entries = max(1, generation_entries)
        self._generations: deque[_Generation] = deque()  # oldest first
        self._answers = 0  # records not swept yet, in every generation
        self._deciding: dict[DuplicateKey, float] = {}  # blocks retransmissions until then
        self._blocks_for = max(window, MIN_IN_PROGRESS_SECONDS)  # a request being decided
        self._last_sweep = -math.inf

    def begin(self, key: DuplicateKey) -> Seen | bytes:
        """NEW (and now in progress), IN_PROGRESS, or the cached answer."""
        now = self._clock()
        self._expire(now)
        h = hash(key)
        for generation in reversed(self._generations):
            off = generation.find(key, h)
            if off >= 0:
                expiry, answer = generation.answer(off)
                if expiry > now:
                    return answer
                break  # its newest answer expired (the clock stepped back): gone
        deciding = self._deciding
        until = deciding.get(key)
        if until is not None and until > now:
            return Seen.IN_PROGRESS
        if until is None and self._answers + len(deciding) >= self.max_entries:
            self._make_room()
        deciding[key] = now + self._blocks_for
        return Seen.NEW

    def complete(self, key: DuplicateKey, response: bytes) -> None:
        """Cache the answer sent for ``key`` for ``window`` seconds."""
        deciding = self._deciding.pop(key, None) is not None
        if self.window <= 0:
            return
        if not deciding and self._answers + len(self._deciding) >= self.max_entries:
            self._make_room()  # evicted while deciding, under a flood
        generations = self._generations
        if not generations or generations[-1].records >= self._generation_entries:
            generations.append(_Generation(self._generation_entries))
        generations[-1].append(key, hash(key), response, self._clock() + self.window)
        self._answers += 1

    def forget(self, key: DuplicateKey) -> None:
        """The first copy got no answer: let a retransmission be decided."""
        self._deciding.pop(key, None)
        h = hash(key)
        for generation in reversed(self._generations):
            off = generation.find(key, h)
            if off >= 0:  # stored, then not sent: expired where it stands
                generation.expire(off)
                return

    def _drop_oldest_answer(self) -> None:
        generations = self._generations
        oldest = generations[0]
        oldest.sweep_one()
        self._answers -= 1
        if not oldest:
            generations.popleft()

    def _make_room(self) -> None:
        """Room for one more entry: the oldest answers go first, then the oldest
        requests being decided."""
        deciding = self._deciding
        while self._answers + len(deciding) >= self.max_entries:
            if self._answers:
                self._drop_oldest_answer()
            elif deciding:
                del deciding[next(iter(deciding))]
            else:
                break  # max_entries <= 0

    def _expire(self, now: float) -> None:
        generations = self._generations
        while generations:
            oldest = generations[0]
            if not oldest:  # an empty newest generation: never, but harmless
                generations.popleft()
                continue
            if oldest.expiry(oldest.start) > now:
                break  # a stray expired one behind it is checked in begin()
            self._drop_oldest_answer()
        if not 0 <= now - self._last_sweep < DECIDING_SWEEP_SECONDS:  # or the clock stepped back
            self._last_sweep = now
            stale = [key for key, until in self._deciding.items() if until <= now]
            for key in stale:
                del self._deciding[key]

    def __len__(self) -> int:
        return self._answers + len(self._deciding)
