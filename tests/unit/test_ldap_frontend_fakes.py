"""The real core behind the LDAP front-end in tests.

``RealCore`` is the product's own :class:`PolicyEngine` and
:class:`Authenticator` on a SQLite store in a temporary folder -- nothing
about passwords, codes or locks is imitated. Only the directory the core
asks is chosen by the test: :class:`MemoryDirectory` (what slapd would
answer for the test entries, for unit tests without sockets) or the real
slapd (integration tests). Shared by the unit and integration suites.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed

from backends.base import AsyncDirectory, DirectoryUnavailable, Identity, InvalidCredentials
from policy.decision import AuthRequest, Decision
from policy.engine import Authenticator, Limits, PasswordCheck, PolicyEngine
from policy.keys import KeyRing
from policy.schema import DAY
from policy.store import Store
from policy.totp import TotpParams, code_for_step, new_totp_key
from policy.usernames import UsernameRules
from proxy.ldap.dn import parse_dn
from tests.clock import ManualClock

BASE = "dc=example,dc=org"
PEOPLE = f"ou=people,{BASE}"
USERS = ("alice", "bob", "carol", "dave")
T0 = 1_700_000_015.0
# A wide window: a test may take several fresh codes before the core decides any
# (a pipelined segment); each is for a later time step than the one before.
PARAMS = TotpParams(window=10)


def user_dn(name: str) -> str:
    return f"uid={name},{PEOPLE}"


class MemoryDirectory:
    """The test entries uid=NAME,ou=people with password NAME-pw, resolved the
    way slapd resolves them (any DN spelling parse_dn reads, case-insensitive
    names; AD-style names through the user filter)."""

    def __init__(self, users: tuple[str, ...] = USERS) -> None:
        self.passwords = {name: f"{name}-pw" for name in users}
        self.checks: list[tuple[str, str]] = []  # (username, password) tried
        self.down = False

    def lookup(self, username: str) -> Deferred[Identity | None]:
        if self.down:
            return fail(DirectoryUnavailable("connection refused"))
        name = username.casefold()
        return succeed(Identity(name, user_dn(name)) if name in self.passwords else None)

    def lookup_dn(self, dn: str) -> Deferred[Identity | None]:
        try:
            rdns = parse_dn(dn)
        except ValueError:
            return succeed(None)
        rest = [tuple((t, v.casefold()) for t, v in rdn) for rdn in rdns[1:]]
        if not rdns or rest != [(("ou", "people"),), (("dc", "example"),), (("dc", "org"),)]:
            return succeed(None)
        uid = dict(rdns[0]).get("uid")
        return self.lookup(uid) if uid else succeed(None)

    def check_password(self, identity: Identity, password: str) -> Deferred[Identity]:
        self.checks.append((identity.username, password))
        if self.down:
            return fail(DirectoryUnavailable("connection refused"))
        if self.passwords.get(identity.username) != password:
            return fail(InvalidCredentials(identity.username))
        return succeed(identity)

    def forget(self, name: str) -> None:
        """Nothing is cached here (see :class:`CachingDirectory`)."""

    def ping(self) -> Deferred[None]:
        return succeed(None)


class CachingDirectory(MemoryDirectory):
    """Entries as a look-up cache hands them out (``from_cache``) until the core
    asks for a name to be forgotten; ``deleted`` entries are gone from the
    directory, though a cache would still have them."""

    def __init__(self, users: tuple[str, ...] = USERS) -> None:
        super().__init__(users)
        self.deleted: set[str] = set()
        self.forgotten: list[str] = []

    def lookup(self, username: str) -> Deferred[Identity | None]:
        fresh = self.forgotten and username.casefold() in self.forgotten
        name = username.casefold()
        if fresh and name in self.deleted:
            return succeed(None)
        return super().lookup(username).addCallback(
            lambda found: found and replace(found, from_cache=not fresh))

    def forget(self, name: str) -> None:
        self.forgotten.append(name.casefold())


class RealCore:
    """The front-end's ``start_sign_in``: the real engine's
    :meth:`Authenticator.start`, users enrolled and required. ``good(user)`` is
    the password and a fresh valid code (the core's clock then moves one time
    step, so the next one is fresh too). The LDAP front-end checks passwords
    with its own upstream bind when the second factor checks out, so
    ``directory`` mostly resolves entries for it (its ``checks`` record the
    core's own binds: a wrong or missing code)."""

    def __init__(self, directory: AsyncDirectory | None = None,
                 enrolled: tuple[str, ...] = USERS, max_failures: int = 5) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="realcore-"))
        self.clock = ManualClock(T0)
        self.directory: Any = directory or MemoryDirectory()
        self.store = Store(f"sqlite:///{self.root / 'state.db'}", self.clock)
        self.store.upgrade()
        self.keys = KeyRing(self.root / "secret.key")
        self.engine = PolicyEngine(self.store, self.keys, PARAMS, Limits(max_failures, 900),
                                   UsernameRules(), clock=self.clock)
        self.authenticator = Authenticator(self.engine, self.directory,
                                           lambda f, *a: maybeDeferred(f, *a), clock=self.clock)
        self.secrets: dict[str, str] = {}
        self.requests: list[AuthRequest] = []
        self.hold: Deferred[None] | None = None  # when set, start's next answer waits for it
        self.checks: list[PasswordCheck] = []  # every password check start handed out
        for name in enrolled:
            self.enroll(name)

    def __call__(self, request: AuthRequest) -> Deferred[Decision | PasswordCheck]:
        self.requests.append(request)
        started = self.authenticator.start(request)
        started.addCallback(self._handed_out)
        if self.hold is not None:
            hold, self.hold = self.hold, None
            return started.addCallback(lambda d: hold.addCallback(lambda _: d))
        return started

    def authenticate(self, request: AuthRequest) -> Deferred[Decision]:
        """The whole decision, the core checking the password itself (what the
        RADIUS front-end and the portal call)."""
        self.requests.append(request)
        return self.authenticator.authenticate(request)

    def _handed_out(self, answer: Decision | PasswordCheck) -> Decision | PasswordCheck:
        if isinstance(answer, PasswordCheck):
            self.checks.append(answer)
        return answer

    @property
    def turns_held(self) -> int:
        """Identities whose turn at the gate is taken (0 once every sign-in ended)."""
        return len(self.authenticator.gate)

    # -- state, through the store as the admin commands write it

    def enroll(self, name: str) -> None:
        self.secrets[name] = new_totp_key()
        now = int(self.clock())
        self.store.admin.require(name, now + 7 * DAY)
        self.store.admin.set_totp_key(name, self.keys.encrypt(self.secrets[name].encode(), name),
                              self.keys.current)

    def code(self, name: str = "alice") -> str:
        """A code of a time step after every one handed out before (the clock
        moves one step first), so it is fresh even if earlier ones are used."""
        self.clock.t += PARAMS.period
        return code_for_step(self.secrets[name], PARAMS.step_at(self.clock()), PARAMS)

    def good(self, name: str = "alice") -> str:
        return f"{name}-pw,{self.code(name)}"

    def use_elsewhere(self, name: str = "alice") -> None:
        """Another instance accepts the latest code handed out (a replay marker at its step)."""
        assert self.store.hot.accept_step(name, PARAMS.step_at(self.clock()), self.clock())

    def lock(self, name: str) -> None:
        for _ in range(self.engine.limits.max_failures):
            self.store.hot.record_failure(name, self.clock(), self.engine.limits.max_failures,
                                          self.engine.limits.lockout_seconds)

    def expire(self, name: str) -> None:
        self.store.admin.reset(name, int(self.clock()) - 1)

    def enrolling(self, name: str, days: int) -> None:
        self.store.admin.reset(name, int(self.clock()) + days * DAY - 60)

    def failures(self, name: str) -> int:
        record = self.store.admin.get(name)
        return record.failures if record else 0

    def close(self) -> None:
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)
