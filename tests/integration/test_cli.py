"""`mfa-proxy` as an admin runs it, on a generated config (local users file, SQLite
state): every command's output and exit status.

A `mfa-proxy` process costs about a second of imports, so most commands run
in-process through click's CliRunner (the same code, the same exit statuses),
and tests marked ``real`` run the installed console script as a subprocess:
stdin handling, exit statuses, `-c` placement, check-config, the big import.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest

from backends.local import LocalDirectory
from policy.decision import AuthRequest, Outcome, Reason
from policy.engine import Limits, PolicyEngine
from policy.keys import KeyRing
from policy.schema import LOCKED_FOREVER
from policy.store import Store
from policy.totp import TotpParams
from policy.usernames import UsernameRules
from tests.sync_core import authenticate_sync

pytestmark = pytest.mark.timeout(180)

MFA_PROXY = str(Path(sys.executable).with_name("mfa-proxy"))
DAY = 86400
FIELDS = ["username", "status", "required", "enrolled", "enrollment_deadline", "days_left",
          "locked", "locked_until", "failures", "bypass", "bypass_until", "recovery_codes_left",
          "step_offset"]

CONFIG = """\
[state]
url = "sqlite:///var/state.db"
key_file = "var/secret.key"

[totp]
issuer = "Example Corp"

[policy]
max_failures = 5
lockout_seconds = 900
enrollment_days = 7

[directory]
type = "local"
users_file = "users.toml"
"""


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


def run_cli(args: list[str], cwd: Path, stdin: str | None = None) -> Result:
    """The installed console script, as a subprocess."""
    p = subprocess.run([MFA_PROXY, *args], cwd=cwd, input=stdin, capture_output=True,
                       text=True, timeout=150,
                       stdin=subprocess.DEVNULL if stdin is None else None)
    return Result(p.returncode, p.stdout, p.stderr)


def invoke(args: list[str], stdin: str | None = None) -> Result:
    """The same command in this process."""
    from click.testing import CliRunner

    from proxy.cli import main

    r = CliRunner().invoke(main, args, input=stdin if stdin is not None else "")
    # click turns usage errors and refusals into SystemExit; anything else is a bug
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Result(r.exit_code, r.stdout, r.stderr)


@dataclass
class Admin:
    """One installation: a config, its users file and state under ``root``."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "mfa-proxy.toml"

    def run(self, *args: str, stdin: str | None = None, config_first: bool = False,
            real: bool = False) -> Result:
        c = ["-c", str(self.config)]
        argv = [*c, *args] if config_first else [*args, *c]
        return run_cli(argv, self.root, stdin) if real else invoke(argv, stdin)

    def ok(self, *args: str, **kw: Any) -> Result:
        r = self.run(*args, **kw)
        assert r.code == 0, (args, r)
        return r

    def show(self, user: str) -> dict[str, Any]:
        view: dict[str, Any] = self.ok("user", "show", user, "--json").json
        return view

    def store(self) -> Store:
        store = Store(f"sqlite:///{self.root / 'var' / 'state.db'}")
        store.upgrade()
        return store

    def keys(self) -> KeyRing:
        return KeyRing(self.root / "var" / "secret.key")

    def authenticate(self, user: str, secret: str, now: float | None = None) -> Any:
        """Decide in this process on the state the CLI wrote (what `serve` would do)."""
        store, clock = self.store(), (lambda: now if now is not None else time.time())
        engine = PolicyEngine(store, self.keys(), TotpParams(), Limits(5, 900),
                              UsernameRules(), clock=clock)
        directory = LocalDirectory(self.root / "users.toml")
        try:
            return authenticate_sync(engine, AuthRequest(user, secret, "radius", "test"),
                                             directory)
        finally:
            store.close()


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alice (vpn, admins), bob (vpn), carol: made once with `local-user set`."""
    root = tmp_path_factory.mktemp("users")
    admin = Admin(root)
    admin.config.write_text(CONFIG)
    r = admin.ok("local-user", "set", "alice", "--group", "vpn", "--group", "admins",
                 stdin="alice-pw\n", real=True)
    assert r.out == "alice: password set\n"
    admin.ok("local-user", "set", "Bob", "--group", "vpn", stdin="bob-pw\n")
    admin.ok("local-user", "set", "carol", stdin="carol-pw\r\nignored second line\n",
             config_first=True, real=True)
    return root / "users.toml"


@pytest.fixture
def admin(tmp_path: Path, users_file: Path) -> Iterator[Admin]:
    a = Admin(tmp_path)
    a.config.write_text(CONFIG)
    shutil.copy(users_file, tmp_path / "users.toml")
    yield a


# -- local users --------------------------------------------------------------------------


def test_local_user_set_writes_argon2id_from_stdin(admin: Admin) -> None:
    import tomllib

    path = admin.root / "users.toml"
    assert path.stat().st_mode & 0o077 == 0
    users = tomllib.loads(path.read_text())["users"]
    assert sorted(users) == ["alice", "bob", "carol"]  # "Bob" was normalised
    assert users["alice"]["groups"] == ["vpn", "admins"]
    assert "groups" not in users["carol"]
    assert all(u["password"].startswith("$argon2id$") for u in users.values())
    d = LocalDirectory(path)
    assert d.verify("carol", "carol-pw").username == "carol"  # one line, CR LF stripped
    assert d.verify("bob", "bob-pw").groups == ("vpn",)


def test_local_user_set_refuses_an_empty_password(admin: Admin) -> None:
    r = admin.run("local-user", "set", "dave", stdin="\n")
    assert r.code == 1
    assert "empty password" in r.err
    assert LocalDirectory(admin.root / "users.toml").lookup("dave") is None


# -- db ---------------------------------------------------------------------------------------


def test_db_upgrade_with_config_before_and_after(admin: Admin) -> None:
    r = admin.ok("db", "upgrade", real=True)
    from policy.migrations import HEAD

    assert r.out == f"state database at revision {HEAD}\n"
    assert (admin.root / "var" / "state.db").is_file()
    assert admin.ok("db", "upgrade", config_first=True).out == r.out  # idempotent


# -- show, list ------------------------------------------------------------------------------


def test_show_json_fields_exactly(admin: Admin) -> None:
    view = admin.show("alice")
    assert list(view) == FIELDS
    assert view == {"username": "alice", "status": "not_required", "required": False,
                    "enrolled": False, "enrollment_deadline": None, "days_left": None,
                    "locked": False, "locked_until": None, "failures": 0, "bypass": False,
                    "bypass_until": None, "recovery_codes_left": 0, "step_offset": 0}


def test_config_option_before_and_after_the_subcommand(admin: Admin) -> None:
    after = admin.ok("user", "show", "ALICE", real=True)
    before = admin.ok("user", "show", "ALICE", config_first=True, real=True)
    assert after.out == before.out
    assert after.out.split("\n")[0].split() == ["username", "alice"]
    assert "status               not_required" in after.out


def test_unknown_user_is_refused(admin: Admin) -> None:
    for args in (["show", "mallory"], ["require", "mallory"], ["enroll", "mallory"],
                 ["unlock", "mallory"]):
        r = admin.run("user", *args)
        assert r.code == 1, args
        assert "unknown user 'mallory'" in r.err, args
        assert r.out == ""
    assert admin.store().admin.get("mallory") is None


def test_exit_statuses_of_the_installed_program(admin: Admin) -> None:
    """0 done, 1 refused, 2 bad usage: what scripts around `mfa-proxy` see."""
    r = admin.run("user", "require", "alice", "--days", "400", real=True)
    assert (r.code, r.out) == (1, "")
    assert r.err == "Error: --days must be between 1 and 365, got 400\n"
    r = admin.run("user", "unlock", "mallory", real=True)
    assert r.code == 1
    assert r.err == ("Error: unknown user 'mallory': not in the directory or the state "
                     "store\n")
    r = admin.run("user", "require", real=True)
    assert r.code == 2
    assert "give USER or --group GROUP" in r.err
    r = admin.run("user", "require", "alice", "--days", "3", real=True)
    assert (r.code, r.out, r.err) == (0, "alice: MFA required; enrollment period 3 days\n", "")


def test_list_json_and_table(admin: Admin) -> None:
    admin.ok("user", "require", "bob", "--days", "3")
    views = admin.ok("user", "list", "--json").json
    assert isinstance(views, list)
    assert [v["username"] for v in views] == ["alice", "bob", "carol"]
    assert all(list(v) == FIELDS for v in views)
    assert [v["status"] for v in views] == ["not_required", "in_enrollment", "not_required"]
    assert views[1]["days_left"] == 3
    table = admin.ok("user", "list", config_first=True).out.splitlines()
    assert table[0].split() == ["USER", "FAILURES", "STATUS"]
    assert table[2].split() == ["bob", "0", "in", "enrollment", "(3", "days", "left)"]


# -- require, extend, reset ------------------------------------------------------------------


def test_require_opens_an_enrollment_period(admin: Admin) -> None:
    before = int(time.time())
    r = admin.ok("user", "require", "alice")
    after = time.time()
    assert r.out == "alice: MFA required; enrollment period 7 days\n"
    view = admin.show("alice")
    assert (view["status"], view["required"], view["enrolled"], view["days_left"]) == (
        "in_enrollment", True, False, 7)
    deadline = dt.datetime.fromisoformat(view["enrollment_deadline"].replace("Z", "+00:00"))
    assert view["enrollment_deadline"].endswith("Z")
    assert before + 7 * DAY <= deadline.timestamp() <= after + 7 * DAY
    d = admin.authenticate("alice", "alice-pw")
    assert (d.outcome, d.reason, d.days_left) == (Outcome.ACCEPT, Reason.IN_ENROLLMENT, 7)


def test_require_with_days(admin: Admin) -> None:
    assert admin.ok("user", "require", "bob", "--days", "30").out == (
        "bob: MFA required; enrollment period 30 days\n")
    assert admin.show("bob")["days_left"] == 30


@pytest.mark.parametrize("days", ["400", "0", "-1"])
def test_require_days_out_of_range_is_refused(admin: Admin, days: str) -> None:
    r = admin.run("user", "require", "alice", "--days", days)
    assert r.code == 1
    assert f"--days must be between 1 and 365, got {days}" in r.err
    assert admin.store().admin.get("alice") is None


def test_bad_usage_is_exit_2(admin: Admin) -> None:
    for args in (["user", "require"], ["user", "require", "alice", "--days", "abc"],
                 ["user", "frobnicate"], ["user", "extend", "alice"],
                 ["user", "bypass", "alice"], ["user", "require", "alice", "--group", "vpn"]):
        r = admin.run(*args)
        assert r.code == 2, (args, r)
        assert r.err, args


def test_require_group_uses_the_local_groups(admin: Admin) -> None:
    r = admin.ok("user", "require", "--group", "vpn", "--days", "5")
    assert r.out == ("group vpn: 2 newly required (enrollment period 5 days), "
                     "0 already required, 0 skipped\n")
    views = {v["username"]: v for v in admin.ok("user", "list", "--json").json}
    assert views["alice"]["status"] == views["bob"]["status"] == "in_enrollment"
    assert views["carol"]["status"] == "not_required"
    r = admin.run("user", "require", "--group", "nobody")
    assert r.code == 1
    assert "group 'nobody'" in r.err


def test_require_group_again_keeps_every_running_period(admin: Admin) -> None:
    """A nightly re-run never restarts or shortens a period; an expired one stays
    expired; an enrolled member without a requirement is left alone."""
    admin.ok("user", "require", "alice", "--days", "30")
    store = admin.store()
    store.admin.extend("bob", int(time.time()) - 10)  # bob's period ran out
    store.close()
    admin.ok("user", "enroll", "carol")
    admin.ok("user", "unrequire", "carol")
    admin.ok("local-user", "set", "carol", "--group", "vpn", "--keep-password")
    admin.ok("local-user", "set", "dave", "--group", "vpn", stdin="dave-pw\n")
    before = {v["username"]: v for v in admin.ok("user", "list", "--json").json}

    r = admin.ok("user", "require", "--group", "vpn", "--days", "2")
    assert r.out == ("group vpn: 1 newly required (enrollment period 2 days), "
                     "2 already required, 1 skipped (1 enrolled, not required)\n")
    after = {v["username"]: v for v in admin.ok("user", "list", "--json").json}
    for name in ("alice", "bob", "carol"):
        assert after[name] == before[name], name
    assert (after["dave"]["status"], after["dave"]["days_left"]) == ("in_enrollment", 2)

    r = admin.ok("user", "require", "--group", "vpn", "--verbose")
    assert r.out.splitlines() == [
        "alice: already required; left as it is",
        "bob: already required; left as it is",
        "dave: already required; left as it is",
        "carol: skipped (enrolled, not required)",
        "group vpn: 0 newly required, 3 already required, 1 skipped (1 enrolled, not required)",
    ]
    assert {v["username"]: v for v in admin.ok("user", "list", "--json").json} == after


def test_require_one_day_says_day(admin: Admin) -> None:
    assert admin.ok("user", "require", "bob", "--days", "1").out == (
        "bob: MFA required; enrollment period 1 day\n")
    assert admin.ok("user", "extend", "bob", "--days", "1").out == (
        "bob: enrollment period 1 day from now\n")
    assert "in enrollment (1 day left)" in admin.ok("user", "list").out


def test_extend_reopens_from_now(admin: Admin) -> None:
    admin.ok("user", "require", "alice", "--days", "1")
    store = admin.store()
    store.admin.extend("alice", int(time.time()) - 10)  # the period ran out
    store.close()
    assert admin.show("alice")["status"] == "enrollment_expired"
    assert admin.authenticate("alice", "alice-pw").reason is Reason.ENROLLMENT_EXPIRED
    r = admin.ok("user", "extend", "alice", "--days", "10")
    assert r.out == "alice: enrollment period 10 days from now\n"
    view = admin.show("alice")
    assert (view["status"], view["days_left"]) == ("in_enrollment", 10)
    assert admin.authenticate("alice", "alice-pw").reason is Reason.IN_ENROLLMENT
    assert admin.run("user", "extend", "alice", "--days", "400").code == 1


# -- enroll --------------------------------------------------------------------------------------


def otpauth(out: str) -> str:
    [uri] = [line for line in out.splitlines() if line.startswith("otpauth://")]
    return uri


def test_enroll_prints_uri_and_qr_and_the_key_works(admin: Admin) -> None:
    admin.ok("user", "require", "alice")
    r = admin.ok("user", "enroll", "alice", real=True)
    assert r.out.startswith("alice: enrolled; the key is active now\n")
    uri = otpauth(r.out)
    parts = urlsplit(uri)
    assert unquote(parts.path) == "/Example Corp:alice"
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert q["issuer"] == "Example Corp"
    assert (q["algorithm"], q["digits"], q["period"]) == ("SHA1", "6", "30")
    assert "█" in r.out or "▀" in r.out or "▄" in r.out  # the terminal QR code
    view = admin.show("alice")
    assert (view["status"], view["enrolled"], view["days_left"]) == ("enrolled", True, None)

    # the printed key is the stored one: a code from it signs alice in
    totp = pyotp.parse_uri(uri)
    now = time.time()
    assert admin.authenticate("alice", "alice-pw", now).reason is Reason.CODE_NEEDED
    d = admin.authenticate("alice", f"alice-pw,{totp.at(int(now))}", now)
    assert (d.outcome, d.reason) == (Outcome.ACCEPT, Reason.OK)


def test_enroll_stores_the_key_encrypted(admin: Admin) -> None:
    from sqlalchemy import text

    uri = otpauth(admin.ok("user", "enroll", "bob").out)
    secret = parse_qs(urlsplit(uri).query)["secret"][0]
    store = admin.store()
    with store.engine.connect() as c:
        blob = c.execute(text("SELECT totp_key FROM users WHERE username='bob'")).scalar_one()
    store.close()
    assert secret.encode() not in blob
    assert base64.b32decode(secret) not in blob
    assert admin.keys().decrypt(blob, "bob") == secret.encode()
    assert (admin.root / "var" / "secret.key").stat().st_mode & 0o777 == 0o600


def test_enroll_without_require_requires(admin: Admin) -> None:
    admin.ok("user", "enroll", "carol")
    view = admin.show("carol")
    assert (view["status"], view["required"]) == ("enrolled", True)


def test_enroll_refuses_to_replace_a_key_without_force(admin: Admin) -> None:
    first = parse_qs(urlsplit(otpauth(admin.ok("user", "enroll", "bob").out)).query)["secret"]
    r = admin.run("user", "enroll", "bob")
    assert r.code == 1
    assert "already has a key" in r.err
    again = admin.ok("user", "enroll", "bob", "--force").out
    assert parse_qs(urlsplit(otpauth(again)).query)["secret"] != first


def test_enroll_imports_a_secret(admin: Admin) -> None:
    r = admin.ok("user", "enroll", "alice", "--secret", "jbsw y3dp ehpk 3pxp jbsw y3dp ehpk 3pxp")
    uri = otpauth(r.out)
    assert parse_qs(urlsplit(uri).query)["secret"] == ["JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"]
    now = time.time()
    code = pyotp.TOTP("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP").at(int(now))
    assert admin.authenticate("alice", f"alice-pw,{code}", now).reason is Reason.OK


def test_enroll_refuses_a_bad_secret(admin: Admin) -> None:
    r = admin.run("user", "enroll", "alice", "--secret", "not-base32!")
    assert r.code == 1
    assert "--secret: not base32" in r.err
    assert admin.store().admin.get("alice") is None


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 000: a file is then as private as the mode it was created with."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_enroll_png(admin: Admin) -> None:
    png = admin.root / "alice-qr.png"
    r = admin.ok("user", "enroll", "alice", "--png", str(png))
    assert f"QR code written to {png}" in r.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 200


def test_enroll_png_is_readable_by_its_owner_only(admin: Admin, open_umask: None) -> None:
    """The QR code is the TOTP key: never world-readable, not even under umask 000."""
    png = admin.root / "alice-qr.png"
    admin.ok("user", "enroll", "alice", "--png", str(png), real=True)
    assert mode(png) == 0o600
    # an existing world-readable file is replaced by a private one
    old = admin.root / "bob-qr.png"
    old.write_bytes(b"old")
    old.chmod(0o644)
    admin.ok("user", "enroll", "bob", "--png", str(old))
    assert mode(old) == 0o600 and old.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in admin.root.glob(".*.tmp")) == []


def test_enroll_png_refuses_a_symlink_and_enrolls_nothing(admin: Admin) -> None:
    target = admin.root / "someone-elses-file"
    target.write_bytes(b"theirs")
    link = admin.root / "qr.png"
    link.symlink_to(target)
    r = admin.run("user", "enroll", "alice", "--png", str(link))
    assert r.code == 1 and "symbolic link" in r.err
    assert target.read_bytes() == b"theirs" and link.is_symlink()
    assert admin.store().admin.get("alice") is None  # refused before the key was made


def test_reset_clears_the_key(admin: Admin) -> None:
    admin.ok("user", "enroll", "alice")
    r = admin.ok("user", "reset", "alice", "--days", "3")
    assert r.out == "alice: key cleared; enrollment period 3 days\n"
    view = admin.show("alice")
    assert (view["status"], view["enrolled"], view["days_left"]) == ("in_enrollment", False, 3)
    rec = admin.store().admin.get("alice")
    assert rec is not None and rec.totp_key is None
    assert admin.run("user", "reset", "alice", "--days", "400").code == 1


def test_unrequire_keeps_the_key(admin: Admin) -> None:
    admin.ok("user", "enroll", "alice")
    assert admin.ok("user", "unrequire", "alice").out == "alice: MFA no longer required\n"
    view = admin.show("alice")
    assert (view["status"], view["required"], view["enrolled"]) == (
        "enrolled_not_required", False, True)
    assert view["enrollment_deadline"] is None


# -- unlock, bypass ---------------------------------------------------------------------------


def test_unlock(admin: Admin) -> None:
    admin.ok("user", "enroll", "alice")
    for _ in range(5):
        d = admin.authenticate("alice", "wrong")
    assert d.lockout_started
    view = admin.show("alice")
    assert (view["locked"], view["failures"]) == (True, 5)
    until = dt.datetime.fromisoformat(view["locked_until"].replace("Z", "+00:00"))
    assert until.timestamp() == d.locked_until
    table = admin.ok("user", "list").out
    assert f"locked until {view['locked_until']}" in table
    assert admin.ok("user", "unlock", "alice").out == "alice: unlocked\n"
    view = admin.show("alice")
    assert (view["locked"], view["locked_until"], view["failures"]) == (False, None, 0)


def test_locked_until_an_admin_unlocks(admin: Admin) -> None:
    admin.ok("db", "upgrade")
    store = admin.store()
    store.hot.record_failure("bob", time.time(), 1, 0)
    assert store.admin.get("bob").locked_until == LOCKED_FOREVER  # type: ignore[union-attr]
    store.close()
    view = admin.show("bob")
    assert (view["locked"], view["locked_until"]) == (True, None)
    assert "locked until an admin unlocks" in admin.ok("user", "list").out


def test_bypass_on_off(admin: Admin) -> None:
    admin.ok("user", "enroll", "alice")
    assert admin.ok("user", "bypass", "alice", "--on").out == "alice: bypass on\n"
    assert admin.show("alice")["bypass"] is True
    assert admin.authenticate("alice", "alice-pw").reason is Reason.BYPASS
    assert admin.ok("user", "bypass", "alice", "--off").out == "alice: bypass off\n"
    assert admin.show("alice")["bypass"] is False
    assert admin.authenticate("alice", "alice-pw").reason is Reason.CODE_NEEDED


# -- import --------------------------------------------------------------------------------------

SECRETS = ["JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ",
           "MFRGGZDFMZTWQ2LKNNWG23TPOBYXE43U"]


def test_import_three_good_lines(admin: Admin) -> None:
    f = admin.root / "users.csv"
    f.write_text("username,secret,required_days\n"
                 f"alice,{SECRETS[0]}\n"
                 f"Bob,{SECRETS[1].lower()},30\n"
                 f"dave,{SECRETS[2]},\n")
    r = admin.ok("user", "import", str(f), "--allow-unknown")  # dave: not in users.toml
    assert r.out == "imported 3 key(s), 0 requirement(s)\n"
    views = {v["username"]: v for v in admin.ok("user", "list", "--json").json}
    assert {n: v["status"] for n, v in views.items()} == {
        "alice": "enrolled", "bob": "enrolled", "carol": "not_required", "dave": "enrolled"}
    now = time.time()
    code = pyotp.TOTP(SECRETS[1]).at(int(now))
    assert admin.authenticate("bob", f"bob-pw,{code}", now).reason is Reason.OK


def test_import_requirement_without_a_key(admin: Admin) -> None:
    f = admin.root / "users.csv"
    f.write_text(f"alice,,14\nbob,{SECRETS[0]}\n")
    assert admin.ok("user", "import", str(f)).out == "imported 1 key(s), 1 requirement(s)\n"
    view = admin.show("alice")
    assert (view["status"], view["days_left"]) == ("in_enrollment", 14)


def test_import_bad_lines_loads_nothing(admin: Admin) -> None:
    f = admin.root / "users.csv"
    f.write_text("\n".join([
        "username,secret,required_days",      # 1: header
        f"alice,{SECRETS[0]}",                 # 2: good
        "bob,not-base32!",                     # 3
        f"carol,{SECRETS[1]},400",             # 4
        f"dave,{SECRETS[2]},7,extra",          # 5
        "eve",                                 # 6
        f"ALICE,{SECRETS[1]}",                 # 7: alice again
        ",JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP",   # 8: no name
        "frank,,",                             # 9: nothing to do
        "# a comment",                         # 10
        "grace,JBSWY3DP",                      # 11: too short
    ]) + "\n")
    r = admin.run("user", "import", str(f))
    assert r.code == 1
    lines = r.err.splitlines()
    assert lines[:-1] == [
        "line 3: not base32",
        "line 4: required_days must be 1–365, got '400'",
        "line 5: expected username,secret[,required_days], got 4 fields",
        "line 6: expected username,secret[,required_days], got 1 fields",
        "line 7: 'alice' already on line 2",
        "line 8: '': empty or too long username",
        "line 9: no secret and no required_days: nothing to do",
        "line 11: shorter than 128 bits (40 given; RFC 4226 §4: at least 128, 160 recommended)",
    ]
    assert "8 bad line(s); nothing imported" in lines[-1]
    assert r.out == ""
    store = admin.store()
    assert store.admin.list_users() == []
    store.close()


def test_import_refuses_existing_keys_short_keys_and_unknown_users(admin: Admin) -> None:
    admin.ok("user", "enroll", "alice", "--secret", SECRETS[0])
    admin.ok("user", "require", "carol", "--days", "30")
    carol = admin.show("carol")
    f = admin.root / "users.csv"
    f.write_text(f"alice,{SECRETS[1]}\n"         # 1: alice has a key
                 f"Bob,{SECRETS[2]}\n"           # 2: good
                 "carol,,3\n"                    # 3: already required: left alone
                 f"zed,{SECRETS[2]}\n"           # 4: not in the directory
                 "erin,GEZDGNBVGY3TQOJQ\n")      # 5: 80 bits, and unknown
    r = admin.run("user", "import", str(f))
    assert r.code == 1
    assert r.err.splitlines() == [
        "line 1: 'alice' already has a key (replacing it stops the authenticator the user has)",
        "line 4: 'zed': no such user in the directory",
        "line 5: shorter than 128 bits (80 given; RFC 4226 §4: at least 128, 160 recommended)",
        "Error: 3 bad line(s); nothing imported (--force / --allow-unknown to load those "
        "lines anyway)"]
    assert admin.show("bob")["status"] == "not_required"  # all or nothing

    f.write_text(f"alice,{SECRETS[1]}\nBob,{SECRETS[2]}\ncarol,,3\nzed,{SECRETS[2]}\n")
    r = admin.ok("user", "import", str(f), "--force", "--allow-unknown")
    assert r.out == ("imported 3 key(s), 0 requirement(s); 1 of the keys replaced a key the "
                     "user had; 1 user(s) already required, left as they are\n")
    assert admin.show("carol") == carol  # the running period was not restarted
    assert admin.show("zed")["status"] == "enrolled"
    now = time.time()
    code = pyotp.TOTP(SECRETS[1]).at(int(now))
    assert admin.authenticate("alice", f"alice-pw,{code}", now).reason is Reason.OK


def test_import_keys_users_by_their_directory_name(admin: Admin) -> None:
    f = admin.root / "users.csv"
    f.write_text(f"BOB,{SECRETS[0]}\nDOMAIN\\carol,{SECRETS[1]}\n")
    assert admin.ok("user", "import", str(f)).out == "imported 2 key(s), 0 requirement(s)\n"
    assert {v["username"] for v in admin.ok("user", "list", "--json").json
            if v["enrolled"]} == {"bob", "carol"}


def test_import_100000_lines(admin: Admin) -> None:
    f = admin.root / "big.csv"
    with f.open("w", newline="") as out:
        w = csv.writer(out)
        for i in range(100_000):
            w.writerow([f"user{i:06d}", base64.b32encode(os.urandom(20)).decode(), 7])
    started = time.monotonic()
    r = admin.ok("user", "import", str(f), "--allow-unknown", real=True)
    took = time.monotonic() - started
    print(f"\nuser import: 100,000 lines in {took:.1f} s")  # a measure, never an assertion
    assert r.out == "imported 100000 key(s), 0 requirement(s)\n"
    store = admin.store()
    assert store.admin.count_by_status(time.time())["enrolled"] == 100_000
    rec = store.admin.get("user099999")
    assert rec is not None and rec.enrolled and rec.required
    store.close()


# -- keys rotate ---------------------------------------------------------------------------------


def test_keys_rotate_re_encrypts_every_key(admin: Admin) -> None:
    f = admin.root / "users.csv"
    f.write_text("".join(f"{n},{s}\n" for n, s in zip(("alice", "bob", "dave"), SECRETS,
                                                       strict=True)))
    admin.ok("user", "import", str(f), "--allow-unknown")
    store = admin.store()
    before = {r.username: r for r in store.admin.list_users()}
    assert {r.key_version for r in before.values()} == {1}

    # mid-rotation a running instance reads old and new versions alike
    running = admin.keys()
    r = admin.ok("keys", "rotate")
    assert r.out == "key version 2: re-encrypted 3 key(s)\n"
    after = {r.username: r for r in store.admin.list_users()}
    assert {r.key_version for r in after.values()} == {2}
    for name, plain in zip(("alice", "bob", "dave"), SECRETS, strict=True):
        assert after[name].totp_key != before[name].totp_key
        assert running.decrypt(after[name].totp_key, name) == plain.encode()  # type: ignore[arg-type]
        assert running.decrypt(before[name].totp_key, name) == plain.encode()  # type: ignore[arg-type]
    assert "2 = " in (admin.root / "var" / "secret.key").read_text()

    r = admin.ok("keys", "rotate", config_first=True)
    assert r.out == "key version 3: re-encrypted 3 key(s)\n"
    now = time.time()
    code = pyotp.TOTP(SECRETS[0]).at(int(now))
    assert admin.authenticate("alice", f"alice-pw,{code}", now).reason is Reason.OK
    store.close()


# -- check-config ---------------------------------------------------------------------------------

GOOD = CONFIG + """
[radius]
listen = ["127.0.0.1:18120"]

[[radius.clients]]
name = "vpn"
address = "127.0.0.0/8"
secret = "a-long-enough-radius-secret"

[http]
listen = "127.0.0.1:19812"
"""

BROKEN = {
    "unknown_key": (GOOD.replace("[policy]\n", "[policy]\nmax_failure = 3\n"),
                    ["policy.max_failure: unknown key (did you mean max_failures?)"]),
    "wrong_type": (GOOD.replace("max_failures = 5", 'max_failures = "5"'),
                   ["policy.max_failures: expected an integer, got string '5'"]),
    "enrollment_days": (GOOD.replace("enrollment_days = 7", "enrollment_days = 400"),
                        ["policy.enrollment_days: must be between 1 and 365, got 400"]),
    "bad_cidr": (GOOD.replace('"127.0.0.0/8"', '"127.0.0.0/40"'),
                 ["radius.clients[0].address: not an address or CIDR: '127.0.0.0/40'"]),
    "secret_file": (GOOD.replace('secret = "a-long-enough-radius-secret"',
                                 'secret_file = "nope.secret"'),
                    ["radius.clients[0].secret_file: cannot read {root}/nope.secret: "
                     "No such file or directory"]),
    "missing_state": (GOOD.replace('[state]\nurl = "sqlite:///var/state.db"\n'
                                   'key_file = "var/secret.key"\n', ""),
                      ["state: missing section [state]"]),
    "listen": (GOOD.replace('"127.0.0.1:19812"', '"localhost:19812"'),
               ["http.listen: not an IP address: 'localhost' in 'localhost:19812'"]),
    "admin_networks": (GOOD.replace('listen = "127.0.0.1:19812"',
                                    'listen = "127.0.0.1:19812"\nadmin_networks = ["10.0.0.0/33"]'),
                       ["http.admin_networks: not an address or CIDR: '10.0.0.0/33'"]),
    "toml": (GOOD.replace("[totp]", "[totp"), None),
    "several": (GOOD.replace("enrollment_days = 7", "enrollment_days = 0")
                .replace('"127.0.0.0/8"', '"nowhere"').replace("[policy]", "bogus = 1\n[policy]"),
                ["policy.enrollment_days: must be between 1 and 365, got 0",
                 "radius.clients[0].address: not an address or CIDR: 'nowhere'",
                 "totp.bogus: unknown key"]),
}


def test_check_config_good_file(tmp_path: Path) -> None:
    (tmp_path / "mfa-proxy.toml").write_text(GOOD)
    r = run_cli(["check-config", "-c", str(tmp_path / "mfa-proxy.toml")], tmp_path)
    assert (r.code, r.out, r.err) == (0, f"{tmp_path / 'mfa-proxy.toml'}: OK\n", "")


def test_check_config_warnings_do_not_fail(tmp_path: Path) -> None:
    (tmp_path / "mfa-proxy.toml").write_text(GOOD.replace("a-long-enough-radius-secret", "short"))
    r = run_cli(["check-config", "-c", str(tmp_path / "mfa-proxy.toml")], tmp_path)
    assert r.code == 0
    assert r.out.splitlines() == [
        "warning: radius.clients[0].secret: shorter than 16 characters; a RADIUS shared "
        "secret should be long and random (BlastRADIUS)",
        f"{tmp_path / 'mfa-proxy.toml'}: OK"]


def test_check_config_broken_files(tmp_path: Path) -> None:
    """Each file in its own folder, all checked at once (check-config starts fast)."""
    procs = {}
    for name, (text, _) in BROKEN.items():
        root = tmp_path / name
        root.mkdir()
        (root / "mfa-proxy.toml").write_text(text)
        procs[name] = subprocess.Popen(
            [MFA_PROXY, "check-config", "-c", str(root / "mfa-proxy.toml")], cwd=root,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        root = tmp_path / name
        assert p.returncode == 2, (name, out, err)
        assert out == "", name
        lines = err.splitlines()
        expected = BROKEN[name][1]
        if expected is None:  # invalid TOML: one line, naming the file and the place
            [line] = lines
            assert line.startswith(f"config error: {root / 'mfa-proxy.toml'}: not valid TOML:")
            assert "line 5" in line
        else:
            assert sorted(lines) == sorted(
                "config error: " + e.format(root=root) for e in expected), name


def test_check_config_missing_file(tmp_path: Path) -> None:
    r = run_cli(["check-config", "-c", "absent.toml"], tmp_path)
    assert r.code == 2
    assert r.err == f"config error: {tmp_path / 'absent.toml'}: no such file\n"


def test_user_commands_refuse_a_broken_config(tmp_path: Path) -> None:
    (tmp_path / "mfa-proxy.toml").write_text(BROKEN["enrollment_days"][0])
    r = run_cli(["user", "show", "alice", "-c", str(tmp_path / "mfa-proxy.toml")], tmp_path)
    assert r.code == 2
    assert r.err == "config error: policy.enrollment_days: must be between 1 and 365, got 400\n"
    assert not (tmp_path / "var").exists()  # nothing created from a bad config
