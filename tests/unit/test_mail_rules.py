"""The mail rules (policy/mail.py) on a real SQLite Store with a fake clock:
which admin or portal change queues which mail (in the change's transaction),
the reminder scan, what a mail says, and when a failed send is tried again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyotp
import pytest

from policy.admin import Accounts
from policy.keys import KeyRing
from policy.mail import (
    MailContext,
    MailEvent,
    OutboxEvents,
    RetryPolicy,
    Template,
    TemplateError,
    render,
    values_for,
)
from policy.schema import QueuedMail
from policy.store import Store
from policy.totp import TotpParams
from policy.usernames import UsernameRules
from tests.clock import ManualClock

DAY = 86400
T0 = 1_700_000_010.0  # 2023-11-14T22:13:30Z


@dataclass
class World:
    accounts: Accounts
    store: Store
    clock: ManualClock

    def queued(self) -> list[tuple[str, str, int | None]]:
        return [(m.event, m.username, m.deadline) for m in self.store.admin.mail_queue()]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = ManualClock(T0)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}", clock)
    store.upgrade()
    events = OutboxEvents(store, clock, reminder_seconds=DAY, origin="the command line")
    accounts = Accounts(store, KeyRing(tmp_path / "secret.key"), TotpParams(), "Example Corp",
                        7, UsernameRules(), clock, events)
    yield World(accounts, store, clock)
    store.close()


# -- which change queues which mail -------------------------------------------------------


def test_admin_changes_queue_their_mail(world: World) -> None:
    d7 = int(T0) + 7 * DAY
    world.accounts.require("alice")
    world.accounts.require("bob", notify=False)  # --no-mail
    world.accounts.extend("alice", 3)
    world.accounts.reset("alice", 5)
    world.accounts.unlock("alice")
    world.accounts.bypass("alice", True)
    assert world.queued() == [("required", "alice", d7), ("extended", "alice", int(T0) + 3 * DAY),
                              ("reset", "alice", int(T0) + 5 * DAY)]


def test_enroll_by_an_admin_is_a_security_notice_from_the_command_line(world: World) -> None:
    world.accounts.enroll("alice")
    [mail] = world.store.admin.mail_queue()
    assert (mail.event, mail.deadline) == ("enrolled", None)
    assert json.loads(mail.detail) == {"at": int(T0), "by": "admin",
                                       "source": "the command line"}


def test_a_key_set_up_in_the_portal_is_a_notice_with_the_client_address(world: World) -> None:
    world.accounts.require("alice")
    first = world.accounts.start_setup("alice")
    assert world.accounts.confirm_setup("alice", pyotp.TOTP(first.totp_key).at(T0),
                                        "10.0.0.9").confirmed
    world.clock.t += 60
    second = world.accounts.start_setup("alice")  # a reset by the user
    assert world.accounts.confirm_setup("alice", pyotp.TOTP(second.totp_key).at(world.clock()),
                                        "10.0.0.10").confirmed
    events = [(m.event, json.loads(m.detail).get("source")) for m in world.store.admin.mail_queue()]
    assert events == [("required", None), ("enrolled", "10.0.0.9"),
                      ("user_reset", "10.0.0.10")]


def test_a_wrong_setup_code_queues_nothing(world: World) -> None:
    world.accounts.start_setup("alice")
    assert not world.accounts.confirm_setup("alice", "000000", "10.0.0.9").confirmed
    assert world.queued() == []


def test_a_listener_that_fails_undoes_the_change(world: World, tmp_path: Path) -> None:
    class Broken(OutboxEvents):
        def required(self, username: str, deadline: int, notify: bool = True) -> None:
            super().required(username, deadline, notify)
            raise RuntimeError("the mail could not be queued")

    accounts = Accounts(world.store, KeyRing(tmp_path / "secret.key"), TotpParams(), "X", 7,
                        UsernameRules(), world.clock, Broken(world.store, world.clock))
    with pytest.raises(RuntimeError):
        accounts.require("alice")
    assert world.store.admin.get("alice") is None and world.queued() == []


# -- reminders ----------------------------------------------------------------------------


def test_one_reminder_a_day_before_the_deadline_and_only_without_a_key(world: World) -> None:
    world.accounts.require("alice", 7)
    world.accounts.require("bob", 7)
    world.accounts.enroll("bob", force=True)
    deadline = int(T0) + 7 * DAY
    assert world.store.admin.queue_reminders(T0 + 5 * DAY, DAY) == []
    assert world.store.admin.queue_reminders(T0 + 6 * DAY + 1, DAY) == [("alice", deadline)]
    assert world.store.admin.queue_reminders(T0 + 6 * DAY + 3600, DAY) == []
    assert [e for e, *_ in world.queued()] == ["required", "required", "enrolled", "reminder"]


def test_a_period_that_starts_inside_the_reminder_time_gets_no_second_mail(
        world: World) -> None:
    world.accounts.require("alice", 1)  # its invitation already says "1 day"
    world.accounts.require("bob", 1, notify=False)  # no invitation: the reminder is the mail
    assert world.store.admin.queue_reminders(T0 + 60, DAY) == [("bob", int(T0) + DAY)]
    assert [(e, u) for e, u, _ in world.queued()] == [("required", "alice"), ("reminder", "bob")]


# -- what a mail says ---------------------------------------------------------------------

TEMPLATE = """Subject: MFA for $username by $deadline

Hello $username, $days days left (until $deadline).
Set it up at $public_url
Regards, $issuer
"""


def queued(event: str, deadline: int | None, detail: str = "{}") -> QueuedMail:
    return QueuedMail(1, event, "alice", deadline, detail, int(T0), "pending", int(T0), 1,
                      None, None, "t", None)


def test_a_mail_names_the_user_the_deadline_as_a_date_and_in_days_and_the_link() -> None:
    context = MailContext("Example Corp", "https://mfa.example.org/")
    template = Template.parse("required.txt", TEMPLATE)
    mail = queued("required", int(T0) + 7 * DAY)
    out = render(template, values_for(mail, "alice", T0 + 1, context))
    assert out.subject == "MFA for alice by 2023-11-21"
    assert out.text == ("Hello alice, 7 days left (until 2023-11-21).\n"
                        "Set it up at https://mfa.example.org/\nRegards, Example Corp\n")
    # counted when sent: two days later, 5 days are left
    later = render(template, values_for(mail, "alice", T0 + 2 * DAY, context))
    assert "5 days left" in later.text


def test_without_a_public_url_its_lines_are_left_out() -> None:
    out = render(Template.parse("required.txt", TEMPLATE),
                 values_for(queued("required", int(T0) + DAY), "alice", T0, MailContext()))
    assert "Set it up" not in out.text and "1 days left" in out.text


def test_the_security_notice_says_when_and_from_where() -> None:
    t = Template.parse("enrolled.txt", "Subject: New key for $username\n\n$when from $source\n")
    detail = json.dumps({"at": int(T0), "by": "user", "source": "10.0.0.9"})
    out = render(t, values_for(queued("enrolled", None, detail), "alice", T0 + 5,
                               MailContext()))
    assert out.text == "2023-11-14 22:13 UTC from the self-service portal, from 10.0.0.9\n"


def test_a_value_cannot_add_a_header_line() -> None:
    t = Template.parse("x.txt", "Subject: for $username\n\nbody\n")
    out = render(t, {"username": "alice\nBcc: eve@example.org"})
    assert "\n" not in out.subject


@pytest.mark.parametrize(("text", "why"), [
    ("no subject line\n\nbody", "must start with one line `Subject: …`"),
    ("Subject: x\nbody", "must start with one line"),
    ("Subject: $usernme\n\nbody", "unknown placeholder $usernme"),
    ("Subject: x\n\ncosts $ 5", "a lone $"),
])
def test_bad_templates_are_refused_naming_the_problem(text: str, why: str) -> None:
    with pytest.raises(TemplateError, match=why.replace("$", r"\$")):
        Template.parse("required.txt", text)


def test_html_values_are_escaped() -> None:
    t = Template.parse("x.txt", "Subject: s\n\nb\n", "<p>$username</p>")
    out = render(t, {"username": "<b>alice</b>"})
    assert out.html == "<p>&lt;b&gt;alice&lt;/b&gt;</p>"


# -- retries ------------------------------------------------------------------------------


def test_retries_back_off_and_give_up() -> None:
    policy = RetryPolicy(first_seconds=60, max_seconds=600, give_up_seconds=DAY)

    def after(attempts: int, now: float) -> int | None:
        mail = QueuedMail(1, "required", "a", None, "{}", int(T0), "pending", int(T0),
                          attempts, None, None, "t", None)
        return policy.next_attempt(mail, now)

    assert [after(n, T0) - int(T0) for n in (1, 2, 3, 4, 5, 9)] == [  # type: ignore[operator]
        60, 120, 240, 480, 600, 600]
    assert after(3, T0 + DAY) is None


def test_every_event_has_a_name() -> None:
    assert {e.value for e in MailEvent} == {"required", "reminder", "extended", "reset",
                                            "enrolled", "user_reset", "test"}
