"""The decision: password → MFA state → code → limits → audit → Decision.

The same for every protocol. :class:`PolicyEngine` holds the logic as plain
synchronous steps (testable with an injected clock, no reactor); the
:class:`Authenticator` runs them off the reactor thread around the directory
check, which is asynchronous.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from backends.base import DirectoryError, DirectoryUnavailable, Identity, InvalidCredentials
from policy.decision import AuthRequest, Decision, MfaMode, Outcome, Reason, SplitMode
from policy.keys import KeyRing
from policy.store import AuditRecord, Store, UserRecord
from policy.totp import TotpParams, match_step
from policy.usernames import InvalidUsername, UsernameRules

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

log = logging.getLogger("mfa_proxy.policy")
T = TypeVar("T")

Clock = Callable[[], float]
Verify = Callable[[str, str], "Deferred[Identity]"]


@dataclass(frozen=True)
class Limits:
    max_failures: int = 5
    lockout_seconds: int = 900


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
    """What the first step learned: who, their state, and how to read the secret."""

    request: AuthRequest
    username: str
    record: UserRecord
    password: str
    code: str | None
    needs_code: bool

    def verdict_without_directory(self) -> Identity | DirectoryError | None:
        """The password verdict when the directory need not (or must not) be asked:
        verified in an earlier round, or empty (never sent: it would bind anonymously)."""
        if self.request.verified_identity is not None:
            return self.request.verified_identity
        if not self.password:
            return InvalidCredentials("empty password")
        return None


MESSAGES = {
    Reason.LOCKED_OUT: "Account locked after too many failed attempts",
    Reason.ENROLLMENT_EXPIRED: "MFA enrollment period expired; contact your administrator",
    Reason.NOT_ENROLLED: "MFA is required here and you have not enrolled",
    Reason.CODE_NEEDED: "Enter your verification code",
}


def enrollment_message(days: int) -> str:
    unit = "day" if days == 1 else "days"
    return f"Set up MFA: {days} {unit} left in your enrollment period"


def split_secret(secret: str, split: SplitMode, separator: str,
                 digits: int) -> tuple[str, str | None]:
    """One interpretation of a password field: (password, code or None).

    A code is taken only from the end, only when it is exactly ``digits``
    digits; the directory is never asked twice with two readings.
    """
    if split is SplitMode.CHALLENGE:
        return secret, None
    if separator:
        password, sep, code = secret.rpartition(separator)
        if sep and len(code) == digits and code.isdigit() and code.isascii():
            return password, code
        return secret, None
    code = secret[-digits:]
    if len(secret) > digits and code.isdigit() and code.isascii():
        return secret[:-digits], code
    return secret, None


class PolicyEngine:
    def __init__(self, store: Store, keys: KeyRing, totp: TotpParams, limits: Limits,
                 usernames: UsernameRules, clock: Clock = time.time,
                 events: EngineEvents | None = None, repeat_key: bytes = b"",
                 repeat_windows: bool = True, log_accepts: bool = True) -> None:
        self.store, self.keys, self.totp, self.limits = store, keys, totp, limits
        self.usernames, self.clock = usernames, clock
        self.events = events or NoEvents()
        self.repeat_key = repeat_key or hashlib.sha256(b"mfa-proxy repeat").digest()
        self.audit = AuditQueue(store)
        # False when no resource has a repeat window: failures then skip clearing
        # a repeat cache that is always empty (one write less per failure).
        self.repeat_windows = repeat_windows
        # Every decision is in the audit table; a log line per accept costs about a
        # tenth of a busy proxy's CPU, so it is optional ([logging] decisions).
        self.log_accepts = log_accepts

    # -- step 1: before the directory --------------------------------------------

    def prepare(self, request: AuthRequest) -> Prepared | Decision:
        """Refuse a locked user before the directory is asked (never burn the
        directory's own lockout counter for an attacker); read the secret."""
        try:
            username = self.usernames.normalize(request.username)
        except InvalidUsername:
            return self._finish(request, request.username[:64], Outcome.REJECT,
                                Reason.INVALID_USERNAME)
        record = self.store.get(username) or UserRecord(username)
        now = self.clock()
        if record.locked(now):
            return self._finish(request, username, Outcome.REJECT, Reason.LOCKED_OUT,
                                locked_until=record.locked_until)
        needs_code = self._needs_code(record, request.mfa)
        password, code = request.secret, request.code
        if needs_code and code is None:
            password, code = split_secret(request.secret, request.split, request.separator,
                                          self.totp.digits)
        return Prepared(request, username, record, password, code, needs_code)

    @staticmethod
    def _needs_code(record: UserRecord, mfa: MfaMode) -> bool:
        if mfa is MfaMode.OFF or record.bypass or not record.enrolled:
            return False
        return record.required or mfa is MfaMode.STRICT

    # -- step 2: after the directory ---------------------------------------------

    def decide(self, p: Prepared, verdict: Identity | DirectoryError) -> Decision:
        if isinstance(verdict, DirectoryUnavailable):
            return self._finish(p.request, p.username, Outcome.REJECT,
                                Reason.DIRECTORY_UNAVAILABLE)
        if isinstance(verdict, DirectoryError):
            reason = Reason.UNKNOWN_USER if verdict.reason == "unknown_user" else (
                Reason.EMPTY_PASSWORD if not p.password else Reason.BAD_PASSWORD)
            if reason is not Reason.BAD_PASSWORD:
                # Counting unknown names would let anyone fill the state store; an
                # empty password never reaches the directory, so it guesses nothing
                # (and counting it would make a row for any made-up name).
                return self._finish(p.request, p.username, Outcome.REJECT, reason)
            return self._failure(p, reason)
        return self._second_factor(p, verdict)

    def _second_factor(self, p: Prepared, identity: Identity) -> Decision:
        rec, mfa, now = p.record, p.request.mfa, self.clock()
        if mfa is MfaMode.OFF:
            return self._success(p, identity, Reason.MFA_OFF)
        if rec.bypass:
            return self._success(p, identity, Reason.BYPASS)
        if p.needs_code:
            return self._check_code(p, identity, now)
        status = rec.status(now)
        if status == "enrollment_expired":
            return self._finish(p.request, p.username, Outcome.REJECT,
                                Reason.ENROLLMENT_EXPIRED, identity)
        if mfa is MfaMode.STRICT:
            return self._finish(p.request, p.username, Outcome.REJECT, Reason.NOT_ENROLLED,
                                identity)
        if status == "in_enrollment":
            days = rec.days_left(now)
            return self._success(p, identity, Reason.IN_ENROLLMENT, days)
        return self._success(p, identity, Reason.NOT_REQUIRED)

    def _check_code(self, p: Prepared, identity: Identity, now: float) -> Decision:
        if p.code is None:
            if p.request.split is SplitMode.APPEND:
                return self._failure(p, Reason.MISSING_CODE, identity)
            return self._finish(p.request, p.username, Outcome.NEED_CODE, Reason.CODE_NEEDED,
                                identity)
        assert p.record.secret is not None
        secret = self.keys.decrypt(p.record.secret, p.username).decode()
        step = match_step(secret, p.code, now, self.totp)
        if step is None:
            return self._failure(p, Reason.BAD_CODE, identity)
        if self.store.accept_step(p.username, step, now):
            self._remember_success(p, now)
            return self._finish(p.request, p.username, Outcome.ACCEPT, Reason.OK, identity)
        if self._is_repeat(p, now):
            return self._finish(p.request, p.username, Outcome.ACCEPT, Reason.REPEAT, identity)
        current = self.store.get(p.username)
        if current is not None and current.locked(now):
            return self._finish(p.request, p.username, Outcome.REJECT, Reason.LOCKED_OUT,
                                identity, locked_until=current.locked_until)
        return self._failure(p, Reason.REPLAYED_CODE, identity)

    # -- idempotent success (opt-in per client) -------------------------------------

    def _repeat_digest(self, p: Prepared) -> bytes:
        material = "\x00".join((p.request.protocol, p.request.client, p.username,
                                p.password, p.code or ""))
        return hmac.new(self.repeat_key, material.encode(), hashlib.sha256).digest()

    def _remember_success(self, p: Prepared, now: float) -> None:
        window = p.request.repeat_window_seconds
        if window > 0:
            self.store.repeat_put(self._repeat_digest(p), p.username, now + window)

    def _is_repeat(self, p: Prepared, now: float) -> bool:
        return (p.request.repeat_window_seconds > 0
                and self.store.repeat_hit(self._repeat_digest(p), now))

    # -- outcomes --------------------------------------------------------------------

    def _success(self, p: Prepared, identity: Identity, reason: Reason,
                 days_left: int | None = None) -> Decision:
        if p.record.failures or p.record.locked_until is not None:
            self.store.record_success(p.username, self.clock())
        return self._finish(p.request, p.username, Outcome.ACCEPT, reason, identity,
                            days_left=days_left)

    def _failure(self, p: Prepared, reason: Reason, identity: Identity | None = None) -> Decision:
        result = self.store.record_failure(p.username, self.clock(), self.limits.max_failures,
                                           self.limits.lockout_seconds)
        if self.repeat_windows:
            self.store.repeat_forget(p.username)
        if result.lockout_started:
            self.events.lockout()
            log.warning("lockout user=%s failures=%d until=%s", p.username, result.failures,
                        result.locked_until)
        return self._finish(p.request, p.username, Outcome.REJECT, reason, identity,
                            lockout_started=result.lockout_started,
                            locked_until=result.locked_until)

    def _finish(self, request: AuthRequest, username: str, outcome: Outcome, reason: Reason,
                identity: Identity | None = None, days_left: int | None = None,
                lockout_started: bool = False, locked_until: int | None = None) -> Decision:
        message = (enrollment_message(days_left) if days_left is not None
                   else MESSAGES.get(reason, ""))
        decision = Decision(outcome, reason, username, identity, days_left, message,
                            lockout_started, locked_until)
        self.audit.add(AuditRecord(self.clock(), username, request.protocol, request.client,
                                   request.source, outcome.value, reason.value))
        if outcome is not Outcome.ACCEPT or self.log_accepts:
            log.info("decision user=%s protocol=%s client=%s source=%s result=%s reason=%s",
                     username, request.protocol, request.client, request.source,
                     outcome.value, reason.value)
        return decision

    def fail_closed(self, request: AuthRequest, reason: Reason) -> Decision:
        """A decision when the engine itself could not run (state store down, a bug)."""
        return Decision(Outcome.REJECT, reason, request.username)

    # -- synchronous whole (CLI, tests, sync callers) ---------------------------------

    def authenticate_sync(self, request: AuthRequest,
                          verify: Callable[[str, str], Identity]) -> Decision:
        prepared = self.prepare(request)
        if isinstance(prepared, Decision):
            return prepared
        verdict = prepared.verdict_without_directory()
        if verdict is None:
            try:
                verdict = verify(prepared.username, prepared.password)
            except DirectoryError as e:
                verdict = e
        return self.decide(prepared, verdict)


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
            self.store.audit(batch)
        except Exception:
            with self._lock:
                self._pending = batch + self._pending
            raise
        return len(batch)


class Authenticator:
    """The reactor-facing entry point: ``authenticate(request) -> Deferred[Decision]``.

    Store work runs in ``run_blocking`` (a worker thread); the directory is
    asked through an asynchronous ``verify``. Anything unexpected becomes a
    reject. Each step hands its result straight to the next (one Deferred per
    step, none returned from a callback): this runs for every request, and
    Deferreds chained inside callbacks cost more than the steps they join.
    """

    def __init__(self, engine: PolicyEngine, verify: Verify,
                 run_blocking: Callable[..., Deferred[Any]], clock: Clock = time.time) -> None:
        self.engine, self.verify, self.clock = engine, verify, clock
        self.run_blocking = run_blocking

    def authenticate(self, request: AuthRequest, verify: Verify | None = None
                     ) -> Deferred[Decision]:
        from twisted.internet.defer import Deferred

        result: Deferred[Decision] = Deferred()
        self._step(result, request, "prepare", self.engine.prepare, request).addCallback(
            self._after_prepare, result, request, verify or self.verify)
        return result

    def _step(self, result: Deferred[Decision], request: AuthRequest, name: str,
              f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """``f`` in ``run_blocking``; on failure ``result`` gets the reject and the
        returned Deferred stops there (it fires None, which the next step ignores)."""
        try:
            d = self.run_blocking(f, *args)
        except Exception:
            from twisted.internet.defer import fail

            d = fail()
        return d.addErrback(self._failed, result, request, name)

    def _after_prepare(self, prepared: Prepared | Decision | None, result: Deferred[Decision],
                       request: AuthRequest, verify: Verify) -> None:
        if prepared is None:  # the step failed: result already has its reject
            return
        try:
            self._ask_directory(prepared, result, verify)
        except Exception:  # a bug: still one answer, a reject
            from twisted.python.failure import Failure

            if not result.called:
                self._failed(Failure(), result, request, "directory")  # type: ignore[no-untyped-call]

    def _ask_directory(self, prepared: Prepared | Decision, result: Deferred[Decision],
                       verify: Verify) -> None:
        if isinstance(prepared, Decision):
            result.callback(prepared)
            return
        known = prepared.verdict_without_directory()
        if known is not None:
            self._decide(known, prepared, result)
            return
        started = self.clock()
        try:
            d = verify(prepared.username, prepared.password)
        except Exception as e:  # a directory that raises instead of failing its Deferred
            self._decide(self._directory_error(e, started), prepared, result)
            return
        d.addCallbacks(self._directory_ok, self._directory_failed, callbackArgs=(started,),
                       errbackArgs=(started,))
        d.addCallback(self._decide, prepared, result)

    def _directory_ok(self, identity: Identity, started: float) -> Identity:
        self.engine.events.directory(self.clock() - started, None)
        return identity

    def _directory_failed(self, failure: Any, started: float) -> DirectoryError:
        return self._directory_error(failure.value, started)

    def _directory_error(self, error: BaseException, started: float) -> DirectoryError:
        if not isinstance(error, DirectoryError):
            log.error("directory check raised %s: %s", type(error).__name__, error)
            error = DirectoryUnavailable(str(error))
        reason = error.reason if isinstance(error, DirectoryUnavailable) else None
        self.engine.events.directory(self.clock() - started, reason)
        return error

    def _decide(self, verdict: Identity | DirectoryError, prepared: Prepared,
                result: Deferred[Decision]) -> None:
        d = self._step(result, prepared.request, "decide", self.engine.decide, prepared, verdict)
        d.addCallback(self._decided, result)

    @staticmethod
    def _decided(decision: Decision | None, result: Deferred[Decision]) -> None:
        if decision is not None:
            result.callback(decision)

    def _failed(self, failure: Any, result: Deferred[Decision], request: AuthRequest,
                step: str) -> None:
        result.callback(self._fail_closed(failure, request, step))

    def _fail_closed(self, failure: Any, request: AuthRequest, step: str) -> Decision:
        from sqlalchemy.exc import SQLAlchemyError

        from policy.store import StoreError

        if isinstance(failure.value, SQLAlchemyError | StoreError):
            self.engine.events.state_error(step)
            log.error("state store failed during %s: %s", step, type(failure.value).__name__)
            return self.engine.fail_closed(request, Reason.STATE_UNAVAILABLE)
        log.error("unexpected error during %s: %s", step, failure.getTraceback())
        return self.engine.fail_closed(request, Reason.STATE_UNAVAILABLE)
