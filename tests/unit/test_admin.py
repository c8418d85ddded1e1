"""The admin service (policy/admin.py): every action's rule, on a real SQLite
Store and key ring in tmp_path, with a fake clock (time moves only when a test
says so) and a recorder in place of the mail sender.

The CLI's words and exit statuses are tested in tests/integration/test_cli.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest

from policy.account_events import AccountEvents
from policy.admin import (
    SKIPPED_BAD_NAME,
    SKIPPED_ENROLLED,
    Accounts,
    AlreadyEnrolled,
    Enrollment,
    ImportRefused,
    ImportRow,
    InvalidPeriod,
    InvalidTotpKey,
    Period,
    Refusal,
    check_period,
    parse_totp_key,
)
from policy.keys import KeyRing
from policy.schema import LOCKED_FOREVER
from policy.store import Store
from policy.totp import TotpParams
from policy.usernames import UsernameRules
from tests.clock import ManualClock

DAY = 86400
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
KEY = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
FIELDS = ["username", "status", "required", "enrolled", "enrollment_deadline", "days_left",
          "locked", "locked_until", "failures", "bypass", "bypass_until", "recovery_codes_left",
          "step_offset"]


@dataclass
class Recorder:
    """Every event, in order, as (name, *arguments)."""

    seen: list[tuple[Any, ...]] = field(default_factory=list)

    def required(self, username: str, deadline: int, notify: bool = True) -> None:
        self.seen.append(("required", username, deadline) if notify else
                         ("required", username, deadline, "no mail"))

    def enrolled(self, username: str) -> None:
        self.seen.append(("enrolled", username))

    def reset(self, username: str, deadline: int) -> None:
        self.seen.append(("reset", username, deadline))

    def extended(self, username: str, deadline: int) -> None:
        self.seen.append(("extended", username, deadline))

    def setup_confirmed(self, username: str, replaced: bool, source: str = "") -> None:
        self.seen.append(("setup_confirmed", username, replaced))

    def unrequired(self, username: str) -> None:
        self.seen.append(("unrequired", username))

    def unlocked(self, username: str) -> None:
        self.seen.append(("unlocked", username))

    def bypass_changed(self, username: str, on: bool) -> None:
        self.seen.append(("bypass_changed", username, on))

    def imported(self, enrolled: Sequence[str], required: Sequence[tuple[str, int]]) -> None:
        self.seen.append(("imported", list(enrolled), list(required)))


@dataclass
class World:
    accounts: Accounts
    store: Store
    keys: KeyRing
    clock: ManualClock
    events: Recorder


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = ManualClock(T0)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}", clock)
    store.upgrade()
    keys = KeyRing(tmp_path / "secret.key")
    events = Recorder()
    recorder: AccountEvents = events  # the recorder is what the Protocol asks for
    accounts = Accounts(store, keys, TotpParams(), "Example Corp", 7, UsernameRules(),
                        clock, recorder)
    yield World(accounts, store, keys, clock, events)
    store.close()


# -- require, reset, extend: periods counted from the clock ---------------------------------


def test_require_opens_a_period_of_the_configured_days(world: World) -> None:
    period = world.accounts.require("alice")
    assert period == Period(7, int(T0) + 7 * DAY)
    view = world.accounts.view("alice")
    assert (view.status, view.days_left, view.enrollment_deadline) == (
        "in_enrollment", 7, "2023-11-21T22:13:20Z")
    assert world.events.seen == [("required", "alice", int(T0) + 7 * DAY)]


def test_days_left_are_whole_days_rounded_up(world: World) -> None:
    world.accounts.require("alice", 3)
    world.clock.advance(1)
    assert world.accounts.view("alice").days_left == 3
    world.clock.advance(DAY)
    assert world.accounts.view("alice").days_left == 2
    world.clock.advance(2 * DAY - 2)
    assert world.accounts.view("alice").days_left == 1  # one second left
    world.clock.advance(1)
    view = world.accounts.view("alice")
    assert (view.status, view.days_left) == ("enrollment_expired", None)


@pytest.mark.parametrize("days", [0, -1, 366, 400])
def test_a_period_outside_1_to_365_days_is_refused_and_changes_nothing(
        world: World, days: int) -> None:
    for action in (lambda: world.accounts.require("alice", days),
                   lambda: world.accounts.reset("alice", days),
                   lambda: world.accounts.extend("alice", days)):
        with pytest.raises(InvalidPeriod) as e:
            action()
        assert e.value.days == days
        assert isinstance(e.value, Refusal)
    assert world.store.admin.get("alice") is None
    assert world.events.seen == []
    with pytest.raises(InvalidPeriod):
        check_period(days)
    assert check_period(1) == 1 and check_period(365) == 365


def test_require_leaves_a_required_and_enrolled_user_alone(world: World) -> None:
    world.accounts.enroll("alice")
    before = world.store.admin.get("alice")
    world.events.seen.clear()
    assert world.accounts.require("alice", 30) is None
    assert world.store.admin.get("alice") == before
    assert world.events.seen == []


def test_require_restarts_a_running_period(world: World) -> None:
    world.accounts.require("alice", 30)
    world.clock.advance(DAY)
    assert world.accounts.require("alice", 2) == Period(2, int(T0) + 3 * DAY)
    assert world.accounts.view("alice").days_left == 2


def test_require_of_an_enrolled_user_not_required(world: World) -> None:
    world.accounts.enroll("alice")
    world.accounts.unrequire("alice")
    assert world.accounts.require("alice") is not None
    assert world.accounts.view("alice").status == "enrolled"


def test_extend_reopens_an_expired_period_from_now(world: World) -> None:
    world.accounts.require("alice", 1)
    world.clock.advance(10 * DAY)
    assert world.accounts.view("alice").status == "enrollment_expired"
    period = world.accounts.extend("alice", 5)
    assert period == Period(5, int(T0) + 15 * DAY)
    assert (world.accounts.view("alice").status, world.accounts.view("alice").days_left) == (
        "in_enrollment", 5)
    assert world.events.seen[-1] == ("extended", "alice", int(T0) + 15 * DAY)


def test_reset_clears_the_key_and_opens_a_period(world: World) -> None:
    world.accounts.enroll("alice")
    world.clock.advance(DAY)
    period = world.accounts.reset("alice")
    assert period == Period(7, int(T0) + 8 * DAY)
    record = world.store.admin.get("alice")
    assert record is not None and record.totp_key is None and record.required
    assert world.accounts.view("alice").status == "in_enrollment"
    assert world.events.seen[-1] == ("reset", "alice", int(T0) + 8 * DAY)


# -- enroll ---------------------------------------------------------------------------------


def test_enroll_makes_an_active_key_and_its_uri(world: World) -> None:
    enrollment = world.accounts.enroll("alice")
    assert isinstance(enrollment, Enrollment)
    parts = urlsplit(enrollment.uri)
    assert unquote(parts.path) == "/Example Corp:alice"
    assert parse_qs(parts.query)["secret"] == [enrollment.totp_key]
    assert len(pyotp.parse_uri(enrollment.uri).byte_secret()) == 20  # 160 bits
    record = world.store.admin.get("alice")
    assert record is not None and record.totp_key is not None
    assert world.keys.decrypt(record.totp_key, "alice") == enrollment.totp_key.encode()
    assert world.accounts.view("alice").status == "enrolled"
    assert world.events.seen == [("enrolled", "alice")]  # required on the way: no mail


def test_enroll_imports_a_key_as_people_paste_it(world: World) -> None:
    enrollment = world.accounts.enroll("alice", "jbsw y3dp ehpk 3pxp jbsw y3dp ehpk 3pxp==")
    assert enrollment.totp_key == KEY


def test_enroll_refuses_to_replace_a_key_without_force(world: World) -> None:
    first = world.accounts.enroll("alice", KEY)
    before = world.store.admin.get("alice")
    with pytest.raises(AlreadyEnrolled) as e:
        world.accounts.enroll("alice")
    assert e.value.username == "alice"
    assert world.store.admin.get("alice") == before
    again = world.accounts.enroll("alice", force=True)
    assert again.totp_key != first.totp_key
    assert world.events.seen == [("enrolled", "alice"), ("enrolled", "alice")]


def test_enroll_keeps_a_running_requirement(world: World) -> None:
    world.accounts.require("alice", 30)
    world.accounts.enroll("alice")
    record = world.store.admin.get("alice")
    assert record is not None and record.enrollment_deadline == int(T0) + 30 * DAY


def test_enroll_refuses_a_bad_key_and_changes_nothing(world: World) -> None:
    for bad, reason in (("not-base32!", "not base32"), ("JBSWY3DP", "shorter than 128 bits"),
                        ("JBSWY3DPEHPK3PXP", "shorter than 128 bits (80 given")):
        with pytest.raises(InvalidTotpKey) as e:
            world.accounts.enroll("alice", bad)
        assert e.value.reason.startswith(reason)
        with pytest.raises(InvalidTotpKey):
            parse_totp_key(bad)
    assert world.store.admin.get("alice") is None
    assert world.events.seen == []


# -- unlock, bypass, unrequire ----------------------------------------------------------------


def test_unlock_clears_failures_and_the_lock(world: World) -> None:
    for _ in range(3):
        world.store.hot.record_failure("alice", world.clock(), 3, 900)
    view = world.accounts.view("alice")
    assert (view.locked, view.failures, view.locked_until) == (True, 3, "2023-11-14T22:28:20Z")
    world.accounts.unlock("alice")
    view = world.accounts.view("alice")
    assert (view.locked, view.failures, view.locked_until) == (False, 0, None)
    assert world.events.seen == [("unlocked", "alice")]


def test_a_lock_until_an_admin_unlocks_has_no_end_date(world: World) -> None:
    world.store.hot.record_failure("bob", world.clock(), 1, 0)
    assert world.store.admin.get("bob").locked_until == LOCKED_FOREVER  # type: ignore[union-attr]
    view = world.accounts.view("bob")
    assert (view.locked, view.locked_until) == (True, None)


def test_a_lock_that_ran_out_shows_as_unlocked(world: World) -> None:
    for _ in range(3):
        world.store.hot.record_failure("alice", world.clock(), 3, 900)
    world.clock.advance(900)
    view = world.accounts.view("alice")
    assert (view.locked, view.locked_until, view.failures) == (False, None, 3)


def test_unlock_and_unrequire_of_a_user_without_state_create_none(world: World) -> None:
    world.accounts.unlock("nobody")
    world.accounts.unrequire("nobody")
    assert world.store.admin.get("nobody") is None
    assert world.events.seen == []


def test_bypass_on_and_off(world: World) -> None:
    world.accounts.bypass("alice", True)
    assert world.accounts.view("alice").bypass is True
    world.accounts.bypass("alice", False)
    assert world.accounts.view("alice").bypass is False
    assert world.events.seen == [("bypass_changed", "alice", True),
                                 ("bypass_changed", "alice", False)]


def test_unrequire_keeps_the_key(world: World) -> None:
    world.accounts.enroll("alice")
    world.accounts.unrequire("alice")
    view = world.accounts.view("alice")
    assert (view.status, view.required, view.enrolled, view.enrollment_deadline) == (
        "enrolled_not_required", False, True, None)
    assert world.events.seen[-1] == ("unrequired", "alice")


# -- views ----------------------------------------------------------------------------------


def test_view_has_exactly_the_user_show_json_fields(world: World) -> None:
    assert world.accounts.view("nobody").as_json() == {
        "username": "nobody", "status": "not_required", "required": False, "enrolled": False,
        "enrollment_deadline": None, "days_left": None, "locked": False, "locked_until": None,
        "failures": 0, "bypass": False, "bypass_until": None, "recovery_codes_left": 0,
        "step_offset": 0}
    assert list(world.accounts.view("nobody").as_json()) == FIELDS
    assert world.store.admin.get("nobody") is None  # looking creates no state


def test_list_views_are_the_stored_users_and_the_extra_names_sorted(world: World) -> None:
    world.accounts.require("carol")
    world.accounts.enroll("alice")
    views = world.accounts.list_views(["bob", "alice"])
    assert [(v.username, v.status) for v in views] == [
        ("alice", "enrolled"), ("bob", "not_required"), ("carol", "in_enrollment")]


# -- import ---------------------------------------------------------------------------------

SECRETS = ["JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ",
           "MFRGGZDFMZTWQ2LKNNWG23TPOBYXE43U"]


def test_parse_import_rows(world: World) -> None:
    rows = world.accounts.parse_import(
        "username,secret,required_days\n"
        f"Alice,{SECRETS[0].lower()}\n"
        "\n"
        "# a comment\n"
        f"DOMAIN\\bob,{SECRETS[1]},30\n"
        "carol,,14\n")
    assert rows == [ImportRow("alice", SECRETS[0], None), ImportRow("bob", SECRETS[1], 30),
                    ImportRow("carol", None, 14)]


def test_a_header_only_counts_on_the_first_line(world: World) -> None:
    with pytest.raises(ImportRefused) as e:
        world.accounts.parse_import(f"alice,{SECRETS[0]}\nusername,secret\n")
    assert e.value.problems == ("line 2: not base32",)


def test_import_reports_every_bad_line_and_loads_nothing(world: World) -> None:
    with pytest.raises(ImportRefused) as e:
        world.accounts.import_csv("\n".join([
            f"alice,{SECRETS[0]}",
            "bob,not-base32!",
            f"carol,{SECRETS[1]},0",
            f"dave,{SECRETS[1]},x",
            f"ALICE,{SECRETS[2]}",
            "eve,,",
        ]))
    assert e.value.problems == (
        "line 2: not base32",
        "line 3: required_days must be 1–365, got '0'",
        "line 4: required_days must be 1–365, got 'x'",
        "line 5: 'alice' already on line 1",
        "line 6: no secret and no required_days: nothing to do",
    )
    assert str(e.value) == "5 bad line(s); nothing imported"
    assert world.store.admin.list_users() == []
    assert world.events.seen == []


def test_import_deadlines(world: World) -> None:
    imported = world.accounts.import_csv(f"alice,{SECRETS[0]}\nbob,{SECRETS[1]},30\ncarol,,14\n")
    assert (imported.keys, imported.requirements) == (2, 1)
    deadlines = {r.username: r.enrollment_deadline for r in world.store.admin.list_users()}
    assert deadlines == {"alice": int(T0) + 7 * DAY, "bob": int(T0) + 30 * DAY,
                         "carol": int(T0) + 14 * DAY}
    alice = world.store.admin.get("alice")
    assert alice is not None and alice.totp_key is not None
    assert world.keys.decrypt(alice.totp_key, "alice") == SECRETS[0].encode()
    assert [v.status for v in world.accounts.list_views()] == [
        "enrolled", "enrolled", "in_enrollment"]
    assert world.events.seen == [("imported", ["alice", "bob"],
                                  [("carol", int(T0) + 14 * DAY)])]


# -- keys rotate ----------------------------------------------------------------------------


def test_rotate_keys_re_encrypts_and_reports_damaged_rows(world: World) -> None:
    world.accounts.import_csv(f"alice,{SECRETS[0]}\nbob,{SECRETS[1]}\n")
    good = world.store.admin.get("bob")
    assert good is not None and good.totp_key is not None
    world.store.admin.set_totp_key("carol", good.totp_key, 1)  # bob's ciphertext: not carol's
    rotation = world.accounts.rotate_keys()
    assert (rotation.version, rotation.reencrypted, rotation.changed_meanwhile,
            rotation.undecryptable) == (2, 2, 0, ("carol",))
    for name, plain in (("alice", SECRETS[0]), ("bob", SECRETS[1])):
        record = world.store.admin.get(name)
        assert record is not None and record.totp_key is not None and record.key_version == 2
        assert world.keys.decrypt(record.totp_key, name) == plain.encode()
    assert world.accounts.rotate_keys().version == 3


# -- the key file is opened only when a key is encrypted ------------------------------------


def test_actions_without_a_key_never_open_the_key_ring(world: World) -> None:
    def no_key_file() -> KeyRing:
        raise AssertionError("the key ring was opened")

    accounts = Accounts(world.store, no_key_file, TotpParams(), "Example Corp", 7,
                        UsernameRules(), world.clock)
    accounts.require("alice")
    accounts.extend("alice", 3)
    accounts.reset("alice")
    accounts.unlock("alice")
    accounts.bypass("alice", True)
    accounts.unrequire("alice")
    accounts.view("alice")
    accounts.list_views()
    opened: list[KeyRing] = []

    def key_ring() -> KeyRing:
        opened.append(world.keys)
        return world.keys

    lazy = Accounts(world.store, key_ring, TotpParams(), "Example Corp", 7, UsernameRules(),
                    world.clock)
    lazy.enroll("bob")
    lazy.enroll("carol")
    assert opened == [world.keys]  # once


# -- require a group: never restarts or shortens a period -------------------------------------


def test_require_members_starts_periods_only_for_members_without_one(world: World) -> None:
    world.accounts.require("alice", 30)
    world.accounts.enroll("bob")
    world.accounts.unrequire("bob")
    world.accounts.enroll("carol")
    world.events.seen.clear()
    world.clock.advance(DAY)
    done = world.accounts.require_members(["Alice", "bob", "carol", "dave", "DAVE", ""], 2)
    assert done.period == Period(2, int(T0) + 3 * DAY)
    assert done.newly_required == ("dave",)
    assert done.already_required == ("alice", "carol")
    assert done.skipped == (("bob", SKIPPED_ENROLLED), ("", SKIPPED_BAD_NAME))
    alice = world.store.admin.get("alice")
    assert alice is not None and alice.enrollment_deadline == int(T0) + 30 * DAY
    bob = world.store.admin.get("bob")
    assert bob is not None and not bob.required and bob.enrolled
    assert world.events.seen == [("required", "dave", int(T0) + 3 * DAY)]


def test_require_members_again_changes_nothing(world: World) -> None:
    world.accounts.require_members(["alice", "bob"], 5)
    world.clock.advance(6 * DAY)  # bob's... and alice's periods ran out
    world.events.seen.clear()
    done = world.accounts.require_members(["alice", "bob"], 5, notify=False)
    assert (done.newly_required, done.already_required) == ((), ("alice", "bob"))
    assert [world.accounts.view(n).status for n in ("alice", "bob")] == [
        "enrollment_expired"] * 2
    assert world.events.seen == []


# -- import refusals ----------------------------------------------------------------------------


def test_import_refuses_a_user_who_has_a_key_unless_forced(world: World) -> None:
    world.accounts.enroll("alice", SECRETS[0])
    with pytest.raises(ImportRefused) as e:
        world.accounts.import_csv(f"bob,{SECRETS[1]}\nalice,{SECRETS[2]}\n")
    assert e.value.problems == ("line 2: 'alice' already has a key (replacing it stops the "
                                "authenticator the user has)",)
    assert (e.value.existing_keys, e.value.unknown_users) == (1, 0)
    assert world.store.admin.get("bob") is None
    imported = world.accounts.import_csv(f"bob,{SECRETS[1]}\nalice,{SECRETS[2]}\n", force=True)
    assert (imported.keys, imported.requirements, imported.replaced) == (2, 0, 1)
    alice = world.store.admin.get("alice")
    assert alice is not None and alice.totp_key is not None
    assert world.keys.decrypt(alice.totp_key, "alice") == SECRETS[2].encode()


def test_import_refuses_unknown_users_and_keys_them_by_the_directory_name(
        world: World) -> None:
    directory = {"alice": "alice", "bob": "robert"}

    def resolve(raw: str) -> str | None:
        return directory.get(raw.lower())

    with pytest.raises(ImportRefused) as e:
        world.accounts.import_csv(f"zed,{SECRETS[0]}\nBob,{SECRETS[1]}\nyan,,3\n",
                                  resolve=resolve)
    assert e.value.problems == ("line 1: 'zed': no such user in the directory",
                                "line 3: 'yan': no such user in the directory")
    assert e.value.unknown_users == 2
    imported = world.accounts.import_csv(f"Bob,{SECRETS[1]}\n", resolve=resolve)
    assert imported.keys == 1
    assert [v.username for v in world.accounts.list_views()] == ["robert"]


def test_import_never_restarts_a_running_period(world: World) -> None:
    world.accounts.require("alice", 30)
    imported = world.accounts.import_csv("alice,,3\nbob,,3\n")
    assert (imported.keys, imported.requirements, imported.unchanged) == (0, 1, 1)
    alice = world.store.admin.get("alice")
    assert alice is not None and alice.enrollment_deadline == int(T0) + 30 * DAY
    assert world.events.seen[-1] == ("imported", [], [("bob", int(T0) + 3 * DAY)])


def test_import_refuses_keys_under_128_bits(world: World) -> None:
    with pytest.raises(ImportRefused) as e:
        world.accounts.import_csv("alice,GEZDGNBVGY3TQOJQ\n")
    assert e.value.problems == ("line 1: shorter than 128 bits (80 given; RFC 4226 §4: at "
                                "least 128, 160 recommended)",)
