"""Fakes for the LDAP front-end tests (shared with the integration tests).

``FakeCore`` follows the core's contract: it refuses a locked user before
calling ``verify``, splits the secret (append mode), calls ``verify`` at
most once, then checks the code against a fixed value.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from backends.base import DirectoryUnavailable, Identity, InvalidCredentials
from policy.decision import AuthRequest, Decision, Outcome, Reason, SplitMode

GOOD_CODE = "123456"

Verify = Callable[[str, str], Deferred[Identity]]


class FakeCore:
    def __init__(self) -> None:
        self.requests: list[AuthRequest] = []
        self.verified: list[tuple[str, str]] = []
        self.locked: set[str] = set()
        self.expired: set[str] = set()
        self.enrolling: dict[str, int] = {}  # username → days left
        self.accept_without_verify = False
        self.hold: Deferred[Decision] | None = None  # when set, decisions wait for it

    def __call__(self, request: AuthRequest, verify: Verify | None = None) -> Deferred[Decision]:
        assert verify is not None
        assert request.protocol == "ldap" and request.split is SplitMode.APPEND
        self.requests.append(request)
        username = request.username.lower()
        if username in self.locked:
            return succeed(self._reject(username, Reason.LOCKED_OUT))
        if self.accept_without_verify:
            return succeed(Decision(Outcome.ACCEPT, Reason.OK, username))
        password, separator, code = request.secret.rpartition(request.separator)
        if not separator:
            password, code = request.secret, ""
        self.verified.append((username, password))
        checked = verify(username, password)
        checked.addCallbacks(self._decide, self._refused, (username, code), None, (username,))
        if self.hold is not None:
            hold, self.hold = self.hold, None
            return checked.addCallback(lambda decision: hold.addCallback(lambda _: decision))
        return checked

    def _decide(self, identity: Identity, username: str, code: str) -> Decision:
        if username in self.expired:
            return self._reject(username, Reason.ENROLLMENT_EXPIRED)
        if username in self.enrolling:
            days = self.enrolling[username]
            return Decision(
                Outcome.ACCEPT, Reason.IN_ENROLLMENT, username, identity, days_left=days
            )
        if code == GOOD_CODE:
            return Decision(Outcome.ACCEPT, Reason.OK, username, identity)
        return self._reject(username, Reason.BAD_CODE if code else Reason.MISSING_CODE)

    def _refused(self, failure: Failure, username: str) -> Decision:
        if failure.check(DirectoryUnavailable):
            return self._reject(username, Reason.DIRECTORY_UNAVAILABLE)
        failure.trap(InvalidCredentials)
        return self._reject(username, Reason.BAD_PASSWORD)

    @staticmethod
    def _reject(username: str, reason: Reason) -> Decision:
        return Decision(Outcome.REJECT, reason, username, message=reason.value)


def test_fake_core_follows_the_contract() -> None:
    calls: list[tuple[str, str]] = []

    def verify(username: str, password: str) -> Deferred[Identity]:
        calls.append((username, password))
        return succeed(Identity(username))

    core = FakeCore()
    request = AuthRequest("Alice", "pw,123456", "ldap", "ldap", split=SplitMode.APPEND)
    decisions: list[Decision] = []
    core(request, verify).addCallback(decisions.append)
    assert calls == [("alice", "pw")] and decisions[0].accepted
    core.locked.add("alice")
    core(request, verify).addCallback(decisions.append)
    assert decisions[1].reason is Reason.LOCKED_OUT and len(calls) == 1
