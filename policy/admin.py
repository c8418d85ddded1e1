"""Account administration: the rules behind the admin commands, for every front-end.

``mfa-proxy user …`` and ``keys rotate`` (proxy/cli.py) are one front-end; the
self-service portal and the mail sender will be others, on the same methods.
Each action is one method of :class:`Accounts`: it applies the rule, writes the
state through the :class:`~policy.store.Store`, and then tells ``events``
what changed. The names given are already identities (the front-end resolved
them through the directory: that is not decided here). An action the rules do
not allow raises a :class:`Refusal` whose message is meant for a person;
subclasses carry what a front-end needs to word it its own way (the CLI names
its options, a portal its form fields).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import enum
import functools
import hmac
import io
import json
import math
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from policy import recovery
from policy.account_events import AccountEvents, NoAccountEvents
from policy.clock import Clock
from policy.escaping import escape_controls
from policy.keys import KeyRing
from policy.schema import (
    DAY,
    LOCKED_FOREVER,
    AuditRecord,
    UserFilter,
    UserRecord,
    UserRow,
    days_left,
)
from policy.store import Store
from policy.totp import (
    NotATotpKey,
    TotpParams,
    code_for_step,
    match_step,
    new_totp_key,
    normalize_totp_key,
    provisioning_uri,
)
from policy.usernames import InvalidUsername, UsernameRules

MIN_PERIOD_DAYS, MAX_PERIOD_DAYS = 1, 365
# A key made in the portal and never confirmed stops being usable after this.
PENDING_KEY_SECONDS = 3600
# `user bypass --for`: from a minute to a year.
MIN_BYPASS_SECONDS, MAX_BYPASS_SECONDS = 60, 365 * DAY
# `user resync` looks this far either side of now for the two codes (±20 steps of 30 s).
RESYNC_SECONDS = 600


# -- refusals ---------------------------------------------------------------------------


class Refusal(Exception):
    """An action the rules do not allow (nothing was changed); ``str()`` says why."""


class InvalidPeriod(Refusal):
    def __init__(self, days: int) -> None:
        super().__init__(f"an enrollment period is {MIN_PERIOD_DAYS}–{MAX_PERIOD_DAYS} days, "
                         f"got {days}")
        self.days = days


class InvalidTotpKey(Refusal):
    def __init__(self, reason: str) -> None:
        super().__init__(f"not a usable TOTP key: {reason}")
        self.reason = reason


class AlreadyEnrolled(Refusal):
    """``enroll`` without ``force`` for a user who has a key."""

    def __init__(self, username: str) -> None:
        super().__init__(f"{username} already has a key")
        self.username = username


class ImportRefused(Refusal):
    """Bad lines in an import: nothing was loaded. ``problems``: one line each,
    ``line N: why``, in line order; ``existing_keys`` and ``unknown_users``: how
    many of them a front-end's override would let through (``force``, an import
    without the directory check)."""

    def __init__(self, problems: Sequence[str], existing_keys: int = 0,
                 unknown_users: int = 0) -> None:
        super().__init__(f"{len(problems)} bad line(s); nothing imported")
        self.problems = tuple(problems)
        self.existing_keys, self.unknown_users = existing_keys, unknown_users


class Locked(Refusal):
    """The user is locked out: nothing may change until the lock ends."""

    def __init__(self, username: str) -> None:
        super().__init__(f"{username} is locked")
        self.username = username


class EnrollmentExpired(Refusal):
    """The enrollment period is over: only an admin can reopen it."""

    def __init__(self, username: str) -> None:
        super().__init__(f"the enrollment period of {username} has expired")
        self.username = username


class InvalidBypassDuration(Refusal):
    def __init__(self, seconds: int) -> None:
        super().__init__(f"a bypass lasts from {MIN_BYPASS_SECONDS // 60} minute to "
                         f"{MAX_BYPASS_SECONDS // DAY} days, got {seconds} seconds")
        self.seconds = seconds


class NotEnrolled(Refusal):
    """The action is about the user's TOTP key, and there is none."""

    def __init__(self, username: str, why: str) -> None:
        super().__init__(f"{username} has no TOTP key: {why}")
        self.username = username


class RecoveryCodesOff(Refusal):
    def __init__(self) -> None:
        super().__init__("recovery codes are turned off ([policy] recovery_codes = false)")


class ResyncFailed(Refusal):
    """The two codes are not consecutive codes of the user's key near now."""

    def __init__(self, username: str, minutes: int) -> None:
        super().__init__(f"{username}: the two codes are not two consecutive codes of the "
                         f"user's key within ±{minutes} minutes of now; nothing changed "
                         "(give two codes the app shows one after the other)")
        self.username = username


class NoSuchUser(Refusal):
    def __init__(self, username: str) -> None:
        super().__init__(f"{username}: no MFA state to delete")
        self.username = username


def check_period(days: int) -> int:
    """``days`` when it is a valid enrollment period, else :class:`InvalidPeriod`."""
    if not MIN_PERIOD_DAYS <= days <= MAX_PERIOD_DAYS:
        raise InvalidPeriod(days)
    return days


def check_bypass_seconds(seconds: int) -> int:
    """``seconds`` when it is a valid length for a bypass, else :class:`InvalidBypassDuration`."""
    if not MIN_BYPASS_SECONDS <= seconds <= MAX_BYPASS_SECONDS:
        raise InvalidBypassDuration(seconds)
    return seconds


def parse_totp_key(raw: str) -> str:
    """A TOTP key as people paste it (spaces, lower case, padding) to its base32
    form, or :class:`InvalidTotpKey`."""
    try:
        return normalize_totp_key(raw)
    except NotATotpKey as e:
        raise InvalidTotpKey(str(e)) from None


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """An enrollment period that was just opened: ``days`` from now, ending at
    ``deadline`` (Unix time)."""

    days: int
    deadline: int


@dataclass(frozen=True)
class Enrollment:
    """A key that is active now: ``totp_key`` in base32 and the ``otpauth://`` URI
    an authenticator app scans."""

    username: str
    totp_key: str
    uri: str


class SetupOutcome(enum.StrEnum):
    """How a confirmation of a pending key ended (also the audit row's reason)."""

    CONFIRMED = "setup_confirmed"
    BAD_CODE = "bad_code"
    LOCKED = "locked_out"
    NO_PENDING_KEY = "no_pending_key"


@dataclass(frozen=True)
class Confirmation:
    """``confirm_setup``'s answer; ``lockout_started``: this wrong code locked the user;
    ``recovery_codes``: the new key's recovery codes, made with it (to show once)."""

    outcome: SetupOutcome
    lockout_started: bool = False
    recovery_codes: tuple[str, ...] = ()

    @property
    def confirmed(self) -> bool:
        return self.outcome is SetupOutcome.CONFIRMED


@dataclass(frozen=True)
class StatusView:
    """One user's MFA status: exactly the fields of ``user show --json``, in order."""

    username: str
    status: str
    required: bool
    enrolled: bool
    enrollment_deadline: str | None  # ISO 8601, UTC ("…Z")
    days_left: int | None
    locked: bool
    locked_until: str | None  # ISO 8601; None when not locked or until an admin unlocks
    failures: int
    bypass: bool  # in force now (a bypass --for that ended is off)
    bypass_until: str | None = None  # ISO 8601, when a bypass in force ends by itself
    recovery_codes_left: int = 0
    step_offset: int = 0  # time steps the user's authenticator is ahead (`user resync`)

    def as_json(self) -> dict[str, object]:
        # Not dataclasses.asdict, which deep-copies every value: `user list` makes
        # 10,000 of these.
        return dict(zip(_VIEW_FIELDS, _view_values(self), strict=True))


_VIEW_FIELDS = tuple(f.name for f in dataclasses.fields(StatusView))
_view_values = operator.attrgetter(*_VIEW_FIELDS)


@dataclass(frozen=True)
class RecoveryCodes:
    """New recovery codes (printed form), replacing any older ones."""

    username: str
    codes: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True)
class Resync:
    """``resync``: the user's authenticator runs ``offset_steps`` time steps ahead
    (negative: behind), ``offset_seconds`` in seconds."""

    username: str
    offset_steps: int
    offset_seconds: int


@dataclass(frozen=True)
class ImportRow:
    """One good import line: a key (base32) to load, or only a requirement."""

    username: str
    totp_key: str | None
    days: int | None
    line: int = field(default=0, compare=False)  # in the file, for the refusals


@dataclass(frozen=True)
class Imported:
    """What an import really changed: ``keys`` loaded (``replaced`` of them took
    the place of a key the user had), ``requirements`` added without a key, and
    ``unchanged`` requirement rows for users already required (a running period
    is never restarted by an import)."""

    keys: int
    requirements: int
    replaced: int = 0
    unchanged: int = 0


@dataclass(frozen=True)
class GroupRequirement:
    """``require_members``: who got a new ``period``, who was already required
    (left as they are: a running period is never restarted or shortened), and
    who was skipped, with why (an unusable name, a key without a requirement)."""

    period: Period
    newly_required: tuple[str, ...]
    already_required: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


_UNKNOWN = ": no such user in the directory"

# Why a member was skipped by ``require_members`` (GroupRequirement.skipped).
SKIPPED_ENROLLED = "enrolled, not required"
SKIPPED_BAD_NAME = "not a usable username"


@dataclass(frozen=True)
class Rotation:
    """``rotate_keys``: keys re-encrypted under ``version``, keys re-enrolled by
    someone meanwhile (left to them), and users whose stored key could not be
    decrypted (left as they are)."""

    version: int
    reencrypted: int
    changed_meanwhile: int
    undecryptable: tuple[str, ...]


# -- the service ---------------------------------------------------------------------------


class Accounts:
    """The admin actions on users' MFA state, one method each.

    ``keys`` may be a function that opens the key ring: it is called the first
    time a key is encrypted, so actions that need no key (``view``, ``unlock``
    …) work without the key file.
    """

    def __init__(self, store: Store, keys: KeyRing | Callable[[], KeyRing],
                 totp: TotpParams, issuer: str, enrollment_days: int,
                 usernames: UsernameRules, clock: Clock = time.time,
                 events: AccountEvents | None = None, max_failures: int = 5,
                 lockout_seconds: int = 900,
                 pending_key_seconds: int = PENDING_KEY_SECONDS,
                 recovery_codes: bool = True) -> None:
        self.store = store
        # [policy] recovery_codes: False makes none (and the core accepts none).
        self.recovery_codes = recovery_codes
        # The same limits as the sign-in core: a wrong set-up code is a failure too.
        self.max_failures, self.lockout_seconds = max_failures, lockout_seconds
        self.pending_key_seconds = pending_key_seconds
        self._keys = keys
        self.totp = totp
        self.issuer = issuer
        self.enrollment_days = check_period(enrollment_days)
        self.usernames = usernames
        self.clock = clock
        self.events: AccountEvents = events if events is not None else NoAccountEvents()

    @property
    def keys(self) -> KeyRing:
        if not isinstance(self._keys, KeyRing):
            self._keys = self._keys()
        return self._keys

    def period(self, days: int | None = None) -> Period:
        """A period of ``days`` (default: the configured enrollment days) from now."""
        n = self.enrollment_days if days is None else check_period(days)
        return Period(n, int(self.clock()) + n * DAY)

    # -- actions ----------------------------------------------------------------------

    def require(self, username: str, days: int | None = None,
                notify: bool = True) -> Period | None:
        """Require MFA with a new enrollment period (restarting a running one).
        None: the user is already required and enrolled, and nothing changed.
        ``notify`` False: no invitation (``--no-mail``)."""
        period = self.period(days)
        record = self.store.admin.get(username)
        if record is not None and record.required and record.enrolled:
            return None
        with self.store.admin.transaction():
            self.store.admin.require(username, period.deadline)
            self.events.required(username, period.deadline, notify=notify)
        return period

    def require_members(self, members: Iterable[str], days: int | None = None,
                        notify: bool = True) -> GroupRequirement:
        """Require MFA for every member of a group (the entries' own names, as the
        directory lists them) who has no requirement yet, each with a new period;
        one transaction. Safe to run again (nightly): a member already required
        keeps the period it has (running, or expired), and an enrolled member
        without a requirement is left alone (skipped: ``require`` one by one)."""
        period = self.period(days)
        new: list[str] = []
        already: list[str] = []
        skipped: list[tuple[str, str]] = []
        seen: set[str] = set()
        for member in members:
            try:
                name = self.usernames.canonical(member)
            except InvalidUsername:
                skipped.append((escape_controls(member), SKIPPED_BAD_NAME))
                continue
            if name in seen:
                continue
            seen.add(name)
            record = self.store.admin.get(name)
            if record is not None and record.required:
                already.append(name)
            elif record is not None and record.enrolled:
                skipped.append((name, SKIPPED_ENROLLED))
            else:
                new.append(name)
        with self.store.admin.transaction():
            for name in new:
                self.store.admin.require(name, period.deadline)
                self.events.required(name, period.deadline, notify=notify)
        return GroupRequirement(period, tuple(new), tuple(already), tuple(skipped))

    def enroll(self, username: str, totp_key: str | None = None,
               force: bool = False) -> Enrollment:
        """Make a key (or import ``totp_key``), active at once. A user who has a
        key keeps it unless ``force`` (:class:`AlreadyEnrolled`); a user not
        required yet is required (the period is moot: they are enrolled)."""
        key = parse_totp_key(totp_key) if totp_key else new_totp_key()
        record = self.store.admin.get(username)
        if record is not None and record.enrolled and not force:
            raise AlreadyEnrolled(username)
        keys = self.keys
        blob = keys.encrypt(key.encode(), username)
        with self.store.admin.transaction():
            if record is None or not record.required:
                self.store.admin.require(username, self.period().deadline)
            self.store.admin.set_totp_key(username, blob, keys.current)
            self.events.enrolled(username)
        return Enrollment(username, key, provisioning_uri(key, username, self.issuer,
                                                          self.totp))

    def reset(self, username: str, days: int | None = None) -> Period:
        """Clear the key (a lost device) and open a new enrollment period."""
        period = self.period(days)
        with self.store.admin.transaction():
            self.store.admin.reset(username, period.deadline)
            self.events.reset(username, period.deadline)
        return period

    def extend(self, username: str, days: int) -> Period:
        """Extend or reopen the enrollment period: ``days`` counted from now."""
        period = self.period(days)
        with self.store.admin.transaction():
            self.store.admin.extend(username, period.deadline)
            self.events.extended(username, period.deadline)
        return period

    def unlock(self, username: str) -> None:
        """Clear the failure counter and any lockout."""
        with self.store.admin.transaction():
            if self.store.admin.unlock(username):
                self.events.unlocked(username)

    def bypass(self, username: str, on: bool) -> None:
        """Password only for this user (``on``, until turned off), or not."""
        with self.store.admin.transaction():
            self.store.admin.set_bypass(username, on)
            self.events.bypass_changed(username, on)

    def bypass_for(self, username: str, seconds: int) -> int:
        """Password only for this user for ``seconds`` from now, then never again
        until an admin says so: the sign-in core reads a bypass past its end as
        off (nothing has to run at that time). Returns the end (Unix time)."""
        until = int(self.clock()) + check_bypass_seconds(seconds)
        with self.store.admin.transaction():
            self.store.admin.set_bypass(username, True, until)
            self.events.bypass_changed(username, True)
        return until

    def delete(self, username: str) -> None:
        """Forget the user: key, requirement, counters, recovery codes, clock offset,
        sessions (their audit rows stay). :class:`NoSuchUser` when there is nothing."""
        with self.store.admin.transaction():
            if not self.store.admin.delete_user(username):
                raise NoSuchUser(username)

    # -- recovery codes and clock drift ---------------------------------------------------

    def new_recovery_codes(self, username: str) -> RecoveryCodes:
        """Ten new single-use recovery codes for an enrolled user, replacing any
        older ones; only their keyed hashes are stored, so this is the one time
        they can be read."""
        if not self.recovery_codes:
            raise RecoveryCodesOff()
        record = self.store.admin.get(username)
        if record is None or not record.enrolled:
            raise NotEnrolled(username, "recovery codes stand in for its codes; `user "
                              "enroll` (or the portal) makes one first")
        codes = tuple(recovery.new_codes())
        with self.store.admin.transaction():
            hashes = self._recovery_hashes(username, codes)
            self.store.admin.replace_recovery_codes(username, hashes)
        return RecoveryCodes(username, codes)

    def _recovery_hashes(self, username: str, codes: Iterable[str]) -> list[bytes]:
        key = self.keys.derive(recovery.KEY_PURPOSE)
        hashes = []
        for code in codes:
            normal = recovery.normalize(code)
            assert normal is not None  # made by recovery.new_codes
            hashes.append(recovery.digest(key, username, normal))
        return hashes

    def hold_for_display(self, session_id_hash: bytes, username: str,
                         codes: Sequence[str]) -> None:
        """Keep new recovery codes with a portal session (encrypted, bound to the
        user) until :meth:`take_for_display` shows them, once."""
        blob = self.keys.encrypt(json.dumps(list(codes)).encode(), _display_aad(username))
        self.store.admin.hold_session_display(session_id_hash, blob)

    def take_for_display(self, session_id_hash: bytes, username: str) -> tuple[str, ...]:
        """The codes held for the session, if any, taken (a reload shows none)."""
        blob = self.store.admin.take_session_display(session_id_hash)
        if blob is None:
            return ()
        try:
            codes = json.loads(self.keys.decrypt(blob, _display_aad(username)))
        except Exception:  # not this user's, or damaged: show nothing
            return ()
        return tuple(str(c) for c in codes)

    def resync(self, username: str, code1: str, code2: str) -> Resync:
        """Find two consecutive codes of the user's key within ±RESYNC_SECONDS of
        now (nearest first) and set the user's clock offset to where the second
        one is: the core then looks for codes around now plus that offset, with
        the usual window. Both steps are marked used (the replay marker, on
        absolute steps, never moves back). :class:`ResyncFailed` when not found."""
        record = self.store.admin.get(username)
        if record is None or record.totp_key is None:
            raise NotEnrolled(username, "nothing to resynchronise")
        minutes = RESYNC_SECONDS // 60
        first, second = code1.strip(), code2.strip()
        digits = self.totp.digits
        if not all(len(c) == digits and c.isascii() and c.isdigit() for c in (first, second)):
            raise ResyncFailed(username, minutes)
        key = self.keys.decrypt(record.totp_key, username).decode()
        now = self.clock()
        current = self.totp.step_at(now)
        reach = math.ceil(RESYNC_SECONDS / self.totp.period)
        for offset in sorted(range(-reach, reach + 1), key=abs):
            last = current + offset
            if (hmac_equal(code_for_step(key, last, self.totp), second)
                    and hmac_equal(code_for_step(key, last - 1, self.totp), first)):
                break
        else:
            raise ResyncFailed(username, minutes)
        if not self.store.admin.set_step_offset(username, record.totp_key, offset, last):
            raise Refusal(f"{username}: the key changed meanwhile; nothing changed")
        return Resync(username, offset, offset * self.totp.period)

    def unrequire(self, username: str) -> None:
        """Remove the requirement; the key, if any, is kept."""
        with self.store.admin.transaction():
            if self.store.admin.unrequire(username):
                self.events.unrequired(username)

    # -- set-up by the user (the portal) ------------------------------------------------

    def start_setup(self, username: str) -> Enrollment:
        """A new key for the user to set up, kept pending (encrypted) in place of any
        older pending key. Nothing else changes: an active key keeps working and the
        status stays as it is until :meth:`confirm_setup` accepts a code from it."""
        now = self.clock()
        record = self.store.admin.get(username) or UserRecord(username)
        self._check_may_set_up(record, now)
        key = new_totp_key()
        keys = self.keys
        self.store.admin.set_pending(username, keys.encrypt(key.encode(), username), keys.current,
                                     int(now) + self.pending_key_seconds)
        return self._enrollment(username, key)

    def pending_setup(self, username: str) -> Enrollment | None:
        """The key being set up (to show it again), or None when there is none or
        it expired."""
        pending = self.store.admin.get_pending(username, self.clock())
        if pending is None:
            return None
        key = self.keys.decrypt(pending.totp_key, username).decode()
        return self._enrollment(username, key)

    def confirm_setup(self, username: str, code: str, source: str = "") -> Confirmation:
        """Activate the pending key if ``code`` is a code from it, atomically; the
        code's time step is marked used (no replay on another protocol). A wrong
        code counts as a failure, in the counter every sign-in uses; a locked user
        cannot confirm. One audit row (protocol ``portal``) either way."""
        now = self.clock()
        result = self._confirm(username, code, now, source)
        self.store.hot.audit([AuditRecord(now, username, "portal", "portal", source,
                                          "accept" if result.confirmed else "reject",
                                          result.outcome.value)])
        return result

    def _confirm(self, username: str, code: str, now: float, source: str) -> Confirmation:
        record = self.store.admin.get(username) or UserRecord(username)
        if record.locked(now):
            return Confirmation(SetupOutcome.LOCKED)
        pending = self.store.admin.get_pending(username, now)
        if pending is None:
            return Confirmation(SetupOutcome.NO_PENDING_KEY)
        key = self.keys.decrypt(pending.totp_key, username).decode()
        step = match_step(key, code.strip(), now, self.totp)
        if step is None:
            failure = self.store.hot.record_failure(username, now, self.max_failures,
                                                    self.lockout_seconds)
            self.store.hot.repeat_forget(username)
            return Confirmation(SetupOutcome.BAD_CODE, failure.lockout_started)
        codes = tuple(recovery.new_codes()) if self.recovery_codes else ()
        with self.store.admin.transaction():
            activated = self.store.admin.activate_pending(username, pending.totp_key, step, now)
            if activated:
                if codes:  # the new key's own recovery codes, in the same transaction
                    self.store.admin.replace_recovery_codes(
                        username, self._recovery_hashes(username, codes))
                self.events.setup_confirmed(username, replaced=record.enrolled, source=source)
        if not activated:
            current = self.store.admin.get(username)
            if current is not None and current.locked(now):
                return Confirmation(SetupOutcome.LOCKED)
            return Confirmation(SetupOutcome.NO_PENDING_KEY)  # replaced or expired meanwhile
        return Confirmation(SetupOutcome.CONFIRMED, recovery_codes=codes)

    @staticmethod
    def _check_may_set_up(record: UserRecord, now: float) -> None:
        if record.locked(now):
            raise Locked(record.username)
        if record.status(now) == "enrollment_expired":
            raise EnrollmentExpired(record.username)

    def _enrollment(self, username: str, key: str) -> Enrollment:
        return Enrollment(username, key, provisioning_uri(key, username, self.issuer, self.totp))

    # -- status -------------------------------------------------------------------------

    def view(self, username: str) -> StatusView:
        """The status of ``username`` (a user the store has never seen: not required)."""
        record = self.store.admin.get(username)
        if record is None:
            return self._view(UserRecord(username), self.clock(), 0)
        return self._view(record, self.clock(), self.store.admin.recovery_codes_left(username))

    def list_views(self, also: Iterable[str] = (),
                   where: UserFilter | None = None) -> list[StatusView]:
        """The users the store knows that match ``where`` (default: all), and the
        names in ``also`` (the directory's users, when it can list them) when a
        user without state matches it, by username. The database filters and
        works out each status (one query, whatever the number of users)."""
        now = self.clock()
        f = where or UserFilter()
        views = self._row_views(self.store.admin.list_user_rows(now, f), now)
        extra = set(also)
        if extra and f.matches_default():
            extra -= self.store.admin.usernames()
            if extra:
                views += [self._view(UserRecord(name), now, 0) for name in extra]
                views.sort(key=lambda v: v.username)
        return views

    @staticmethod
    def _view(record: UserRecord, now: float, recovery_codes_left: int) -> StatusView:
        locked = record.locked(now)
        bypassed = record.bypassed(now)
        return StatusView(
            username=record.username, status=record.status(now), required=record.required,
            enrolled=record.enrolled,
            enrollment_deadline=_iso(record.enrollment_deadline) if record.required else None,
            days_left=record.days_left(now), locked=locked,
            locked_until=_iso(record.locked_until)
            if locked and record.locked_until != LOCKED_FOREVER else None,
            failures=record.failures, bypass=bypassed,
            bypass_until=_iso(record.bypass_until) if bypassed else None,
            recovery_codes_left=recovery_codes_left, step_offset=record.step_offset)

    @staticmethod
    def _row_views(rows: Iterable[UserRow], now: float) -> list[StatusView]:
        """:meth:`_view` of listed rows, whose status and bypass the database gave
        (one loop over positional fields: `user list` runs it 10,000 times)."""
        iso, view, forever = _iso, StatusView, LOCKED_FOREVER
        views = []
        for (name, status, required, enrolled, deadline, failures, locked_until, bypass,
             until, offset, left) in rows:
            locked = locked_until is not None and locked_until > now
            views.append(view(
                name, status, required, enrolled, iso(deadline) if required else None,
                days_left(deadline, now) if status == "in_enrollment" else None, locked,
                iso(locked_until) if locked and locked_until != forever else None,
                failures, bypass, iso(until) if bypass else None, left, offset))
        return views

    # -- bulk -----------------------------------------------------------------------------

    def import_csv(self, text: str, force: bool = False,
                   resolve: Callable[[str], str | None] | None = None) -> Imported:
        """Load CSV lines ``username,secret[,required_days]``, all or nothing
        (:class:`ImportRefused` names every bad line). A key with no days gets
        the configured enrollment days as its deadline; an empty secret with
        days requires MFA without a key.

        A line is refused when its user already has a key (unless ``force``:
        the user's authenticator stops working) and, with ``resolve`` (the
        directory: a typed name to the entry's own name, None when there is no
        such entry), when its user is unknown. A requirement line for a user
        already required changes nothing (a running period is never restarted)."""
        rows, problems = self._parse(text, resolve)
        records = self._records([r.username for r in rows])
        existing = [r for r in rows if r.totp_key and r.username in records
                    and records[r.username].enrolled]
        if not force:
            problems += [(r.line, f"{r.username!r} already has a key (replacing it stops "
                                  "the authenticator the user has)") for r in existing]
        if problems:
            unknown = sum(1 for _, p in problems if p.endswith(_UNKNOWN))
            raise ImportRefused([f"line {n}: {p}" for n, p in sorted(problems)],
                                0 if force else len(existing), unknown)
        unchanged = [r for r in rows if not r.totp_key and r.username in records
                     and records[r.username].required]
        todo = [r for r in rows if r not in unchanged]
        imported = self.import_rows(todo)
        return Imported(imported.keys, imported.requirements, len(existing), len(unchanged))

    def _records(self, names: Sequence[str]) -> dict[str, UserRecord]:
        """The state of ``names`` that the store has: one query each for a few,
        one scan for many."""
        if len(names) > 500:
            wanted = set(names)
            return {r.username: r for r in self.store.admin.list_users() if r.username in wanted}
        found = ((n, self.store.admin.get(n)) for n in names)
        return {n: r for n, r in found if r is not None}

    def parse_import(self, text: str,
                     resolve: Callable[[str], str | None] | None = None) -> list[ImportRow]:
        """The good rows of an import file, or :class:`ImportRefused`. Blank
        lines, ``#`` comments and a ``username,…`` header line are skipped; a
        user twice is a bad line; with ``resolve``, so is an unknown user."""
        rows, problems = self._parse(text, resolve)
        if problems:
            raise ImportRefused([f"line {n}: {p}" for n, p in problems])
        return rows

    def _parse(self, text: str, resolve: Callable[[str], str | None] | None
               ) -> tuple[list[ImportRow], list[tuple[int, str]]]:
        rows: list[ImportRow] = []
        problems: list[tuple[int, str]] = []
        seen: dict[str, int] = {}
        for n, fields in enumerate(csv.reader(io.StringIO(text)), 1):
            if not fields or not "".join(fields).strip() or fields[0].lstrip().startswith("#"):
                continue
            if n == 1 and fields[0].strip().lower() == "username":
                continue
            try:
                row = self._import_row(fields, n, resolve)
            except ValueError as e:
                problems.append((n, str(e)))
                continue
            if row.username in seen:
                problems.append((n, f"{row.username!r} already on line {seen[row.username]}"))
                continue
            seen[row.username] = n
            rows.append(row)
        return rows, problems

    def _import_row(self, fields: list[str], line: int,
                    resolve: Callable[[str], str | None] | None) -> ImportRow:
        if len(fields) not in (2, 3):
            raise ValueError(f"expected username,secret[,required_days], got {len(fields)} fields")
        try:
            name = self.usernames.normalize(fields[0])
        except InvalidUsername as e:
            raise ValueError(f"{fields[0]!r}: {e}") from None
        days: int | None = None
        if len(fields) == 3 and fields[2].strip():
            if not fields[2].strip().isdigit() or not (
                    MIN_PERIOD_DAYS <= int(fields[2]) <= MAX_PERIOD_DAYS):
                raise ValueError(f"required_days must be {MIN_PERIOD_DAYS}–{MAX_PERIOD_DAYS}, "
                                 f"got {fields[2].strip()!r}")
            days = int(fields[2])
        key = fields[1].strip()
        if not key and days is None:
            raise ValueError("no secret and no required_days: nothing to do")
        totp_key = normalize_totp_key(key) if key else None
        if resolve is not None:
            found = resolve(fields[0].strip())
            if found is None:
                raise ValueError(f"{name!r}{_UNKNOWN}")
            name = found
        return ImportRow(name, totp_key, days, line)

    def import_rows(self, rows: Sequence[ImportRow]) -> Imported:
        """Load good rows (from :meth:`parse_import`) in one transaction."""
        now = int(self.clock())
        enrolled: list[tuple[str, bytes, int, int | None]] = []
        if any(r.totp_key for r in rows):
            keys = self.keys
            enrolled = [(r.username, keys.encrypt(r.totp_key.encode(), r.username),
                         keys.current, now + (r.days or self.enrollment_days) * DAY)
                        for r in rows if r.totp_key]
        required = [(r.username, now + (r.days or 0) * DAY) for r in rows if not r.totp_key]
        with self.store.admin.transaction():
            count = self.store.admin.import_users(enrolled, required)
            self.events.imported([u for u, *_ in enrolled], required)
        return Imported(count, len(rows) - count)

    def rotate_keys(self) -> Rotation:
        """Re-encrypt every stored TOTP key under a new key version. Older versions
        stay readable meanwhile (running instances keep working); a key re-enrolled
        during the pass is left alone; a row that cannot be decrypted does not
        stop the others."""
        ring = self.keys
        version = ring.add_version()
        done = skipped = 0
        failed: list[str] = []
        for batch in self.store.admin.keys_to_rotate(version):
            for name, blob in batch:
                try:
                    plain = ring.decrypt(blob, name)
                except Exception:  # a damaged row must not stop the others
                    failed.append(name)
                    continue
                new = ring.encrypt(plain, name)
                if self.store.admin.replace_totp_key(name, blob, new, version):
                    done += 1
                else:
                    skipped += 1
        return Rotation(version, done, skipped, tuple(failed))


@functools.lru_cache(maxsize=4096)  # `user list`: deadlines repeat (a --group, an import)
def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _display_aad(username: str) -> str:
    return f"recovery-display\x00{username}"


def hmac_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
