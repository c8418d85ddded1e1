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
