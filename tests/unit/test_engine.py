"""The decision: enrollment timeline, `mfa` modes, codes, replay and lockout.

Every test runs the real PolicyEngine on a real (SQLite) Store with a fake
clock handed to both: time moves only when a test says so, nothing sleeps.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from twisted.internet import defer

from backends.base import (
    DirectoryUnavailable,
    Identity,
    InvalidCredentials,
    UnknownUser,
)
from policy.decision import AuthRequest, Decision, MfaMode, Outcome, Reason, SplitMode
from policy.engine import Authenticator, Limits, PolicyEngine, split_password
from policy.keys import KeyRing
from policy.schema import LOCKED_FOREVER, UserRecord
from policy.store import Store
from policy.totp import TotpParams, code_for_step, new_totp_key
from policy.usernames import UsernameRules
from tests.clock import ManualClock
from tests.sync_core import authenticate_sync

DAY = 86400
T0 = 1_700_000_015.0  # 5 s into a 30 s time step
PARAMS = TotpParams(digits=6, period=30, window=1)

ACCEPT, REJECT, NEED_CODE = Outcome.ACCEPT, Outcome.REJECT, Outcome.NEED_CODE


class FakeDirectory:
    """alice / bob / carol with passwords NAME-pw, matched case-insensitively
    (like an LDAP uid); records every password check in ``calls``."""

    def __init__(self) -> None:
        self.passwords = {n: f"{n}-pw" for n in ("alice", "bob", "carol")}
        self.calls: list[tuple[str, str]] = []
        self.lookups: list[str] = []
        self.down = False

    def lookup(self, username: str) -> Identity | None:
        self.lookups.append(username)
        if self.down:
            raise DirectoryUnavailable("connection refused")
        name = username.casefold()
        if name not in self.passwords:
            return None
        return Identity(name, f"uid={name},ou=people,dc=example,dc=org", ("vpn",))

    def lookup_dn(self, dn: str) -> Identity | None:
        rdn, _, rest = dn.partition(",")
        kind, _, value = rdn.partition("=")
        if kind.strip().lower() != "uid" or rest.replace(" ", "").lower() != \
                "ou=people,dc=example,dc=org":
            return None
        return self.lookup(value.strip())

    def check_password(self, identity: Identity, password: str) -> Identity:
        self.calls.append((identity.username, password))
        if self.down:
            raise DirectoryUnavailable("connection refused")
        if identity.username not in self.passwords:
            raise UnknownUser(identity.username)
        if password != self.passwords[identity.username]:
            raise InvalidCredentials(identity.username)
        return identity

    def verify(self, username: str, password: str) -> Identity:
        identity = self.lookup(username)
        if identity is None:
            raise UnknownUser(username)
        return self.check_password(identity, password)


class AsyncFake:
    """A FakeDirectory behind Deferreds (what the Authenticator is given)."""

    def __init__(self, directory: Any) -> None:
        self.directory = directory

    def lookup(self, username: str) -> defer.Deferred[Identity | None]:
        return defer.maybeDeferred(self.directory.lookup, username)

    def lookup_dn(self, dn: str) -> defer.Deferred[Identity | None]:
        return defer.maybeDeferred(self.directory.lookup_dn, dn)

    def check_password(self, identity: Identity, password: str) -> defer.Deferred[Identity]:
        return defer.maybeDeferred(self.directory.check_password, identity, password)


@dataclass
class Events:
    lockouts: int = 0
    directory_calls: list[tuple[float, str | None]] = field(default_factory=list)
    state_errors: list[str] = field(default_factory=list)

    def lockout(self) -> None:
        self.lockouts += 1

    def directory(self, seconds: float, error: str | None) -> None:
        self.directory_calls.append((seconds, error))

    def state_error(self, operation: str) -> None:
        self.state_errors.append(operation)


@dataclass
class Harness:
    engine: PolicyEngine
    store: Store
    keys: KeyRing
    clock: ManualClock
    directory: FakeDirectory
    events: Events
    secrets: dict[str, str] = field(default_factory=dict)

    def request(self, username: str = "alice", password: str | None = None, *,
                code: str | None = None, mfa: MfaMode = MfaMode.ENROLLED,
                split: SplitMode = SplitMode.AUTO, client: str = "vpn",
                repeat: int = 0) -> AuthRequest:
        if password is None:
            password = f"{username}-pw"
        return AuthRequest(username=username, password=password, protocol="radius", client=client,
                           mfa=mfa, split=split, separator=",", code=code,
                           repeat_window_seconds=repeat, source="192.0.2.7")

    def auth(self, username: str = "alice", password: str | None = None, **kw: Any) -> Decision:
        return authenticate_sync(self.engine, self.request(username, password, **kw),
                                             self.directory)

    def require(self, username: str = "alice", days: int = 7) -> None:
        self.store.admin.require(username, int(self.clock()) + days * DAY)

    def enroll(self, username: str = "alice") -> str:
        secret = new_totp_key()
        self.store.admin.set_totp_key(username, self.keys.encrypt(secret.encode(), username),
                              self.keys.current)
        self.secrets[username] = secret
        return secret

    def code(self, username: str = "alice", offset: int = 0) -> str:
        return code_for_step(self.secrets[username], PARAMS.step_at(self.clock()) + offset,
                             PARAMS)

    def with_code(self, username: str = "alice", offset: int = 0) -> str:
        return f"{username}-pw,{self.code(username, offset)}"

    def record(self, username: str = "alice") -> UserRecord:
        return self.store.admin.get(username) or UserRecord(username)

    def next_step(self) -> None:
        self.clock.advance(PARAMS.period)


def make_harness(tmp_path: Path, limits: Limits | None = None) -> Harness:
    limits = limits or Limits(max_failures=5, lockout_seconds=900)
    clock = ManualClock(T0)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}", clock)
    store.upgrade()
    keys = KeyRing(tmp_path / "secret.key")
    events = Events()
    engine = PolicyEngine(store, keys, PARAMS, limits, UsernameRules(), clock=clock,
                          events=events)
    return Harness(engine, store, keys, clock, FakeDirectory(), events)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = make_harness(tmp_path)
    yield harness
    harness.store.close()


def outcome(d: Decision) -> tuple[Outcome, Reason]:
    return d.outcome, d.reason


# -- reading the password field ---------------------------------------------------------


@pytest.mark.parametrize(("typed", "split", "sep", "expected"), [
    ("pw,123456", SplitMode.AUTO, ",", ("pw", "123456")),
    ("pw,123456", SplitMode.APPEND, ",", ("pw", "123456")),
    ("pw,123456", SplitMode.CHALLENGE, ",", ("pw,123456", None)),
    ("p,w,123456", SplitMode.AUTO, ",", ("p,w", "123456")),  # last separator only
    ("pw,12345", SplitMode.AUTO, ",", ("pw,12345", None)),  # too short
    ("pw,1234567", SplitMode.AUTO, ",", ("pw,1234567", None)),  # too long
    ("pw,12a456", SplitMode.AUTO, ",", ("pw,12a456", None)),
    ("pw,١٢٣٤٥٦", SplitMode.AUTO, ",", ("pw,١٢٣٤٥٦", None)),  # not ASCII digits
    ("pw123456", SplitMode.AUTO, ",", ("pw123456", None)),  # no separator
    (",123456", SplitMode.AUTO, ",", ("", "123456")),
    ("pw123456", SplitMode.AUTO, "", ("pw", "123456")),  # "" = last `digits` characters
    ("123456", SplitMode.AUTO, "", ("123456", None)),  # nothing left for a password
    ("pw12345a", SplitMode.AUTO, "", ("pw12345a", None)),
    ("pw::123456", SplitMode.APPEND, "::", ("pw", "123456")),
])
def test_split_password(typed: str, split: SplitMode, sep: str,
                      expected: tuple[str, str | None]) -> None:
    assert split_password(typed, split, sep, 6) == expected


def test_split_password_eight_digits() -> None:
    assert split_password("pw,12345678", SplitMode.AUTO, ",", 8) == ("pw", "12345678")
    assert split_password("pw,123456", SplitMode.AUTO, ",", 8) == ("pw,123456", None)


# -- enrollment timeline ----------------------------------------------------------------


def test_enrollment_timeline(h: Harness) -> None:
    # never required: the password is enough
    assert outcome(h.auth()) == (ACCEPT, Reason.NOT_REQUIRED)

    h.require(days=7)
    d = h.auth()
    assert outcome(d) == (ACCEPT, Reason.IN_ENROLLMENT)
    assert d.days_left == 7
    assert "7 days left" in d.message
    assert d.identity is not None and d.identity.username == "alice"

    h.clock.advance(3600)  # whole days rounded up
    assert h.auth().days_left == 7
    h.clock.advance(DAY - 3600)
    assert h.auth().days_left == 6
    h.clock.advance(6 * DAY - 1)  # one second before the deadline
    d = h.auth()
    assert (d.outcome, d.days_left) == (ACCEPT, 1)
    assert "1 day left" in d.message

    h.clock.advance(1)  # the deadline itself: expired
    d = h.auth()
    assert outcome(d) == (REJECT, Reason.ENROLLMENT_EXPIRED)
    assert "expired" in d.message
    assert d.days_left is None
    h.clock.advance(30 * DAY)
    assert outcome(h.auth()) == (REJECT, Reason.ENROLLMENT_EXPIRED)
    assert h.record().failures == 0  # the user's password was right: not a failure
    assert outcome(h.auth(password="wrong")) == (REJECT, Reason.BAD_PASSWORD)

    # an admin extends: from now
    h.store.admin.extend("alice", int(h.clock()) + 2 * DAY)
    d = h.auth()
    assert outcome(d) == (ACCEPT, Reason.IN_ENROLLMENT)
    assert d.days_left == 2
    assert h.record().failures == 0  # the success cleared the bad password

    # the user enrolls: from now on a code is needed
    h.enroll()
    assert outcome(h.auth()) == (NEED_CODE, Reason.CODE_NEEDED)
    assert outcome(h.auth(split=SplitMode.CHALLENGE)) == (NEED_CODE, Reason.CODE_NEEDED)
    assert outcome(h.auth(split=SplitMode.APPEND)) == (REJECT, Reason.MISSING_CODE)
    assert h.record().failures == 1  # a missing code in append mode is a failure

    d = h.auth(password=h.with_code())
    assert outcome(d) == (ACCEPT, Reason.OK)
    assert d.days_left is None
    assert h.record().failures == 0
    assert h.record().status(h.clock()) == "enrolled"


def test_challenge_answer_is_the_code_field(h: Harness) -> None:
    h.require()
    h.enroll()
    first = h.auth(split=SplitMode.CHALLENGE)
    assert outcome(first) == (NEED_CODE, Reason.CODE_NEEDED)
    assert first.message == "Enter your verification code"
    # the front-end sends the code with the identity the first round verified
    req = AuthRequest("alice", "", "radius", "vpn", split=SplitMode.CHALLENGE,
                      code=h.code(), verified_identity=first.identity)
    calls = len(h.directory.calls)
    assert outcome(authenticate_sync(h.engine, req, h.directory)) == (ACCEPT, Reason.OK)
    assert len(h.directory.calls) == calls  # the password is not asked again


def test_a_challenge_answer_takes_one_trip_to_the_state_thread(h: Harness) -> None:
    """No directory call sits between begin and decide in a second round: one state
    step (two would double its thread hand-overs), and still every check of decide."""
    h.require()
    h.enroll()
    first = h.auth(split=SplitMode.CHALLENGE)
    steps: list[str] = []

    def run_blocking(f: Any, *args: Any) -> defer.Deferred[Any]:
        steps.append(f.__name__)
        return defer.maybeDeferred(f, *args)

    auth = Authenticator(h.engine, AsyncFake(h.directory), run_blocking, clock=h.clock)

    def answer(code: str) -> Decision:
        req = AuthRequest("alice", "", "radius", "vpn", split=SplitMode.CHALLENGE, code=code,
                          verified_identity=first.identity)
        got: list[Decision] = []
        auth.authenticate(req).addCallback(got.append)
        return got[0]

    assert outcome(answer(h.code())) == (ACCEPT, Reason.OK)
    assert steps == ["begin_and_decide"]
    assert outcome(answer(h.code())) == (REJECT, Reason.REPLAYED_CODE)
    window = {h.code(offset=o) for o in (-1, 0, 1)}
    wrong = next(c for c in ("000000", "111111", "222222", "333333") if c not in window)
    assert outcome(answer(wrong)) == (REJECT, Reason.BAD_CODE)
    assert steps == ["begin_and_decide"] * 3
    assert h.record().failures == 2


def test_password_field_is_not_split_for_a_user_who_needs_no_code(h: Harness) -> None:
    h.directory.passwords["alice"] = "pass,123456"
    assert outcome(h.auth(password="pass,123456")) == (ACCEPT, Reason.NOT_REQUIRED)
    assert h.directory.calls[-1] == ("alice", "pass,123456")


def test_directory_gets_the_password_without_the_code(h: Harness) -> None:
    h.require()
    h.enroll()
    h.auth(password=h.with_code())
    assert h.directory.calls == [("alice", "alice-pw")]


def test_reset_clears_the_key_and_opens_a_new_period(h: Harness) -> None:
    h.require()
    old = h.enroll()
    assert outcome(h.auth(password=h.with_code())) == (ACCEPT, Reason.OK)
    h.store.admin.reset("alice", int(h.clock()) + 3 * DAY)
    rec = h.record()
    assert rec.totp_key is None and rec.key_version is None and rec.last_step is None
    assert rec.required
    d = h.auth()
    assert outcome(d) == (ACCEPT, Reason.IN_ENROLLMENT)
    assert d.days_left == 3
    h.next_step()
    new = h.enroll()
    assert new != old
    old_code = code_for_step(old, PARAMS.step_at(h.clock()), PARAMS)
    assert old_code != h.code()
    assert outcome(h.auth(password=f"alice-pw,{old_code}")) == (REJECT, Reason.BAD_CODE)
    assert outcome(h.auth(password=h.with_code())) == (ACCEPT, Reason.OK)


def test_bypass(h: Harness) -> None:
    h.require()
    h.enroll()
    h.store.admin.set_bypass("alice", True)
    for mfa in (MfaMode.ENROLLED, MfaMode.STRICT):
        assert outcome(h.auth(mfa=mfa)) == (ACCEPT, Reason.BYPASS)
        assert outcome(h.auth(mfa=mfa, split=SplitMode.APPEND)) == (ACCEPT, Reason.BYPASS)
    assert outcome(h.auth(password="wrong")) == (REJECT, Reason.BAD_PASSWORD)
    h.store.admin.set_bypass("alice", False)
    assert outcome(h.auth()) == (NEED_CODE, Reason.CODE_NEEDED)


def test_bypass_lets_an_expired_enrollment_in(h: Harness) -> None:
    h.require(days=1)
    h.clock.advance(2 * DAY)
    assert outcome(h.auth()) == (REJECT, Reason.ENROLLMENT_EXPIRED)
    h.store.admin.set_bypass("alice", True)
    assert outcome(h.auth()) == (ACCEPT, Reason.BYPASS)


def test_unrequire_keeps_the_key(h: Harness) -> None:
    h.require()
    h.enroll()
    assert h.store.admin.unrequire("alice")
    rec = h.record()
    assert rec.enrolled and not rec.required
    assert rec.status(h.clock()) == "enrolled_not_required"
    assert outcome(h.auth()) == (ACCEPT, Reason.NOT_REQUIRED)
    assert outcome(h.auth(mfa=MfaMode.STRICT)) == (NEED_CODE, Reason.CODE_NEEDED)


# -- the `mfa` setting of a resource, for every user state ----------------------------------

STATES = ["enrolled", "in_enrollment", "enrollment_expired", "enrolled_not_required",
          "not_required", "bypass"]

# (state, mfa) -> what the password alone gets
PASSWORD_ONLY = {
    ("enrolled", "enrolled"): (NEED_CODE, Reason.CODE_NEEDED),
    ("enrolled", "strict"): (NEED_CODE, Reason.CODE_NEEDED),
    ("enrolled", "off"): (ACCEPT, Reason.MFA_OFF),
    ("in_enrollment", "enrolled"): (ACCEPT, Reason.IN_ENROLLMENT),
    ("in_enrollment", "strict"): (REJECT, Reason.NOT_ENROLLED),
    ("in_enrollment", "off"): (ACCEPT, Reason.MFA_OFF),
    ("enrollment_expired", "enrolled"): (REJECT, Reason.ENROLLMENT_EXPIRED),
    ("enrollment_expired", "strict"): (REJECT, Reason.ENROLLMENT_EXPIRED),
    ("enrollment_expired", "off"): (ACCEPT, Reason.MFA_OFF),
    ("enrolled_not_required", "enrolled"): (ACCEPT, Reason.NOT_REQUIRED),
    ("enrolled_not_required", "strict"): (NEED_CODE, Reason.CODE_NEEDED),
    ("enrolled_not_required", "off"): (ACCEPT, Reason.MFA_OFF),
    ("not_required", "enrolled"): (ACCEPT, Reason.NOT_REQUIRED),
    ("not_required", "strict"): (REJECT, Reason.NOT_ENROLLED),
    ("not_required", "off"): (ACCEPT, Reason.MFA_OFF),
    ("bypass", "enrolled"): (ACCEPT, Reason.BYPASS),
    ("bypass", "strict"): (ACCEPT, Reason.BYPASS),
    ("bypass", "off"): (ACCEPT, Reason.MFA_OFF),
}


def put_in_state(h: Harness, state: str) -> None:
    if state in ("enrolled", "enrolled_not_required", "bypass"):
        h.require()
        h.enroll()
    if state == "enrolled_not_required":
        h.store.admin.unrequire("alice")
    if state == "bypass":
        h.store.admin.set_bypass("alice", True)
    if state == "in_enrollment":
        h.require(days=7)
    if state == "enrollment_expired":
        h.require(days=1)
        h.clock.advance(DAY)
    if state != "bypass":
        assert h.record().status(h.clock()) == state


@pytest.mark.parametrize("mfa", ["enrolled", "strict", "off"])
@pytest.mark.parametrize("state", STATES)
def test_mfa_modes_password_only(h: Harness, state: str, mfa: str) -> None:
    put_in_state(h, state)
    assert outcome(h.auth(mfa=MfaMode(mfa))) == PASSWORD_ONLY[(state, mfa)]


@pytest.mark.parametrize("mfa", ["enrolled", "strict"])
@pytest.mark.parametrize("state", ["enrolled", "enrolled_not_required"])
def test_mfa_modes_code_accepted_where_needed(h: Harness, state: str, mfa: str) -> None:
    put_in_state(h, state)
    if PASSWORD_ONLY[(state, mfa)][0] is NEED_CODE:
        assert outcome(h.auth(password=h.with_code(), mfa=MfaMode(mfa))) == (ACCEPT, Reason.OK)


def test_wrong_password_is_refused_in_every_mode(h: Harness) -> None:
    for mfa in MfaMode:
        assert outcome(h.auth(password="nope", mfa=mfa)) == (REJECT, Reason.BAD_PASSWORD)


# -- codes and replay ---------------------------------------------------------------------


def test_wrong_code_is_bad_code(h: Harness) -> None:
    h.require()
    h.enroll()
    wrong = f"{(int(h.code()) + 1) % 1_000_000:06d}"
    assert outcome(h.auth(password=f"alice-pw,{wrong}")) == (REJECT, Reason.BAD_CODE)
    assert h.record().failures == 1


@pytest.mark.parametrize("code", ["١٢٣٤٥٦", "12345", "1234567", "12 456", "", "abcdef"])
def test_malformed_challenge_answers_are_bad_codes(h: Harness, code: str) -> None:
    """A challenge answer (or SCRV1 code) arrives as typed: anything but the right
    ASCII digits is a bad code, never an error."""
    h.require()
    h.enroll()
    d = h.auth(split=SplitMode.CHALLENGE, code=code)
    assert outcome(d) == (REJECT, Reason.BAD_CODE)


def test_wrong_password_with_right_code_is_bad_password(h: Harness) -> None:
    h.require()
    h.enroll()
    assert outcome(h.auth(password=f"nope,{h.code()}")) == (REJECT, Reason.BAD_PASSWORD)
    # the code was not spent: the right password with it still works
    assert outcome(h.auth(password=h.with_code())) == (ACCEPT, Reason.OK)


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_codes_within_the_window_are_accepted(h: Harness, offset: int) -> None:
    h.require()
    h.enroll()
    assert outcome(h.auth(password=h.with_code(offset=offset))) == (ACCEPT, Reason.OK)


@pytest.mark.parametrize("offset", [-3, -2, 2, 3])
def test_codes_beyond_the_window_are_refused(h: Harness, offset: int) -> None:
    h.require()
    h.enroll()
    assert outcome(h.auth(password=h.with_code(offset=offset))) == (REJECT, Reason.BAD_CODE)


def test_same_code_twice_is_a_replay(h: Harness) -> None:
    h.require()
    h.enroll()
    code_field = h.with_code()
    assert outcome(h.auth(password=code_field)) == (ACCEPT, Reason.OK)
    d = h.auth(password=code_field)
    assert outcome(d) == (REJECT, Reason.REPLAYED_CODE)
    assert h.record().failures == 1  # a replay counts as a failure
    # still a replay from another client and through the challenge path
    assert outcome(h.auth(password=code_field, client="other")) == (REJECT, Reason.REPLAYED_CODE)
    assert outcome(h.auth(split=SplitMode.CHALLENGE, code=h.code())) == (
        REJECT, Reason.REPLAYED_CODE)


def test_an_earlier_code_after_a_later_one_is_a_replay(h: Harness) -> None:
    h.require()
    h.enroll()
    earlier, later = h.code(offset=-1), h.code(offset=0)
    assert outcome(h.auth(password=f"alice-pw,{later}")) == (ACCEPT, Reason.OK)
    assert outcome(h.auth(password=f"alice-pw,{earlier}")) == (REJECT, Reason.REPLAYED_CODE)


def test_a_later_code_after_an_earlier_one_is_accepted(h: Harness) -> None:
    h.require()
    h.enroll()
    assert outcome(h.auth(password=h.with_code(offset=-1))) == (ACCEPT, Reason.OK)
    assert outcome(h.auth(password=h.with_code(offset=0))) == (ACCEPT, Reason.OK)
    assert outcome(h.auth(password=h.with_code(offset=0))) == (REJECT, Reason.REPLAYED_CODE)


def test_next_time_step_brings_a_fresh_code(h: Harness) -> None:
    h.require()
    h.enroll()
    for _ in range(5):
        assert outcome(h.auth(password=h.with_code())) == (ACCEPT, Reason.OK)
        h.next_step()
    step = PARAMS.step_at(h.clock()) - 1
    assert h.record().last_step == step


def test_replay_marker_is_per_user(h: Harness) -> None:
    h.require("alice")
    h.require("bob")
    secret = h.enroll("alice")
    # bob happens to have the same key (an import gone wrong): his use is his own
    h.store.admin.set_totp_key("bob", h.keys.encrypt(secret.encode(), "bob"), h.keys.current)
    h.secrets["bob"] = secret
    assert outcome(h.auth("alice", h.with_code("alice"))) == (ACCEPT, Reason.OK)
    assert outcome(h.auth("bob", h.with_code("bob"))) == (ACCEPT, Reason.OK)


def test_repeat_window_accepts_the_same_request_again(h: Harness) -> None:
    h.require()
    h.enroll()
    field_ = h.with_code()
    assert outcome(h.auth(password=field_, repeat=60)) == (ACCEPT, Reason.OK)
    assert outcome(h.auth(password=field_, repeat=60)) == (ACCEPT, Reason.REPEAT)
    # another client, or a client without the window, is refused
    assert outcome(h.auth(password=field_, repeat=60, client="other")) == (
        REJECT, Reason.REPLAYED_CODE)


def test_repeat_window_expires(h: Harness) -> None:
    h.require()
    h.enroll()
    field_ = h.with_code()
    assert outcome(h.auth(password=field_, repeat=20)) == (ACCEPT, Reason.OK)
    h.clock.advance(21)
    assert outcome(h.auth(password=field_, repeat=20)) == (REJECT, Reason.REPLAYED_CODE)


def test_repeat_window_off_by_default(h: Harness) -> None:
    h.require()
    h.enroll()
    field_ = h.with_code()
    assert outcome(h.auth(password=field_)) == (ACCEPT, Reason.OK)
    assert outcome(h.auth(password=field_)) == (REJECT, Reason.REPLAYED_CODE)


# -- lockout ------------------------------------------------------------------------------


def enrolled(h: Harness) -> Harness:
    h.require()
    h.enroll()
    return h


def test_n_minus_one_failures_then_success_resets(h: Harness) -> None:
    enrolled(h)
    for _ in range(4):
        d = h.auth(password="wrong")
        assert outcome(d) == (REJECT, Reason.BAD_PASSWORD)
        assert not d.lockout_started
    assert h.record().failures == 4
    assert outcome(h.auth(password=h.with_code())) == (ACCEPT, Reason.OK)
    assert h.record().failures == 0
    for _ in range(4):
        assert not h.auth(password="wrong").lockout_started
    assert not h.record().locked(h.clock())


def test_password_only_success_resets_too(h: Harness) -> None:
    for _ in range(4):
        h.auth(password="wrong")
    assert h.record().failures == 4
    assert outcome(h.auth()) == (ACCEPT, Reason.NOT_REQUIRED)
    assert h.record().failures == 0


def test_nth_failure_locks_and_the_right_credentials_are_then_refused(h: Harness) -> None:
    enrolled(h)
    decisions = [h.auth(password="wrong") for _ in range(5)]
    assert [d.lockout_started for d in decisions] == [False] * 4 + [True]
    assert decisions[-1].reason is Reason.BAD_PASSWORD
    assert decisions[-1].locked_until == int(h.clock()) + 900
    assert h.events.lockouts == 1
    rec = h.record()
    assert rec.failures == 5 and rec.locked(h.clock())

    calls = len(h.directory.calls)
    d = h.auth(password=h.with_code())
    assert outcome(d) == (REJECT, Reason.LOCKED_OUT)
    assert d.locked_until == int(T0) + 900
    assert "locked" in d.message.lower()
    assert len(h.directory.calls) == calls  # the directory was not asked
    assert not d.lockout_started
    # attempts while locked neither reach the directory nor extend the lock
    for _ in range(3):
        assert outcome(h.auth(password="wrong")) == (REJECT, Reason.LOCKED_OUT)
    assert len(h.directory.calls) == calls
    assert h.record().locked_until == int(T0) + 900
    assert h.events.lockouts == 1


def test_lock_expires_after_lockout_seconds(h: Harness) -> None:
    enrolled(h)
    for _ in range(5):
        h.auth(password="wrong")
    h.clock.advance(899)
    assert outcome(h.auth(password=h.with_code())) == (REJECT, Reason.LOCKED_OUT)
    h.clock.advance(1)
    assert outcome(h.auth(password=h.with_code())) == (ACCEPT, Reason.OK)
    rec = h.record()
    assert rec.failures == 0 and rec.locked_until is None


def test_after_a_lock_expires_the_count_starts_again(h: Harness) -> None:
    enrolled(h)
    for _ in range(5):
        h.auth(password="wrong")
    h.clock.advance(900)
    d = h.auth(password="wrong")
    assert outcome(d) == (REJECT, Reason.BAD_PASSWORD)
    assert not d.lockout_started
    rec = h.record()
    assert rec.failures == 1 and rec.locked_until is None
    for _ in range(3):
        h.auth(password="wrong")
    assert h.auth(password="wrong").lockout_started
    assert h.events.lockouts == 2


def test_lockout_seconds_zero_locks_until_unlock(tmp_path: Path) -> None:
    h = make_harness(tmp_path, Limits(max_failures=3, lockout_seconds=0))
    enrolled(h)
    for _ in range(3):
        d = h.auth(password="wrong")
    assert d.lockout_started
    assert h.record().locked_until == LOCKED_FOREVER
    h.clock.advance(10 * 365 * DAY)
    assert outcome(h.auth(password=h.with_code())) == (REJECT, Reason.LOCKED_OUT)
    assert h.store.admin.unlock("alice")
    rec = h.record()
    assert rec.failures == 0 and rec.locked_until is None
    assert outcome(h.auth(password=h.with_code())) == (ACCEPT, Reason.OK)
    h.store.close()


def test_unlock_clears_the_lock_and_the_count(h: Harness) -> None:
    enrolled(h)
    for _ in range(5):
        h.auth(password="wrong")
    assert h.store.admin.unlock("alice")
    assert outcome(h.auth(password=h.with_code())) == (ACCEPT, Reason.OK)
    for _ in range(4):
        assert not h.auth(password="wrong").lockout_started


def test_unlock_of_a_user_without_state_is_false(h: Harness) -> None:
    assert not h.store.admin.unlock("nobody")


def test_password_and_code_failures_count_together(h: Harness) -> None:
    enrolled(h)
    wrong_code = f"{(int(h.code()) + 1) % 1_000_000:06d}"
    reasons = [
        h.auth(password="wrong").reason,
        h.auth(password=f"alice-pw,{wrong_code}").reason,
        h.auth(password="wrong").reason,
        h.auth(split=SplitMode.APPEND).reason,
    ]
    assert reasons == [Reason.BAD_PASSWORD, Reason.BAD_CODE, Reason.BAD_PASSWORD,
                       Reason.MISSING_CODE]
    assert h.record().failures == 4
    d = h.auth(password=f"alice-pw,{wrong_code}")
    assert outcome(d) == (REJECT, Reason.BAD_CODE)
    assert d.lockout_started


def test_replays_count_towards_the_lock(h: Harness) -> None:
    enrolled(h)
    code_field = h.with_code()
    h.auth(password=code_field)
    decisions = [h.auth(password=code_field) for _ in range(5)]
    assert [d.reason for d in decisions] == [Reason.REPLAYED_CODE] * 5
    assert decisions[-1].lockout_started


@pytest.mark.parametrize("forms", [
    ["alice", "ALICE", " alice ", "EXAMPLE\\alice", "alice@example.org"],
    ["Alice", "aLiCe", "alice\t", "CORP\\ALICE", "ALICE@EXAMPLE.ORG"],
])
def test_case_and_domain_variants_share_one_counter(h: Harness, forms: list[str]) -> None:
    enrolled(h)
    decisions = [h.auth(name, password="wrong") for name in forms]
    assert all(d.username == "alice" for d in decisions)
    assert decisions[-1].lockout_started
    for name in forms:
        d = h.auth(name, password=h.with_code())
        assert outcome(d) == (REJECT, Reason.LOCKED_OUT), name
    assert h.store.admin.get("ALICE") is None  # no second row under another spelling


def test_each_user_has_their_own_counter(h: Harness) -> None:
    for _ in range(5):
        h.auth("alice", password="wrong")
    assert h.record("alice").locked(h.clock())
    assert outcome(h.auth("bob")) == (ACCEPT, Reason.NOT_REQUIRED)
    assert h.record("bob").failures == 0


def test_unknown_users_are_not_counted(h: Harness) -> None:
    for _ in range(10):
        d = h.auth("mallory", password="guess")
        assert outcome(d) == (REJECT, Reason.UNKNOWN_USER)
    assert h.store.admin.get("mallory") is None


def test_empty_password_is_refused_without_asking_the_directory(h: Harness) -> None:
    d = h.auth(password="")
    assert outcome(d) == (REJECT, Reason.EMPTY_PASSWORD)
    assert h.directory.calls == []


def test_empty_passwords_for_unknown_names_leave_no_state(h: Harness) -> None:
    """Anyone may send empty passwords for made-up names; they must not fill the store."""
    for i in range(5):
        assert outcome(h.auth(f"random{i}", password="")) == (REJECT, Reason.EMPTY_PASSWORD)
    assert h.store.admin.list_users() == []


def test_directory_unavailable_is_not_counted(h: Harness) -> None:
    enrolled(h)
    h.directory.down = True
    for _ in range(10):
        d = h.auth(password=h.with_code())
        assert outcome(d) == (REJECT, Reason.DIRECTORY_UNAVAILABLE)
        assert not d.lockout_started
    rec = h.record()
    assert rec.failures == 0 and not rec.locked(h.clock())
    h.directory.down = False
    assert outcome(h.auth(password=h.with_code())) == (ACCEPT, Reason.OK)


def test_invalid_username_is_refused_without_asking_the_directory(h: Harness) -> None:
    for name in ("", "   ", "bad\x00name", "x" * 300):
        assert outcome(h.auth(name, password="pw")) == (REJECT, Reason.INVALID_USERNAME)
    assert h.directory.calls == []
    assert h.store.admin.list_users() == []


def test_code_of_a_locked_user_is_not_spent(h: Harness) -> None:
    """The lock is checked before the code: a code typed while locked is not
    marked used and works once the lock is over (same time step)."""
    enrolled(h)
    for _ in range(5):
        h.auth(password="wrong")
    code_field = h.with_code()
    assert outcome(h.auth(password=code_field)) == (REJECT, Reason.LOCKED_OUT)
    assert h.store.admin.unlock("alice")
    assert outcome(h.auth(password=code_field)) == (ACCEPT, Reason.OK)


def test_keys_of_mixed_versions_work_mid_rotation(h: Harness) -> None:
    """While `keys rotate` runs, some rows are under the old key version and some
    under the new; an engine started before the rotation decrypts both."""
    h.require("alice")
    h.require("bob")
    h.enroll("alice")  # version 1
    rotator = KeyRing(h.keys.path)
    assert rotator.add_version() == 2
    secret = new_totp_key()
    h.store.admin.set_totp_key("bob", rotator.encrypt(secret.encode(), "bob"), 2)
    h.secrets["bob"] = secret
    assert {r.key_version for r in h.store.admin.list_users()} == {1, 2}
    assert outcome(h.auth("alice", h.with_code("alice"))) == (ACCEPT, Reason.OK)
    assert outcome(h.auth("bob", h.with_code("bob"))) == (ACCEPT, Reason.OK)


def test_a_key_moved_to_another_user_does_not_decrypt(h: Harness) -> None:
    """Keys are bound to their username: copying alice's row to mallory in the
    database gives mallory nothing (the key does not decrypt: the core fails closed)."""
    h.require("alice")
    h.require("bob")
    h.enroll("alice")
    blob = h.record("alice").totp_key
    assert blob is not None
    h.store.admin.set_totp_key("bob", blob, h.keys.current)
    assert outcome(h.auth("bob", f"bob-pw,{h.code('alice')}")) == (
        REJECT, Reason.STATE_UNAVAILABLE)


# -- audit --------------------------------------------------------------------------------


def test_every_decision_is_audited(h: Harness) -> None:
    enrolled(h)
    h.auth(password="wrong")
    h.auth(password=h.with_code())
    h.auth("mallory", password="x")
    assert h.engine.audit.flush() == 3
    rows = h.store.admin.recent_audit()
    assert [(r.username, r.result, r.reason) for r in reversed(rows)] == [
        ("alice", "reject", "bad_password"),
        ("alice", "accept", "ok"),
        ("mallory", "reject", "unknown_user"),
    ]
    assert all(r.protocol == "radius" and r.client == "vpn" and r.source == "192.0.2.7"
               for r in rows)
    assert rows[0].at == int(T0)
    assert h.engine.audit.flush() == 0


def test_audit_never_holds_passwords_or_codes(h: Harness) -> None:
    enrolled(h)
    code = h.code()
    h.auth(password=f"hunter2-secret,{code}")
    h.engine.audit.flush()
    with h.store.engine.connect() as c:
        dump = repr(c.execute(text("SELECT * FROM audit")).all())
    assert "hunter2" not in dump and code not in dump


# -- the asynchronous entry point --------------------------------------------------------


def fired(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred did not fire"
    return results[0]


def authenticator(h: Harness, directory: Any = None, run: Any = None,
                  call_later: Any = None) -> Authenticator:
    return Authenticator(h.engine, directory or AsyncFake(h.directory),
                         run or (lambda f, *a: defer.maybeDeferred(f, *a)), clock=h.clock,
                         call_later=call_later)


class Scripted(AsyncFake):
    """AsyncFake with one method replaced by a function of the test's."""

    def __init__(self, directory: Any, **methods: Any) -> None:
        super().__init__(directory)
        for name, method in methods.items():
            setattr(self, name, method)


class HeldPasswords(Scripted):
    """AsyncFake whose password checks wait until the test answers them:
    ``held`` is [(Deferred, password)], oldest first."""

    def __init__(self, directory: Any) -> None:
        super().__init__(directory)
        self.held: list[tuple[defer.Deferred[Identity], str]] = []

    def check_password(self, identity: Identity, password: str) -> defer.Deferred[Identity]:
        d: defer.Deferred[Identity] = defer.Deferred()
        self.held.append((d, password))
        return d

    def answer(self, ok: bool) -> None:
        d, _ = self.held.pop(0)
        if ok:
            d.callback(Identity("alice", "uid=alice"))
        else:
            d.errback(InvalidCredentials("alice"))


def test_authenticator_accepts_with_code(h: Harness) -> None:
    enrolled(h)
    d = fired(authenticator(h).authenticate(h.request(password=h.with_code())))
    assert outcome(d) == (ACCEPT, Reason.OK)
    assert h.events.directory_calls == [(0.0, None), (0.0, None)]  # look-up, bind


def test_authenticator_refuses_a_locked_user_before_the_password(h: Harness) -> None:
    enrolled(h)
    for _ in range(5):
        h.auth(password="wrong")
    checked = len(h.directory.calls)
    d = fired(authenticator(h).authenticate(h.request(password=h.with_code())))
    assert outcome(d) == (REJECT, Reason.LOCKED_OUT)
    assert len(h.directory.calls) == checked


def test_authenticator_unexpected_directory_error_is_unavailable(h: Harness) -> None:
    failing = Scripted(h.directory, check_password=lambda i, p: defer.fail(RuntimeError("boom")))
    d = fired(authenticator(h, failing).authenticate(h.request(password="wrong")))
    assert outcome(d) == (REJECT, Reason.DIRECTORY_UNAVAILABLE)
    assert h.events.directory_calls[-1] == (0.0, "directory_unavailable")
    assert h.record().failures == 0


def test_authenticator_lookup_failure_is_unavailable_and_touches_no_state(h: Harness) -> None:
    h.directory.down = True
    d = fired(authenticator(h).authenticate(h.request(password="wrong")))
    assert outcome(d) == (REJECT, Reason.DIRECTORY_UNAVAILABLE)
    assert h.store.admin.get("alice") is None and h.directory.calls == []


def test_authenticator_bad_password_is_counted_on_the_entry(h: Harness) -> None:
    d = fired(authenticator(h).authenticate(h.request("ALICE", password="wrong")))
    assert outcome(d) == (REJECT, Reason.BAD_PASSWORD)
    assert d.username == "alice" and h.record().failures == 1


def test_authenticator_state_store_failure_fails_closed(h: Harness,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(username: str) -> None:
        raise OperationalError("SELECT", {}, Exception("database is locked"))

    monkeypatch.setattr(h.store.hot, "get", broken)
    d = fired(authenticator(h).authenticate(h.request()))
    assert outcome(d) == (REJECT, Reason.STATE_UNAVAILABLE)
    assert h.events.state_errors == ["begin"]


def test_authenticator_empty_password_skips_the_directory(h: Harness) -> None:
    d = fired(authenticator(h).authenticate(h.request(password="")))
    assert outcome(d) == (REJECT, Reason.EMPTY_PASSWORD)
    assert h.directory.calls == [] and h.directory.lookups == []


def test_authenticator_empty_password_after_the_code_is_not_sent(h: Harness) -> None:
    enrolled(h)
    d = fired(authenticator(h).authenticate(h.request(password=f",{h.code()}")))
    assert outcome(d) == (REJECT, Reason.EMPTY_PASSWORD)
    assert h.directory.calls == [] and h.record().failures == 0


def test_authenticator_directory_raising_instead_of_failing_is_unavailable(h: Harness) -> None:
    def raising(identity: Identity, password: str) -> defer.Deferred[Identity]:
        raise RuntimeError("raised, not returned")

    d = fired(authenticator(h, Scripted(h.directory, check_password=raising)).authenticate(
        h.request(password="pw")))
    assert outcome(d) == (REJECT, Reason.DIRECTORY_UNAVAILABLE)


def test_authenticator_decide_failure_fails_closed_once(h: Harness,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    enrolled(h)

    def broken(username: str, step: int, now: float) -> bool:
        raise OperationalError("UPDATE", {}, Exception("disk I/O error"))

    monkeypatch.setattr(h.store.hot, "accept_step", broken)
    d = authenticator(h).authenticate(h.request(password=h.with_code()))
    assert outcome(fired(d)) == (REJECT, Reason.STATE_UNAVAILABLE)
    assert h.events.state_errors == ["decide"]


def test_authenticator_a_worker_that_refuses_the_job_still_gets_one_reject(h: Harness) -> None:
    def refusing(f: Any, *args: Any) -> defer.Deferred[Any]:
        raise RuntimeError("worker stopped")

    auth = authenticator(h, run=refusing)
    assert outcome(fired(auth.authenticate(h.request()))) == (REJECT, Reason.STATE_UNAVAILABLE)
    assert len(auth.gate) == 0  # the identity's turn was given back


def test_authenticator_a_bug_after_begin_still_gets_one_reject(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(self: Any, p: Any, verdict: Any) -> None:
        raise AttributeError("a bug")

    monkeypatch.setattr(PolicyEngine, "decide", bug)
    auth = authenticator(h)
    assert outcome(fired(auth.authenticate(h.request()))) == (REJECT, Reason.STATE_UNAVAILABLE)
    assert len(auth.gate) == 0


# -- the identity is the entry -------------------------------------------------------------


def test_every_spelling_the_directory_matches_is_one_identity(h: Harness) -> None:
    enrolled(h)
    for spelling in ("ALICE", "Alice", "ａｌｉｃｅ", "EXAMPLE\\alice", "alice@example.org"):
        assert outcome(h.auth(spelling, password="alice-pw", split=SplitMode.APPEND)) == (
            REJECT, Reason.MISSING_CODE)
    assert h.record().failures == 5 and h.record().locked(h.clock())
    assert [r.username for r in h.store.admin.list_users()] == ["alice"]


def test_an_ldap_bind_dn_resolves_to_the_entry(h: Harness) -> None:
    enrolled(h)
    request = h.request(password=h.with_code())
    request.bind_dn = "UID=Alice, OU=People, DC=example, DC=org"
    request.username = request.bind_dn
    d = authenticate_sync(h.engine, request, h.directory)
    assert outcome(d) == (ACCEPT, Reason.OK) and d.username == "alice"
    assert d.identity is not None and d.identity.dn == "uid=alice,ou=people,dc=example,dc=org"


def test_an_entry_without_a_usable_name_is_nobody(h: Harness) -> None:
    nameless = Scripted(h.directory,
                        lookup=lambda n: defer.succeed(Identity("ali\nce", "uid=x")))
    d = fired(authenticator(h, nameless).authenticate(h.request(password="alice-pw")))
    assert outcome(d) == (REJECT, Reason.UNKNOWN_USER)
    assert h.store.admin.list_users() == []


def test_unknown_names_create_no_state_but_read_like_a_real_account(h: Harness) -> None:
    real = [h.auth("alice", password="guess") for _ in range(6)]
    fake = [h.auth("mallory", password="guess") for _ in range(6)]
    assert [r.message for r in real] == [f.message for f in fake]
    assert real[-1].reason is Reason.LOCKED_OUT and fake[-1].reason is Reason.UNKNOWN_USER
    assert fake[-1].public_reason is Reason.LOCKED_OUT
    assert [r.username for r in h.store.admin.list_users()] == ["alice"]


def test_unknown_names_are_answered_after_a_wrong_password_s_usual_time(h: Harness) -> None:
    from twisted.internet.task import Clock

    reactor = Clock()
    directory = HeldPasswords(h.directory)
    auth = authenticator(h, directory, call_later=reactor.callLater)
    for _ in range(30):  # teach it: a wrong password takes 0.5 s here
        pending = auth.authenticate(h.request(password="wrong"))
        h.clock.advance(0.5)
        directory.answer(ok=False)
        assert outcome(fired(pending)) == (REJECT, Reason.BAD_PASSWORD)
        h.engine.store.admin.unlock("alice")
    unknown = auth.authenticate(h.request("mallory", password="wrong"))
    assert not unknown.called
    reactor.advance(0.3)
    assert not unknown.called
    reactor.advance(0.4)
    assert outcome(fired(unknown)) == (REJECT, Reason.UNKNOWN_USER)


# -- the lockout under concurrency ---------------------------------------------------------


def test_concurrent_guesses_reach_the_directory_one_at_a_time_and_stop_at_the_lock(
        h: Harness) -> None:
    directory = HeldPasswords(h.directory)
    auth = authenticator(h, directory)
    attempts = [auth.authenticate(h.request(password="wrong")) for _ in range(20)]
    right = auth.authenticate(h.request(password="alice-pw"))
    beyond = [auth.authenticate(h.request(password="alice-pw")) for _ in range(20)]
    checked = 0
    while directory.held:
        assert len(directory.held) == 1  # never two passwords of one identity in flight
        checked += 1
        directory.answer(ok=directory.held[0][1] == "alice-pw")
    assert checked == 5  # then locked: the rest never reach the directory
    reasons = [fired(a).reason for a in attempts]
    assert reasons[:5] == [Reason.BAD_PASSWORD] * 5
    assert set(reasons[5:]) == {Reason.LOCKED_OUT}
    assert outcome(fired(right)) == (REJECT, Reason.LOCKED_OUT)
    # more than 32 waiting for one identity: refused at once, never accepted
    assert {outcome(fired(b)) for b in beyond} == {(REJECT, Reason.LOCKED_OUT),
                                                  (REJECT, Reason.BUSY)}
    assert h.record().locked(h.clock()) and len(auth.gate) == 0


def test_a_lock_that_came_meanwhile_refuses_the_right_password(h: Harness) -> None:
    """Another instance locks the account while this one checks the password."""
    h.require()
    directory = HeldPasswords(h.directory)
    auth = authenticator(h, directory)
    pending = auth.authenticate(h.request(password="alice-pw"))
    for _ in range(5):
        h.store.hot.record_failure("alice", h.clock(), 5, 900)
    directory.answer(ok=True)
    assert outcome(fired(pending)) == (REJECT, Reason.LOCKED_OUT)


def test_the_gate_lets_waiting_attempts_through_in_order() -> None:
    from policy.engine import IdentityGate

    gate, order = IdentityGate(max_waiting=2), []
    assert gate.enter("a", lambda: order.append(1))
    assert gate.enter("a", lambda: order.append(2))
    assert gate.enter("b", lambda: order.append("b"))
    assert gate.enter("a", lambda: order.append(3))
    assert not gate.enter("a", lambda: order.append(4))  # too many waiting
    assert order == [1, "b"]
    gate.leave("a")
    gate.leave("a")
    gate.leave("a")
    gate.leave("b")
    assert order == [1, "b", 2, 3] and len(gate) == 0


def test_audit_queue_counts_what_it_drops_once(h: Harness) -> None:
    from policy.engine import AuditQueue
    from policy.schema import AuditRecord

    queue = AuditQueue(h.store, max_pending=2)
    for i in range(5):
        queue.add(AuditRecord(float(i), "alice", "radius", "vpn", "", "reject", "bad_code"))
    assert queue.take_dropped() == 3
    assert queue.take_dropped() == 0  # reported once
    assert queue.flush() == 2


# -- log lines ------------------------------------------------------------------------------


@pytest.mark.parametrize("log_accepts", [True, False])
def test_rejects_are_always_logged_accepts_only_when_asked(
        h: Harness, caplog: pytest.LogCaptureFixture, log_accepts: bool) -> None:
    h.engine.log_accepts = log_accepts
    h.require()
    h.enroll()
    with caplog.at_level(logging.INFO, logger="mfa_proxy.policy"):
        assert outcome(h.auth(password=h.with_code())) == (ACCEPT, Reason.OK)
        assert outcome(h.auth(password="nope")) == (REJECT, Reason.BAD_PASSWORD)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decision ")]
    rejects = [line for line in lines if "result=reject reason=bad_password" in line]
    accepts = [line for line in lines if "result=accept reason=ok" in line]
    assert len(rejects) == 1 and "alice-pw" not in rejects[0] and "nope" not in rejects[0]
    assert len(accepts) == (1 if log_accepts else 0)
    # the audit table has both, whatever the log says
    h.engine.audit.flush()
    assert [r.result for r in h.store.admin.recent_audit("alice")] == ["reject", "accept"]


def test_plain_spellings_of_an_unknown_dn_share_one_counter(h: Harness) -> None:
    """A real entry locks across its spellings; so does a made-up one."""
    spellings = ["uid=nobody,ou=people,dc=example,dc=org",
                 "UID=Nobody, OU=People, DC=example, DC=org",
                 "uid = nobody , ou=people,dc=example,dc=org"]
    decisions = []
    for i in range(6):
        request = h.request(password="guess")
        request.bind_dn = request.username = spellings[i % 3]
        decisions.append(authenticate_sync(h.engine, request, h.directory))
    assert decisions[-1].public_reason is Reason.LOCKED_OUT
    assert h.store.admin.list_users() == []


def test_a_lock_that_came_meanwhile_refuses_the_right_password_and_code(h: Harness) -> None:
    """The code path takes the lock into its one conditional UPDATE."""
    enrolled(h)
    directory = HeldPasswords(h.directory)
    auth = authenticator(h, directory)
    pending = auth.authenticate(h.request(password=h.with_code()))
    for _ in range(5):
        h.store.hot.record_failure("alice", h.clock(), 5, 900)
    directory.answer(ok=True)
    assert outcome(fired(pending)) == (REJECT, Reason.LOCKED_OUT)


def test_a_lock_that_came_meanwhile_refuses_a_challenge(h: Harness) -> None:
    enrolled(h)
    directory = HeldPasswords(h.directory)
    auth = authenticator(h, directory)
    pending = auth.authenticate(h.request(password="alice-pw", split=SplitMode.CHALLENGE))
    for _ in range(5):
        h.store.hot.record_failure("alice", h.clock(), 5, 900)
    directory.answer(ok=True)
    assert outcome(fired(pending)) == (REJECT, Reason.LOCKED_OUT)


# -- what the user is told (Decision.message, the same on every front-end) ---------------------


def test_a_bad_password_and_a_bad_or_missing_code_read_the_same(h: Harness) -> None:
    from policy.engine import CREDENTIALS

    h.require()
    h.enroll()
    wrong_code = f"alice-pw,{int(h.code()) ^ 1:06d}"
    said = {
        "bad password": h.auth(password="nope,123456"),
        "bad code": h.auth(password=wrong_code),
        "missing code": h.auth(split=SplitMode.APPEND),
        "unknown user": h.auth("zed", "zed-pw,123456"),
    }
    assert {k: (d.outcome, d.message) for k, d in said.items()} == {
        k: (REJECT, CREDENTIALS) for k in said}
    assert CREDENTIALS.startswith("invalid credentials")


def test_a_replayed_code_says_to_wait_for_the_next(h: Harness) -> None:
    h.require()
    h.enroll()
    typed = h.with_code()
    assert h.auth(password=typed).accepted
    d = h.auth(password=typed)
    assert outcome(d) == (REJECT, Reason.REPLAYED_CODE)
    assert d.message == ("invalid credentials: that verification code was used already; "
                         "wait for the next one")


def test_the_attempt_that_locks_says_until_when(h: Harness) -> None:
    h.require()
    h.enroll()
    for _ in range(4):
        assert not h.auth(password="nope").lockout_started
    d = h.auth(password="nope")
    assert d.lockout_started and outcome(d) == (REJECT, Reason.BAD_PASSWORD)
    until = "2023-11-14T22:28:35Z"  # T0 + 900 s
    assert d.message == f"locked after too many failed attempts, until {until}"
    later = h.auth(password=h.with_code())
    assert outcome(later) == (REJECT, Reason.LOCKED_OUT)
    assert later.message == d.message


def test_an_unknown_name_is_told_the_same_as_an_account(h: Harness) -> None:
    said = [h.auth("zed", "nope").message for _ in range(6)]
    assert said[4] == said[5] == "locked after too many failed attempts, until 2023-11-14T22:28:35Z"
    assert said[0] == said[3] != said[4]


def test_locked_until_an_admin_unlocks_says_so(tmp_path: Path) -> None:
    h = make_harness(tmp_path, Limits(max_failures=1, lockout_seconds=0))
    d = h.auth(password="nope")
    assert d.message == "locked after too many failed attempts, until an administrator unlocks it"
    h.store.close()


def test_the_enrollment_notice_says_how_to_set_up(h: Harness) -> None:
    h.require(days=1)
    assert h.auth().message == "Set up MFA: 1 day left in your enrollment period"
    h.engine.enrollment_help = "Scan the QR code at the IT desk."
    assert h.auth().message == ("Set up MFA: 1 day left in your enrollment period. "
                                "Scan the QR code at the IT desk.")
    h.engine.enrollment_url = "https://mfa.example.org/"
    assert h.auth().message == ("Set up MFA: 1 day left in your enrollment period: "
                                "https://mfa.example.org/")
    d = h.auth(mfa=MfaMode.STRICT)
    assert outcome(d) == (REJECT, Reason.NOT_ENROLLED)
    assert d.message == ("invalid credentials: MFA is required here and you have not set it "
                         "up: https://mfa.example.org/")


def test_an_expired_enrollment_says_whom_to_call(h: Harness) -> None:
    h.require(days=1)
    h.clock.advance(2 * DAY)
    assert h.auth().message == ("enrollment expired: the period to set up MFA is over; "
                                "contact your administrator")


def test_the_lockout_log_line_reads_iso_8601(h: Harness,
                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "mfa_proxy.policy"):
        for _ in range(5):
            h.auth(password="nope")
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lockout")]
    assert re.fullmatch(r"lockout user=alice failures=5 until=2023-11-14T22:28:35Z "
                        r"request_id=[0-9a-f]{6}-[0-9a-f]+", line), line


def test_each_attempt_gets_a_request_id_on_its_decision_and_lockout_lines(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.enroll("alice")
    auth = authenticator(h)
    requests = [h.request(password="wrong") for _ in range(h.engine.limits.max_failures)]
    with caplog.at_level(logging.INFO, "mfa_proxy.policy"):
        for request in requests:
            assert outcome(fired(auth.authenticate(request))) == (REJECT, Reason.BAD_PASSWORD)
    ids = [r.request_id for r in requests]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{6}-[0-9a-f]+", i)
                                             for i in ids)
    decisions = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decision")]
    assert [m.rsplit("request_id=", 1)[1] for m in decisions] == ids
    [lockout] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lockout")]
    assert lockout.endswith(f"request_id={ids[-1]}")
    given = h.request(password="wrong")
    given.request_id = "from-the-front-end"
    fired(auth.authenticate(given))
    assert given.request_id == "from-the-front-end"
