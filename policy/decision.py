"""What a protocol adapter hands the core, and what it gets back.

Adapters translate their protocol into an :class:`AuthRequest` and a
:class:`Decision` back into their protocol; they never decide.
"""

from __future__ import annotations

import enum
import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backends.base import Identity

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


class MfaMode(enum.StrEnum):
    """How a resource (a RADIUS client, the LDAP listener) applies MFA."""

    ENROLLED = "enrolled"  # enrolled users need a code; others follow their enrollment state
    STRICT = "strict"  # everyone needs a code; not enrolled is refused
    OFF = "off"  # password only


class SplitMode(enum.StrEnum):
    """How a password field may carry the code."""

    APPEND = "append"  # password, separator, code; a code is expected at the end
    CHALLENGE = "challenge"  # the field is the password alone; the code comes separately
    AUTO = "auto"  # split when the field ends in separator + `digits` digits


class Outcome(enum.StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"
    NEED_CODE = "challenge"  # password good, a code is needed: ask for it


class Reason(enum.StrEnum):
    """Machine-readable reasons (metric labels, audit rows, tests)."""

    OK = "ok"  # password and code
    BAD_PASSWORD = "bad_password"  # noqa: S105 (a reason label)
    UNKNOWN_USER = "unknown_user"
    EMPTY_PASSWORD = "empty_password"  # noqa: S105 (a reason label)
    BAD_CODE = "bad_code"
    MISSING_CODE = "missing_code"
    REPLAYED_CODE = "replayed_code"
    LOCKED_OUT = "locked_out"
    ENROLLMENT_EXPIRED = "enrollment_expired"
    NOT_ENROLLED = "not_enrolled"
    IN_ENROLLMENT = "in_enrollment"
    NOT_REQUIRED = "not_required"
    BYPASS = "bypass"
    MFA_OFF = "mfa_off"
    CODE_NEEDED = "code_needed"
    REPEAT = "repeat"  # idempotent success within a client's repeat window
    RECOVERY_CODE = "recovery_code"  # password and a single-use recovery code
    DIRECTORY_UNAVAILABLE = "directory_unavailable"
    STATE_UNAVAILABLE = "state_unavailable"
    INVALID_USERNAME = "invalid_username"
    OUTSIDE_USER_BASE = "outside_user_base"  # an entry the front-end is not for ([ldap] user_base)
    BUSY = "busy"  # too many attempts for one identity waiting at once


# Per-request values are plain slotted dataclasses, not frozen ones: a frozen
# dataclass pays ~2 µs more per instance in __init__, and a sign-in makes several.
# Nothing changes them after construction.
@dataclass(slots=True)
class AuthRequest:
    """One sign-in attempt, protocol-neutral.

    ``password`` is what the user typed in the password field. When ``code`` is
    given (a challenge answer, OpenVPN's static challenge) it is the password
    alone; otherwise ``split`` says how a code may be appended to it.
    """

    username: str  # as the client gave it (logs); the core resolves it to the entry
    password: str
    protocol: str  # "radius" | "ldap" | ...
    client: str  # a bounded name: the configured client, never an address
    mfa: MfaMode = MfaMode.ENROLLED
    split: SplitMode = SplitMode.AUTO
    separator: str = ","
    code: str | None = None
    # When set, the password was already verified by an earlier step
    # (the first round of a challenge): the directory is not asked again.
    verified_identity: Identity | None = None
    # Idempotent success: same user, password and code from the same client
    # within this many seconds gets the same accept (0 = off).
    repeat_window_seconds: int = 0
    source: str = ""  # for logs and audit only (an address), never a metric label
    # LDAP: the bind DN; the identity is the entry at this DN (any spelling the
    # directory accepts), not a name read out of it.
    bind_dn: str | None = None
    # time.monotonic() when the core was first asked (0: not yet): the audit
    # row's latency is measured from here (policy.engine.Authenticator sets it).
    received_at: float = 0.0
    # Ties together the log lines of one attempt (decision, lockout): set by
    # the core when the front-end gave none (:func:`new_request_id`).
    request_id: str = ""
    # A rule of this resource uses the entry's groups (a RADIUS client's reply
    # rules), known when the front-end is configured: only then, or when
    # [policy] require_groups is set, may the core make the directory search them.
    needs_groups: bool = False


@dataclass(slots=True)  # see AuthRequest on frozen
class Decision:
    outcome: Outcome
    reason: Reason
    username: str  # canonical
    identity: Identity | None = None
    days_left: int | None = None  # set while the user is in an enrollment period
    message: str = ""  # what the user may be told (Reply-Message, diagnostic)
    lockout_started: bool = False  # this attempt locked the account
    locked_until: float | None = None
    # What the client is told when it differs from ``reason``: an unknown name
    # is answered exactly like a locked account once it has been guessed at as often.
    public_reason: Reason | None = None

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPT


# The core's entry point as every front-end calls it
# (:meth:`policy.engine.Authenticator.authenticate`): one request, one decision.
Authenticate = Callable[[AuthRequest], "Deferred[Decision]"]


# A request id: this process's random prefix and a counter, so two instances
# writing to one log collector never give the same id, at the cost of a counter.
_ID_PREFIX = secrets.token_hex(3)
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"
