"""The portal's rules in the core, on a real SQLite Store and key ring with a
fake clock: a key set up by the user (pending until a code from it verifies),
portal sessions (hashed ids, idle timeout, rotation) and CSRF tokens."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
import pytest

from backends.base import Identity
from policy.admin import (
    PENDING_KEY_SECONDS,
    Accounts,
    EnrollmentExpired,
    Locked,
    SetupOutcome,
)
from policy.keys import KeyRing
from policy.sessions import LoginCsrf, PortalSessions, Stage, token_hash
from policy.store import Store
from policy.totp import TotpParams, match_step
from policy.usernames import UsernameRules
from tests.clock import ManualClock

DAY = 86400
T0 = 1_700_000_010.0  # 10 s into a 30 s time step


@dataclass
class Events:
    seen: list[tuple[Any, ...]] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kw: self.seen.append((name, *args, *kw.values()))


@dataclass
class World:
    accounts: Accounts
    store: Store
    keys: KeyRing
    clock: ManualClock
    events: Events
    path: Path


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = ManualClock(T0)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}", clock)
    store.upgrade()
    keys = KeyRing(tmp_path / "secret.key")
    events = Events()
    accounts = Accounts(store, keys, TotpParams(), "Example Corp", 7, UsernameRules(), clock,
                        events, max_failures=5, lockout_seconds=900)  # type: ignore[arg-type]
    yield World(accounts, store, keys, clock, events, tmp_path / "state.db")
    store.close()


def code_at(key: str, t: float) -> str:
    return pyotp.TOTP(key).at(t)


def wrong_code(key: str, t: float) -> str:
    near = {pyotp.TOTP(key).at(t + 30 * k) for k in range(-2, 3)}
    return next(c for c in (f"{n:06d}" for n in range(100000, 999999, 7919)) if c not in near)


# -- a pending key -------------------------------------------------------------------------


def test_start_setup_keeps_a_pending_key_and_changes_nothing_else(world: World) -> None:
    world.accounts.require("alice")
    before = world.accounts.view("alice")
    setup = world.accounts.start_setup("alice")
    assert setup.uri.startswith("otpauth://totp/Example%20Corp:alice?secret=" + setup.totp_key)
    assert world.accounts.view("alice") == before  # still in enrollment, no key
    assert world.store.admin.get("alice").totp_key is None  # type: ignore[union-attr]
    assert world.accounts.pending_setup("alice") == setup
    assert [e[0] for e in world.events.seen] == ["required"]


def test_the_pending_key_is_encrypted_at_rest_and_bound_to_its_user(world: World) -> None:
    setup = world.accounts.start_setup("alice")
    with closing(sqlite3.connect(world.path)) as db:
        blob, version = db.execute("SELECT pending_totp_key, pending_key_version FROM users "
                                   "WHERE username = 'alice'").fetchone()
    assert setup.totp_key.encode() not in blob
    assert version == world.keys.current
    assert world.keys.decrypt(blob, "alice").decode() == setup.totp_key
    with pytest.raises(Exception):  # noqa: B017 - AES-GCM's InvalidTag
        world.keys.decrypt(blob, "bob")


def test_a_good_code_activates_the_pending_key(world: World) -> None:
    world.accounts.require("alice")
    setup = world.accounts.start_setup("alice")
    result = world.accounts.confirm_setup("alice", code_at(setup.totp_key, T0), "10.0.0.9")
    assert result.outcome is SetupOutcome.CONFIRMED
    view = world.accounts.view("alice")
    assert (view.status, view.enrolled, view.failures) == ("enrolled", True, 0)
    record = world.store.admin.get("alice")
    assert record is not None and record.totp_key is not None
    assert world.keys.decrypt(record.totp_key, "alice").decode() == setup.totp_key
    assert world.accounts.pending_setup("alice") is None
    assert ("setup_confirmed", "alice", False, "10.0.0.9") in world.events.seen
    audit = world.store.admin.recent_audit("alice")
    assert [(a.protocol, a.result, a.reason, a.source) for a in audit] == [
        ("portal", "accept", "setup_confirmed", "10.0.0.9")]


def test_the_confirming_code_is_marked_used(world: World) -> None:
    """The code that confirmed cannot be replayed (on the VPN): its step is the marker."""
    setup = world.accounts.start_setup("alice")
    code = code_at(setup.totp_key, T0)
    assert world.accounts.confirm_setup("alice", code).confirmed
    record = world.store.admin.get("alice")
    assert record is not None
    step = match_step(setup.totp_key, code, T0, TotpParams())
    assert record.last_step == step
    assert not world.store.hot.accept_step("alice", step, T0)  # what a replay would hit


def test_a_wrong_code_counts_as_a_failure_and_keeps_the_same_pending_key(world: World) -> None:
    world.accounts.require("alice")
    setup = world.accounts.start_setup("alice")
    result = world.accounts.confirm_setup("alice", wrong_code(setup.totp_key, T0))
    assert result.outcome is SetupOutcome.BAD_CODE
    view = world.accounts.view("alice")
    assert (view.status, view.failures, view.enrolled) == ("in_enrollment", 1, False)
    assert world.accounts.pending_setup("alice") == setup
    assert world.store.admin.recent_audit("alice")[0].reason == "bad_code"


def test_five_wrong_codes_lock_and_a_locked_user_cannot_confirm(world: World) -> None:
    setup = world.accounts.start_setup("alice")
    results = [world.accounts.confirm_setup("alice", wrong_code(setup.totp_key, T0))
               for _ in range(5)]
    assert [r.lockout_started for r in results] == [False] * 4 + [True]
    good = world.accounts.confirm_setup("alice", code_at(setup.totp_key, T0))
    assert good.outcome is SetupOutcome.LOCKED
    assert world.store.admin.get("alice").totp_key is None  # type: ignore[union-attr]
    with pytest.raises(Locked):
        world.accounts.start_setup("alice")
    world.clock.advance(901)  # the lock has run out
    assert world.accounts.confirm_setup("alice", code_at(setup.totp_key, world.clock())).confirmed


def test_the_old_key_keeps_working_until_the_new_one_is_confirmed(world: World) -> None:
    old = world.accounts.enroll("alice")
    new = world.accounts.start_setup("alice")
    record = world.store.admin.get("alice")
    assert record is not None and record.totp_key is not None
    assert world.keys.decrypt(record.totp_key, "alice").decode() == old.totp_key
    assert world.accounts.view("alice").status == "enrolled"
    world.clock.advance(30)
    assert world.accounts.confirm_setup("alice", code_at(new.totp_key, world.clock())).confirmed
    record = world.store.admin.get("alice")
    assert record is not None and record.totp_key is not None
    assert world.keys.decrypt(record.totp_key, "alice").decode() == new.totp_key
    assert ("setup_confirmed", "alice", True, "") in world.events.seen  # a reset by the user


def test_a_code_of_the_old_key_does_not_confirm_the_new_one(world: World) -> None:
    old = world.accounts.enroll("alice")
    world.accounts.start_setup("alice")
    result = world.accounts.confirm_setup("alice", code_at(old.totp_key, T0))
    assert result.outcome is SetupOutcome.BAD_CODE


def test_a_new_setup_replaces_the_older_pending_key(world: World) -> None:
    first = world.accounts.start_setup("alice")
    second = world.accounts.start_setup("alice")
    assert first.totp_key != second.totp_key
    assert world.accounts.pending_setup("alice") == second
    assert world.accounts.confirm_setup("alice", code_at(first.totp_key, T0)).outcome is (
        SetupOutcome.BAD_CODE)
    assert world.accounts.confirm_setup("alice", code_at(second.totp_key, T0)).confirmed


def test_activation_is_conditional_on_the_pending_key_it_verified(world: World) -> None:
    """The one UPDATE … WHERE: a pending key replaced between the check and the
    activation is not activated (nor is the newer one)."""
    first = world.accounts.start_setup("alice")
    blob = world.store.admin.get_pending("alice", T0)
    assert blob is not None
    world.accounts.start_setup("alice")
    assert not world.store.admin.activate_pending("alice", blob.totp_key, 1, T0)
    assert world.store.admin.get("alice").totp_key is None  # type: ignore[union-attr]
    assert first.totp_key


def test_an_abandoned_pending_key_expires(world: World) -> None:
    setup = world.accounts.start_setup("alice")
    world.clock.advance(PENDING_KEY_SECONDS)
    assert world.accounts.pending_setup("alice") is None
    result = world.accounts.confirm_setup("alice", code_at(setup.totp_key, world.clock()))
    assert result.outcome is SetupOutcome.NO_PENDING_KEY
    world.store.admin.prune(world.clock(), 90)
    with closing(sqlite3.connect(world.path)) as db:
        assert db.execute("SELECT pending_totp_key FROM users").fetchone() == (None,)


def test_confirming_makes_a_user_who_was_not_required_required(world: World) -> None:
    setup = world.accounts.start_setup("carol")
    assert world.accounts.view("carol").status == "not_required"
    assert world.accounts.confirm_setup("carol", code_at(setup.totp_key, T0)).confirmed
    assert world.accounts.view("carol").status == "enrolled"


def test_an_expired_enrollment_cannot_be_set_up(world: World) -> None:
    world.accounts.require("alice", 1)
    world.clock.advance(DAY)
    with pytest.raises(EnrollmentExpired):
        world.accounts.start_setup("alice")


def test_an_admin_reset_drops_the_pending_key(world: World) -> None:
    world.accounts.start_setup("alice")
    world.accounts.reset("alice")
    assert world.accounts.pending_setup("alice") is None


# -- sessions ------------------------------------------------------------------------------

ALICE = Identity("alice", "uid=alice,ou=people,dc=example,dc=org", ("vpn-users",))


@pytest.fixture
def sessions(world: World) -> PortalSessions:
    return PortalSessions(world.store, idle_seconds=15 * 60, clock=world.clock)


def test_a_session_id_is_256_random_bits_and_only_its_hash_is_stored(
        world: World, sessions: PortalSessions) -> None:
    token, session = sessions.start("alice", Stage.SIGNED_IN, ALICE, True)
    other, _ = sessions.start("alice", Stage.SIGNED_IN, ALICE, True)
    assert token != other and len(token) >= 43  # 32 bytes, URL-safe base64
    with closing(sqlite3.connect(world.path)) as db:
        stored = [bytes(r[0]) for r in db.execute("SELECT id_hash FROM portal_sessions")]
        dump = "\n".join(db.iterdump())
    assert token_hash(token) in stored and token not in dump
    found = sessions.find(token)
    assert found == session
    assert found is not None and found.identity == ALICE and found.signed_in


def test_a_session_ends_after_the_idle_timeout(world: World, sessions: PortalSessions) -> None:
    token, _ = sessions.start("alice", Stage.SIGNED_IN, ALICE, False)
    world.clock.advance(14 * 60)
    assert sessions.find(token) is not None  # a request restarts the idle timer
    world.clock.advance(14 * 60)
    assert sessions.find(token) is not None
    world.clock.advance(15 * 60)
    assert sessions.find(token) is None
    world.clock.advance(-20 * 60)
    assert sessions.find(token) is None  # once expired it stays dead


def test_logout_and_rotation_end_the_old_session(world: World, sessions: PortalSessions) -> None:
    code_step, _ = sessions.start("alice", Stage.CODE, ALICE, False)
    signed_in, session = sessions.start("alice", Stage.SIGNED_IN, ALICE, True,
                                        replacing=code_step)
    assert sessions.find(code_step) is None
    assert sessions.find(signed_in) == session
    sessions.end(signed_in)
    assert sessions.find(signed_in) is None


@pytest.mark.parametrize("token", [None, "", "x", "A" * 43, "A" * 10_000, "é" * 50])
def test_unknown_or_malformed_ids_open_nothing(sessions: PortalSessions,
                                               token: str | None) -> None:
    assert sessions.find(token) is None
    sessions.end(token)


def test_each_session_has_its_own_csrf_token(sessions: PortalSessions) -> None:
    _, a = sessions.start("alice", Stage.SIGNED_IN, ALICE, False)
    _, b = sessions.start("alice", Stage.SIGNED_IN, ALICE, False)
    assert a.csrf_token != b.csrf_token and len(a.csrf_token) >= 43


def test_expired_sessions_are_pruned(world: World, sessions: PortalSessions) -> None:
    sessions.start("alice", Stage.SIGNED_IN, ALICE, False)
    world.clock.advance(16 * 60)
    world.store.admin.prune(world.clock(), 90)
    with closing(sqlite3.connect(world.path)) as db:
        assert db.execute("SELECT count(*) FROM portal_sessions").fetchone() == (0,)


# -- CSRF before login ---------------------------------------------------------------------


def test_the_login_csrf_token_is_tied_to_its_cookie_by_the_key() -> None:
    csrf = LoginCsrf(b"k" * 32)
    cookie, token = csrf.issue()
    assert csrf.check(cookie, token)
    other_cookie, other_token = csrf.issue()
    assert not csrf.check(cookie, other_token)
    assert not csrf.check(other_cookie, token)
    assert not csrf.check(cookie, None) and not csrf.check(None, token)
    assert not csrf.check(cookie, "")
    assert not LoginCsrf(b"x" * 32).check(cookie, token)  # another key: another token
    assert not csrf.check(cookie, token + "0")


def test_the_enrollment_notice_ends_with_the_public_url() -> None:
    from policy.engine import enrollment_message

    assert enrollment_message(5) == "Set up MFA: 5 days left in your enrollment period"
    assert enrollment_message(1, "https://mfa.example.org/") == (
        "Set up MFA: 1 day left in your enrollment period: https://mfa.example.org/")
