"""The core's phased entry point for a front-end that checks the password itself
(the LDAP front-end's own upstream bind): ``Authenticator.start`` resolves,
waits its turn at the identity's gate and begins, then hands back a
:class:`PasswordCheck`; ``finish(verdict)`` decides as ``authenticate`` would
have after the directory's answer, ``abandon()`` ends the attempt with no
verdict. Every path gives the identity's turn back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from backends.base import DirectoryUnavailable, Identity, InvalidCredentials
from policy.decision import Decision, Outcome, Reason, SplitMode
from policy.engine import Authenticator, GroupRequirement, PasswordCheck
from tests.unit.test_engine import (
    AsyncFake,
    Harness,
    Scripted,
    authenticator,
    enrolled,
    fired,
    make_harness,
    outcome,
)

ALICE_DN = "uid=alice,ou=people,dc=example,dc=org"


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = make_harness(tmp_path)
    yield harness
    harness.store.close()


def started(auth: Authenticator, h: Harness, password: str | None = None,
            **kw: Any) -> PasswordCheck:
    answer = fired(auth.start(h.request(password=password, **kw)))
    assert isinstance(answer, PasswordCheck), answer
    return answer


def reasons_audited(h: Harness) -> list[str]:
    h.engine.audit.flush()
    return [r.reason for r in reversed(h.store.admin.recent_audit("alice"))]


def test_start_hands_back_the_check_and_holds_the_identity_s_turn(h: Harness) -> None:
    enrolled(h)
    auth = authenticator(h)
    check = started(auth, h, h.with_code())
    assert (check.identity.username, check.identity.dn, check.password) == (
        "alice", ALICE_DN, "alice-pw")  # the entry, and the password without its code
    assert h.directory.calls == []  # the core checked no password itself
    assert len(auth.gate) == 1 and not check.ended
    h.next_step()
    waiting = auth.start(h.request("ALICE", password=h.with_code()))  # the same identity
    assert not waiting.called  # waits for the first attempt to end
    decision = fired(check.finish(check.identity))
    assert outcome(decision) == (Outcome.ACCEPT, Reason.OK) and check.ended
    second = fired(waiting)  # now its turn
    assert isinstance(second, PasswordCheck) and len(auth.gate) == 1
    second.abandon()
    assert len(auth.gate) == 0
    assert reasons_audited(h) == ["ok", "directory_unavailable"]


def wrong_code(h: Harness) -> str:
    near = {h.code(offset=k) for k in (-1, 0, 1)}
    return next(c for c in ("000000", "999999", "123456") if c not in near)


@pytest.mark.parametrize(("field", "reason"), [
    ("alice-pw,{wrong}", Reason.BAD_CODE),
    ("wrong,{wrong}", Reason.BAD_PASSWORD),  # which factor failed reads the same to the client
    ("alice-pw", Reason.MISSING_CODE),
    ("wrong", Reason.BAD_PASSWORD),
])
def test_a_second_factor_that_fails_is_decided_without_handing_the_check_over(
        h: Harness, field: str, reason: Reason) -> None:
    """The caller would bind its own session to check the password: that session
    must not be bound when the second factor fails whatever the password. The
    check says so (``binds_session``), and ``check_here`` has the core check the
    password itself (one bind, as the caller's would have been) and decide; the
    same failure is counted, the same answer given."""
    enrolled(h)
    auth = authenticator(h)
    check = started(auth, h, field.format(wrong=wrong_code(h)),
                    split=SplitMode.APPEND)  # as the LDAP front-end
    assert not check.binds_session and h.directory.calls == [] and len(auth.gate) == 1
    answer = fired(check.check_here())
    assert outcome(answer) == (Outcome.REJECT, reason) and check.ended
    assert h.directory.calls == [("alice", field.split(",")[0])]  # the core's own check
    assert h.record().failures == 1 and len(auth.gate) == 0
    assert answer.message == "invalid credentials: wrong password or verification code"


def test_a_used_code_is_decided_by_the_core_and_the_right_one_handed_over(h: Harness) -> None:
    enrolled(h)
    auth = authenticator(h)
    field = h.with_code()
    first = started(auth, h, field)
    assert outcome(fired(first.finish(first.identity))) == (Outcome.ACCEPT, Reason.OK)
    assert first.binds_session
    again = started(auth, h, field)  # the same code: a replay
    assert not again.binds_session
    assert outcome(fired(again.check_here())) == (Outcome.REJECT, Reason.REPLAYED_CODE)
    assert h.directory.calls == [("alice", "alice-pw")]  # checked by the core


def test_the_code_s_step_found_before_the_password_is_the_one_decide_uses(
        h: Harness) -> None:
    """Matched once, at begin: a clock that moves past the code's window while the
    caller's bind runs does not turn a right code into a wrong one after the
    session was bound (nor the other way round)."""
    enrolled(h)
    auth = authenticator(h)
    check = started(auth, h, h.with_code(offset=-1))  # the oldest step the window allows
    h.next_step()  # the bind took long: that step is out of the window now
    assert outcome(fired(check.finish(check.identity))) == (Outcome.ACCEPT, Reason.OK)


def test_an_expired_enrollment_is_decided_by_the_core(h: Harness) -> None:
    h.store.admin.require("alice", int(h.clock()) - 1)
    auth = authenticator(h)
    check = started(auth, h)
    assert not check.binds_session
    assert outcome(fired(check.check_here())) == (Outcome.REJECT, Reason.ENROLLMENT_EXPIRED)
    assert h.directory.calls == [("alice", "alice-pw")]


def test_a_password_only_user_is_handed_over(h: Harness) -> None:
    h.require()  # in enrollment, no key yet: the password alone passes
    auth = authenticator(h)
    check = started(auth, h)
    assert check.binds_session
    decision = fired(check.finish(check.identity))
    assert outcome(decision) == (Outcome.ACCEPT, Reason.IN_ENROLLMENT)
    assert h.directory.calls == []


def test_a_recovery_code_is_handed_over_when_held_and_decided_by_the_core_when_not(
        h: Harness) -> None:
    from policy import recovery

    enrolled(h)
    code = recovery.new_codes()[0]
    normal = recovery.normalize(code)
    assert normal is not None
    h.store.admin.replace_recovery_codes(
        "alice", [recovery.digest(h.engine.recovery_key, "alice", normal)])
    auth = authenticator(h)
    check = started(auth, h, f"alice-pw,{code}")
    assert check.binds_session
    assert h.store.admin.recovery_codes_left("alice") == 1  # looked at, not used, yet
    decision = fired(check.finish(check.identity))
    assert outcome(decision) == (Outcome.ACCEPT, Reason.RECOVERY_CODE)
    used = started(auth, h, f"alice-pw,{code}")  # single use
    assert not used.binds_session
    assert outcome(fired(used.check_here())) == (Outcome.REJECT, Reason.BAD_CODE)
    assert h.directory.calls == [("alice", "alice-pw")]


def test_a_repeat_within_the_window_is_handed_over(h: Harness) -> None:
    enrolled(h)
    auth = authenticator(h)
    field = h.with_code()
    first = started(auth, h, field, repeat=30)
    assert outcome(fired(first.finish(first.identity))) == (Outcome.ACCEPT, Reason.OK)
    again = started(auth, h, field, repeat=30)  # a repeat would be accepted: bind for it
    assert again.binds_session
    assert outcome(fired(again.finish(again.identity))) == (Outcome.ACCEPT, Reason.REPEAT)
    assert h.directory.calls == []


def step_now(h: Harness) -> int:
    """The time step of ``h.code()``."""
    from tests.unit.test_engine import PARAMS

    return PARAMS.step_at(h.clock())


def test_a_repeat_that_came_after_begin_is_not_accepted_on_the_core_s_own_check(
        h: Harness) -> None:
    """Begin found the code used and no repeat: the check must not bind the
    session. Another instance's accept of the same credentials (its repeat
    window) lands meanwhile: the core's own check still refuses -- no accept is
    ever answered for a session that was not bound."""
    enrolled(h)
    auth = authenticator(h)
    field = h.with_code()
    h.store.hot.accept_step("alice", step_now(h), h.clock())  # used elsewhere, no repeat
    check = started(auth, h, field, repeat=30)
    assert not check.binds_session
    request = h.request(password=field, repeat=30)
    prepared = h.engine.begin(request, check.identity, "alice")
    assert not isinstance(prepared, Decision)
    h.engine._remember_success(prepared, h.clock())  # the other instance's repeat entry
    decision = fired(check.check_here())
    assert outcome(decision) == (Outcome.REJECT, Reason.REPLAYED_CODE)


def test_a_refused_password_is_counted_and_teaches_the_latency_mimic(h: Harness) -> None:
    auth = authenticator(h)
    before = auth.mimic.average
    check = started(auth, h, "wrong")
    h.clock.advance(0.5)  # the front-end's bind takes this long
    decision = fired(check.finish(InvalidCredentials("alice")))
    assert outcome(decision) == (Outcome.REJECT, Reason.BAD_PASSWORD)
    assert h.record().failures == 1 and len(auth.gate) == 0
    assert h.events.directory_calls[-1] == (0.5, None)  # the check's latency, no error
    assert auth.mimic.average > before  # unknown names now wait about as long


def test_a_directory_failure_is_not_counted(h: Harness) -> None:
    auth = authenticator(h)
    check = started(auth, h)
    decision = fired(check.finish(DirectoryUnavailable("bind answered 51")))
    assert outcome(decision) == (Outcome.REJECT, Reason.DIRECTORY_UNAVAILABLE)
    assert h.record().failures == 0 and len(auth.gate) == 0
    assert h.events.directory_calls[-1] == (0.0, "directory_unavailable")


def test_abandon_is_a_reject_audited_like_a_directory_outage(h: Harness) -> None:
    enrolled(h)
    auth = authenticator(h)
    before = auth.mimic.average
    check = started(auth, h, h.with_code())
    decisions: list[Decision] = []
    check.decided.addCallback(decisions.append)
    check.abandon()
    assert [outcome(d) for d in decisions] == [(Outcome.REJECT, Reason.DIRECTORY_UNAVAILABLE)]
    assert check.ended and len(auth.gate) == 0
    assert h.record().failures == 0 and auth.mimic.average == before
    assert reasons_audited(h) == ["directory_unavailable"]
    # the next attempt for the identity goes through at once
    assert isinstance(fired(auth.start(h.request(password=h.with_code()))), PasswordCheck)


def test_exactly_one_of_finish_and_abandon(h: Harness) -> None:
    auth = authenticator(h)
    check = started(auth, h)
    fired(check.finish(check.identity))
    check.abandon()  # nothing: it has ended
    with pytest.raises(RuntimeError):
        check.finish(check.identity)
    abandoned = started(auth, h)
    abandoned.abandon()
    abandoned.abandon()
    with pytest.raises(RuntimeError):
        abandoned.finish(abandoned.identity)
    assert len(auth.gate) == 0
    assert reasons_audited(h) == ["not_required", "directory_unavailable"]  # one row each


def test_what_needs_no_password_check_is_decided_at_once(h: Harness) -> None:
    enrolled(h)
    auth = authenticator(h)
    empty = fired(auth.start(h.request(password=f",{h.code()}")))
    assert isinstance(empty, Decision) and empty.reason is Reason.EMPTY_PASSWORD
    unknown = fired(auth.start(h.request("mallory", password="guess")))
    assert isinstance(unknown, Decision) and unknown.reason is Reason.UNKNOWN_USER
    for _ in range(5):  # a right code: the caller's bind checks the password
        fired(started(auth, h, f"wrong,{h.code()}").finish(InvalidCredentials("alice")))
    locked = fired(auth.start(h.request(password=h.with_code())))
    assert isinstance(locked, Decision) and locked.reason is Reason.LOCKED_OUT
    assert len(auth.gate) == 0 and h.directory.calls == []


def test_a_start_cancelled_before_its_check_abandons_it(h: Harness) -> None:
    held: list[defer.Deferred[Identity | None]] = []

    def slow_lookup(name: str) -> defer.Deferred[Identity | None]:
        held.append(defer.Deferred())
        return held[-1]

    auth = authenticator(h, Scripted(h.directory, lookup=slow_lookup))
    pending = auth.start(h.request())
    pending.addErrback(lambda f: f.trap(defer.CancelledError))
    pending.cancel()  # the front-end gave up (its bind timed out)
    held.pop().callback(h.directory.lookup("alice"))  # the core goes on
    assert len(auth.gate) == 0  # the check nobody will make was abandoned
    assert reasons_audited(h) == ["directory_unavailable"]


def test_the_lockout_holds_under_concurrent_starts(h: Harness) -> None:
    auth = authenticator(h)
    attempts = [auth.start(h.request(password="wrong")) for _ in range(10)]
    checked = 0
    for attempt in attempts:
        answer = fired(attempt)  # each only once the one before it has ended
        if isinstance(answer, PasswordCheck):
            assert len(auth.gate) == 1
            checked += 1
            fired(answer.finish(InvalidCredentials("alice")))
        else:
            assert answer.reason is Reason.LOCKED_OUT
    assert checked == 5 and h.record().locked(h.clock()) and len(auth.gate) == 0


def test_finish_searches_the_groups_a_rule_needs(h: Harness) -> None:
    searched: list[Identity] = []

    def groups(identity: Identity) -> defer.Deferred[Identity]:
        searched.append(identity)
        return defer.succeed(replace(identity, groups=("cn=vpn",), groups_complete=True))

    h.engine.group_requirement = GroupRequirement(("vpn",))
    directory = Scripted(h.directory, groups=groups,
                         lookup=lambda n: defer.succeed(replace(
                             h.directory.lookup(n), groups=(), groups_complete=False)))
    auth = authenticator(h, directory)
    check = started(auth, h)  # resolved with its groups searched (the requirement needs them)
    assert len(searched) == 1
    bound_as = replace(check.identity, groups=(), groups_complete=False)  # a refreshed entry
    decision = fired(check.finish(bound_as))
    assert len(searched) == 2  # searched again for the entry the password was checked on
    assert decision.accepted and h.record().required  # the group's requirement was stored


def test_authenticate_is_unchanged_beside_start(h: Harness) -> None:
    auth = authenticator(h, AsyncFake(h.directory))
    assert outcome(fired(auth.authenticate(h.request()))) == (Outcome.ACCEPT,
                                                              Reason.NOT_REQUIRED)
    assert h.directory.calls == [("alice", "alice-pw")]  # the core's own check


def test_a_refused_cached_entry_is_looked_up_again_and_the_mimic_sees_the_whole_attempt(
        h: Harness) -> None:
    """The front-end's bind refused an entry the look-up cache gave: forgotten,
    looked up again; the same entry found again is a wrong password (counted),
    and the latency the unknown-name mimic learns is the whole attempt's."""
    forgotten: list[str] = []
    lookups: list[str] = []

    def lookup(name: str) -> defer.Deferred[Identity | None]:
        lookups.append(name)
        found = h.directory.lookup(name)
        return defer.succeed(replace(found, from_cache=len(lookups) == 1))

    directory = Scripted(h.directory, lookup=lookup, forget=forgotten.append)
    auth = authenticator(h, directory)
    auth.mimic.average = 0.0
    check = started(auth, h, "wrong")
    assert check.identity.from_cache
    h.clock.advance(0.4)  # the front-end's bind
    decision = fired(check.finish(InvalidCredentials("alice")))
    assert outcome(decision) == (Outcome.REJECT, Reason.BAD_PASSWORD)
    assert forgotten == ["alice", "alice"] and lookups == ["alice", "alice"]
    assert h.record().failures == 1 and len(auth.gate) == 0
    assert auth.mimic.average == pytest.approx(0.1 * 0.4)  # from the start, not the re-look


def test_a_refused_cached_entry_whose_directory_is_down_now_counts_nothing(
        h: Harness) -> None:
    calls = 0

    def lookup(name: str) -> defer.Deferred[Identity | None]:
        nonlocal calls
        calls += 1
        if calls > 1:
            return defer.fail(DirectoryUnavailable("connection refused"))
        return defer.succeed(replace(h.directory.lookup(name), from_cache=True))

    auth = authenticator(h, Scripted(h.directory, lookup=lookup, forget=lambda name: None))
    check = started(auth, h, "wrong")
    decision = fired(check.finish(InvalidCredentials("alice")))
    assert outcome(decision) == (Outcome.REJECT, Reason.DIRECTORY_UNAVAILABLE)
    assert h.record().failures == 0 and len(auth.gate) == 0
    assert h.events.directory_calls[-1][1] == "directory_unavailable"
