"""The decision, the same for every protocol, in named phases:

1. **resolve** the name (or LDAP bind DN) to its directory entry, with the
   service account: the entry is the MFA identity, and its own name (not
   the typed one) keys every piece of state. No entry, no state.
2. **gate**: one attempt at a time per identity in this process, so each
   sees the counters the previous one left (a burst of guesses cannot all
   reach the directory before the lock).
3. **begin**: the identity's lock and MFA state, before its password is
   tried; the one reading of the password field (password, code).
4. **password**: the directory binds as the entry -- or, through
   :meth:`Authenticator.start`, the front-end does (the LDAP front-end's own
   upstream bind is the check): it gets a :class:`PasswordCheck` and hands the
   directory's verdict back with :meth:`PasswordCheck.finish`.
5. **decide**: code, counters, audit -- on the state as it is then, the
   accept conditional on the identity not being locked.

The entry's groups are searched (with phase 1) only when a rule for the
request uses them: the resource's (``AuthRequest.needs_groups``) or
``[policy] require_groups`` (:class:`GroupRequirement`). A member of such a
group who is not required yet is treated as required from ``begin`` on, and
once the password is right the requirement is stored (one conditional write,
with its mail) before ``decide``.

:class:`PolicyEngine` holds phases 1, 3 and 5 as plain synchronous steps
(an injected clock, no reactor); :class:`Authenticator` runs them around
the asynchronous directory, the state steps on the state thread.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import re
import threading
import time
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from backends.base import (
    AsyncDirectory,
    DirectoryError,
    DirectoryUnavailable,
    Identity,
    InvalidCredentials,
    group_key,
    group_names,
)
from policy import recovery
from policy.account_events import AccountEvents, NoAccountEvents
from policy.clock import Clock
from policy.decision import (
    AuthRequest,
    Decision,
    MfaMode,
    Outcome,
    Reason,
    SplitMode,
    new_request_id,
)
from policy.escaping import escape_controls
from policy.keys import KeyRing
from policy.schema import DAY, LOCKED_FOREVER, AuditRecord, UserRecord
from policy.store import Store
from policy.totp import TotpParams, match_step
from policy.usernames import MAX_USERNAME, InvalidUsername, UsernameRules

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

log = logging.getLogger("mfa_proxy.policy")


@dataclass(frozen=True)
class Limits:
    max_failures: int = 5
    lockout_seconds: int = 900


@dataclass(frozen=True)
class GroupRequirement:
    """``[policy] require_groups``: a member of one of these groups (a name or a
    full DN, matched like a reply rule's group: :func:`backends.base.group_names`)
    who is not required yet is required at sign-in, with an enrollment period of
    ``enrollment_days`` from then. Leaving the group changes nothing stored."""

    groups: tuple[str, ...] = ()
    enrollment_days: int = 7
    _keys: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_keys", frozenset(k for k in map(group_key, self.groups) if k))

    def __bool__(self) -> bool:
        return bool(self._keys)

    def covers(self, identity: Identity) -> bool:
        return bool(self._keys) and not self._keys.isdisjoint(group_names(identity.groups))


class EngineEvents(Protocol):
    def lockout(self) -> None: ...

    def directory(self, seconds: float, error: str | None) -> None: ...

    def state_error(self, operation: str) -> None: ...


class NoEvents:
    def lockout(self) -> None:
        pass

    def directory(self, seconds: float, error: str | None) -> None:
        pass

    def state_error(self, operation: str) -> None:
        pass


@dataclass(slots=True)  # per request: see policy/decision.py on frozen
class Prepared:
    """What ``begin`` learned: which entry, its state, and how to read the password field."""

    request: AuthRequest
    username: str  # canonical: the entry's own name, normalised
    identity: Identity
    record: UserRecord
    password: str
    code: str | None
    needs_code: bool
    # A member of a require_groups group not required yet: ``record`` is as if
    # required; the requirement is stored once the password is right.
    joins_group: bool = False
    # begin(..., ahead=True): whether the second factor checks out as far as the
    # state can tell before the password (with a right one, decide would accept),
    # and the code's time step, matched then once for both (``step_matched``).
    second_factor_ok: bool = True
    step: int | None = None
    step_matched: bool = False


# What a user is told (RADIUS Reply-Message, LDAP diagnostic), built here so every
# front-end says the same. A wrong password and a wrong or missing code read the
# same (a guesser learns nothing about the password); each text starts with the
# words the LDAP contract gives its diagnostics ("invalid credentials", "locked",
# "enrollment expired"), so a client that matches them still does.
# The one log line per decision, for every front-end and every reject path (the
# RADIUS front-end's own rejects, before the core, use it too).
DECISION_LINE = ("decision user=%s protocol=%s client=%s source=%s result=%s reason=%s "
                 "latency_ms=%s request_id=%s")

CREDENTIALS = "invalid credentials: wrong password or verification code"
MESSAGES = {
    Reason.BAD_PASSWORD: CREDENTIALS,
    Reason.BAD_CODE: CREDENTIALS,
    Reason.MISSING_CODE: CREDENTIALS,
    Reason.UNKNOWN_USER: CREDENTIALS,
    Reason.INVALID_USERNAME: CREDENTIALS,
    # Only after the right password (and a code that was right once): says what to do.
    Reason.REPLAYED_CODE: ("invalid credentials: that verification code was used already; "
                           "wait for the next one"),
    Reason.ENROLLMENT_EXPIRED: ("enrollment expired: the period to set up MFA is over; "
                                "contact your administrator"),
    Reason.CODE_NEEDED: "Enter your verification code",
    Reason.DIRECTORY_UNAVAILABLE: "directory unavailable: try again in a moment",
}
NOT_ENROLLED = "invalid credentials: MFA is required here and you have not set it up"
LOCKED = "locked after too many failed attempts"


def lockout_message(locked_until: float | None) -> str:
    """The locked account's text: until when (ISO 8601, UTC), or until an admin acts."""
    if locked_until is None:
        return LOCKED
    if locked_until >= LOCKED_FOREVER:
        return f"{LOCKED}, until an administrator unlocks it"
    return f"{LOCKED}, until {iso_time(locked_until)}"


def iso_time(ts: float) -> str:
    """``2026-01-31T09:15:00Z``: how times are shown to users and in the logs."""
    return datetime.fromtimestamp(int(ts), UTC).isoformat().replace("+00:00", "Z")


def how_to_set_up(url: str = "", help_text: str = "") -> str:
    """Where to set MFA up: the portal's public URL when there is one, else the
    configured ``[policy] enrollment_help`` text ("" when neither is set)."""
    return f": {url}" if url else (f". {help_text}" if help_text else "")


def enrollment_message(days: int, url: str = "", help_text: str = "") -> str:
    """The notice a user in an enrollment period gets on an accept (RADIUS
    Reply-Message, LDAP diagnostic); it ends with where to set MFA up."""
    unit = "day" if days == 1 else "days"
    return f"Set up MFA: {days} {unit} left in your enrollment period" + how_to_set_up(
        url, help_text)


def split_password(typed: str, split: SplitMode, separator: str,
                   digits: int) -> tuple[str, str | None]:
    """One interpretation of a password field: (password, code or None).

    A code is taken only from the end, only when it is exactly ``digits``
    digits, or a recovery code in its printed form ``xxxx-xxxx-xx``
    (policy/recovery.py; without a separator: the last 12 characters); the
    directory is never asked twice with two readings.
    """
    if split is SplitMode.CHALLENGE:
        return typed, None
    if separator:
        password, sep, code = typed.rpartition(separator)
        if sep and ((len(code) == digits and code.isdigit() and code.isascii())
                    or recovery.is_printed(code)):
            return password, code
        return typed, None
    code = typed[-digits:]
    if len(typed) > digits and code.isdigit() and code.isascii():
        return typed[:-digits], code
    code = typed[-recovery.PRINTED_LENGTH:]
    if len(typed) > recovery.PRINTED_LENGTH and recovery.is_printed(code):
        return typed[:-recovery.PRINTED_LENGTH], code
    return typed, None


class UnknownNames:
    """Failure counts for names that resolve to no entry: in memory, bounded.

    An unknown name creates no state, yet it must read like a real account to
    a guesser: after as many wrong passwords it is answered "locked" too.
    """

    def __init__(self, limits: Limits, max_names: int = 10_000) -> None:
        self.limits = limits
        self.max_names = max_names
        self._names: OrderedDict[str, tuple[int, float | None]] = OrderedDict()
        self._lock = threading.Lock()

    def attempt(self, name: str, now: float) -> tuple[bool, float | None]:
        """Count one attempt: (was already locked, locked until)."""
        with self._lock:
            failures, until = self._names.pop(name, (0, None))
            if until is not None and until > now:
                self._names[name] = (failures, until)
                return True, until
            failures = 1 if until is not None else failures + 1
            until = None
            if self.limits.max_failures and failures >= self.limits.max_failures:
                seconds = self.limits.lockout_seconds
                until = float(LOCKED_FOREVER) if seconds == 0 else now + seconds
            self._names[name] = (failures, until)
            while len(self._names) > self.max_names:
                self._names.popitem(last=False)
            return False, until


class PolicyEngine:
    """The synchronous steps of a decision, each a unit of state work.

    ``begin`` (the entry's lock and state, the split of the password field) runs
    before the password is tried; ``decide`` (password verdict, code,
    counters) after. Both key everything by the entry's canonical name.
    """

    def __init__(self, store: Store, keys: KeyRing, totp: TotpParams, limits: Limits,
                 usernames: UsernameRules, clock: Clock = time.time,
                 events: EngineEvents | None = None, repeat_key: bytes = b"",
                 repeat_windows: bool = True, log_accepts: bool = True,
                 enrollment_url: str = "", enrollment_help: str = "",
                 recovery_codes: bool = True, group_requirement: GroupRequirement | None = None,
                 account_events: AccountEvents | None = None) -> None:
        self.store, self.keys, self.totp, self.limits = store, keys, totp, limits
        # [policy] recovery_codes: False refuses every recovery code (a bad code).
        self.recovery_codes = recovery_codes
        self._recovery_key: bytes | None = None
        self.group_requirement = group_requirement or GroupRequirement()
        # Told of a requirement a sign-in starts (the 'required' mail), as an
        # admin's `user require` tells it (policy/admin.py).
        self.account_events = account_events or NoAccountEvents()
        # The portal's public URL: the enrollment notices end with it.
        self.enrollment_url = enrollment_url
        # Where to set MFA up when there is no portal ([policy] enrollment_help).
        self.enrollment_help = enrollment_help
        self.usernames, self.clock = usernames, clock
        self.events = events or NoEvents()
        self.repeat_key = repeat_key or hashlib.sha256(b"mfa-proxy repeat").digest()
        self.audit = AuditQueue(store)
        self.unknown_names = UnknownNames(limits)
        # False when no resource has a repeat window: failures then skip clearing
        # a repeat cache that is always empty (one write less per failure).
        self.repeat_windows = repeat_windows
        # Every decision is in the audit table; a log line per accept costs about a
        # tenth of a busy proxy's CPU, so it is optional ([logging] decisions).
        self.log_accepts = log_accepts

    # -- phase 1: the name (no state, no directory) ----------------------------------

    def lookup_name(self, request: AuthRequest) -> str:
        """The name to look the entry up by (InvalidUsername: refuse)."""
        return self.usernames.lookup_form(request.username)

    def canonical(self, identity: Identity) -> str:
        """The state key of an entry (InvalidUsername: treat as unknown)."""
        return self.usernames.canonical(identity.username)

    def needs_groups(self, request: AuthRequest) -> bool:
        """Whether a rule for this request uses the entry's groups (else the
        directory is not asked to search them)."""
        return request.needs_groups or bool(self.group_requirement)

    def refuse(self, request: AuthRequest, name: str, reason: Reason) -> Decision:
        """A reject that touches no state: the attempt never reached an entry."""
        return self._finish(request, name, Outcome.REJECT, reason)

    def unknown(self, request: AuthRequest, name: str) -> Decision:
        """No such entry: no state, but the same answer a real account would get."""
        locked, until = self.unknown_names.attempt(_unknown_key(name), self.clock())
        if locked:
            return self._finish(request, name, Outcome.REJECT, Reason.UNKNOWN_USER,
                                message=lockout_message(until),
                                public_reason=Reason.LOCKED_OUT, locked_until=until)
        if until is not None:  # this attempt locked it, as the same on an account would
            return self._finish(request, name, Outcome.REJECT, Reason.UNKNOWN_USER,
                                message=lockout_message(until),
                                public_reason=Reason.BAD_PASSWORD, locked_until=until)
        return self._finish(request, name, Outcome.REJECT, Reason.UNKNOWN_USER,
                            public_reason=Reason.BAD_PASSWORD)

    # -- phase 2: the entry's state, before its password is tried ---------------------

    def begin(self, request: AuthRequest, identity: Identity, username: str,
              ahead: bool = False) -> Prepared | Decision:
        """Refuse a locked identity before the directory sees its password (no
        password oracle, no burning the directory's own lockout); read the password field.

        ``ahead``: the password check will bind a session the caller then uses
        (the LDAP front-end's own upstream session), so the second factor is
        checked first, without using anything up (``Prepared.second_factor_ok``):
        such a session is bound only when both factors check out."""
        record = self.store.hot.get(username) or UserRecord(username)
        if record.locked(self.clock()):
            return self._finish(request, username, Outcome.REJECT, Reason.LOCKED_OUT,
                                locked_until=record.locked_until)
        joins_group = not record.required and self.group_requirement.covers(identity)
        if joins_group:
            record = replace(record, required=True,
                             enrollment_deadline=self._group_deadline(self.clock()))
        needs_code = self._needs_code(record, request.mfa, self.clock())
        password, code = request.password, request.code
        if needs_code and code is None:
            password, code = split_password(request.password, request.split, request.separator,
                                          self.totp.digits)
        if not password and request.verified_identity is None:
            # Never sent to a directory (it would bind anonymously), never counted.
            return self._finish(request, username, Outcome.REJECT, Reason.EMPTY_PASSWORD)
        prepared = Prepared(request, username, identity, record, password, code, needs_code,
                            joins_group)
        if ahead:
            prepared.second_factor_ok = self._second_factor_holds(prepared, self.clock())
        return prepared

    def begin_and_decide(self, request: AuthRequest, identity: Identity, username: str
                         ) -> Prepared | Decision:
        """A challenge's second round (the password was checked in the first, so no
        directory call sits between the two): ``begin`` and ``decide`` as one unit of
        state work, one trip to the state thread. A Prepared back when a group
        requirement must be stored first (it has its own transaction)."""
        prepared = self.begin(request, identity, username)
        if isinstance(prepared, Decision) or prepared.joins_group:
            return prepared
        return self.decide(prepared, identity)

    @staticmethod
    def _needs_code(record: UserRecord, mfa: MfaMode, now: float) -> bool:
        if mfa is MfaMode.OFF or record.bypassed(now) or not record.enrolled:
            return False
        return record.required or mfa is MfaMode.STRICT

    def _group_deadline(self, now: float) -> int:
        return int(now) + self.group_requirement.enrollment_days * DAY

    def join_group(self, p: Prepared) -> None:
        """The requirement of a require_groups member whose password was right
        (``p.joins_group``): stored unless someone stored one meanwhile (another
        instance, an admin), with the 'required' notice in the same transaction
        (none for a user who has a key already); ``p.record`` is then the state
        as stored. Not inside a group of hot-path steps: it writes through the
        admin store (:meth:`AdminStore.transaction`), which refuses to run in one."""
        deadline = self._group_deadline(self.clock())
        with self.store.admin.transaction():
            started = self.store.admin.require_new(p.username, deadline)
            if started:
                self.account_events.required(p.username, deadline,
                                             notify=not p.record.enrolled)
        if started:
            log.info("require_groups: user=%s is a member of a required group: MFA required, "
                     "enrollment period of %d day(s) from now", p.username,
                     self.group_requirement.enrollment_days,
                     extra={"event": "group_requirement"})
        p.record = self.store.hot.get(p.username) or p.record
        p.joins_group = False

    # -- phase 3: after the password -------------------------------------------------

    def decide(self, p: Prepared, verdict: Identity | DirectoryError) -> Decision:
        """Every accept and challenge on the state as it is now, not as ``begin``
        saw it: a lock that came meanwhile (another instance) wins. A code is
        accepted by one ``UPDATE … WHERE not locked``; the other accepts and the
        challenge read the lock again first (:meth:`_locked_now`)."""
        now = self.clock()
        if isinstance(verdict, DirectoryUnavailable):
            return self._finish(p.request, p.username, Outcome.REJECT,
                                Reason.DIRECTORY_UNAVAILABLE)
        if isinstance(verdict, DirectoryError):
            # The entry exists: a refused password counts on it, whatever the
            # directory called it (a stale cached entry included).
            return self._failure(p, Reason.BAD_PASSWORD)
        return self._second_factor(p, verdict, now)

    def _locked_now(self, p: Prepared) -> Decision | None:
        """LOCKED_OUT when the identity got locked since ``begin`` (p.record is
        then the state as it is now)."""
        current = self.store.hot.get(p.username)
        if current is not None:
            p.record = current
            if current.locked(self.clock()):
                return self._finish(p.request, p.username, Outcome.REJECT, Reason.LOCKED_OUT,
                                    locked_until=current.locked_until)
        return None

    @staticmethod
    def _second_factor_rule(p: Prepared, now: float) -> Reason:
        """What decides once the password is right: CODE_NEEDED (the code does),
        a password-only accept (MFA_OFF, BYPASS, IN_ENROLLMENT, NOT_REQUIRED) or a
        refusal (ENROLLMENT_EXPIRED, NOT_ENROLLED)."""
        rec, mfa = p.record, p.request.mfa
        if mfa is MfaMode.OFF:
            return Reason.MFA_OFF
        if rec.bypassed(now):
            return Reason.BYPASS
        if p.needs_code:
            return Reason.CODE_NEEDED
        status = rec.status(now)
        if status == "enrollment_expired":
            return Reason.ENROLLMENT_EXPIRED
        if mfa is MfaMode.STRICT:
            return Reason.NOT_ENROLLED
        if status == "in_enrollment":
            return Reason.IN_ENROLLMENT
        return Reason.NOT_REQUIRED

    def _second_factor(self, p: Prepared, identity: Identity, now: float) -> Decision:
        rule = self._second_factor_rule(p, now)
        if rule is Reason.CODE_NEEDED:
            return self._check_code(p, identity, now)
        if rule in _REFUSING_RULES:
            return self._finish(p.request, p.username, Outcome.REJECT, rule, identity)
        if rule is Reason.IN_ENROLLMENT:
            return self._success(p, identity, rule, p.record.days_left(now))
        return self._success(p, identity, rule)

    def _second_factor_holds(self, p: Prepared, now: float) -> bool:
        """Before the password: would a right one be accepted? A read of what
        :meth:`_second_factor` would use -- nothing is used up, no failure
        counted (decide does that once the password is checked). A challenge is
        not an accept."""
        rule = self._second_factor_rule(p, now)
        if rule is not Reason.CODE_NEEDED:
            return rule not in _REFUSING_RULES
        if p.code is None:
            return False
        recovery_code = recovery.normalize(p.code)
        if recovery_code is not None:
            return bool(self.recovery_codes) and self.store.hot.holds_recovery_code(
                p.username, recovery.digest(self.recovery_key, p.username, recovery_code))
        p.step, p.step_matched = self._match_step(p, p.code, now), True
        if p.step is not None and (p.record.last_step is None or p.step > p.record.last_step):
            return True
        return self._is_repeat(p, now)

    def _match_step(self, p: Prepared, code: str, now: float) -> int | None:
        assert p.record.totp_key is not None
        key = self.keys.decrypt(p.record.totp_key, p.username).decode()
        # A resynchronised user's codes are looked for around their own clock;
        # the step found is absolute, and so is the replay marker.
        return match_step(key, code, now + p.record.step_offset * self.totp.period, self.totp)

    def _check_code(self, p: Prepared, identity: Identity, now: float) -> Decision:
        if p.code is None:
            if p.request.split is SplitMode.APPEND:
                return self._failure(p, Reason.MISSING_CODE, identity)
            return self._locked_now(p) or self._finish(
                p.request, p.username, Outcome.NEED_CODE, Reason.CODE_NEEDED, identity)
        recovery_code = recovery.normalize(p.code)
        if recovery_code is not None:  # never a TOTP code: no time step, no replay marker
            return self._use_recovery_code(p, identity, recovery_code, now)
        step = p.step if p.step_matched else self._match_step(p, p.code, now)
        if step is None:
            return self._failure(p, Reason.BAD_CODE, identity)
        # Conditional on the identity not being locked, atomically.
        if self.store.hot.accept_step(p.username, step, now):
            self._remember_success(p, now)
            return self._accepted(p, identity, Reason.OK)
        # (Not for a check made without the caller's session: begin found no repeat,
        # and one that came meanwhile from another instance must not accept it.)
        if p.second_factor_ok and self._is_repeat(p, now):
            return self._accepted(p, identity, Reason.REPEAT)
        return self._locked_now(p) or self._failure(p, Reason.REPLAYED_CODE, identity)

    def _use_recovery_code(self, p: Prepared, identity: Identity, code: str,
                           now: float) -> Decision:
        """One use of a recovery code, conditional on the identity not being locked
        (one ``DELETE … WHERE``); a wrong one is a bad code. Never remembered for
        a repeat window: it is single-use."""
        if self.recovery_codes:
            digest = recovery.digest(self.recovery_key, p.username, code)
            if self.store.hot.use_recovery_code(p.username, digest, now):
                return self._accepted(p, identity, Reason.RECOVERY_CODE)
            locked = self._locked_now(p)
            if locked is not None:
                return locked
        return self._failure(p, Reason.BAD_CODE, identity)

    @property
    def recovery_key(self) -> bytes:
        if self._recovery_key is None:
            self._recovery_key = self.keys.derive(recovery.KEY_PURPOSE)
        return self._recovery_key

    # -- idempotent success (opt-in per client) -------------------------------------

    def _repeat_digest(self, p: Prepared) -> bytes:
        material = "\x00".join((p.request.protocol, p.request.client, p.request.source,
                                p.username, p.password, p.code or ""))
        return hmac.new(self.repeat_key, material.encode("utf-8", "surrogateescape"),
                        hashlib.sha256).digest()

    def _remember_success(self, p: Prepared, now: float) -> None:
        window = p.request.repeat_window_seconds
        if window > 0:
            self.store.hot.repeat_put(self._repeat_digest(p), p.username, now + window)

    def _is_repeat(self, p: Prepared, now: float) -> bool:
        return (p.request.repeat_window_seconds > 0
                and self.store.hot.repeat_hit(self._repeat_digest(p), now))

    # -- outcomes --------------------------------------------------------------------

    def _success(self, p: Prepared, identity: Identity, reason: Reason,
                 days_left: int | None = None) -> Decision:
        """A password-only accept: not if locked meanwhile; clears the failures,
        atomically conditional on the identity not being locked."""
        locked = self._locked_now(p)
        if locked is not None:
            return locked
        if ((p.record.failures or p.record.locked_until is not None)
                and not self.store.hot.record_success(p.username, self.clock())):
            current = self.store.hot.get(p.username)
            if current is not None and current.locked(self.clock()):
                return self._finish(p.request, p.username, Outcome.REJECT, Reason.LOCKED_OUT,
                                    locked_until=current.locked_until)
        return self._accepted(p, identity, reason, days_left)

    def _accepted(self, p: Prepared, identity: Identity, reason: Reason,
                  days_left: int | None = None) -> Decision:
        return self._finish(p.request, p.username, Outcome.ACCEPT, reason, identity,
                            days_left=days_left)

    def _failure(self, p: Prepared, reason: Reason, identity: Identity | None = None) -> Decision:
        result = self.store.hot.record_failure(p.username, self.clock(), self.limits.max_failures,
                                               self.limits.lockout_seconds)
        if self.repeat_windows:
            self.store.hot.repeat_forget(p.username)
        if result.lockout_started:
            self.events.lockout()
            log.warning("lockout user=%s failures=%d until=%s request_id=%s", p.username,
                        result.failures, "admin-unlock" if result.locked_until is None
                        or result.locked_until >= LOCKED_FOREVER
                        else iso_time(result.locked_until), p.request.request_id or "-")
        return self._finish(p.request, p.username, Outcome.REJECT, reason, identity,
                            lockout_started=result.lockout_started,
                            locked_until=result.locked_until)

    def _finish(self, request: AuthRequest, username: str, outcome: Outcome, reason: Reason,
                identity: Identity | None = None, days_left: int | None = None,
                lockout_started: bool = False, locked_until: float | None = None,
                message: str | None = None, public_reason: Reason | None = None) -> Decision:
        if message is None:
            message = self._message(reason, days_left, lockout_started, locked_until)
        name = escape_controls(username[:MAX_USERNAME])  # typed names of nobody included
        decision = Decision(outcome, reason, name, identity, days_left, message,
                            lockout_started, locked_until, public_reason)
        latency_ms = ((time.monotonic() - request.received_at) * 1000.0
                      if request.received_at else None)
        self.audit.add(AuditRecord(self.clock(), name, request.protocol, request.client,
                                   request.source, outcome.value, reason.value, latency_ms))
        if outcome is not Outcome.ACCEPT or self.log_accepts:
            log.info(DECISION_LINE, name, request.protocol, request.client, request.source,
                     outcome.value, reason.value,
                     "-" if latency_ms is None else f"{latency_ms:.1f}",
                     request.request_id or "-")
        return decision

    def _message(self, reason: Reason, days_left: int | None, lockout_started: bool,
                 locked_until: float | None) -> str:
        if days_left is not None:
            return enrollment_message(days_left, self.enrollment_url, self.enrollment_help)
        if lockout_started or reason is Reason.LOCKED_OUT:
            return lockout_message(locked_until)
        if reason is Reason.NOT_ENROLLED:
            return NOT_ENROLLED + how_to_set_up(self.enrollment_url, self.enrollment_help)
        return MESSAGES.get(reason, "")

    def fail_closed(self, request: AuthRequest, reason: Reason) -> Decision:
        """A decision when the engine itself could not run (state store down, a bug)."""
        return Decision(Outcome.REJECT, reason, escape_controls(request.username[:MAX_USERNAME]))


# Second-factor rules that refuse a right password.
_REFUSING_RULES = frozenset({Reason.ENROLLMENT_EXPIRED, Reason.NOT_ENROLLED})


class AuditQueue:
    """Audit rows are written in batches, off the request path."""

    def __init__(self, store: Store, max_pending: int = 100_000) -> None:
        self.store = store
        self.max_pending = max_pending
        self._pending: list[AuditRecord] = []
        self._lock = threading.Lock()
        self.dropped = 0
        self._reported = 0

    def take_dropped(self) -> int:
        """Rows dropped since the last call (for the metric)."""
        with self._lock:
            new, self._reported = self.dropped - self._reported, self.dropped
        return new

    def add(self, record: AuditRecord) -> None:
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self.dropped += 1  # the store is down: keep deciding, say so in the log
                return
            self._pending.append(record)

    def flush(self) -> int:
        with self._lock:
            batch, self._pending = self._pending, []
        try:
            self.store.hot.audit(batch)
        except Exception:
            with self._lock:
                self._pending = batch + self._pending
            raise
        return len(batch)


class IdentityGate:
    """One attempt at a time per identity; the others wait their turn, in order.

    Without it, fifty guesses sent at once all read "not locked" and all
    reach the directory before the first failure is counted. At most
    ``max_waiting`` wait per identity; beyond that an attempt is refused.
    Reactor thread only.
    """

    def __init__(self, max_waiting: int = 32) -> None:
        self.max_waiting = max_waiting
        self._waiting: dict[str, deque[Callable[[], None]]] = {}

    def enter(self, key: str, proceed: Callable[[], None]) -> bool:
        """Run ``proceed`` now, or once the attempts before it have left; False
        when too many wait already (``proceed`` then never runs)."""
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = deque()
            proceed()
            return True
        if len(waiting) >= self.max_waiting:
            return False
        waiting.append(proceed)
        return True

    def leave(self, key: str) -> None:
        waiting = self._waiting.get(key)
        if not waiting:
            self._waiting.pop(key, None)
            return
        waiting.popleft()()

    def __len__(self) -> int:
        return len(self._waiting)


class LatencyMimic:
    """How long a wrong password for a real entry takes to answer, lately.

    An unknown name needs no state and no bind, so it would be answered
    sooner: it waits about as long (an exponential average with jitter),
    and a guesser cannot tell which names exist by the clock.
    """

    def __init__(self, initial: float = 0.002, weight: float = 0.1, cap: float = 2.0) -> None:
        self.average, self.weight, self.cap = initial, weight, cap

    def observe(self, seconds: float) -> None:
        self.average += self.weight * (min(seconds, self.cap) - self.average)

    def delay(self) -> float:
        return self.average * random.uniform(0.85, 1.15)  # noqa: S311 (not a secret)


class Authenticator:
    """The reactor-facing entry point: ``authenticate(request) -> Deferred[Decision]``.

    Every front-end calls it the same way, but one that checks the password
    itself (the LDAP front-end: its upstream session bind) calls
    ``start(request)`` and finishes the :class:`PasswordCheck` it may get. The
    directory is asynchronous;
    the engine's state steps run in ``run_blocking`` (the state thread);
    anything unexpected becomes a reject. ``call_later`` (the reactor's)
    delays the answers to unknown names. ``run_alone``: the state thread for
    a step that must not share a transaction with others (the requirement a
    group brings, written with its mail; default ``run_blocking``).
    """

    def __init__(self, engine: PolicyEngine, directory: AsyncDirectory,
                 run_blocking: Callable[..., Deferred[Any]], clock: Clock = time.time,
                 call_later: Callable[..., Any] | None = None,
                 run_alone: Callable[..., Deferred[Any]] | None = None) -> None:
        self.engine, self.directory, self.clock = engine, directory, clock
        self.run_blocking = run_blocking
        self.run_alone = run_alone or run_blocking
        self.call_later = call_later
        self.gate = IdentityGate()
        self.mimic = LatencyMimic()

    def authenticate(self, request: AuthRequest) -> Deferred[Decision]:
        from twisted.internet.defer import Deferred

        result: Deferred[Decision] = Deferred()
        if not request.received_at:
            request.received_at = time.monotonic()
        if not request.request_id:
            request.request_id = new_request_id()
        _SignIn(self, request, result).resolve()
        return result

    def start(self, request: AuthRequest) -> Deferred[Decision | PasswordCheck]:
        """Phases 1 to 3 as :meth:`authenticate` runs them; where the core would
        check the password, a :class:`PasswordCheck` for the caller to make
        (the identity's turn at the gate is held until it ends). A decision
        that needs no password check (unknown, locked, empty password, ...)
        comes as it is."""
        from twisted.internet.defer import Deferred

        result: Deferred[Decision | PasswordCheck] = Deferred()
        if not request.received_at:
            request.received_at = time.monotonic()
        if not request.request_id:
            request.request_id = new_request_id()
        _SignIn(self, request, result, hands_over=True).resolve()
        return result


# :meth:`Authenticator.start` as a front-end is given it.
StartSignIn = Callable[[AuthRequest], "Deferred[Decision | PasswordCheck]"]


class PasswordCheck:
    """The password check of a started sign-in, made by its front-end: bind as
    ``identity.dn`` with ``password`` (the password part of the field), then
    exactly one of :meth:`finish` (the directory's verdict) or :meth:`abandon`
    (no verdict: a timeout, the connection gone) -- or, when ``binds_session``
    is False, :meth:`check_here` instead of the bind and finish. Until then the
    identity's turn at the gate is held: the next attempt for it waits.

    ``binds_session``: the second factor checked out (``begin`` looked, without
    using it up), so a bind that passes may stand as the user's session. When
    it is False the attempt fails whatever the password (a wrong, missing or
    used code, an expired enrollment): a session must not be bound on it, and
    :meth:`check_here` has the core check the password on its own connection
    and decide -- one bind, the same answer and count as the session's would
    have been."""

    __slots__ = ("_checked_at", "_sign_in", "binds_session", "decided", "identity", "password")

    def __init__(self, sign_in: _SignIn, identity: Identity, password: str,
                 checked_at: float, binds_session: bool = True) -> None:
        self._sign_in: _SignIn | None = sign_in
        self.identity, self.password, self._checked_at = identity, password, checked_at
        self.binds_session = binds_session
        # The decision, once finish's or abandon's comes (finish returns it). Callbacks
        # added here must return what they are given.
        self.decided: Deferred[Decision] = sign_in.result

    @property
    def ended(self) -> bool:
        return self._sign_in is None

    def finish(self, verdict: Identity | DirectoryError) -> Deferred[Decision]:
        """The directory's verdict (the entry: the password is right;
        InvalidCredentials: it is not, counted; DirectoryUnavailable: no answer,
        not counted) and the rest of the sign-in: groups, code, counters, audit."""
        sign_in = self._end()
        if isinstance(verdict, Identity):
            sign_in._password_ok(verdict, self._checked_at)
        elif isinstance(verdict, InvalidCredentials) and self.identity.from_cache:
            sign_in._refused_from_cache(verdict, self._checked_at)
        else:
            sign_in._password_refused(verdict, self._checked_at)
        return self.decided

    def check_here(self) -> Deferred[Decision]:
        """The core checks the password itself (its own directory connection) and
        decides: for a check that must not bind the caller's session."""
        self._end()._check_password(self._checked_at)
        return self.decided

    def abandon(self, reason: Reason = Reason.DIRECTORY_UNAVAILABLE) -> None:
        """No verdict will come: the attempt ends as a reject for ``reason``
        (by default audited like a directory outage), nothing counted on the
        identity, and its turn is given back. Nothing once the check has ended."""
        sign_in, self._sign_in = self._sign_in, None
        if sign_in is not None:
            sign_in._abandoned(reason)

    def _end(self) -> _SignIn:
        sign_in, self._sign_in = self._sign_in, None
        if sign_in is None:
            raise RuntimeError("this password check has ended already")
        return sign_in


class _SignIn:
    """One request through the phases; each method hands on to the next.

    One result Deferred, none returned from a callback: this runs for every
    request, and Deferreds chained inside callbacks cost more than the steps
    they join. Every path ends in :meth:`_done`, exactly once, which lets
    the next attempt for the identity through the gate.
    """

    __slots__ = ("auth", "engine", "gated", "hands_over", "identity", "name", "prepared",
                 "request", "result", "started", "username")

    def __init__(self, auth: Authenticator, request: AuthRequest,
                 result: Deferred[Any], hands_over: bool = False) -> None:
        self.auth, self.engine, self.request, self.result = auth, auth.engine, request, result
        # Authenticator.start: the password check is the caller's (a PasswordCheck).
        self.hands_over = hands_over
        self.name = request.username
        self.username = ""  # canonical, once resolved
        self.identity: Identity | None = None
        self.prepared: Prepared | None = None
        self.gated = False
        self.started = 0.0

    # -- 1. resolve ---------------------------------------------------------------

    def resolve(self) -> None:
        request = self.request
        if request.verified_identity is not None:  # a challenge's second round
            self._resolved(request.verified_identity)
            return
        if not request.password:
            self._done(self.engine.refuse(request, request.username, Reason.EMPTY_PASSWORD))
            return
        self.started = self.auth.clock()
        try:
            if request.bind_dn is not None:
                self.name = request.bind_dn
                found = self.auth.directory.lookup_dn(request.bind_dn)
            else:
                self.name = self.engine.lookup_name(request)
                found = self.auth.directory.lookup(self.name)
        except InvalidUsername:
            self._done(self.engine.refuse(request, request.username, Reason.INVALID_USERNAME))
            return
        except Exception as e:  # a directory that raises instead of failing its Deferred
            self._lookup_failed(e)
            return
        found.addCallbacks(self._found, self._lookup_failed_async)

    def _found(self, identity: Identity | None) -> None:
        self._timed(None)
        if (identity is not None and not identity.groups_complete
                and self.engine.needs_groups(self.request)):
            self._with_groups(identity, self._resolved)
            return
        self._run(self._resolved, identity)

    def _lookup_failed_async(self, failure: Any) -> None:
        self._lookup_failed(failure.value)

    def _lookup_failed(self, error: BaseException) -> None:
        reason = _directory_error(error)
        self._timed(reason.reason)
        self._done(self.engine.refuse(self.request, self.name, Reason.DIRECTORY_UNAVAILABLE))

    def _resolved(self, identity: Identity | None) -> None:
        if identity is not None:
            try:
                self.username = self.engine.canonical(identity)
            except InvalidUsername:
                identity = None
        if identity is None:
            self._unknown()
            return
        self.identity = identity
        # -- 2. the gate
        if not self.auth.gate.enter(self.username, self._begin):
            self._done(self.engine.refuse(self.request, self.username, Reason.BUSY))

    def _unknown(self) -> None:
        decision = self.engine.unknown(self.request, self.name)
        later = self.auth.call_later
        if later is None:
            self._done(decision)
        else:
            later(self.auth.mimic.delay(), self._done, decision)

    # -- 3. begin -----------------------------------------------------------------

    def _begin(self) -> None:
        self.gated = True
        identity = self.identity
        assert identity is not None
        self.started = self.auth.clock()
        if (self.request.verified_identity is not None
                and (identity.groups_complete or not self.engine.needs_groups(self.request))):
            # Nothing for the directory to do: the state read and the code check in one hop.
            self._step("begin", self.engine.begin_and_decide, self._begun, self.request,
                       identity, self.username)
            return
        self._step("begin", self.engine.begin, self._begun, self.request, identity,
                   self.username, self.hands_over)

    def _begun(self, prepared: Prepared | Decision) -> None:
        if isinstance(prepared, Decision):
            self._done(prepared)
            return
        self.prepared = prepared
        if self.request.verified_identity is not None:
            self._verified(self.request.verified_identity)
            return
        # -- 4. the password
        assert self.identity is not None
        checked_at = self.auth.clock()
        if self.hands_over:
            self._hand_over(prepared, checked_at)
            return
        self._check_password(checked_at)

    def _check_password(self, checked_at: float) -> None:
        """The core's own password check (a bind on its directory connection)."""
        assert self.identity is not None and self.prepared is not None
        try:
            d = self.auth.directory.check_password(self.identity, self.prepared.password)
        except Exception as e:
            self._decide(_directory_error(e))
            return
        d.addCallbacks(self._password_ok, self._password_failed, callbackArgs=(checked_at,),
                       errbackArgs=(checked_at,))

    def _password_ok(self, identity: Identity, checked_at: float) -> None:
        self.auth.engine.events.directory(self.auth.clock() - checked_at, None)
        self._run(self._verified, identity)

    def _verified(self, identity: Identity) -> None:
        """The password is right: the groups of an entry the bind refreshed (a
        stale cached one) when a rule needs them, the requirement a group brings,
        then decide."""
        assert self.prepared is not None
        if not identity.groups_complete and self.engine.needs_groups(self.request):
            self._with_groups(identity, self._verified)
        elif self.prepared.joins_group:
            self._join_group(identity)
        else:
            self._decide(identity)

    def _join_group(self, identity: Identity) -> None:
        try:
            d = self.auth.run_alone(self.engine.join_group, self.prepared)
        except Exception:
            from twisted.python.failure import Failure

            self._failed(Failure(), "group requirement")  # type: ignore[no-untyped-call]
            return
        d.addCallbacks(self._continue, self._failed,
                       callbackArgs=(lambda _: self._decide(identity),),
                       errbackArgs=("group requirement",))

    # -- the groups, only when a rule for the request uses them --------------------

    def _with_groups(self, identity: Identity, then: Callable[[Identity], None]) -> None:
        """``then(the identity with every group)``; a group search that fails is a
        reject (directory_unavailable), never a decision on groups missing."""
        started = self.auth.clock()
        try:
            d = self.auth.directory.groups(identity)
        except Exception as e:  # a directory that raises instead of failing its Deferred
            self._groups_failed(e, started)
            return
        d.addCallbacks(self._groups_found, self._groups_failed_async,
                       callbackArgs=(then, started), errbackArgs=(started,))

    def _groups_found(self, identity: Identity, then: Callable[[Identity], None],
                      started: float) -> None:
        if not identity.groups_complete:  # a directory that broke its promise
            self._groups_failed(DirectoryUnavailable("groups not read"), started)
            return
        self.engine.events.directory(self.auth.clock() - started, None)
        self._run(then, identity)

    def _groups_failed_async(self, failure: Any, started: float) -> None:
        self._groups_failed(failure.value, started)

    def _groups_failed(self, error: BaseException, started: float) -> None:
        reason = _directory_error(error)
        self.engine.events.directory(self.auth.clock() - started, reason.reason)
        self._done(self.engine.refuse(self.request, self.username or self.name,
                                      Reason.DIRECTORY_UNAVAILABLE))

    def _password_failed(self, failure: Any, checked_at: float) -> None:
        self._password_refused(failure.value, checked_at)

    def _password_refused(self, error: BaseException, checked_at: float) -> None:
        error = _directory_error(error)
        reason = error.reason if isinstance(error, DirectoryUnavailable) else None
        self.auth.engine.events.directory(self.auth.clock() - checked_at, reason)
        self._run(self._decide, error)

    # -- 4'. the password, checked by the caller of Authenticator.start -----------

    def _hand_over(self, prepared: Prepared, checked_at: float) -> None:
        """Fire start's Deferred with the check; the decision goes to a new one."""
        from twisted.internet.defer import Deferred

        assert self.identity is not None
        started, self.result = self.result, Deferred()
        check = PasswordCheck(self, self.identity, prepared.password, checked_at,
                              binds_session=prepared.second_factor_ok)
        if started.called:  # cancelled: nobody will make the check
            check.abandon()
            return
        started.callback(check)

    def _abandoned(self, reason: Reason) -> None:
        self._done(self.engine.refuse(self.request, self.username, reason))

    def _refused_from_cache(self, refused: InvalidCredentials, checked_at: float) -> None:
        """The caller's bind refused an entry the look-up cache gave: it may be
        stale (deleted, renamed, moved since). It is looked up again, and only
        the same entry found again makes this a wrong password (counted); an
        entry gone or moved was nobody's (answered as an unknown name). The
        core's own check does the same in the directory (and binds again there)."""
        clock, events = self.auth.clock, self.engine.events
        events.directory(clock() - checked_at, None)
        identity, directory, request = self.identity, self.auth.directory, self.request
        assert identity is not None
        asked = clock()

        def failed(error: BaseException) -> None:
            events.directory(clock() - asked, _directory_error(error).reason)
            self._done(self.engine.refuse(request, self.username, Reason.DIRECTORY_UNAVAILABLE))

        def found_again(fresh: Identity | None) -> None:
            events.directory(clock() - asked, None)
            self._looked_again(fresh, refused)

        try:
            directory.forget(self.name)
            directory.forget(identity.username)
            if request.bind_dn is not None:
                found = directory.lookup_dn(request.bind_dn)
            else:
                found = directory.lookup(self.name)
        except Exception as e:  # a directory that raises instead of failing its Deferred
            failed(e)
            return
        found.addCallbacks(self._continue, lambda f: failed(f.value),
                           callbackArgs=(found_again,))

    def _looked_again(self, fresh: Identity | None, refused: InvalidCredentials) -> None:
        identity = self.identity
        assert identity is not None
        if (fresh is not None and fresh.dn == identity.dn
                and self.engine.canonical(fresh) == self.username):
            self._decide(refused)
        else:
            self._unknown()

    # -- 5. decide ----------------------------------------------------------------

    def _decide(self, verdict: Identity | DirectoryError) -> None:
        assert self.prepared is not None
        if isinstance(verdict, InvalidCredentials):
            self._step("decide", self.engine.decide, self._decided_failure, self.prepared,
                       verdict)
        else:
            self._step("decide", self.engine.decide, self._done, self.prepared, verdict)

    def _decided_failure(self, decision: Decision) -> None:
        # What a wrong password costs a real entry: unknown names wait as long.
        self.auth.mimic.observe(self.auth.clock() - self.started)
        self._done(decision)

    # -- plumbing -----------------------------------------------------------------

    def _step(self, name: str, f: Callable[..., Any], then: Callable[[Any], None],
              *args: Any) -> None:
        """``f(*args)`` on the state thread, then ``then(result)`` (or a reject)."""
        try:
            d = self.auth.run_blocking(f, *args)
        except Exception:
            from twisted.python.failure import Failure

            self._failed(Failure(), name)  # type: ignore[no-untyped-call]
            return
        d.addCallbacks(self._continue, self._failed, callbackArgs=(then,),
                       errbackArgs=(name,))

    def _continue(self, value: Any, then: Callable[[Any], None]) -> None:
        self._run(then, value)

    def _run(self, then: Callable[[Any], None], value: Any) -> None:
        try:
            then(value)
        except Exception:  # a bug: still one answer, a reject
            from twisted.python.failure import Failure

            self._failed(Failure(), "decision")  # type: ignore[no-untyped-call]

    def _failed(self, failure: Any, step: str) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        from policy.schema import StoreError

        if isinstance(failure.value, SQLAlchemyError | StoreError):
            self.engine.events.state_error(step)
            log.error("state store failed during %s: %s", step, type(failure.value).__name__)
        else:
            log.error("unexpected error during %s: %s", step, failure.getTraceback())
        self._done(self.engine.fail_closed(self.request, Reason.STATE_UNAVAILABLE))

    def _timed(self, error: str | None) -> None:
        self.engine.events.directory(self.auth.clock() - self.started, error)

    def _done(self, decision: Decision) -> None:
        if self.gated:
            self.gated = False
            self.auth.gate.leave(self.username)
        if not self.result.called:
            self.result.callback(decision)


_DN_SPACES = re.compile(r"\s*([=,+;])\s*")


def _unknown_key(name: str) -> str:
    """One counter for the plain spellings of one unknown name or DN (case, spaces
    around separators), as a real entry has one for all of its spellings."""
    return _DN_SPACES.sub(r"\1", unicodedata.normalize("NFKC", name).casefold().strip())


def _directory_error(error: BaseException) -> DirectoryError:
    if isinstance(error, DirectoryError):
        return error
    log.error("directory call raised %s: %s", type(error).__name__, error)
    return DirectoryUnavailable(str(error))
