"""Challenge State: random, single-use, bound to client and user, expiring, bounded."""

from __future__ import annotations

import itertools

from proxy.radius.challenge import ChallengeStore, new_state
from tests.clock import ManualClock


def test_state_is_random_printable_and_at_least_16_octets() -> None:
    states = {new_state() for _ in range(1000)}
    assert len(states) == 1000
    for state in list(states)[:10]:
        assert len(state) >= 16 and state.isascii() and state.decode().isalnum()


def test_state_is_single_use() -> None:
    store: ChallengeStore[str] = ChallengeStore(clock=ManualClock(50.0))
    state = store.issue("vpn", "alice", "payload")
    assert store.take(state, "vpn", "alice") == "payload"
    assert store.take(state, "vpn", "alice") is None


def test_state_is_bound_to_client_and_user_and_spent_by_a_wrong_try() -> None:
    store: ChallengeStore[str] = ChallengeStore(clock=ManualClock(50.0))
    state = store.issue("vpn", "alice", "payload")
    assert store.take(state, "vpn", "bob") is None
    assert store.take(state, "vpn", "alice") is None  # spent: no guessing users one by one
    state = store.issue("vpn", "alice", "payload")
    assert store.take(state, "wifi", "alice") is None
    assert store.take(state, "vpn", "alice") is None


def test_state_expires() -> None:
    clock = ManualClock(50.0)
    store: ChallengeStore[str] = ChallengeStore(timeout=120, clock=clock)
    early = store.issue("vpn", "alice", "a")
    late = store.issue("vpn", "bob", "b")
    clock.t += 119.9
    assert store.take(early, "vpn", "alice") == "a"
    clock.t += 0.2
    assert store.take(late, "vpn", "bob") is None
    assert len(store) == 0


def test_unknown_state() -> None:
    store: ChallengeStore[str] = ChallengeStore(clock=ManualClock(50.0))
    assert store.take(b"never-issued", "vpn", "alice") is None


def test_store_is_bounded_oldest_first() -> None:
    store: ChallengeStore[int] = ChallengeStore(max_entries=10, clock=ManualClock(50.0))
    states = [store.issue("vpn", f"user{n}", n) for n in range(25)]
    assert len(store) == 10
    assert store.take(states[0], "vpn", "user0") is None
    assert store.take(states[24], "vpn", "user24") == 24


def test_a_colliding_generator_still_gives_unique_states() -> None:
    counter = itertools.count()
    store: ChallengeStore[int] = ChallengeStore(
        clock=ManualClock(50.0), make_state=lambda: b"s%d" % (next(counter) // 2))
    first, second = store.issue("c", "u", 1), store.issue("c", "u", 2)
    assert first != second
