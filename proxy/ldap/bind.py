"""The bind flow's steps, pure: what a bind request asks for, what the core is
asked, how the session is bound after both factors pass, and the BindResponse
a client gets for each outcome.

:mod:`proxy.ldap.session` runs these steps in order (and keeps the sequencing
around them); nothing here does I/O. The wording the contract fixes is in one
place: a bad password and a bad or missing code read the same ("invalid
credentials"), so a guesser learns nothing; only "locked" and "enrollment
expired" say more, because the user needs to know to call an admin.

The flow of one bind::

    plan_bind(request)        → a refusal here, Relay(reason), or MFA_BIND
    MFA_BIND: core_request()  → the core's start: a Decision (answered at once:
                                reply_for_decision; a failure: reply_for_error),
                                or a PasswordCheck (the identity's turn held)
              entry_bind(check) → the upstream session bind as the resolved
                                entry with the password part: the password check
              password_verdict(result) → the core's finish(verdict): code,
                                counters, audit → reply_for_decision(decision)
              (a reject after a successful bind: the session reset first)
    Relay:    the client's bind upstream as it is → reply_for_relayed_bind(result)

One bind as the user per sign-in: the directory checks the password on the
session the client goes on to use, never on a second connection too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeoutError

from backends.base import DirectoryError, DirectoryUnavailable, Identity, InvalidCredentials
from backends.ldapwire.messages import BindRequest, LdapResult, ResultCode
from policy.decision import AuthRequest, Decision, Reason, SplitMode
from proxy.ldap.config import LdapFrontendConfig

if TYPE_CHECKING:
    from policy.engine import PasswordCheck

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


# -------------------------------------------------------------------- the flow's steps

DIRECTORY_DOWN = refuse(ResultCode.UNAVAILABLE, UNAVAILABLE, Reason.DIRECTORY_UNAVAILABLE.value)
TIMED_OUT = refuse(ResultCode.UNAVAILABLE, "timed out", Reason.DIRECTORY_UNAVAILABLE.value)
INTERNAL_ERROR = refuse(ResultCode.OTHER, "internal error", "internal_error")
OUTSIDE_USER_BASE = refuse(ResultCode.INVALID_CREDENTIALS, INVALID_CREDENTIALS,
                           Reason.OUTSIDE_USER_BASE.value)
SASL_REFUSED = refuse(
    ResultCode.AUTH_METHOD_NOT_SUPPORTED,
    "SASL binds are not supported: use a simple bind with password and code",
    "sasl_not_supported",
)


class BindRules(Protocol):
    """The DN rules a bind is checked against (the factory's: a reload changes
    them for every next bind)."""

    def is_exempt(self, bind_name: str) -> bool: ...

    def outside_user_base(self, bind_name: str, unparsable_is_outside: bool = False) -> bool: ...

    def cache_window(self, bind_name: str) -> float: ...


@dataclass(frozen=True, slots=True)
class Relay:
    """Exempt, anonymous and SASL-passthrough binds: the client's request and the
    directory's answer, both as they are; ``reason`` is the metric label."""

    reason: str


class _MfaBind:
    """Both factors through the core, then the session bound as the entry."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MFA_BIND"


MFA_BIND = _MfaBind()

BindPlan = BindReply | Relay | _MfaBind


def plan_bind(request: BindRequest, config: LdapFrontendConfig, rules: BindRules) -> BindPlan:
    """What a bind asks for, decided from the request alone: a refusal at once,
    a relay, or an MFA bind."""
    if request.version != 3:
        return refuse(ResultCode.PROTOCOL_ERROR, "only LDAPv3 is supported", "protocol_error")
    if not request.is_simple:
        # The bind name means nothing to a SASL mechanism (PLAIN carries its
        # own authcid): being exempt is no reason to relay one.
        return Relay("sasl_passthrough") if config.sasl_passthrough else SASL_REFUSED
    exempt = rules.is_exempt(request.name)
    if request.is_anonymous:
        if config.allow_anonymous:
            return Relay("anonymous")
        return refuse(
            ResultCode.INAPPROPRIATE_AUTHENTICATION, "anonymous bind not allowed",
            "anonymous_refused",
        )
    if not request.password:
        # RFC 4513 §5.1.2: an "unauthenticated" bind would succeed as anonymous.
        return refuse(
            ResultCode.UNWILLING_TO_PERFORM,
            "unauthenticated bind (name without password) not allowed",
            Reason.EMPTY_PASSWORD.value,
        )
    if not request.name:
        return refuse(
            ResultCode.INVALID_CREDENTIALS, INVALID_CREDENTIALS, Reason.INVALID_USERNAME.value
        )
    if exempt:
        return Relay("exempt")
    if rules.outside_user_base(request.name):
        return OUTSIDE_USER_BASE
    return MFA_BIND


def core_request(
    request: BindRequest, config: LdapFrontendConfig, peer: str, repeat_window: float
) -> AuthRequest:
    """The sign-in attempt an MFA bind is, for the core."""
    assert request.password is not None
    name = request.name
    return AuthRequest(
        username=name,
        # surrogateescape: a password that is not UTF-8 survives the round trip
        password=request.password.decode("utf-8", "surrogateescape"),
        protocol="ldap",
        client=config.client_name,
        mfa=config.mfa,
        split=SplitMode.APPEND,
        separator=config.separator,
        source=peer,
        # A DN names an entry (the directory resolves its spellings); anything
        # else (AD's user@realm, DOMAIN\\user) is a name for the user filter.
        bind_dn=name if "=" in name else None,
        repeat_window_seconds=int(repeat_window),
    )


@dataclass(frozen=True, slots=True)
class EntryBind:
    """The upstream session bind that checks the password: as the entry the core
    resolved (never the DN as the client spelled it), with the password part of
    the field (the code split off by the core)."""

    dn: str
    password: bytes


def entry_bind(check: PasswordCheck, rules: BindRules) -> EntryBind | BindReply | None:
    """The session bind a password check is, a refusal (an entry outside
    ``user_base``), or None when the core gave no entry to bind as (a bug)."""
    identity = check.identity
    if not identity.dn or not check.password:
        return None
    if rules.outside_user_base(identity.dn, unparsable_is_outside=True):
        return OUTSIDE_USER_BASE
    return EntryBind(identity.dn, check.password.encode("utf-8", "surrogateescape"))


def password_verdict(result: LdapResult | None, identity: Identity) -> Identity | DirectoryError:
    """The directory's answer to the session bind, as the core's verdict: the
    entry (the password is right), InvalidCredentials (a refusal: counted), or
    DirectoryUnavailable (anything else, a malformed answer included: not counted)."""
    if result is None:
        return DirectoryUnavailable("malformed BindResponse")
    if result.code == ResultCode.SUCCESS:
        return identity
    if result.code in UPSTREAM_REFUSALS:
        return InvalidCredentials(identity.username)
    return DirectoryUnavailable(f"bind answered {result.code}")


def reply_for_relayed_bind(
    result: LdapResult | None, response: bytes, reason: str, anonymous: bool
) -> BindReply:
    """A relayed bind's answer, relayed as it is (None: malformed, 52)."""
    if result is None:
        return DIRECTORY_DOWN
    code, diagnostic = result.code, result.diagnostic
    if code == ResultCode.SUCCESS:
        return BindReply(
            code, diagnostic, "accept", reason, authenticated=not anonymous, raw=response
        )
    if code == ResultCode.SASL_BIND_IN_PROGRESS:
        return BindReply(code, diagnostic, "", reason, raw=response)
    refused = "bad_password" if code in UPSTREAM_REFUSALS else Reason.DIRECTORY_UNAVAILABLE.value
    return BindReply(code, diagnostic, "reject", refused, raw=response)


def is_expected_error(error: BaseException | None) -> bool:
    """A failure of the core that has its reply; anything else is a bug (logged)."""
    return reply_for_error(error) is not None
