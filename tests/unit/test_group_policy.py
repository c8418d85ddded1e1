"""Groups through the real core: searched only when a rule for the request uses
them, and ``[policy] require_groups`` (a member is required at sign-in).

The real PolicyEngine and Authenticator on a real SQLite Store with a fake
clock (tests/unit/test_engine.py's harness); the directory is a fake that
counts its group searches, or the real AsyncLdapDirectory on fake
connections (tests/unit/test_ldap_backend_codec.py's ``Wired``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from backends.base import DirectoryUnavailable, Identity, group_names
from policy.decision import AuthRequest, MfaMode, Outcome, Reason, SplitMode
from policy.engine import Authenticator, GroupRequirement, PolicyEngine
from policy.mail import OutboxEvents
from tests.sync_core import authenticate_sync
from tests.unit.test_engine import (
    DAY,
    AsyncFake,
    FakeDirectory,
    Harness,
    fired,
    make_harness,
    outcome,
)
from tests.unit.test_ldap_backend_codec import Wired

ACCEPT, REJECT, NEED_CODE = Outcome.ACCEPT, Outcome.REJECT, Outcome.NEED_CODE
VPN = "cn=VPN Users,ou=groups,dc=example,dc=org"


class GroupDirectory(FakeDirectory):
    """FakeDirectory whose users' groups the test sets; with ``search`` the
    look-up names none (like an entry without memberOf) and :meth:`groups`
    is the group search, counted."""

    def __init__(self, search: bool = False) -> None:
        super().__init__()
        self.member_of: dict[str, tuple[str, ...]] = {}
        self.search = search
        self.group_searches = 0
        self.groups_down = False

    def lookup(self, username: str) -> Identity | None:
        found = super().lookup(username)
        if found is None:
            return None
        groups = self.member_of.get(found.username, ())
        if self.search:
            return Identity(found.username, found.dn, (), groups_complete=False)
        return Identity(found.username, found.dn, groups)

    def groups(self, identity: Identity) -> Identity:
        self.group_searches += 1
        if self.groups_down:
            raise DirectoryUnavailable("group search: result 51")
        return Identity(identity.username, identity.dn, self.member_of.get(identity.username, ()))


class AsyncGroups(AsyncFake):
    def groups(self, identity: Identity) -> defer.Deferred[Identity]:
        return defer.maybeDeferred(self.directory.groups, identity)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = make_harness(tmp_path)
    harness.directory = GroupDirectory()
    yield harness
    harness.store.close()


def requiring(h: Harness, *groups: str, days: int = 7, mail: bool = False) -> None:
    h.engine.group_requirement = GroupRequirement(groups, days)
    if mail:
        h.engine.account_events = OutboxEvents(h.store, h.clock)


def auth(h: Harness, request: AuthRequest) -> Any:
    """Through the Authenticator (the reactor-facing path), run synchronously."""
    authenticator = Authenticator(h.engine, AsyncGroups(h.directory),
                                  lambda f, *a: defer.maybeDeferred(f, *a), clock=h.clock)
    return fired(authenticator.authenticate(request))


def request(h: Harness, username: str = "alice", password: str | None = None,
            needs_groups: bool = False, **kw: Any) -> AuthRequest:
    r = h.request(username, password, **kw)
    r.needs_groups = needs_groups
    return r


# -- the group search only when a rule needs it ------------------------------------------


def test_no_rule_no_group_search(h: Harness) -> None:
    h.directory.search = True
    h.directory.member_of["alice"] = (VPN,)
    d = auth(h, request(h))
    assert outcome(d) == (ACCEPT, Reason.NOT_REQUIRED)
    assert h.directory.group_searches == 0
    assert d.identity is not None and d.identity.groups == ()


def test_a_rule_of_the_resource_gets_the_groups(h: Harness) -> None:
    h.directory.search = True
    h.directory.member_of["alice"] = (VPN,)
    d = auth(h, request(h, needs_groups=True))
    assert outcome(d) == (ACCEPT, Reason.NOT_REQUIRED)
    assert h.directory.group_searches == 1
    assert d.identity is not None and d.identity.groups == (VPN,)


def test_groups_the_entry_named_need_no_search(h: Harness) -> None:
    h.directory.member_of["alice"] = (VPN,)  # memberOf: complete already
    d = auth(h, request(h, needs_groups=True))
    assert d.identity is not None and d.identity.groups == (VPN,)
    assert h.directory.group_searches == 0


def test_a_failed_group_search_is_directory_unavailable_and_touches_no_state(
        h: Harness) -> None:
    h.directory.search = True
    h.directory.groups_down = True
    d = auth(h, request(h, needs_groups=True))
    assert outcome(d) == (REJECT, Reason.DIRECTORY_UNAVAILABLE)
    assert h.store.admin.get("alice") is None and h.directory.calls == []  # no password tried
    assert h.events.directory_calls[-1][1] == "directory_unavailable"
    requiring(h, "vpn users")  # require_groups needs the groups on every request
    assert outcome(auth(h, request(h))) == (REJECT, Reason.DIRECTORY_UNAVAILABLE)
    assert h.store.admin.get("alice") is None


def test_require_groups_makes_every_request_read_the_groups(h: Harness) -> None:
    h.directory.search = True
    requiring(h, "vpn users")
    assert h.engine.needs_groups(request(h))
    auth(h, request(h))
    assert h.directory.group_searches == 1


# -- require_groups ------------------------------------------------------------------------


def test_a_member_is_required_at_sign_in_with_a_fresh_period(h: Harness) -> None:
    requiring(h, "vpn users", days=5)
    h.directory.member_of["alice"] = (VPN,)
    h.clock.advance(1234)
    d = auth(h, request(h))
    assert outcome(d) == (ACCEPT, Reason.IN_ENROLLMENT)
    assert d.days_left == 5 and "5 days left" in d.message
    record = h.record()
    assert record.required and record.enrollment_deadline == int(h.clock()) + 5 * DAY
    assert record.status(h.clock()) == "in_enrollment"
    # the period runs from the first sign-in: later sign-ins do not restart it
    h.clock.advance(DAY)
    assert auth(h, request(h)).days_left == 4
    assert h.record().enrollment_deadline == record.enrollment_deadline


def test_a_non_member_is_untouched(h: Harness) -> None:
    requiring(h, "vpn users")
    h.directory.member_of["bob"] = ("cn=staff,ou=groups,dc=example,dc=org",)
    assert outcome(auth(h, request(h, "bob"))) == (ACCEPT, Reason.NOT_REQUIRED)
    assert h.store.admin.get("bob") is None or not h.store.admin.get("bob").required  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["vpn users", "VPN Users", VPN, VPN.upper(),
                                  "cn=VPN Users, ou=groups, dc=example, dc=org"])
def test_a_group_by_its_name_or_its_full_dn(h: Harness, name: str) -> None:
    requiring(h, name)
    h.directory.member_of["alice"] = (VPN,)
    assert outcome(auth(h, request(h))) == (ACCEPT, Reason.IN_ENROLLMENT)


def test_a_full_dn_names_that_group_only(h: Harness) -> None:
    requiring(h, "cn=vpn users,ou=other,dc=example,dc=org")
    h.directory.member_of["alice"] = (VPN,)
    assert outcome(auth(h, request(h))) == (ACCEPT, Reason.NOT_REQUIRED)


def test_a_wrong_password_starts_no_period(h: Harness) -> None:
    requiring(h, "vpn users")
    h.directory.member_of["alice"] = (VPN,)
    assert outcome(auth(h, request(h, password="wrong"))) == (REJECT, Reason.BAD_PASSWORD)
    record = h.record()
    assert not record.required and record.enrollment_deadline is None and record.failures == 1


def test_leaving_the_group_keeps_the_requirement_and_the_key(h: Harness) -> None:
    requiring(h, "vpn users")
    h.directory.member_of["alice"] = (VPN,)
    auth(h, request(h))
    deadline = h.record().enrollment_deadline
    h.directory.member_of["alice"] = ()
    assert outcome(auth(h, request(h))) == (ACCEPT, Reason.IN_ENROLLMENT)
    assert h.record().required and h.record().enrollment_deadline == deadline
    h.enroll()
    assert outcome(auth(h, request(h, password=h.with_code()))) == (ACCEPT, Reason.OK)
    assert outcome(auth(h, request(h))) == (NEED_CODE, Reason.CODE_NEEDED)


def test_an_expired_period_of_a_member_stays_expired(h: Harness) -> None:
    requiring(h, "vpn users", days=1)
    h.directory.member_of["alice"] = (VPN,)
    auth(h, request(h))
    h.clock.advance(DAY)
    assert outcome(auth(h, request(h))) == (REJECT, Reason.ENROLLMENT_EXPIRED)
    assert h.record().enrollment_deadline == int(h.clock())  # not reopened by the group


def test_an_admin_s_requirement_stands(h: Harness) -> None:
    requiring(h, "vpn users", days=7)
    h.directory.member_of["alice"] = (VPN,)
    h.require(days=2)
    assert auth(h, request(h)).days_left == 2


def test_a_member_with_a_key_but_no_requirement_needs_a_code_at_once(h: Harness) -> None:
    h.enroll()  # enrolled_not_required: the password alone would do
    requiring(h, "vpn users")
    h.directory.member_of["alice"] = (VPN,)
    # the password field is read as password + code from the first sign-in on
    assert outcome(auth(h, request(h, split=SplitMode.APPEND))) == (REJECT, Reason.MISSING_CODE)
    assert h.record().required  # the password was right: required from now on
    h.store.admin.unrequire("alice")
    assert outcome(auth(h, request(h, password="wrong," + h.code()))) == (
        REJECT, Reason.BAD_PASSWORD)
    assert not h.record().required  # a wrong password stores no requirement
    d = auth(h, request(h, password=h.with_code()))
    assert outcome(d) == (ACCEPT, Reason.OK)
    assert h.record().required and h.record().status(h.clock()) == "enrolled"


def test_a_challenge_round_does_not_require_twice(h: Harness, tmp_path: Path) -> None:
    h.enroll()
    requiring(h, "vpn users", mail=True)
    h.directory.member_of["alice"] = (VPN,)
    first = auth(h, request(h, split=SplitMode.CHALLENGE))
    assert outcome(first) == (NEED_CODE, Reason.CODE_NEEDED)
    second = AuthRequest("alice", "", "radius", "vpn", split=SplitMode.CHALLENGE,
                         code=h.code(), verified_identity=first.identity)
    assert outcome(auth(h, second)) == (ACCEPT, Reason.OK)
    assert h.record().required
    assert h.store.admin.mail_queue() == []  # enrolled already: nothing to set up, no invitation


def test_bypass_and_mfa_off_still_store_the_requirement(h: Harness) -> None:
    requiring(h, "vpn users")
    h.directory.member_of["alice"] = (VPN,)
    h.directory.member_of["bob"] = (VPN,)
    h.store.admin.set_bypass("bob", True)
    assert outcome(auth(h, request(h, mfa=MfaMode.OFF))) == (ACCEPT, Reason.MFA_OFF)
    assert outcome(auth(h, request(h, "bob"))) == (ACCEPT, Reason.BYPASS)
    assert h.record().required and h.record("bob").required


def test_strict_mode_refuses_the_new_member_without_a_key(h: Harness) -> None:
    requiring(h, "vpn users")
    h.directory.member_of["alice"] = (VPN,)
    assert outcome(auth(h, request(h, mfa=MfaMode.STRICT))) == (REJECT, Reason.NOT_ENROLLED)
    assert h.record().required  # the password was right: the period started


def test_the_required_mail_is_queued_once_with_the_requirement(h: Harness) -> None:
    requiring(h, "vpn users", mail=True)
    h.directory.member_of["alice"] = (VPN,)
    auth(h, request(h))
    auth(h, request(h))
    [mail] = h.store.admin.mail_queue()
    assert (mail.event, mail.username) == ("required", "alice")
    assert mail.deadline == h.record().enrollment_deadline


def test_the_synchronous_path_applies_it_too(h: Harness) -> None:
    requiring(h, "vpn users")
    h.directory.member_of["alice"] = (VPN,)
    assert outcome(h.auth()) == (ACCEPT, Reason.IN_ENROLLMENT)
    assert h.record().required


def test_local_directory_groups(tmp_path: Path) -> None:
    from argon2 import PasswordHasher

    from backends.local import LocalDirectory

    harness = make_harness(tmp_path)
    try:
        users = LocalDirectory(tmp_path / "users.toml",
                               PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
        users.set_password("carol", "carol-pw", ["VPN-Users"])
        users.set_password("dave", "dave-pw", ["staff"])
        harness.engine.group_requirement = GroupRequirement(("vpn-users",), 7)
        for name in ("carol", "dave"):
            d = authenticate_sync(harness.engine, harness.request(name), users)
            assert d.accepted
        assert harness.record("carol").required and not harness.record("dave").required
    finally:
        harness.store.close()


# -- two sign-ins racing (two instances sharing one state) --------------------------------


def test_racing_first_sign_ins_create_one_requirement(h: Harness, tmp_path: Path) -> None:
    from policy.store import Store

    requiring(h, "vpn users", mail=True)
    h.directory.member_of["alice"] = (VPN,)
    other_store = Store(h.store.url, h.clock)
    try:
        other = PolicyEngine(other_store, h.keys, h.engine.totp, h.engine.limits,
                             h.engine.usernames, clock=h.clock,
                             group_requirement=h.engine.group_requirement,
                             account_events=OutboxEvents(other_store, h.clock))
        identity = h.directory.lookup("alice")
        assert identity is not None
        # both have read "not required" before either wrote
        mine = h.engine.begin(request(h), identity, "alice")
        h.clock.advance(5)
        theirs = other.begin(request(h), identity, "alice")
        assert not isinstance(mine, type(None)) and not isinstance(theirs, type(None))
        assert mine.joins_group and theirs.joins_group  # type: ignore[union-attr]
        h.engine.join_group(mine)  # type: ignore[arg-type]
        deadline = h.record().enrollment_deadline
        other.join_group(theirs)  # type: ignore[arg-type]
        assert h.record().enrollment_deadline == deadline  # the first one's period stands
        assert theirs.record.enrollment_deadline == deadline  # type: ignore[union-attr]
        assert len(h.store.admin.mail_queue()) == 1
    finally:
        other_store.close()


def test_require_new_is_conditional(h: Harness) -> None:
    assert h.store.admin.require_new("alice", 100)
    assert not h.store.admin.require_new("alice", 200)
    assert h.record().enrollment_deadline == 100
    h.store.admin.unrequire("alice")
    assert h.store.admin.require_new("alice", 300)
    assert h.record().enrollment_deadline == 300


# -- the real LDAP client, on fake connections, through the real core ---------------------


def ldap_auth(h: Harness, wired: Wired, needs_groups: bool) -> list[Any]:
    authenticator = Authenticator(h.engine, wired.directory,
                                  lambda f, *a: defer.maybeDeferred(f, *a), clock=h.clock)
    result: list[Any] = []
    authenticator.authenticate(request(h, "bob", "pw", needs_groups=needs_groups)
                               ).addBoth(result.append)
    return result


BOB = ("uid=bob,ou=people", {"uid": ["bob"]})  # no memberOf


def test_ldap_group_base_without_a_rule_sends_no_group_search(h: Harness) -> None:
    wired = Wired(group_base="ou=g")
    result = ldap_auth(h, wired, needs_groups=False)
    wired.search.answer_search([BOB])
    wired.bind.answer_bind(0)
    assert outcome(fired_list(result)) == (ACCEPT, Reason.NOT_REQUIRED)
    assert wired.search.requests() == []
    assert (wired.directory.stats.searches, wired.directory.stats.group_searches) == (1, 0)


def test_ldap_a_reply_rule_gets_the_groups_cached_until_they_expire(h: Harness) -> None:
    wired = Wired(group_base="ou=g", group_cache_seconds=60)

    def sign_in(search_expected: bool) -> Any:
        result = ldap_auth(h, wired, needs_groups=True)
        wired.search.answer_search([BOB])
        if search_expected:
            wired.search.answer_search([("cn=vpn,ou=g", {})])
        wired.bind.answer_bind(0)
        assert wired.search.requests() == []
        return fired_list(result)

    assert sign_in(True).identity.groups == ("cn=vpn,ou=g",)
    wired.clock.advance(59)
    assert sign_in(False).identity.groups == ("cn=vpn,ou=g",)  # cached
    wired.clock.advance(1)
    assert sign_in(True).identity.groups == ("cn=vpn,ou=g",)  # expired: searched again
    assert wired.directory.stats.group_searches == 2


def test_ldap_require_groups_by_group_search(h: Harness) -> None:
    requiring(h, "vpn")
    wired = Wired(group_base="ou=g", group_cache_seconds=0)
    result = ldap_auth(h, wired, needs_groups=False)
    wired.search.answer_search([BOB])
    wired.search.answer_search([("cn=vpn,ou=g", {})])
    wired.bind.answer_bind(0)
    assert outcome(fired_list(result)) == (ACCEPT, Reason.IN_ENROLLMENT)
    assert h.record("bob").required


def fired_list(result: list[Any]) -> Any:
    assert result, "not decided"
    return result[0]


def test_group_names_match_names_and_dns() -> None:
    assert group_names([VPN]) == {"cn=vpn users,ou=groups,dc=example,dc=org", "vpn users"}
    assert group_names([r"cn=a\2C b\, c,ou=g"]) == {r"cn=a\2c b\,c,ou=g", "a,b,c"}
    assert group_names(["local-group"]) == {"local-group"}
