"""Mail to users: which change causes which mail, what it says, and when a
failed send is tried again. No SMTP and no Twisted here (proxy/mail does the
sending); this is the rule, the same for every front-end.

The mails (PRODUCT.md, "Mail events"):

- ``required``: MFA is required, with the deadline and the days left (an
  admin's ``user require``, not with ``--no-mail``);
- ``reminder``: ``reminder_hours`` before the deadline, once per period, only
  while the user has no key (queued by the sender's scan, see
  :meth:`policy.admin_store.AdminStore.queue_reminders`);
- ``extended`` / ``reset``: an admin extended or reset the period: the new
  deadline;
- ``enrolled`` / ``user_reset``: a security notice when a new key becomes
  active: set up by the user in the portal or by an admin (``enrolled``), or
  replacing an older key the user had (``user_reset``): when, from where, and
  what to do if it was not them.

:class:`OutboxMail` rows are written by :class:`OutboxEvents`, the
:class:`policy.account_events.AccountEvents` listener, inside the transaction of the
change (``Accounts`` opens it): a change is never stored without its mail,
nor a mail without its change.
"""

from __future__ import annotations

import datetime as dt
import enum
import html
import json
import math
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from policy.account_events import NoAccountEvents
from policy.clock import Clock
from policy.escaping import escape_controls

if TYPE_CHECKING:  # the config loader reads templates without loading SQLAlchemy
    from policy.schema import QueuedMail
    from policy.store import Store

DAY = 86400


class MailEvent(enum.StrEnum):
    REQUIRED = "required"
    REMINDER = "reminder"
    EXTENDED = "extended"
    RESET = "reset"
    ENROLLED = "enrolled"
    USER_RESET = "user_reset"
    TEST = "test"  # `mfa-proxy mail test`: never queued


# The events that tell of a deadline (their mails give it as a date and in days).
DEADLINE_EVENTS = frozenset({MailEvent.REQUIRED, MailEvent.REMINDER, MailEvent.EXTENDED,
                             MailEvent.RESET})
# What a template may use, and for which events each is filled in.
PLACEHOLDERS = ("username", "deadline", "days", "public_url", "issuer", "when", "source")


class OutboxEvents(NoAccountEvents):
    """:class:`policy.account_events.AccountEvents` → mails in the outbox, in the change's
    transaction.

    ``origin``: where admin actions come from, for the security notice ("the
    command line on host …"). ``reminder_seconds``: a period that already ends
    within the reminder time when its mail is queued gets no separate reminder
    (its own mail gives the deadline)."""

    def __init__(self, store: Store, clock: Clock = time.time, reminder_seconds: int = 0,
                 origin: str = "") -> None:
        self.store, self.clock = store, clock
        self.reminder_seconds = reminder_seconds
        self.origin = origin

    def _queue(self, event: MailEvent, username: str, deadline: int | None = None,
               **detail: Any) -> None:
        from policy.schema import OutboxMail

        self.store.admin.enqueue_mail([OutboxMail(event.value, username, deadline,
                                                  json.dumps(detail, sort_keys=True))])
        if deadline is not None and deadline - self.clock() <= self.reminder_seconds:
            self.store.admin.mark_reminded(username, deadline)

    def required(self, username: str, deadline: int, notify: bool = True) -> None:
        if notify:
            self._queue(MailEvent.REQUIRED, username, deadline)

    def reset(self, username: str, deadline: int) -> None:
        self._queue(MailEvent.RESET, username, deadline)

    def extended(self, username: str, deadline: int) -> None:
        self._queue(MailEvent.EXTENDED, username, deadline)

    def enrolled(self, username: str) -> None:
        self._queue(MailEvent.ENROLLED, username, at=int(self.clock()), by="admin",
                    source=self.origin)

    def setup_confirmed(self, username: str, replaced: bool, source: str = "") -> None:
        self._queue(MailEvent.USER_RESET if replaced else MailEvent.ENROLLED, username,
                    at=int(self.clock()), by="user", source=source)

    def imported(self, enrolled: Sequence[str], required: Sequence[tuple[str, int]]) -> None:
        """A bulk import sends nothing: it is how keys are migrated from another
        system, and its users were told by that system."""


def valid_address(address: str) -> bool:
    """A plain ``local@domain`` mail address, as a directory holds one: nothing that
    could end a header or name a second recipient (spaces, controls, ``<>,;"``)."""
    local, at, domain = address.rpartition("@")
    bad = set(' <>,;"()[]\\')
    return bool(at and local and domain and "@" not in local and len(address) <= 320
                and not any(c in bad or ord(c) < 0x20 or ord(c) == 0x7F for c in address))


# -- what a mail says -------------------------------------------------------------------


class TemplateError(ValueError):
    """A template that cannot be used; ``str()`` names the file and the problem."""


@dataclass(frozen=True)
class Template:
    """One mail's text: ``Subject: …``, a blank line, then the body (and, when the
    operator gives one, an HTML body). ``$name`` placeholders (PLACEHOLDERS); a
    line that uses ``$public_url`` is left out when no public URL is set."""

    name: str
    subject: str
    body: str
    html: str | None = None

    @classmethod
    def parse(cls, name: str, text: str, html_text: str | None = None) -> Template:
        head, sep, body = text.replace("\r\n", "\n").partition("\n\n")
        if not sep or not head.lower().startswith("subject:") or "\n" in head:
            raise TemplateError(f"{name}: must start with one line `Subject: …`, "
                                "then a blank line, then the body")
        template = cls(name, head[len("subject:"):].strip(), body, html_text)
        template.check()
        return template

    def check(self) -> None:
        """Every placeholder known (a typo is found by check-config, not by a user)."""
        for part, text in (("subject", self.subject), ("body", self.body),
                           ("html", self.html or "")):
            for match in string.Template.pattern.finditer(text):
                name = match.group("named") or match.group("braced")
                if match.group("invalid") is not None:
                    raise TemplateError(f"{self.name}: {part}: a lone $ (write $$ for a "
                                        "dollar sign)")
                if name is not None and name not in PLACEHOLDERS:
                    raise TemplateError(f"{self.name}: {part}: unknown placeholder ${name} "
                                        f"(known: {', '.join('$' + p for p in PLACEHOLDERS)})")


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str | None = None


@dataclass(frozen=True)
class MailContext:
    """What every mail may say: the product's name and the portal's URL."""

    issuer: str = "mfa-proxy"
    public_url: str = ""
    templates: Mapping[str, Template] = field(default_factory=dict)


def values_for(mail: QueuedMail | None, username: str, now: float,
               context: MailContext) -> dict[str, str]:
    """The placeholders' values for ``mail`` sent at ``now``: the deadline as a
    date (UTC) and in whole days left, rounded up (as ``user show`` counts them)."""
    detail: dict[str, Any] = json.loads(mail.detail) if mail is not None else {}
    deadline = mail.deadline if mail is not None else None
    at = detail.get("at")
    source = str(detail.get("source") or "")
    if detail.get("by") == "user":
        source = f"the self-service portal, from {source}" if source else \
            "the self-service portal"
    return {
        "username": escape_controls(username),
        "deadline": _date(deadline) if deadline is not None else "",
        "days": str(max(0, math.ceil((deadline - now) / DAY))) if deadline is not None else "",
        "public_url": context.public_url,
        "issuer": context.issuer,
        "when": _moment(at) if isinstance(at, int) else _moment(now),
        "source": escape_controls(source or "an administrator"),
    }


def render(template: Template, values: Mapping[str, str]) -> Rendered:
    def fill(text: str, escape: bool = False) -> str:
        lines = text.split("\n")
        if not values.get("public_url"):
            lines = [line for line in lines
                     if "$public_url" not in line and "${public_url}" not in line]
        given = {k: html.escape(v) for k, v in values.items()} if escape else values
        return string.Template("\n".join(lines)).safe_substitute(given)

    subject = " ".join(fill(template.subject).split())  # one line, whatever a value held
    return Rendered(subject, fill(template.body),
                    fill(template.html, escape=True) if template.html else None)


def _date(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def _moment(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- when to try again -------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """A failed send is tried again after ``first_seconds``, then twice as long
    each time (at most ``max_seconds`` apart), until ``give_up_seconds`` after
    the mail was queued."""

    first_seconds: int = 60
    max_seconds: int = 3600
    give_up_seconds: int = 2 * DAY

    def next_attempt(self, mail: QueuedMail, now: float) -> int | None:
        """When to try ``mail`` again after its ``attempts``-th attempt failed at
        ``now``; None: give up (it is too old)."""
        if now - mail.created_at >= self.give_up_seconds:
            return None
        delay = min(self.max_seconds,
                    self.first_seconds << min(30, max(0, mail.attempts - 1)))
        return int(now) + max(1, delay)
