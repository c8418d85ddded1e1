"""Issue 11's admin commands through the installed ``mfa-proxy`` program, as a
subprocess (``real=True``): recovery-codes, bypass --for, delete, the list
filters, resync, local-user list/delete; their output, JSON and exit statuses
(0 done, 1 refused, 2 bad usage). What a command wrote is then decided on by
the real core in this process (``Admin.authenticate``, what ``serve`` does).

The same features with real RADIUS, LDAP and portal clients against a running
``serve`` are in test_admin_features.py.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from pathlib import Path

import pyotp
import pytest

from policy.decision import Outcome, Reason
from policy.schema import AuditRecord
from tests.integration.test_cli import CONFIG, Admin, admin, users_file  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(300)

KEY = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
CODE = re.compile(r"^  ([0-9a-hjkmnp-tv-z]{4}-[0-9a-hjkmnp-tv-z]{4}-[0-9a-hjkmnp-tv-z]{2})$")


def enroll(admin: Admin, user: str = "alice") -> None:  # noqa: F811
    admin.ok("user", "enroll", user, "--secret", KEY)


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# -- recovery codes ---------------------------------------------------------------------------


def test_recovery_codes_are_printed_once_and_each_works_once(admin: Admin) -> None:  # noqa: F811
    enroll(admin)
    r = admin.ok("user", "recovery-codes", "ALICE", real=True)
    lines = r.out.splitlines()
    assert lines[0] == ("alice: 10 new recovery codes (older ones no longer work); each works "
                        "once in place of a code:")
    codes = [m.group(1) for m in map(CODE.match, lines[1:]) if m]
    assert len(codes) == len(lines) - 1 == 10 == len(set(codes)), r.out
    assert admin.show("alice")["recovery_codes_left"] == 10
    # not kept in the clear anywhere in the state
    state = b"".join(p.read_bytes() for p in (admin.root / "var").glob("state.db*"))
    assert not any(c.encode() in state or c.replace("-", "").encode() in state for c in codes)

    d = admin.authenticate("alice", f"alice-pw,{codes[0]}")
    assert (d.outcome, d.reason) == (Outcome.ACCEPT, Reason.RECOVERY_CODE)
    d = admin.authenticate("alice", f"alice-pw,{codes[0]}")
    assert (d.outcome, d.reason) == (Outcome.REJECT, Reason.BAD_CODE)
    shown = admin.show("alice")
    assert (shown["recovery_codes_left"], shown["failures"]) == (9, 1)
    assert "recovery_codes_left  9" in admin.ok("user", "show", "alice", real=True).out

    again = admin.ok("user", "recovery-codes", "alice", "--json", real=True).json
    assert list(again) == ["username", "recovery_codes"] and again["username"] == "alice"
    assert len(again["recovery_codes"]) == 10 and not set(again["recovery_codes"]) & set(codes)
    assert admin.authenticate("alice", f"alice-pw,{codes[1]}").reason is Reason.BAD_CODE
    assert admin.authenticate("alice", f"alice-pw,{again['recovery_codes'][0]}").accepted
    assert admin.show("alice")["recovery_codes_left"] == 9


def test_recovery_codes_are_refused_without_a_key_or_when_turned_off(
        admin: Admin) -> None:  # noqa: F811
    r = admin.run("user", "recovery-codes", "alice", real=True)
    assert (r.code, r.out) == (1, "")
    assert r.err == ("Error: alice has no TOTP key: recovery codes stand in for its codes; "
                     "`user enroll` (or the portal) makes one first\n")
    r = admin.run("user", "recovery-codes", "mallory", real=True)
    assert r.code == 1 and "unknown user 'mallory'" in r.err
    enroll(admin)
    admin.config.write_text(CONFIG.replace("enrollment_days = 7",
                                           "enrollment_days = 7\nrecovery_codes = false"))
    r = admin.run("user", "recovery-codes", "alice", real=True)
    assert (r.code, r.out) == (1, "")
    assert r.err == ("Error: recovery codes are turned off ([policy] recovery_codes = "
                     "false)\n")
    assert admin.show("alice")["recovery_codes_left"] == 0


# -- bypass --for ------------------------------------------------------------------------------


def test_bypass_for_ends_by_itself(admin: Admin) -> None:  # noqa: F811
    enroll(admin)
    before = int(time.time())
    r = admin.ok("user", "bypass", "alice", "--for", "4h", real=True)
    after = int(time.time())
    m = re.fullmatch(r"alice: bypass on until (\S+)\n", r.out)
    assert m is not None, r.out
    assert m.group(1) in {iso(t + 4 * 3600) for t in range(before, after + 1)}
    view = admin.show("alice")
    assert (view["bypass"], view["bypass_until"]) == (True, m.group(1))
    assert f"bypass until {m.group(1)}" in admin.ok("user", "list").out
    now = time.time()
    assert admin.authenticate("alice", "alice-pw", now).reason is Reason.BYPASS
    assert admin.authenticate("alice", "alice-pw", now + 4 * 3600 + 2).reason \
        is Reason.CODE_NEEDED  # over, with nothing run at that time
    for duration, seconds in (("15m", 900), ("2d", 2 * 86400), ("1w", 7 * 86400)):
        out = admin.ok("user", "bypass", "alice", "--for", duration).out
        until = calendar.timegm(time.strptime(out.split()[-1], "%Y-%m-%dT%H:%M:%SZ"))
        assert abs(until - time.time() - seconds) < 60, (duration, out)
    assert admin.ok("user", "bypass", "alice", "--off", real=True).out == "alice: bypass off\n"
    view = admin.show("alice")
    assert (view["bypass"], view["bypass_until"]) == (False, None)
    assert admin.ok("user", "bypass", "alice", "--on").out == "alice: bypass on\n"
    assert (admin.show("alice")["bypass"], admin.show("alice")["bypass_until"]) == (True, None)


def test_bypass_usage_and_refusals(admin: Admin) -> None:  # noqa: F811
    for args, code, message in (
            (["--for", "4x"], 2, "Invalid value for --for: '4x': expected a number and a unit"),
            (["--for", "4"], 2, "Invalid value for --for"),
            ([], 2, "give one of --on, --off or --for DURATION"),
            (["--on", "--for", "1h"], 2, "give one of --on, --off or --for DURATION"),
            (["--for", "400d"], 1, "Error: --for must be between 1m and 365d, got 34560000s"),
            (["--for", "0m"], 1, "Error: --for must be between 1m and 365d, got 0s")):
        r = admin.run("user", "bypass", "alice", *args, real=True)
        assert (r.code, r.out) == (code, ""), (args, r)
        assert message in r.err, (args, r.err)
    assert admin.show("alice")["bypass"] is False


# -- delete ------------------------------------------------------------------------------------


def test_delete_removes_the_state_and_keeps_the_audit_rows(admin: Admin) -> None:  # noqa: F811
    enroll(admin)
    admin.ok("user", "recovery-codes", "alice")
    admin.ok("user", "bypass", "alice", "--for", "1h")
    assert admin.authenticate("alice", "wrong").reason is Reason.BAD_PASSWORD
    store = admin.store()
    store.hot.audit([AuditRecord(time.time() - 60, "alice", "radius", "vpn", "127.0.0.1",
                                 "accept", "ok")])
    store.close()
    r = admin.ok("user", "delete", "alice", real=True)
    assert r.out == ("alice: MFA state deleted (key, requirement, counters, recovery codes); "
                     "audit rows kept\n")
    view = admin.show("alice")
    assert (view["status"], view["enrolled"], view["failures"], view["bypass"],
            view["recovery_codes_left"]) == ("not_required", False, 0, False, 0)
    store = admin.store()
    assert store.admin.get("alice") is None
    store.close()
    rows = [json.loads(line) for line in
            admin.ok("audit", "--user", "alice", "--json", real=True).out.splitlines()]
    assert [(row["user"], row["result"], row["reason"]) for row in rows] == [
        ("alice", "accept", "ok")]
    r = admin.run("user", "delete", "alice", real=True)
    assert (r.code, r.err) == (1, "Error: alice: no MFA state to delete\n")
    r = admin.run("user", "delete", "mallory", real=True)
    assert r.code == 1 and "unknown user 'mallory'" in r.err
    # the local users file is not touched: alice signs in as a user never required
    assert admin.authenticate("alice", "alice-pw").reason is Reason.NOT_REQUIRED


# -- the filtered list ---------------------------------------------------------------------


def test_list_filters_combine(admin: Admin) -> None:  # noqa: F811
    enroll(admin, "alice")
    admin.ok("user", "require", "bob", "--days", "1")
    admin.ok("user", "require", "carol", "--days", "5")
    admin.ok("user", "bypass", "carol", "--for", "2h")
    for _ in range(5):
        admin.authenticate("carol", "wrong")

    def names(*args: str) -> list[str]:
        views = admin.ok("user", "list", *args, "--json", real=True).json
        return [v["username"] for v in views]

    assert names() == ["alice", "bob", "carol"]
    assert names("--status", "in_enrollment") == ["bob", "carol"]
    assert names("--status", "enrolled") == ["alice"]
    assert names("--locked") == ["carol"]
    assert names("--bypass") == ["carol"]
    assert names("--expiring-within", "2d") == ["bob"]
    assert names("--expiring-within", "1w", "--locked") == ["carol"]
    assert names("--status", "enrolled", "--bypass") == []
    table = admin.ok("user", "list", "--locked", config_first=True).out.splitlines()
    assert table[0].split() == ["USER", "FAILURES", "STATUS"] and len(table) == 2
    assert table[1].startswith("carol") and "locked until" in table[1]
    r = admin.run("user", "list", "--status", "happy", real=True)
    assert r.code == 2 and "'happy' is not one of enrolled, in_enrollment" in r.err
    r = admin.run("user", "list", "--expiring-within", "soon")
    assert r.code == 2 and "--expiring-within" in r.err


def test_ten_thousand_users_listed_and_filtered(admin: Admin) -> None:  # noqa: F811
    """The list is one query (no timing asserted here; see README "Performance")."""
    from policy.schema import DAY

    store = admin.store()
    now = int(time.time())
    keys = admin.keys()
    blob = keys.encrypt(KEY.encode(), "x")
    store.admin.import_users(
        [(f"u{i:05d}", blob, keys.current, now + DAY) for i in range(5000)],
        [(f"u{i:05d}", now + (i % 10) * DAY - 3600) for i in range(5000, 10000)])
    store.close()
    started = time.monotonic()
    views = admin.ok("user", "list", "--json", real=True).json
    elapsed = time.monotonic() - started
    assert len(views) == 10003  # and the three local users
    soon = admin.ok("user", "list", "--expiring-within", "2d", "--json", real=True).json
    # deadlines now + k days - 1 h: k = 1, 2 are within 2 days; k = 0 has expired
    assert len(soon) == 1000 and {v["days_left"] for v in soon} == {1, 2}
    expired = admin.ok("user", "list", "--status", "enrollment_expired", "--json").json
    assert len(expired) == 500
    print(f"user list --json, 10,003 users: {elapsed:.2f} s (the whole command)")


# -- resync ---------------------------------------------------------------------------------


def wait_for_a_fresh_step(margin: float = 8.0) -> None:
    """Codes made now stay this step's for at least ``margin`` seconds (a
    subprocess takes about one)."""
    left = 30 - time.time() % 30
    if left < margin:
        time.sleep(left + 0.05)


def test_resync_of_a_phone_seven_minutes_ahead(admin: Admin) -> None:  # noqa: F811
    enroll(admin)
    phone = pyotp.TOTP(KEY)
    wait_for_a_fresh_step()
    now = time.time()
    ahead = now + 7 * 60
    assert admin.authenticate("alice", f"alice-pw,{phone.at(ahead)}", now).reason \
        is Reason.BAD_CODE
    r = admin.ok("user", "resync", "alice", phone.at(ahead - 30), phone.at(ahead), real=True)
    assert r.out == "alice: clock offset +14 time step(s) (+7m00s); both codes are used\n"
    assert admin.show("alice")["step_offset"] == 14
    d = admin.authenticate("alice", f"alice-pw,{phone.at(ahead)}", now)
    assert (d.outcome, d.reason) == (Outcome.REJECT, Reason.REPLAYED_CODE)
    d = admin.authenticate("alice", f"alice-pw,{phone.at(ahead + 30)}", now + 30)
    assert (d.outcome, d.reason) == (Outcome.ACCEPT, Reason.OK)


def test_resync_that_finds_nothing_is_refused(admin: Admin) -> None:  # noqa: F811
    enroll(admin)
    phone = pyotp.TOTP(KEY)
    wait_for_a_fresh_step()
    far = time.time() + 15 * 60
    r = admin.run("user", "resync", "alice", phone.at(far - 30), phone.at(far), real=True)
    assert (r.code, r.out) == (1, "")
    assert r.err == ("Error: alice: the two codes are not two consecutive codes of the user's "
                     "key within ±10 minutes of now; nothing changed (give two codes the app "
                     "shows one after the other)\n")
    assert admin.show("alice")["step_offset"] == 0
    r = admin.run("user", "resync", "bob", "123456", "654321", real=True)
    assert (r.code, r.err) == (1, "Error: bob has no TOTP key: nothing to resynchronise\n")
    r = admin.run("user", "resync", "alice", "123456", real=True)
    assert r.code == 2 and "Missing argument 'CODE2'" in r.err


# -- local users -------------------------------------------------------------------------------


def test_local_user_list_and_delete(admin: Admin) -> None:  # noqa: F811
    admin.ok("local-user", "set", "bob", "--email", "bob@example.org", "--keep-password")
    table = admin.ok("local-user", "list", real=True).out.splitlines()
    assert [line.split() for line in table] == [
        ["USER", "GROUPS", "EMAIL"], ["alice", "vpn,admins", "-"],
        ["bob", "vpn", "bob@example.org"], ["carol", "-", "-"]]
    listed = admin.ok("local-user", "list", "--json", real=True).json
    assert listed == [
        {"username": "alice", "groups": ["vpn", "admins"], "email": None},
        {"username": "bob", "groups": ["vpn"], "email": "bob@example.org"},
        {"username": "carol", "groups": [], "email": None}]
    enroll(admin, "bob")
    r = admin.ok("local-user", "delete", "BOB", real=True)
    assert r.out == ("bob: removed from the local users file; its MFA state is kept "
                     "(`mfa-proxy user delete bob` removes it)\n")
    assert [u["username"] for u in admin.ok("local-user", "list", "--json").json] == [
        "alice", "carol"]
    assert admin.show("bob")["enrolled"] is True  # the state store still knows bob
    assert admin.authenticate("bob", "bob-pw").reason is Reason.UNKNOWN_USER
    r = admin.run("local-user", "delete", "bob", real=True)
    assert (r.code, r.err) == (1, "Error: bob: no such local user\n")


def test_local_user_commands_need_the_local_directory(tmp_path: Path) -> None:
    a = Admin(tmp_path)
    a.config.write_text(CONFIG.replace(
        'type = "local"\nusers_file = "users.toml"',
        'type = "ldap"\nurls = ["ldap://127.0.0.1:1"]\nuser_base = "ou=people,dc=example,'
        'dc=org"'))
    for args in (["list"], ["delete", "alice"]):
        r = a.run("local-user", *args)
        assert r.code == 1 and 'directory.type is not "local"' in r.err, (args, r)


# -- help -----------------------------------------------------------------------------------


def test_help_names_the_new_commands_and_options() -> None:
    from policy.schema import STATUSES
    from tests.integration.test_cli import run_cli

    root = Path.cwd()
    out = run_cli(["user", "--help"], root).out
    for command in ("recovery-codes", "delete", "resync", "bypass", "list"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), command
    assert "--for DURATION" in run_cli(["user", "bypass", "--help"], root).out
    listing = " ".join(run_cli(["user", "list", "--help"], root).out.split())
    for option in ("--status S", "--locked", "--bypass", "--expiring-within DURATION"):
        assert option in listing, option
    assert all(status in listing for status in STATUSES)
    local = run_cli(["local-user", "--help"], root).out
    assert re.search(r"^\s+list\s", local, re.MULTILINE)
    assert re.search(r"^\s+delete\s", local, re.MULTILINE)
    codes = " ".join(run_cli(["user", "recovery-codes", "--help"], root).out.split())
    assert "recovery_codes = false" in codes and "Each works once" in codes
