"""End to end: groups with the real slapd and the real ``mfa-proxy serve``.

- ``[policy] require_groups``: a user added to the group with ``ldapmodify`` is
  required at the next sign-in (``user show --json``: ``in_enrollment``, a
  fresh deadline, the invitation mail), on RADIUS, LDAP and the portal; a
  non-member is untouched; leaving the group keeps the requirement; first
  sign-ins racing on two instances sharing one state create one requirement.
  With memberOf (the overlay keeps it) and with a group search
  (``use_memberof = false``).
- With ``group_base`` set and no rule using groups, slapd receives no group
  search (its own ``stats`` log says which searches it got); a reply rule
  still gets the groups.

A private slapd with ``-d stats`` (this module changes its groups).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.portalclient import PortalClient
from tests.integration.proxyproc import ProxyProcess, pyrad_auth, pyrad_client
from tests.integration.slapd import Slapd, group_dn, start_slapd, user_dn, user_password
from tests.integration.smtpserver import SmtpServer

ACCESS_ACCEPT = 2
GROUP = "vpn-users"
DAYS = 5
FAST_MAIL = {"security": "none", "from": "MFA <mfa@example.org>", "poll_seconds": 0.5,
             "retry_seconds": 1, "timeout_seconds": 2.0, "claim_seconds": 6}
# Membership changes are seen at the next sign-in: no look-up or group caches.
NO_CACHES = {"dn_cache_seconds": 0, "group_cache_seconds": 0}


@pytest.fixture(scope="module")
def slapd_stats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    server = start_slapd(tmp_path_factory.mktemp("slapd-groups"), debug="stats")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer.start_new()
    try:
        yield server
    finally:
        server.stop()


def ldapmodify(slapd: Slapd, change: str, user: str, group: str = GROUP) -> None:
    ldif = (f"dn: {group_dn(group)}\nchangetype: modify\n{change}: member\n"
            f"member: {user_dn(user)}\n")
    subprocess.run(["ldapmodify", "-x", "-H", slapd.url, "-D", slapd.admin_dn,
                    "-w", slapd.admin_password], input=ldif.encode(), check=True,
                   capture_output=True, timeout=30)


def group_searches(slapd: Slapd, since: int) -> list[str]:
    base = f'base="ou=groups,{slapd.base_dn}"'
    return [s for s in slapd.searches(since) if s.startswith(base)]


def deadline_of(shown: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(shown["enrollment_deadline"]).replace("Z", "+00:00")
                                     ).timestamp()


def wait_until(check: Any, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def configure(workdir: Path, slapd: Slapd, smtp: SmtpServer | None = None,
              use_memberof: bool = True, **options: Any) -> ProxyProcess:
    overrides: dict[str, Any] = {"policy": {"require_groups": [GROUP], "enrollment_days": DAYS}}
    if smtp is not None:
        overrides["mail"] = {"smtp": smtp.address, **FAST_MAIL}
    overrides.update(options.pop("overrides", {}))
    return ProxyProcess.configure(
        workdir, slapd, clients=[{"name": "vpn", "address": "127.0.0.1/32"}],
        directory={"use_memberof": use_memberof, **NO_CACHES}, overrides=overrides, **options)


# -- require_groups on every front-end -------------------------------------------------------

World = tuple[ProxyProcess, tuple[str, ...]]
# Users of the test directory in "staff" only; each case takes its own.
CASES = {"memberof": (True, ("dave", "erin", "frank", "grace")),
         "group-search": (False, ("heidi", "ivan", "judy", "mallory"))}


@pytest.fixture(scope="module", params=list(CASES))
def world(request: pytest.FixtureRequest, slapd_stats: Slapd, smtp: SmtpServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    use_memberof, users = CASES[request.param]
    proxy = configure(tmp_path_factory.mktemp(f"groups-{request.param}"), slapd_stats, smtp,
                      use_memberof, ldap={}, portal={"public_url": "https://mfa.example.org/"})
    with proxy.running():
        yield proxy, users


def radius(proxy: ProxyProcess, user: str) -> Any:
    return pyrad_auth(pyrad_client(proxy), user, user_password(user))


def test_a_user_added_to_the_group_is_required_at_the_next_sign_in(
        world: World, slapd_stats: Slapd,
        smtp: SmtpServer) -> None:
    proxy, (member, other, _, _) = world
    reply = radius(proxy, member)
    assert reply.code == ACCESS_ACCEPT and "Reply-Message" not in reply
    assert proxy.user(member)["status"] == "not_required"

    ldapmodify(slapd_stats, "add", member)
    before = time.time()
    reply = radius(proxy, member)
    after = time.time()
    assert reply.code == ACCESS_ACCEPT
    assert f"{DAYS} days left" in reply["Reply-Message"][0]
    shown = proxy.user(member)
    assert (shown["status"], shown["required"], shown["days_left"]) == (
        "in_enrollment", True, DAYS)
    assert before + DAYS * 86400 - 1 <= deadline_of(shown) <= after + DAYS * 86400 + 1
    wait_until(lambda: smtp.to(f"{member}@example.org"), what=f"the invitation to {member}")
    [mail] = smtp.to(f"{member}@example.org")
    assert (dt.datetime.now(dt.UTC) + dt.timedelta(days=DAYS)).strftime("%Y-%m-%d") \
        in mail["Subject"] + SmtpServer.body(mail)

    # the non-member is untouched
    assert radius(proxy, other).code == ACCESS_ACCEPT
    assert proxy.user(other)["status"] == "not_required"

    # leaving the group keeps the requirement, and its deadline
    ldapmodify(slapd_stats, "delete", member)
    reply = radius(proxy, member)
    assert reply.code == ACCESS_ACCEPT and "days left" in reply["Reply-Message"][0]
    again = proxy.user(member)
    assert (again["status"], again["enrollment_deadline"]) == ("in_enrollment",
                                                               shown["enrollment_deadline"])
    assert len(smtp.to(f"{member}@example.org")) == 1  # one invitation, once


def test_a_new_member_is_required_on_ldap_and_the_portal_too(
        world: World, slapd_stats: Slapd) -> None:
    proxy, (_, _, by_ldap, by_portal) = world
    for user in (by_ldap, by_portal):
        ldapmodify(slapd_stats, "add", user)
    bound = subprocess.run(
        ["ldapwhoami", "-x", "-H", f"ldap://127.0.0.1:{proxy.ldap_port}", "-D", user_dn(by_ldap),
         "-w", user_password(by_ldap)], capture_output=True, text=True, timeout=30, check=False)
    assert bound.returncode == 0, bound.stderr
    assert proxy.user(by_ldap)["status"] == "in_enrollment"

    web = PortalClient(proxy.portal_port)
    page = web.follow(web.login(by_portal, user_password(by_portal)))
    assert page.status == 200 and page.by_id("mfa-status")["data-status"] == "in_enrollment"
    assert page.text("days-left") == str(DAYS)
    assert proxy.user(by_portal)["status"] == "in_enrollment"


def test_racing_first_sign_ins_on_two_instances_create_one_requirement(
        slapd_stats: Slapd, smtp: SmtpServer, tmp_path: Path) -> None:
    user = "oscar"
    ldapmodify(slapd_stats, "add", user)
    a = configure(tmp_path / "a", slapd_stats, smtp)
    b = configure(tmp_path / "b", slapd_stats, smtp, state_url=a.state_url, key_file=a.key_file)
    with a.running(), b.running():
        clients = [pyrad_client(p) for p in (a, b) for _ in range(4)]
        replies: list[Any] = []
        start = threading.Barrier(len(clients))

        def sign_in(nas: Any) -> None:
            start.wait()
            replies.append(pyrad_auth(nas, user, user_password(user)).code)

        threads = [threading.Thread(target=sign_in, args=(nas,)) for nas in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert replies == [ACCESS_ACCEPT] * len(clients)
        shown = a.user(user)
        assert shown["status"] == "in_enrollment"
        logs = a.log_tail(200_000) + b.log_tail(200_000)
        assert logs.count(f"require_groups: user={user} ") == 1, logs
        wait_until(lambda: smtp.to(f"{user}@example.org"), what="the invitation")
        time.sleep(2.0)  # a second mail would have been sent by now
        assert len(smtp.to(f"{user}@example.org")) == 1
        assert a.user(user)["enrollment_deadline"] == shown["enrollment_deadline"]


# -- no group search that no rule needs ------------------------------------------------------


def test_group_base_without_a_rule_sends_slapd_no_group_search(
        slapd_stats: Slapd, tmp_path: Path) -> None:
    # use_memberof = false: before, every sign-in made a group search
    proxy = configure(tmp_path, slapd_stats, use_memberof=False,
                      overrides={"policy": {"require_groups": []}})
    assert proxy.doc["directory"]["group_base"]
    with proxy.running():
        since = slapd_stats.log_size()
        for user in ("peggy", "trent", "alice"):
            assert radius(proxy, user).code == ACCESS_ACCEPT
        searches = slapd_stats.searches(since)
        assert len(searches) >= 3  # the user look-ups reached slapd (and were logged)
        assert group_searches(slapd_stats, since) == []


def test_a_reply_rule_still_gets_the_groups(slapd_stats: Slapd, tmp_path: Path) -> None:
    proxy = configure(tmp_path, slapd_stats, use_memberof=False,
                      overrides={"policy": {"require_groups": []}},
                      reply=[{"group": GROUP, "attributes": {"Filter-Id": "vpn"}},
                             {"group": group_dn("admins"), "attributes": {"Class": "admins"}}])
    with proxy.running():
        since = slapd_stats.log_size()
        alice = radius(proxy, "alice")  # in vpn-users and admins
        assert alice.code == ACCESS_ACCEPT
        assert alice["Filter-Id"] == ["vpn"] and alice["Class"] == [b"admins"]
        trent = radius(proxy, "trent")  # in neither
        assert trent.code == ACCESS_ACCEPT and "Filter-Id" not in trent
        found = group_searches(slapd_stats, since)
        assert [s.split('filter="', 1)[1] for s in found] == [
            f'(member={user_dn("alice")})"', f'(member={user_dn("trent")})"']
