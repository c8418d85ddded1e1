"""End to end, issue 11's features on the real ``mfa-proxy serve`` with the real
slapd: recovery codes used once each over RADIUS (append and challenge, pyrad
as the NAS), LDAP (``ldapwhoami`` through the proxy) and the portal (shown once
after a set-up, taken at the code step); many simultaneous uses of one code
accept once; ``[policy] recovery_codes = false`` refuses them; a resync at +7
minutes lets the phone's codes in; a bypass past its end is off; a deleted
user signs in as never required, with the audit rows still there.

The commands' own output and exit statuses are in test_cli_admin.py; the rules
with an injected clock in tests/unit/test_admin_features.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
import pytest

from tests.integration.portalclient import PortalClient
from tests.integration.proxyproc import ProxyProcess, pyrad_auth, pyrad_client
from tests.integration.slapd import Slapd, user_dn, user_password

pytestmark = pytest.mark.timeout(300)

ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE = 2, 3, 11
LDAP_INVALID_CREDENTIALS = 49


def totp_key(name: str) -> str:
    return base64.b32encode(hashlib.sha1(name.encode()).digest()).decode()  # noqa: S324


@dataclass
class World:
    proxy: ProxyProcess
    enrolled: list[str] = field(default_factory=list)
    enrolling: list[str] = field(default_factory=list)

    def take(self, pool: str = "enrolled") -> str:
        names: list[str] = getattr(self, pool)
        return names.pop(0)

    def recovery_codes(self, user: str) -> list[str]:
        out = self.proxy.cli("user", "recovery-codes", user, "--json").stdout
        codes: list[str] = json.loads(out)["recovery_codes"]
        assert len(codes) == 10
        return codes

    def left(self, user: str) -> int:
        return int(self.proxy.user(user)["recovery_codes_left"])

    def whoami(self, user: str, password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ldapwhoami", "-x", "-H", f"ldap://127.0.0.1:{self.proxy.ldap_port}",
             "-D", user_dn(user), "-w", password], capture_output=True, text=True, timeout=30,
            stdin=subprocess.DEVNULL, check=False)

    def audit(self, user: str, count: int,
              reasons: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
        """The user's audit rows (protocol, result, reason; only ``reasons`` when
        given), oldest first, once there are ``count`` (rows are flushed every
        0.25 s, so the newest may not be there yet)."""
        deadline = time.monotonic() + 10
        while True:
            with closing(sqlite3.connect(self.proxy.state_path)) as db:
                rows = [tuple(r) for r in db.execute(
                    "SELECT protocol, result, reason FROM audit WHERE username = ? "
                    "ORDER BY id", (user,)).fetchall() if not reasons or r[2] in reasons]
            if len(rows) >= count or time.monotonic() > deadline:
                return rows


def numbered(first: int, count: int) -> list[str]:
    return [f"user{i:05d}" for i in range(first, first + count)]


@pytest.fixture(scope="module")
def world(slapd: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(ProxyProcess.configure(
        tmp_path_factory.mktemp("admin-features"), slapd,
        clients=[{"name": "vpn", "address": "127.0.0.1/32", "mode": "append"},
                 {"name": "chal", "address": "127.0.0.2/32", "mode": "challenge"}],
        ldap={"upstream": slapd.url, "exempt": [], "separator": ","}, portal={}),
        enrolled=numbered(701, 20), enrolling=numbered(741, 5))
    rows = [f"{u},{totp_key(u)}" for u in w.enrolled] + [f"{u},,5" for u in w.enrolling]
    csv = w.proxy.workdir / "users.csv"
    csv.write_text("\n".join(rows) + "\n")
    w.proxy.cli("user", "import", str(csv))
    with w.proxy.running():
        yield w


# -- RADIUS ------------------------------------------------------------------------------------


def test_a_recovery_code_signs_in_once_over_radius_in_append_mode(world: World) -> None:
    user = world.take()
    codes = world.recovery_codes(user)
    nas = pyrad_client(world.proxy, "vpn")
    field = f"{user_password(user)},{codes[0]}"
    assert pyrad_auth(nas, user, field).code == ACCESS_ACCEPT
    assert pyrad_auth(nas, user, field).code == ACCESS_REJECT
    assert world.left(user) == 9 and world.proxy.user(user)["failures"] == 1
    # another code of the ten, typed in capitals
    assert pyrad_auth(nas, user, f"{user_password(user)},{codes[1].upper()}").code \
        == ACCESS_ACCEPT
    assert world.audit(user, 3) == [("radius", "accept", "recovery_code"),
                                    ("radius", "reject", "bad_code"),
                                    ("radius", "accept", "recovery_code")]
    m = world.proxy.metrics()
    assert m.value("mfa_proxy_requests_total", client="vpn", result="accept",
                   reason="recovery_code") >= 2


def test_a_recovery_code_answers_the_radius_challenge_once(world: World) -> None:
    user = world.take()
    code = world.recovery_codes(user)[4]
    nas = pyrad_client(world.proxy, "chal", "127.0.0.2")
    for expected in (ACCESS_ACCEPT, ACCESS_REJECT):
        challenge = pyrad_auth(nas, user, user_password(user))
        assert challenge.code == ACCESS_CHALLENGE
        answer = pyrad_auth(nas, user, code, state=challenge["State"][0])
        assert answer.code == expected
    assert world.left(user) == 9


def test_many_simultaneous_uses_of_one_recovery_code_accept_once(world: World) -> None:
    user = world.take()
    code = world.recovery_codes(user)[0]
    field = f"{user_password(user)},{code}"
    racers = 16
    barrier = threading.Barrier(racers)
    answers: list[int] = []
    sockets = [pyrad_client(world.proxy, "vpn") for _ in range(racers)]

    def sign_in(nas: Any) -> None:
        barrier.wait()
        answers.append(pyrad_auth(nas, user, field).code)

    threads = [threading.Thread(target=sign_in, args=(nas,)) for nas in sockets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(answers) == [ACCESS_ACCEPT] + [ACCESS_REJECT] * (racers - 1)
    assert world.left(user) == 9
    rows = world.audit(user, racers)
    assert rows.count(("radius", "accept", "recovery_code")) == 1


# -- LDAP ---------------------------------------------------------------------------------------


def test_a_recovery_code_binds_once_over_ldap(world: World) -> None:
    user = world.take()
    code = world.recovery_codes(user)[2]
    first = world.whoami(user, f"{user_password(user)},{code}")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"dn:{user_dn(user)}"
    again = world.whoami(user, f"{user_password(user)},{code}")
    assert again.returncode == LDAP_INVALID_CREDENTIALS, again
    assert world.left(user) == 9
    assert world.audit(user, 2) == [("ldap", "accept", "recovery_code"),
                                    ("ldap", "reject", "bad_code")]


def test_one_code_is_used_once_across_protocols(world: World) -> None:
    user = world.take()
    code = world.recovery_codes(user)[0]
    assert world.whoami(user, f"{user_password(user)},{code}").returncode == 0
    nas = pyrad_client(world.proxy, "vpn")
    assert pyrad_auth(nas, user, f"{user_password(user)},{code}").code == ACCESS_REJECT


# -- the portal --------------------------------------------------------------------------------


def test_the_portal_shows_new_codes_once_after_set_up_and_takes_one_at_the_code_step(
        world: World) -> None:
    user = world.take("enrolling")
    web = PortalClient(world.proxy.portal_port)
    account = web.follow(web.login(user, user_password(user)))
    assert account.by_id("mfa-status")["data-status"] == "in_enrollment"
    assert not account.has("recovery-codes")
    page = web.start_setup()
    key = web.secret(page)
    done = web.post("/setup", {"code": pyotp.TOTP(key).now()})
    assert done.status == 303, done.body
    shown = web.follow(done)
    assert shown.by_id("mfa-status")["data-status"] == "enrolled"
    assert shown.has("recovery-codes"), shown.body
    codes = re.findall(r'<code class="recovery-code">([^<]+)</code>', shown.body)
    assert len(codes) == len(set(codes)) == 10
    assert world.left(user) == 10
    again = web.get("/")  # shown once: a reload shows none
    assert again.status == 200 and not again.has("recovery-codes")
    assert again.text("recovery-codes-left") == "10"

    # signing in with the password, then a recovery code at the code step
    web = PortalClient(world.proxy.portal_port)
    signed_in = web.login_with_code(user, user_password(user), codes[0])
    assert signed_in.status == 303, signed_in.body
    assert web.follow(signed_in).by_id("mfa-status")["data-status"] == "enrolled"
    assert world.left(user) == 9
    web = PortalClient(world.proxy.portal_port)
    refused = web.login_with_code(user, user_password(user), codes[0])
    assert refused.status == 401 and refused.by_id("message")["data-kind"] == "bad_credentials"
    # another one of them on the VPN
    nas = pyrad_client(world.proxy, "vpn")
    assert pyrad_auth(nas, user, f"{user_password(user)},{codes[1]}").code == ACCESS_ACCEPT
    assert world.audit(user, 3, reasons=("recovery_code", "bad_code")) == [
        ("portal", "accept", "recovery_code"), ("portal", "reject", "bad_code"),
        ("radius", "accept", "recovery_code")]


# -- resync, bypass, delete ---------------------------------------------------------------------


def test_after_a_resync_the_phones_codes_seven_minutes_ahead_sign_in(world: World) -> None:
    user = world.take()
    phone = pyotp.TOTP(totp_key(user))
    left = 30 - time.time() % 30
    if left < 10:  # the codes below stay this step's while the commands run
        time.sleep(left + 0.05)
    ahead = time.time() + 7 * 60
    nas = pyrad_client(world.proxy, "vpn")
    assert pyrad_auth(nas, user, f"{user_password(user)},{phone.at(ahead)}").code \
        == ACCESS_REJECT
    done = world.proxy.cli("user", "resync", user, phone.at(ahead - 30), phone.at(ahead))
    assert done.stdout == f"{user}: clock offset +14 time step(s) (+7m00s); both codes are used\n"
    assert world.proxy.user(user)["step_offset"] == 14
    # the running serve reads the offset with the user's state: the phone's next code
    assert pyrad_auth(nas, user, f"{user_password(user)},{phone.at(ahead + 30)}").code \
        == ACCESS_ACCEPT
    assert pyrad_auth(nas, user, f"{user_password(user)},{phone.at(ahead + 30)}").code \
        == ACCESS_REJECT  # replay: on absolute steps


def test_a_bypass_past_its_end_is_off(world: World) -> None:
    user = world.take()
    world.proxy.cli("user", "bypass", user, "--for", "15m")
    nas = pyrad_client(world.proxy, "vpn")
    assert pyrad_auth(nas, user, user_password(user)).code == ACCESS_ACCEPT  # password only
    with closing(sqlite3.connect(world.proxy.state_path)) as db, db:  # 15 minutes later
        db.execute("UPDATE users SET bypass_until = ? WHERE username = ?",
                   (int(time.time()) - 1, user))
    assert pyrad_auth(nas, user, user_password(user)).code == ACCESS_REJECT
    view = world.proxy.user(user)
    assert (view["bypass"], view["bypass_until"]) == (False, None)
    assert world.audit(user, 2) == [("radius", "accept", "bypass"),
                                    ("radius", "reject", "missing_code")]


def test_a_deleted_user_signs_in_as_never_required_and_keeps_the_audit_rows(
        world: World) -> None:
    user = world.take()
    codes = world.recovery_codes(user)
    nas = pyrad_client(world.proxy, "vpn")
    assert pyrad_auth(nas, user, f"{user_password(user)},{codes[0]}").code == ACCESS_ACCEPT
    world.audit(user, 1)
    world.proxy.cli("user", "delete", user)
    assert pyrad_auth(nas, user, user_password(user)).code == ACCESS_ACCEPT
    assert world.audit(user, 2) == [("radius", "accept", "recovery_code"),
                                    ("radius", "accept", "not_required")]
    view = world.proxy.user(user)
    assert (view["status"], view["recovery_codes_left"]) == ("not_required", 0)


# -- recovery codes turned off ------------------------------------------------------------------


def test_recovery_codes_off_refuses_them_on_every_protocol(slapd: Slapd, tmp_path: Path) -> None:
    proxy = ProxyProcess.configure(
        tmp_path, slapd, clients=[{"name": "vpn", "address": "127.0.0.1/32",
                                   "mode": "append"}],
        ldap={"upstream": slapd.url, "exempt": [], "separator": ","})
    user = "user00799"
    proxy.cli("user", "enroll", user, "--secret", totp_key(user))
    codes = json.loads(proxy.cli("user", "recovery-codes", user, "--json").stdout)[
        "recovery_codes"]
    proxy.doc.setdefault("policy", {})["recovery_codes"] = False
    proxy.write_config()
    refused = proxy.cli("user", "recovery-codes", user, check=False)
    assert refused.returncode == 1 and "turned off" in refused.stderr
    with proxy.running():
        nas = pyrad_client(proxy, "vpn")
        assert pyrad_auth(nas, user, f"{user_password(user)},{codes[0]}").code \
            == ACCESS_REJECT
        ldap = subprocess.run(
            ["ldapwhoami", "-x", "-H", f"ldap://127.0.0.1:{proxy.ldap_port}",
             "-D", user_dn(user), "-w", f"{user_password(user)},{codes[1]}"],
            capture_output=True, text=True, timeout=30, check=False)
        assert ldap.returncode == LDAP_INVALID_CREDENTIALS
        view = proxy.user(user)
        assert (view["recovery_codes_left"], view["failures"]) == (10, 2)


# -- import against the directory -----------------------------------------------------------


def test_an_import_asks_the_directory_about_every_line(world: World) -> None:
    """Against the real slapd: 150 lines looked up several at a time (the CLI asks
    ahead, one look-up per service connection), each user keyed by the entry's
    own name whatever the spelling; one unknown name refuses the whole file."""
    names = numbered(1001, 150)
    spelled = [n.upper() if i % 2 else f"EXAMPLE\\{n}" for i, n in enumerate(names)]
    rows = [f"{s},{totp_key(n)}" for s, n in zip(spelled, names, strict=True)]
    csv = world.proxy.workdir / "import-directory.csv"
    csv.write_text("\n".join(rows[:70] + ["nosuchuser99,JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"]
                             + rows[70:]) + "\n")
    refused = world.proxy.cli("user", "import", str(csv), check=False)
    assert refused.returncode == 1
    assert "line 71: 'nosuchuser99'" in refused.stderr and "--allow-unknown" in refused.stderr
    assert re.findall(r"^line \d+", refused.stderr, re.M) == ["line 71"]
    assert world.proxy.user(names[0])["status"] == "not_required"  # nothing was loaded

    csv.write_text("\n".join(rows) + "\n")
    done = world.proxy.cli("user", "import", str(csv))
    assert "imported 150 key(s)" in done.stdout
    for name in (names[0], names[1], names[-1]):
        assert world.proxy.user(name)["enrolled"] is True
    listed = json.loads(world.proxy.cli("user", "list", "--json").stdout)
    assert {v["username"] for v in listed} >= set(names)
    assert not [v for v in listed if v["username"].startswith(("USER", "EXAMPLE"))]
