"""The sender loop ``serve`` runs: every ``poll_seconds``, queue the reminders that
are due, claim due mails from the outbox, send them, mark them.

Where each step runs: the store's work on the state thread (``run_state``),
the directory look-up of the address on the directory's own client
(``lookup``), SMTP in the mail thread pool (``send``): a slow or dead mail
server holds up the mail pool only, never a sign-in. Each mail is claimed
for ``claim_seconds`` under this sender's token (AdminStore.claim_mail): a
mail is sent by one instance; if that instance dies before marking it, the
claim runs out and another instance (or this one, restarted) sends it. So a
mail is sent at least once, and twice only when the sender died (or lost its
claim) after the server accepted it and before the mark was stored.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from backends.base import DirectoryError, Identity
from policy.clock import Clock
from policy.mail import MailContext, MailEvent, render, valid_address, values_for
from policy.schema import QueuedMail
from policy.store import Store
from proxy.mail.config import MailConfig
from proxy.mail.smtp import SendResult, build_message

log = logging.getLogger("mfa_proxy.mail")


class MailEvents(Protocol):
    def sent(self, event: str) -> None: ...

    def failed(self, reason: str) -> None: ...

    def queue(self, pending: int) -> None: ...


class NoMailEvents:
    def sent(self, event: str) -> None:
        pass

    def failed(self, reason: str) -> None:
        pass

    def queue(self, pending: int) -> None:
        pass


class MailSender:
    def __init__(self, config: MailConfig, store: Store, context: MailContext,
                 run_state: Callable[..., Deferred[Any]],
                 lookup: Callable[[str], Deferred[Identity | None]],
                 send: Callable[[str, EmailMessage], Deferred[SendResult]],
                 clock: Clock, events: MailEvents | None = None) -> None:
        self.config, self.store, self.context = config, store, context
        self.run_state, self.lookup, self.send, self.clock = run_state, lookup, send, clock
        self.events: MailEvents = events or NoMailEvents()
        self.token = uuid.uuid4().hex  # this sender's claims
        self._busy = False

    def tick(self) -> Deferred[None]:
        """One round; a round still running (a slow server) is not doubled."""
        if self._busy:
            return defer.succeed(None)
        self._busy = True

        def done(result: Any) -> None:
            self._busy = False
            if isinstance(result, Failure):  # the store is down: the next round tries again
                log.warning("mail round failed: %s", result.getErrorMessage())

        d: Deferred[None] = Deferred.fromCoroutine(self._round())
        return d.addBoth(done)

    async def _round(self) -> None:
        c, store = self.config, self.store
        if c.reminder_hours:
            reminded = await self.run_state(store.admin.queue_reminders, self.clock(),
                                            c.reminder_hours * 3600, MailEvent.REMINDER.value)
            if reminded:
                log.info("%d reminder mail(s) queued", len(reminded))
        while True:
            claimed: list[QueuedMail] = await self.run_state(
                store.admin.claim_mail, self.clock(), c.claim_seconds, self.token, c.batch)
            for mail in claimed:
                await self._deliver(mail)
            if len(claimed) < c.batch:
                break
        self.events.queue(await self.run_state(store.admin.pending_mail_count))

    async def _deliver(self, mail: QueuedMail) -> None:
        try:
            await self._deliver_one(mail)
        except DirectoryError as e:
            await self._failed(mail, "directory", f"directory: {e}", permanent=False)
        except Exception as e:  # one bad row must not stop the others
            log.exception("mail %d (%s for %s): %s", mail.id, mail.event, mail.username, e)
            await self._failed(mail, "error", f"{type(e).__name__}: {e}", permanent=False)

    async def _deliver_one(self, mail: QueuedMail) -> None:
        if mail.event == MailEvent.REMINDER and not await self._still_due(mail):
            await self._finish(mail, "cancelled", "no longer due: enrolled, or a new period")
            return
        identity = await self.lookup(mail.username)
        if identity is None:
            await self._failed(mail, "unknown_user", "not in the directory", permanent=True)
            return
        address = identity.mail
        if not address:
            await self._failed(mail, "no_address", "the directory entry has no mail address",
                               permanent=True)
            return
        if not valid_address(address):
            await self._failed(mail, "bad_address", "not a usable mail address",
                               permanent=True)
            return
        template = self.context.templates[mail.event]
        rendered = render(template, values_for(mail, mail.username, self.clock(), self.context))
        result = await self.send(address, build_message(self.config, address, rendered))
        if result.ok:
            await self._finish(mail, "sent", None, address)
            self.events.sent(mail.event)
            log.info("mail sent: %s to %s (mail %d): %s", mail.event, mail.username, mail.id,
                     result.reply)
            return
        await self._failed(mail, result.reason, result.reply, result.permanent, address)

    async def _still_due(self, mail: QueuedMail) -> bool:
        record = await self.run_state(self.store.admin.get, mail.username)
        return bool(record is not None and record.required and not record.enrolled
                    and record.enrollment_deadline == mail.deadline
                    and (mail.deadline or 0) > self.clock())

    async def _failed(self, mail: QueuedMail, reason: str, why: str, permanent: bool,
                      address: str | None = None) -> None:
        self.events.failed(reason)
        now = self.clock()
        retry_at = None if permanent else self.config.retry.next_attempt(mail, now)
        if retry_at is None:
            gave_up = "" if permanent else f"gave up after {mail.attempts} attempt(s): "
            log.warning("mail not sent: %s to %s (mail %d): %s%s", mail.event, mail.username,
                        mail.id, gave_up, why)
            if not permanent:
                self.events.failed("gave_up")
            await self._finish(mail, "failed", f"{gave_up}{why}", address)
            return
        log.warning("mail not sent yet: %s to %s (mail %d, attempt %d): %s; next try in %d s",
                    mail.event, mail.username, mail.id, mail.attempts, why, retry_at - int(now))
        await self.run_state(self.store.admin.retry_mail, mail.id, self.token, retry_at, why,
                             address)

    async def _finish(self, mail: QueuedMail, status: str, why: str | None,
                      address: str | None = None) -> None:
        await self.run_state(self.store.admin.finish_mail, mail.id, self.token, status,
                             self.clock(), why, address)
