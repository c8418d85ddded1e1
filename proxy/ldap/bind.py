"""From a decision (or a failure) to the BindResponse a client gets.

Kept apart from the server so the wording the contract fixes is in one
place: a bad password and a bad or missing code read the same ("invalid
credentials"), so a guesser learns nothing; only "locked" and "enrollment
expired" say more, because the user needs to know to call an admin.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeoutError

from backends.base import DirectoryUnavailable, InvalidCredentials
from backends.ldapwire.messages import ResultCode
from policy.decision import Decision, Reason

INVALID_CREDENTIALS = "invalid credentials"
LOCKED = "locked"
ENROLLMENT_EXPIRED = "enrollment expired"
UNAVAILABLE = "directory unavailable"

# Upstream bind results that mean "not this user with this password"; any
# other failure is the directory's problem, not the user's.
UPSTREAM_REFUSALS = frozenset(
    {
        ResultCode.INVALID_CREDENTIALS,
        ResultCode.NO_SUCH_OBJECT,
        ResultCode.INVALID_DN_SYNTAX,
        ResultCode.INAPPROPRIATE_AUTHENTICATION,
        ResultCode.INSUFFICIENT_ACCESS_RIGHTS,
        ResultCode.UNWILLING_TO_PERFORM,  # e.g. a disabled account
        ResultCode.CONSTRAINT_VIOLATION,  # e.g. password policy
    }
)

_REJECTIONS: dict[Reason, tuple[int, str]] = {
    Reason.LOCKED_OUT: (ResultCode.INVALID_CREDENTIALS, LOCKED),
    Reason.ENROLLMENT_EXPIRED: (ResultCode.INVALID_CREDENTIALS, ENROLLMENT_EXPIRED),
    Reason.DIRECTORY_UNAVAILABLE: (ResultCode.UNAVAILABLE, UNAVAILABLE),
    Reason.STATE_UNAVAILABLE: (ResultCode.UNAVAILABLE, "unavailable"),
    Reason.EMPTY_PASSWORD: (ResultCode.UNWILLING_TO_PERFORM, "unauthenticated bind not allowed"),
}


@dataclass(frozen=True)
class BindReply:
    code: int
    diagnostic: str = ""
    result: str = "reject"  # metric label: "accept" | "reject" | "" (no event: SASL in progress)
    reason: str = ""  # metric label
    authenticated: bool = False  # the session is now bound as someone (require_bind)
    raw: bytes | None = None  # an upstream BindResponse to relay as it is

    @property
    def success(self) -> bool:
        return self.code == ResultCode.SUCCESS


def refuse(code: int, diagnostic: str, reason: str) -> BindReply:
    return BindReply(code, diagnostic, "reject", reason)


def accept_message(decision: Decision) -> str:
    """The diagnosticMessage of a successful bind: only the enrollment reminder."""
    if decision.days_left is None:
        return ""
    if decision.message:
        return decision.message
    days = decision.days_left
    return f"MFA enrollment: {days} day{'s' if days != 1 else ''} left to set up your authenticator"


def reply_for_decision(decision: Decision) -> BindReply:
    """An accept, or the reject the contract prescribes for its reason."""
    if decision.accepted:
        return BindReply(
            ResultCode.SUCCESS,
            accept_message(decision),
            "accept",
            decision.reason.value,
            authenticated=True,
        )
    # What the client is told: an unknown name reads like the account it imitates.
    code, diagnostic = _REJECTIONS.get(
        decision.public_reason or decision.reason,
        (ResultCode.INVALID_CREDENTIALS, INVALID_CREDENTIALS),
    )
    return refuse(code, decision.message or diagnostic, decision.reason.value)


def reply_for_error(error: BaseException | None) -> BindReply | None:
    """The reply for a failure that escaped the core; None for a bug."""
    if isinstance(error, InvalidCredentials):
        return refuse(ResultCode.INVALID_CREDENTIALS, INVALID_CREDENTIALS, error.reason)
    if isinstance(error, DirectoryUnavailable):
        return refuse(ResultCode.UNAVAILABLE, UNAVAILABLE, Reason.DIRECTORY_UNAVAILABLE.value)
    if isinstance(error, (DeferredTimeoutError, CancelledError)):
        return refuse(ResultCode.UNAVAILABLE, "timed out", Reason.DIRECTORY_UNAVAILABLE.value)
    return None
