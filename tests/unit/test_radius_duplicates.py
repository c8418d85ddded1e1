"""RFC 5080 §2.2.2 duplicate cache: in progress, answered, expired, bounded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.radius.duplicates import (
    MIN_IN_PROGRESS_SECONDS,
    DuplicateCache,
    DuplicateKey,
    Seen,
    duplicate_key,
)
from tests.clock import ManualClock


def key(n: int = 1, client: str = "vpn") -> DuplicateKey:
    return duplicate_key(client, n % 256, n.to_bytes(16, "big"))


def test_first_copy_is_new_then_in_progress_then_answered() -> None:
    cache = DuplicateCache(window=30, clock=ManualClock(1000.0))
    assert cache.begin(key()) is Seen.NEW
    assert cache.begin(key()) is Seen.IN_PROGRESS
    cache.complete(key(), b"answer")
    assert cache.begin(key()) == b"answer"
    assert cache.begin(key()) == b"answer"


def test_key_is_client_identifier_and_authenticator() -> None:
    cache = DuplicateCache(clock=ManualClock(1000.0))
    cache.begin(key())
    assert cache.begin(key(client="vpn2")) is Seen.NEW
    other_authenticator = duplicate_key("vpn", 1, bytes(16))
    assert cache.begin(other_authenticator) is Seen.NEW
    assert cache.begin(duplicate_key("vpn", 2, (1).to_bytes(16, "big"))) is Seen.NEW


def test_answers_expire_after_the_window() -> None:
    clock = ManualClock(1000.0)
    cache = DuplicateCache(window=30, clock=clock)
    cache.begin(key())
    clock.t += 5
    cache.complete(key(), b"answer")
    clock.t += 29.9
    assert cache.begin(key()) == b"answer"
    clock.t += 0.2
    assert cache.begin(key()) is Seen.NEW  # decided afresh: a new attempt


def test_an_undecided_entry_does_not_block_forever() -> None:
    clock = ManualClock(1000.0)
    cache = DuplicateCache(window=5, clock=clock)
    cache.begin(key())
    clock.t += MIN_IN_PROGRESS_SECONDS - 1
    assert cache.begin(key()) is Seen.IN_PROGRESS
    clock.t += 2
    assert cache.begin(key()) is Seen.NEW


def test_window_zero_still_guards_the_decision_but_caches_nothing() -> None:
    cache = DuplicateCache(window=0, clock=ManualClock(1000.0))
    cache.begin(key())
    assert cache.begin(key()) is Seen.IN_PROGRESS
    cache.complete(key(), b"answer")
    assert cache.begin(key()) is Seen.NEW
    assert len(cache) == 1


def test_forget_lets_a_retransmission_be_decided() -> None:
    cache = DuplicateCache(clock=ManualClock(1000.0))
    cache.begin(key())
    cache.forget(key())
    assert cache.begin(key()) is Seen.NEW


def test_size_is_bounded_oldest_first() -> None:
    cache = DuplicateCache(max_entries=100, clock=ManualClock(1000.0))
    for n in range(250):
        cache.begin(key(n))
        cache.complete(key(n), b"%d" % n)
    assert len(cache) == 100
    assert cache.begin(key(249)) == b"249"
    assert cache.begin(key(0)) is Seen.NEW


@given(st.integers(1, 40))
def test_bounded_oldest_first_across_generations(generation: int) -> None:
    clock = ManualClock(1000.0)
    cache = DuplicateCache(max_entries=30, clock=clock, generation_entries=generation)
    for n in range(100):
        cache.begin(key(n))
        clock.t += 0.01
        cache.complete(key(n), b"%d" % n)
    assert len(cache) == 30
    assert [cache.begin(key(n)) for n in range(70, 100)] == [b"%d" % n for n in range(70, 100)]
    assert cache.begin(key(69)) is Seen.NEW
    clock.t += 30
    assert cache.begin(key(1000)) is Seen.NEW
    assert len(cache) == 1  # key(1000), being decided: the answers and key(69) expired


def test_expired_entries_are_purged() -> None:
    clock = ManualClock(1000.0)
    cache = DuplicateCache(window=30, clock=clock)
    for n in range(50):
        cache.begin(key(n))
        cache.complete(key(n), b"x")
    clock.t += 31
    cache.begin(key(1000))
    assert len(cache) == 1


@given(st.tuples(st.sampled_from(["vpn", "vpn1", "wifi", "é"]), st.integers(0, 255),
                 st.binary(min_size=16, max_size=16)),
       st.tuples(st.sampled_from(["vpn", "vpn1", "wifi", "é"]), st.integers(0, 255),
                 st.binary(min_size=16, max_size=16)))
def test_distinct_requests_never_share_a_key(a: tuple, b: tuple) -> None:  # type: ignore[type-arg]
    assert (duplicate_key(*a) == duplicate_key(*b)) == (a == b)


def test_a_stored_answer_that_was_never_sent_is_forgotten() -> None:
    cache = DuplicateCache(clock=ManualClock(1000.0))
    cache.begin(key())
    cache.complete(key(), b"answer")
    cache.forget(key())  # sending it failed: the NAS's retry is decided afresh
    assert cache.begin(key()) is Seen.NEW
    cache.complete(key(), b"second")
    assert cache.begin(key()) == b"second"


def test_requests_being_decided_count_against_the_bound_oldest_first() -> None:
    cache = DuplicateCache(max_entries=10, clock=ManualClock(1000.0))
    for n in range(15):
        assert cache.begin(key(n)) is Seen.NEW
    assert len(cache) == 10
    assert cache.begin(key(14)) is Seen.IN_PROGRESS
    assert cache.begin(key(5)) is Seen.IN_PROGRESS
    assert cache.begin(key(0)) is Seen.NEW


def test_when_full_the_oldest_answers_go_before_requests_being_decided() -> None:
    cache = DuplicateCache(max_entries=10, clock=ManualClock(1000.0))
    for n in range(5):
        cache.begin(key(n))
        cache.complete(key(n), b"%d" % n)
    for n in range(100, 108):
        cache.begin(key(n))
    assert len(cache) == 10
    assert [cache.begin(key(n)) for n in (3, 4)] == [b"3", b"4"]
    assert all(cache.begin(key(n)) is Seen.IN_PROGRESS for n in range(100, 108))
    assert cache.begin(key(0)) is Seen.NEW


def test_an_answer_evicted_while_deciding_is_still_stored() -> None:
    cache = DuplicateCache(max_entries=2, clock=ManualClock(1000.0))
    for n in range(3):
        cache.begin(key(n))  # key(0) is pushed out while being decided
    cache.complete(key(0), b"late")
    assert len(cache) == 2
    assert cache.begin(key(0)) == b"late"


def test_a_clock_stepping_back_never_serves_an_expired_answer() -> None:
    clock = ManualClock(1000.0)
    cache = DuplicateCache(window=30, clock=clock)
    cache.begin(key(1))
    cache.complete(key(1), b"first")  # until 1030
    clock.t = 990.0
    cache.begin(key(2))
    cache.complete(key(2), b"second")  # until 1020, stored behind the first
    clock.t = 1025.0
    assert cache.begin(key(2)) is Seen.NEW
    assert cache.begin(key(2)) is Seen.IN_PROGRESS
    assert cache.begin(key(1)) == b"first"
    cache.complete(key(2), b"again")
    assert cache.begin(key(2)) == b"again"
    clock.t = 1060.0
    assert cache.begin(key(1)) is Seen.NEW and cache.begin(key(2)) is Seen.NEW


class _Reference:
    """The rule, written plainly: one entry per key, (until when, answer or None)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.entries: dict[DuplicateKey, tuple[float, bytes | None]] = {}

    def begin(self, key: DuplicateKey, now: float) -> Seen | bytes:
        entry = self.entries.get(key)
        if entry is not None and entry[0] > now:
            return Seen.IN_PROGRESS if entry[1] is None else entry[1]
        self.entries[key] = (now + max(self.window, MIN_IN_PROGRESS_SECONDS), None)
        return Seen.NEW

    def complete(self, key: DuplicateKey, response: bytes, now: float) -> None:
        if self.window <= 0:
            self.entries.pop(key, None)
        else:
            self.entries[key] = (now + self.window, response)

    def forget(self, key: DuplicateKey) -> None:
        self.entries.pop(key, None)


_OPS = st.lists(st.tuples(st.sampled_from(["begin", "complete", "forget", "tick"]),
                          st.integers(0, 5), st.floats(-5, 40)), max_size=80)


@given(st.sampled_from([0, 1, 5, 30, 45]), st.sampled_from([1, 2, 3, 1000]), _OPS)
def test_same_answers_as_the_plain_rule(window: int, generation: int,
                                        ops: list[tuple[str, int, float]]) -> None:
    clock = ManualClock(1000.0)
    cache = DuplicateCache(window=window, clock=clock, generation_entries=generation)
    reference = _Reference(window)
    answers = 0
    for op, n, dt in ops:
        k = key(n)
        if op == "tick":
            clock.t += dt  # backwards too: the reactor's clock is the wall clock
        elif op == "begin":
            assert cache.begin(k) == reference.begin(k, clock.t)
        elif op == "complete":
            answers += 1
            cache.complete(k, b"answer %d" % answers)
            reference.complete(k, b"answer %d" % answers, clock.t)
        else:
            cache.forget(k)
            reference.forget(k)


@given(st.integers(1, 3))
def test_a_key_answered_again_gets_its_newest_answer(generation: int) -> None:
    cache = DuplicateCache(clock=ManualClock(1000.0), generation_entries=generation)
    for n in (1, 2, 3):
        cache.begin(key(n))
        cache.complete(key(n), b"first %d" % n)
    cache.forget(key(2))  # its answer was never sent: kept behind key(1), expired
    assert cache.begin(key(2)) is Seen.NEW
    cache.complete(key(2), b"second 2")  # in a later generation, or later in this one
    assert [cache.begin(key(n)) for n in (1, 2, 3)] == [b"first 1", b"second 2", b"first 3"]
    cache.forget(key(2))
    assert cache.begin(key(2)) is Seen.NEW


def test_keys_of_any_length_and_a_key_that_is_another_s_prefix() -> None:
    cache = DuplicateCache(clock=ManualClock(1000.0))
    long_name = duplicate_key("n" * 300, 1, bytes(16))  # longer than a byte can count
    prefix = duplicate_key("vpn", 1, bytes(16))
    longer = duplicate_key("vpn2", 1, bytes(16))
    for k, answer in ((long_name, b"long"), (longer, b"longer")):
        cache.begin(k)
        cache.complete(k, answer)
    assert cache.begin(prefix) is Seen.NEW
    assert cache.begin(long_name) == b"long" and cache.begin(longer) == b"longer"
