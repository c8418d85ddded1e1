"""The sender loop (proxy/mail/sender.py) with a fake clock, a fake directory
and a fake SMTP server, on a real SQLite Store: no thread, no socket (every
Deferred fires at once)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from backends.base import DirectoryUnavailable, Identity
from policy.mail import MailContext, OutboxEvents, RetryPolicy
from policy.store import Store
from proxy.mail.config import MailConfig
from proxy.mail.sender import MailSender
from proxy.mail.smtp import SendResult
from proxy.mail.templates import load_templates
from tests.clock import ManualClock

DAY = 86400
T0 = 1_700_000_000.0


@dataclass
class Fakes:
    addresses: dict[str, str | None] = field(default_factory=dict)
    directory_down: bool = False
    replies: list[SendResult] = field(default_factory=list)  # next sends' results
    sent: list[tuple[str, EmailMessage]] = field(default_factory=list)
    sent_events: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)

    def lookup(self, username: str) -> defer.Deferred[Identity | None]:
        if self.directory_down:
            return defer.fail(DirectoryUnavailable("down"))
        if username not in self.addresses:
            return defer.succeed(None)
        return defer.succeed(Identity(username, mail=self.addresses[username]))

    def send(self, to: str, message: EmailMessage) -> defer.Deferred[SendResult]:
        result = self.replies.pop(0) if self.replies else SendResult(True, "250 ok")
        if result.ok:
            self.sent.append((to, message))
        return defer.succeed(result)

    # MailEvents
    def queue(self, pending: int) -> None:
        self.pending.append(pending)


@dataclass
class World:
    store: Store
    clock: ManualClock
    fakes: Fakes
    sender: MailSender
    events: OutboxEvents

    def tick(self) -> None:
        d = self.sender.tick()
        assert d.called


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = ManualClock(T0)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}", clock)
    store.upgrade()
    fakes = Fakes()
    config = MailConfig("127.0.0.1", 25, "none", from_header="MFA <mfa@example.org>",
                        reminder_hours=24, retry=RetryPolicy(60, 600, DAY), claim_seconds=300)

    class Events:
        def sent(self, event: str) -> None:
            fakes.sent_events.append(event)

        def failed(self, reason: str) -> None:
            fakes.failed.append(reason)

        def queue(self, pending: int) -> None:
            fakes.pending.append(pending)

    sender = MailSender(config, store, MailContext("Example", "https://mfa.example.org/",
                                                   load_templates(None)),
                        lambda f, *a: defer.maybeDeferred(f, *a), fakes.lookup, fakes.send,
                        clock, Events())
    yield World(store, clock, fakes, sender, OutboxEvents(store, clock, DAY))
    store.close()


def require(world: World, user: str, days: int, notify: bool = True) -> None:
    with world.store.admin.transaction():
        deadline = int(world.clock()) + days * DAY
        world.store.admin.require(user, deadline)
        world.events.required(user, deadline, notify)


def test_a_queued_mail_is_sent_once(world: World) -> None:
    world.fakes.addresses["alice"] = "alice@example.org"
    require(world, "alice", 7)
    world.tick()
    world.tick()
    [(to, message)] = world.fakes.sent
    assert to == "alice@example.org" and message["To"] == "alice@example.org"
    assert "alice" in message.get_content() and "7 days" in message.get_content()
    assert "https://mfa.example.org/" in message.get_content()
    assert world.fakes.sent_events == ["required"] and world.fakes.pending[-1] == 0


def test_temporary_failures_back_off_then_succeed(world: World) -> None:
    world.fakes.addresses["alice"] = "alice@example.org"
    world.fakes.replies = [SendResult(False, "421 busy", "temporary"),
                           SendResult(False, "refused", "unreachable")]
    require(world, "alice", 7)
    world.tick()  # attempt 1 fails: next in 60 s
    world.clock.t += 59
    world.tick()
    assert world.fakes.sent == [] and world.fakes.failed == ["temporary"]
    world.clock.t += 1
    world.tick()  # attempt 2 fails: next in 120 s
    world.clock.t += 119
    world.tick()
    assert world.fakes.sent == []
    world.clock.t += 1
    world.tick()
    assert len(world.fakes.sent) == 1 and world.fakes.failed == ["temporary", "unreachable"]
    [row] = world.store.admin.mail_queue(("sent",))
    assert row.attempts == 3


def test_a_mail_that_keeps_failing_is_given_up(world: World) -> None:
    world.fakes.addresses["alice"] = "alice@example.org"
    world.fakes.replies = [SendResult(False, "timeout", "unreachable")] * 100
    require(world, "alice", 7)
    for _ in range(60):  # 30 hours: past the day it may wait
        world.tick()
        world.clock.t += 1800
    [row] = world.store.admin.mail_queue(("failed",))
    assert row.last_error is not None and row.last_error.startswith("gave up after")
    assert "gave_up" in world.fakes.failed and world.fakes.sent == []


def test_a_permanent_refusal_is_not_retried(world: World) -> None:
    world.fakes.addresses["alice"] = "alice@example.org"
    world.fakes.replies = [SendResult(False, "550 no such user", "refused", permanent=True)]
    require(world, "alice", 7)
    world.tick()
    world.clock.t += 3600
    world.tick()
    [row] = world.store.admin.mail_queue(("failed",))
    assert (row.attempts, row.last_error) == (1, "550 no such user")


def test_no_address_no_mail_and_counted(world: World) -> None:
    world.fakes.addresses["bob"] = None
    require(world, "bob", 7)
    world.tick()
    assert world.fakes.sent == [] and world.fakes.failed == ["no_address"]
    [row] = world.store.admin.mail_queue(("failed",))
    assert row.last_error == "the directory entry has no mail address"


def test_a_directory_outage_is_retried(world: World) -> None:
    world.fakes.addresses["alice"] = "alice@example.org"
    world.fakes.directory_down = True
    require(world, "alice", 7)
    world.tick()
    assert world.fakes.failed == ["directory"] and world.store.admin.pending_mail_count() == 1
    world.fakes.directory_down = False
    world.clock.t += 60
    world.tick()
    assert len(world.fakes.sent) == 1


def test_the_reminder_goes_out_once_a_day_before_the_deadline(world: World) -> None:
    world.fakes.addresses.update(alice="alice@example.org", bob="bob@example.org")
    require(world, "alice", 3, notify=False)
    require(world, "bob", 3, notify=False)
    world.clock.t += DAY
    world.tick()
    assert world.fakes.sent == []  # 2 days left: not yet
    world.clock.t += DAY + 60
    world.store.admin.set_totp_key("bob", b"key", 1)  # bob enrolled meanwhile: none for him
    for _ in range(3):
        world.tick()
        world.clock.t += 600
    assert [to for to, _ in world.fakes.sent] == ["alice@example.org"]
    body = world.fakes.sent[0][1].get_content()
    assert "1 day(s)" in body and "alice" in body


def test_a_reminder_that_is_no_longer_true_is_cancelled(world: World) -> None:
    world.fakes.addresses["alice"] = "alice@example.org"
    world.fakes.directory_down = True  # the reminder is queued, not sent
    require(world, "alice", 1, notify=False)
    world.tick()
    world.store.admin.set_totp_key("alice", b"key", 1)  # enrolled before the retry
    world.fakes.directory_down = False
    world.clock.t += 60
    world.tick()
    assert world.fakes.sent == []
    [row] = world.store.admin.mail_queue(("cancelled",))
    assert row.event == "reminder"


def test_a_round_with_the_store_down_is_logged_not_raised(world: World) -> None:
    calls: list[Any] = []

    def broken(f: Any, *a: Any) -> defer.Deferred[Any]:
        calls.append(f)
        return defer.fail(RuntimeError("state store down"))

    world.sender.run_state = broken
    d = world.sender.tick()
    assert d.called and calls  # no error out of the LoopingCall's function
    world.sender.run_state = lambda f, *a: defer.maybeDeferred(f, *a)
    world.tick()  # and the next round runs
