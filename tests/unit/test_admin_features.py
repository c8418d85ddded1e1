"""Issue 11's features admins expect, in the core: recovery codes, a bypass that ends
by itself, clock-drift resync, user delete and the filtered user list.

Every test runs the real Accounts and PolicyEngine on a real SQLite Store and key
ring in tmp_path, with one fake clock (policy/clock.py's Clock) handed to all of
them: time moves only when a test says so. The same flows through the real
``mfa-proxy`` and real clients are in tests/integration/test_admin_features.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pyotp
import pytest

from backends.base import Identity, InvalidCredentials, UnknownUser
from backends.local import LocalDirectory
from policy import recovery
from policy.admin import (
    MAX_BYPASS_SECONDS,
    Accounts,
    InvalidBypassDuration,
    NoSuchUser,
    NotEnrolled,
    RecoveryCodesOff,
    ResyncFailed,
)
from policy.decision import AuthRequest, Decision, Outcome, Reason, SplitMode
from policy.engine import Limits, PolicyEngine, split_password
from policy.keys import KeyRing
from policy.schema import STATUSES, AuditFilter, UserFilter
from policy.store import Store
from policy.totp import TotpParams
from policy.usernames import UsernameRules
from tests.clock import ManualClock
from tests.sync_core import authenticate_sync

DAY = 86400
T0 = 1_700_000_010.0  # 10 s into a 30 s time step
KEY = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
ACCEPT, REJECT, NEED_CODE = Outcome.ACCEPT, Outcome.REJECT, Outcome.NEED_CODE


class Directory:
    """alice, bob, carol with passwords NAME-pw."""

    def lookup(self, username: str) -> Identity | None:
        name = username.casefold()
        return Identity(name, None, ()) if name in ("alice", "bob", "carol") else None

    def check_password(self, identity: Identity, password: str) -> Identity:
        if identity.username not in ("alice", "bob", "carol"):
            raise UnknownUser(identity.username)
        if password != f"{identity.username}-pw":
            raise InvalidCredentials(identity.username)
        return identity


@dataclass
class World:
    store: Store
    keys: KeyRing
    clock: ManualClock
    accounts: Accounts
    engine: PolicyEngine
    path: Path

    def auth(self, user: str, password: str, code: str | None = None,
             split: SplitMode = SplitMode.AUTO, separator: str = ",") -> Decision:
        decision = authenticate_sync(self.engine,
            AuthRequest(user, password, "radius", "vpn", split=split, separator=separator,
                        code=code), Directory())  # type: ignore[arg-type]
        self.engine.audit.flush()
        return decision

    def code(self, at: float | None = None) -> str:
        return pyotp.TOTP(KEY).at(self.clock() if at is None else at)

    def enroll(self, user: str = "alice") -> None:
        self.accounts.enroll(user, KEY)

    def rows(self, sql: str) -> list[tuple[object, ...]]:
        with closing(sqlite3.connect(self.path)) as db:
            return db.execute(sql).fetchall()


def make_world(tmp_path: Path, recovery_codes: bool = True) -> World:
    clock = ManualClock(T0)
    path = tmp_path / "state.db"
    store = Store(f"sqlite:///{path}", clock)
    store.upgrade()
    keys = KeyRing(tmp_path / "secret.key")
    params = TotpParams(6, 30, 1)
    accounts = Accounts(store, keys, params, "Example Corp", 7, UsernameRules(), clock,
                        max_failures=5, lockout_seconds=900, recovery_codes=recovery_codes)
    engine = PolicyEngine(store, keys, params, Limits(5, 900), UsernameRules(), clock=clock,
                          recovery_codes=recovery_codes)
    return World(store, keys, clock, accounts, engine, path)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path)
    yield w
    w.store.close()


# -- the codes themselves ------------------------------------------------------------------


def test_codes_are_ten_printed_groups_never_all_digits_and_distinct() -> None:
    codes = recovery.new_codes()
    assert len(codes) == recovery.COUNT == 10 and len(set(codes)) == 10
    for code in codes:
        assert len(code) == 12 and code[4] == code[9] == "-"
        assert set(code.replace("-", "")) <= set(recovery.ALPHABET)
        assert not code.replace("-", "").isdigit()
        assert recovery.is_printed(code)
        assert recovery.normalize(code) == code.replace("-", "")


@pytest.mark.parametrize(("typed", "normal"), [
    ("abcd-efgh-jk", "abcdefghjk"),
    ("ABCD-EFGH-JK", "abcdefghjk"),
    ("abcdefghjk", "abcdefghjk"),
    (" abcd efgh jk ", "abcdefghjk"),
    ("0bcd-efgh-1k", "0bcdefgh1k"),
    ("obcd-efgh-ik", "0bcdefgh1k"),  # o reads 0, i and l read 1 (Crockford)
    ("lbcd-efgh-jk", "1bcdefghjk"),
])
def test_a_code_is_read_whatever_its_case_spaces_and_hyphens(typed: str, normal: str) -> None:
    assert recovery.normalize(typed) == normal


@pytest.mark.parametrize("typed", [
    "123456", "12345678", "1234567890", "1234-5678-90",  # digits: a TOTP code, or nothing
    "abcd-efgh-j", "abcd-efgh-jkm", "abcd-efgh-ju",  # too short, too long, u is no digit
    "ａｂｃｄ-efgh-jk", "", "abcd_efgh_jk",
])
def test_what_is_not_a_recovery_code(typed: str) -> None:
    assert recovery.normalize(typed) is None


@pytest.mark.parametrize(("typed", "separator", "expected"), [
    ("secret,abcd-efgh-jk", ",", ("secret", "abcd-efgh-jk")),
    ("se,cret,ABCD-EFGH-JK", ",", ("se,cret", "ABCD-EFGH-JK")),
    ("secret,abcdefghjk", ",", ("secret,abcdefghjk", None)),  # only the printed form
    ("secret,123456", ",", ("secret", "123456")),
    ("secretabcd-efgh-jk", "", ("secret", "abcd-efgh-jk")),
    ("secret123456", "", ("secret", "123456")),
    ("abcd-efgh-jk", "", ("abcd-efgh-jk", None)),  # nothing before it: a password
    ("secret,abcd-efgh-j1", ",", ("secret", "abcd-efgh-j1")),
])
def test_the_password_field_is_split_before_a_printed_recovery_code(
        typed: str, separator: str, expected: tuple[str, str | None]) -> None:
    assert split_password(typed, SplitMode.AUTO, separator, 6) == expected
    assert split_password(typed, SplitMode.APPEND, separator, 6) == expected
    assert split_password(typed, SplitMode.CHALLENGE, separator, 6) == (typed, None)


# -- recovery codes in the sign-in core ------------------------------------------------------


def test_recovery_codes_are_only_for_an_enrolled_user_and_stored_as_keyed_hashes(
        world: World) -> None:
    with pytest.raises(NotEnrolled):
        world.accounts.new_recovery_codes("alice")
    world.enroll()
    codes = world.accounts.new_recovery_codes("alice").codes
    assert len(codes) == 10 and world.accounts.view("alice").recovery_codes_left == 10
    stored = world.rows("SELECT username, code_hash FROM recovery_codes")
    assert len(stored) == 10 and {u for u, _ in stored} == {"alice"}
    key = world.keys.derive(recovery.KEY_PURPOSE)
    expected = {recovery.digest(key, "alice", c.replace("-", "")) for c in codes}
    assert {bytes(h) for _, h in stored} == expected  # type: ignore[arg-type]
    dump = world.path.read_bytes() + b"".join(
        p.read_bytes() for p in world.path.parent.glob("state.db-wal"))
    for code in codes:
        assert code.encode() not in dump and code.replace("-", "").encode() not in dump


def test_a_recovery_code_works_once_in_place_of_a_code_in_append_mode(world: World) -> None:
    world.enroll()
    codes = world.accounts.new_recovery_codes("alice").codes
    d = world.auth("alice", f"alice-pw,{codes[0]}")
    assert (d.outcome, d.reason) == (ACCEPT, Reason.RECOVERY_CODE)
    assert world.accounts.view("alice").recovery_codes_left == 9
    again = world.auth("alice", f"alice-pw,{codes[0]}")
    assert (again.outcome, again.reason) == (REJECT, Reason.BAD_CODE)
    assert world.store.admin.get("alice").failures == 1  # type: ignore[union-attr]
    audit = world.store.admin.query_audit(AuditFilter(username="alice"), None, oldest_first=True)
    assert [(r.record.result, r.record.reason) for r in audit] == [
        ("accept", "recovery_code"), ("reject", "bad_code")]


def test_a_recovery_code_answers_a_challenge_in_any_spelling(world: World) -> None:
    world.enroll()
    code = world.accounts.new_recovery_codes("alice").codes[3]
    first = world.auth("alice", "alice-pw")
    assert first.outcome is NEED_CODE
    second = authenticate_sync(world.engine, AuthRequest(
        "alice", "", "radius", "vpn", split=SplitMode.CHALLENGE,
        code=code.upper().replace("-", " "), verified_identity=first.identity),
        Directory())  # type: ignore[arg-type]
    assert (second.outcome, second.reason) == (ACCEPT, Reason.RECOVERY_CODE)


def test_a_recovery_code_is_no_time_step(world: World) -> None:
    world.enroll()
    code = world.accounts.new_recovery_codes("alice").codes[0]
    before = world.store.admin.get("alice")
    assert world.auth("alice", f"alice-pw,{code}").accepted
    after = world.store.admin.get("alice")
    assert before is not None and after is not None and after.last_step == before.last_step
    # the TOTP code of this very step still works (no replay marker moved)...
    assert world.auth("alice", f"alice-pw,{world.code()}").reason is Reason.OK
    # ...and once it is used, a recovery code still works (no marker to be behind)
    assert world.auth("alice", f"alice-pw,{world.accounts.new_recovery_codes('alice').codes[1]}"
                      ).reason is Reason.RECOVERY_CODE


def test_a_recovery_code_clears_the_failure_count(world: World) -> None:
    world.enroll()
    code = world.accounts.new_recovery_codes("alice").codes[0]
    for _ in range(3):
        world.auth("alice", "alice-pw,000000")
    assert world.store.admin.get("alice").failures == 3  # type: ignore[union-attr]
    assert world.auth("alice", f"alice-pw,{code}").accepted
    assert world.store.admin.get("alice").failures == 0  # type: ignore[union-attr]


def test_wrong_recovery_codes_are_bad_codes_and_lock(world: World) -> None:
    world.enroll()
    codes = world.accounts.new_recovery_codes("alice").codes
    wrong = next(c for c in recovery.new_codes(50) if c not in codes)
    for _ in range(5):
        d = world.auth("alice", f"alice-pw,{wrong}")
        assert (d.outcome, d.reason) == (REJECT, Reason.BAD_CODE)
    assert d.lockout_started
    locked = world.auth("alice", f"alice-pw,{codes[0]}")
    assert (locked.outcome, locked.reason) == (REJECT, Reason.LOCKED_OUT)
    assert world.accounts.view("alice").recovery_codes_left == 10  # a lock uses no code
    world.clock.advance(901)
    assert world.auth("alice", f"alice-pw,{codes[0]}").reason is Reason.RECOVERY_CODE


def test_a_code_of_one_user_is_nothing_for_another(world: World) -> None:
    world.enroll("alice")
    world.enroll("bob")
    alices = world.accounts.new_recovery_codes("alice").codes
    world.accounts.new_recovery_codes("bob")
    assert world.auth("bob", f"bob-pw,{alices[0]}").reason is Reason.BAD_CODE
    assert world.auth("alice", f"alice-pw,{alices[0]}").reason is Reason.RECOVERY_CODE


def test_new_codes_replace_the_old_ones(world: World) -> None:
    world.enroll()
    old = world.accounts.new_recovery_codes("alice").codes
    new = world.accounts.new_recovery_codes("alice").codes
    assert not set(old) & set(new)
    assert world.auth("alice", f"alice-pw,{old[0]}").reason is Reason.BAD_CODE
    assert world.auth("alice", f"alice-pw,{new[0]}").reason is Reason.RECOVERY_CODE
    assert world.accounts.view("alice").recovery_codes_left == 9


def test_a_reset_clears_the_recovery_codes_with_the_key(world: World) -> None:
    world.enroll()
    code = world.accounts.new_recovery_codes("alice").codes[0]
    world.accounts.reset("alice")
    world.enroll()
    assert world.accounts.view("alice").recovery_codes_left == 0
    assert world.auth("alice", f"alice-pw,{code}").reason is Reason.BAD_CODE


def test_recovery_codes_off_makes_none_and_accepts_none(tmp_path: Path) -> None:
    on = make_world(tmp_path)
    on.enroll()
    code = on.accounts.new_recovery_codes("alice").codes[0]
    on.store.close()
    off = make_world(tmp_path, recovery_codes=False)
    with pytest.raises(RecoveryCodesOff):
        off.accounts.new_recovery_codes("alice")
    d = off.auth("alice", f"alice-pw,{code}")
    assert (d.outcome, d.reason) == (REJECT, Reason.BAD_CODE)
    assert off.accounts.view("alice").recovery_codes_left == 10  # refused, not used
    off.store.close()


def test_a_portal_set_up_makes_the_new_keys_recovery_codes(world: World) -> None:
    world.accounts.require("alice")
    enrollment = world.accounts.start_setup("alice")
    done = world.accounts.confirm_setup("alice", pyotp.TOTP(enrollment.totp_key).at(T0))
    assert done.confirmed and len(done.recovery_codes) == 10
    assert world.accounts.view("alice").recovery_codes_left == 10
    assert world.auth("alice", f"alice-pw,{done.recovery_codes[0]}").accepted


def test_codes_held_for_a_portal_session_are_shown_once(world: World) -> None:
    from policy.sessions import PortalSessions, Stage

    sessions = PortalSessions(world.store, 900, world.clock)
    _, session = sessions.start("alice", Stage.SIGNED_IN, Identity("alice", None, ()), True)
    world.accounts.hold_for_display(session.id_hash, "alice", ["abcd-efgh-jk"])
    blob = world.rows("SELECT recovery_display FROM portal_sessions")[0][0]
    assert b"abcd" not in bytes(blob)  # type: ignore[arg-type]
    assert world.accounts.take_for_display(session.id_hash, "bob") == ()  # bound to alice
    world.accounts.hold_for_display(session.id_hash, "alice", ["abcd-efgh-jk"])
    assert world.accounts.take_for_display(session.id_hash, "alice") == ("abcd-efgh-jk",)
    assert world.accounts.take_for_display(session.id_hash, "alice") == ()


# -- a bypass that ends by itself -----------------------------------------------------------


def test_a_bypass_for_four_hours_ends_by_itself(world: World) -> None:
    world.enroll()
    until = world.accounts.bypass_for("alice", 4 * 3600)
    assert until == int(T0) + 4 * 3600
    view = world.accounts.view("alice")
    assert view.bypass and view.bypass_until == "2023-11-15T02:13:30Z"
    assert world.auth("alice", "alice-pw").reason is Reason.BYPASS
    assert [v.username for v in world.accounts.list_views(where=UserFilter(bypass=True))] == [
        "alice"]
    world.clock.advance(4 * 3600 - 1)
    assert world.auth("alice", "alice-pw").reason is Reason.BYPASS
    world.clock.advance(1)
    over = world.auth("alice", "alice-pw")
    assert over.outcome is NEED_CODE  # a code again, nothing had to run at that time
    assert world.auth("alice", f"alice-pw,{world.code()}").reason is Reason.OK
    view = world.accounts.view("alice")
    assert (view.bypass, view.bypass_until) == (False, None)
    assert world.accounts.list_views(where=UserFilter(bypass=True)) == []


def test_bypass_on_has_no_end_and_off_ends_a_timed_one(world: World) -> None:
    world.enroll()
    world.accounts.bypass_for("alice", 3600)
    world.accounts.bypass("alice", True)  # until turned off
    world.clock.advance(10 * DAY)
    assert world.auth("alice", "alice-pw").reason is Reason.BYPASS
    world.accounts.bypass_for("alice", 3600)
    world.accounts.bypass("alice", False)
    assert world.auth("alice", "alice-pw").outcome is NEED_CODE
    assert world.store.admin.get("alice").bypass_until is None  # type: ignore[union-attr]


@pytest.mark.parametrize("seconds", [0, 59, MAX_BYPASS_SECONDS + 1])
def test_a_bypass_lasts_a_minute_to_a_year(world: World, seconds: int) -> None:
    with pytest.raises(InvalidBypassDuration):
        world.accounts.bypass_for("alice", seconds)
    assert world.store.admin.get("alice") is None


# -- clock drift --------------------------------------------------------------------------


def test_resync_seven_minutes_ahead(world: World) -> None:
    world.enroll()
    ahead = T0 + 7 * 60
    phone = pyotp.TOTP(KEY)
    assert world.auth("alice", f"alice-pw,{phone.at(ahead)}").reason is Reason.BAD_CODE
    done = world.accounts.resync("alice", phone.at(ahead - 30), phone.at(ahead))
    assert (done.offset_steps, done.offset_seconds) == (14, 420)
    assert world.accounts.view("alice").step_offset == 14
    # the two codes the resync was given are used
    assert world.auth("alice", f"alice-pw,{phone.at(ahead)}").reason is Reason.REPLAYED_CODE
    world.clock.advance(30)
    assert world.auth("alice", f"alice-pw,{phone.at(ahead + 30)}").reason is Reason.OK
    world.clock.advance(30)  # the usual window, around the phone's time
    assert world.auth("alice", f"alice-pw,{phone.at(ahead + 90)}").reason is Reason.OK
    assert world.auth("alice", f"alice-pw,{phone.at(world.clock() + 30)}").reason \
        is Reason.BAD_CODE  # the server's own time is no longer looked at


def test_resync_behind_and_then_back(world: World) -> None:
    world.enroll()
    phone = pyotp.TOTP(KEY)
    behind = T0 - 5 * 60
    assert world.accounts.resync("alice", phone.at(behind - 30), phone.at(behind)
                                 ).offset_steps == -10
    world.clock.advance(30)
    assert world.auth("alice", f"alice-pw,{phone.at(behind + 30)}").reason is Reason.OK
    # a new key (here an admin's) starts with no offset
    world.accounts.enroll("alice", KEY, force=True)
    assert world.accounts.view("alice").step_offset == 0


@pytest.mark.parametrize("minutes", [11, -11, 30])
def test_resync_beyond_ten_minutes_finds_nothing(world: World, minutes: int) -> None:
    world.enroll()
    phone = pyotp.TOTP(KEY)
    at = T0 + minutes * 60
    with pytest.raises(ResyncFailed) as e:
        world.accounts.resync("alice", phone.at(at - 30), phone.at(at))
    assert "10 minutes" in str(e.value)
    assert world.accounts.view("alice").step_offset == 0


def test_resync_needs_two_consecutive_codes(world: World) -> None:
    world.enroll()
    phone = pyotp.TOTP(KEY)
    at = T0 + 180
    with pytest.raises(ResyncFailed):  # reversed
        world.accounts.resync("alice", phone.at(at), phone.at(at - 30))
    with pytest.raises(ResyncFailed):  # one step apart is two
        world.accounts.resync("alice", phone.at(at - 60), phone.at(at))
    with pytest.raises(ResyncFailed):
        world.accounts.resync("alice", "abc", "def")
    with pytest.raises(NotEnrolled):
        world.accounts.resync("bob", phone.at(at - 30), phone.at(at))
    assert world.accounts.resync("alice", phone.at(at - 30), phone.at(at)).offset_steps == 6


# -- delete -------------------------------------------------------------------------------


def test_delete_forgets_everything_but_the_audit_rows(world: World) -> None:
    world.enroll()
    world.accounts.new_recovery_codes("alice")
    world.auth("alice", "alice-pw,000000")
    world.accounts.bypass_for("alice", 3600)
    world.enroll("bob")
    world.accounts.delete("alice")
    assert world.store.admin.get("alice") is None
    assert world.rows("SELECT count(*) FROM recovery_codes WHERE username = 'alice'") == [(0,)]
    assert world.accounts.view("alice").status == "not_required"
    assert [r.record.reason for r in world.store.admin.query_audit(AuditFilter(username="alice"))] \
        == ["bad_code"]
    assert world.store.admin.get("bob") is not None
    with pytest.raises(NoSuchUser):
        world.accounts.delete("alice")
    # signing in again: a user never required
    assert world.auth("alice", "alice-pw").reason is Reason.NOT_REQUIRED


# -- the filtered list ----------------------------------------------------------------------


def test_list_filters_combine_and_follow_the_status_rule(world: World) -> None:
    world.enroll("alice")                                   # enrolled
    world.accounts.require("bob", days=1)                   # in enrollment, 1 day
    world.accounts.require("carol", days=5)                 # in enrollment, 5 days
    world.accounts.require("dave", days=1)
    world.clock.advance(2 * DAY)                            # dave: expired; carol: 3 left
    world.accounts.require("bob", days=1)
    for _ in range(5):
        world.store.hot.record_failure("carol", world.clock(), 5, 900)
    world.accounts.bypass_for("bob", 3600)

    def names(**kw: object) -> list[str]:
        return [v.username for v in world.accounts.list_views(
            ["zed", "alice"], UserFilter(**kw))]  # type: ignore[arg-type]

    assert names() == ["alice", "bob", "carol", "dave", "zed"]
    assert names(status="in_enrollment") == ["bob", "carol"]
    assert names(status="enrollment_expired") == ["dave"]
    assert names(status="not_required") == ["zed"]
    assert names(locked=True) == ["carol"]
    assert names(bypass=True) == ["bob"]
    assert names(expiring_within=2 * DAY) == ["bob"]
    assert names(expiring_within=4 * DAY) == ["bob", "carol"]
    assert names(expiring_within=4 * DAY, locked=True) == ["carol"]
    assert names(status="enrolled", bypass=True) == []
    views = {v.username: v for v in world.accounts.list_views(["zed"])}
    for name, view in views.items():  # the list says what `user show` says
        assert view == world.accounts.view(name), name
    assert {v.status for v in views.values()} <= set(STATUSES)


def test_default_matches_only_what_a_user_without_state_is() -> None:
    assert UserFilter().matches_default()
    assert UserFilter(status="not_required").matches_default()
    assert not UserFilter(status="enrolled").matches_default()
    assert not UserFilter(locked=True).matches_default()
    assert not UserFilter(bypass=True).matches_default()
    assert not UserFilter(expiring_within=DAY).matches_default()


# -- the local users file ----------------------------------------------------------------


def test_local_users_file_lists_and_deletes(tmp_path: Path) -> None:
    from argon2 import PasswordHasher

    directory = LocalDirectory(tmp_path / "users.toml",
                               PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    directory.set_password("alice", "a-pw", ["vpn", "admins"], "alice@example.org")
    directory.set_password("Bob", "b-pw")
    assert [(e.username, e.groups, e.mail) for e in directory.entries()] == [
        ("Bob", (), None), ("alice", ("vpn", "admins"), "alice@example.org")]
    assert directory.delete("BOB") == "Bob"  # any spelling of the name
    assert [e.username for e in directory.entries()] == ["alice"]
    with pytest.raises(UnknownUser):
        directory.delete("bob")
    assert directory.lookup("alice") is not None
    assert (tmp_path / "users.toml").stat().st_mode & 0o777 == 0o600


# -- the config key ---------------------------------------------------------------------------


def test_policy_recovery_codes_is_a_boolean_default_true(tmp_path: Path) -> None:
    from proxy import config as configmod

    path = tmp_path / "mfa-proxy.toml"
    base = ('[state]\nurl = "sqlite:///state.db"\nkey_file = "secret.key"\n'
            '[directory]\ntype = "local"\nusers_file = "users.toml"\n')
    path.write_text(base)
    assert configmod.load(path).policy.recovery_codes is True
    path.write_text(base + "[policy]\nrecovery_codes = false\n")
    assert configmod.load(path).policy.recovery_codes is False
    path.write_text(base + '[policy]\nrecovery_codes = "no"\n')
    with pytest.raises(configmod.ConfigError) as e:
        configmod.load(path)
    assert e.value.problems == [
        "policy.recovery_codes: expected true or false, got string 'no'"]
