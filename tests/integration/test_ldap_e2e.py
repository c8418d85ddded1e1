"""The LDAP front-end end to end, with the REAL core.

The real ``mfa-proxy serve`` process (a subprocess, with a generated config:
SQLite state, the test slapd as the directory and as the LDAP upstream, an
``[ldap]`` section with plain/StartTLS and LDAPS listeners, a ``[radius]``
section for the cross-protocol tests) is driven by real clients: ldapwhoami
and ldapsearch (ldap-utils), ldap3, radclient (freeradius-utils), and the
admin CLI (``mfa-proxy user …``) on the same config.

The protocol itself, with a fake core, is tested in test_ldap_frontend.py
(and tests/unit/test_ldap_frontend_*.py); these tests prove the product works
as a whole: MFA state, failure counters, replay protection, enrollment
periods, lockout and metrics as the running process keeps them.

Time: TOTP codes are real (the process has no clock override). Every user
gets codes for strictly increasing time steps (see :class:`Codes`), starting
one step in the past, and the proxies run with ``[totp] window = 2``, so a
step boundary passing during a test never turns a good code bad. No
assertion depends on timing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ldap3
import pyotp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.ldapwire import RawSession, raw_search, result_code, sasl_plain_bind
from tests.integration.slapd import (
    BASE_DN,
    SASL_USER,
    Slapd,
    free_port,
    make_ca,
    make_server_cert,
    start_slapd,
    user_dn,
    user_password,
)

pytestmark = pytest.mark.timeout(180)

MFA_PROXY = str(Path(sys.executable).with_name("mfa-proxy"))
RADIUS_SECRET = "e2e-radius-shared-secret-0123456789"
TIMEOUT = 60  # seconds, for any one client run (a hung process fails the test, not the run)
START_TIMEOUT = 30.0  # seconds for `serve` to become ready
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 3  # fresh ports each time (another process may take one first)

PERIOD = 30
WINDOW = 2  # accepted steps either side: see the module docstring

# Users with a TOTP key, loaded with one `mfa-proxy user import` (each test
# its own users, so failure counters and used codes never cross tests).
ENROLLED = ("alice", "bob", "carol", "dave", "erin", "judy", "mallory", "oscar", "peggy",
            "walter")
IN_ENROLLMENT = {"grace": 5, "frank": 7}  # required, no key yet: (days)
NOT_REQUIRED = "heidi"  # never required: not in the state store at all


# ---------------------------------------------------------------- TOTP codes


class Codes:
    """Real TOTP codes for the users' keys, never the same step twice.

    Each user's codes are for strictly increasing time steps, the first one
    step in the past: the server accepts ``now ± WINDOW`` steps and refuses a
    step at or before the last one it accepted, so every code this hands out
    is fresh, and stays acceptable even if a step boundary passes before the
    server checks it.
    """

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self._last: dict[str, int] = {}

    def new_totp_key(self, user: str) -> str:
        self.secrets[user] = pyotp.random_base32()
        return self.secrets[user]

    @staticmethod
    def _step() -> int:
        return int(time.time()) // PERIOD

    def _totp(self, user: str) -> pyotp.TOTP:
        return pyotp.TOTP(self.secrets[user], interval=PERIOD)

    def fresh(self, user: str) -> str:
        now = self._step()
        step = max(self._last.get(user, now - 2) + 1, now - 1)
        if step > now + 1:  # a test used more codes than the window holds
            raise AssertionError(f"test bug: too many codes for {user} within one step")
        self._last[user] = step
        return self._totp(user).at(step * PERIOD)

    def wrong(self, user: str) -> str:
        """Six digits that are no code of this user anywhere near now."""
        now = self._step()
        near = {self._totp(user).at(s * PERIOD) for s in range(now - 2 * WINDOW - 1,
                                                               now + 2 * WINDOW + 2)}
        return next(c for c in ("000000", "999999", "123456", "654321") if c not in near)


# ---------------------------------------------------------------- the process


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class ProxyProcess:
    """One `mfa-proxy serve -c CONFIG` child and the config it runs on."""

    root: Path
    ldap_port: int
    ldaps_port: int
    radius_port: int
    http_port: int
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config(self) -> Path:
        return self.root / "mfa-proxy.toml"

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.ldap_port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def db(self) -> Path:
        return self.root / "var" / "state.db"

    @property
    def log(self) -> Path:
        return self.root / "serve.log"

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    # -- lifecycle

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [MFA_PROXY, "serve", "-c", str(self.config)], cwd=self.root,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mfa-proxy serve exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if self.http_status("/readyz") == 200:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mfa-proxy serve not ready within {START_TIMEOUT}s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM by PID (a clean shutdown), SIGKILL if it does not go."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def stop_cleanly(self) -> None:
        """Stop, and fail unless the process was still up, left on SIGTERM with
        status 0, and logged no traceback on the way."""
        alive = self.running
        self.stop()
        assert alive, f"mfa-proxy serve died on its own:\n{self.log_tail()}"
        assert self.proc is not None and self.proc.returncode == 0, \
            f"mfa-proxy serve exited with {self.proc and self.proc.returncode}:\n{self.log_tail()}"
        log = self.log.read_text(errors="replace")
        for bad in ("Traceback", "Unhandled", "CRITICAL"):
            assert bad not in log, f"{bad!r} in the serve log:\n{log[-6000:]}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- HTTP

    def http_status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                        timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def metrics(self) -> Metrics:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return Metrics(response.read().decode())

    # -- the admin CLI on the same config

    def cli(self, *args: str, real: bool = False) -> CliResult:
        """``mfa-proxy ARGS -c CONFIG``: the installed console script as a process
        when ``real``, else the same click command in this process (a process
        costs more than a second of imports; the checks that are about the CLI
        itself run it for real)."""
        argv = [*args, "-c", str(self.config)]
        if real:
            p = subprocess.run([MFA_PROXY, *argv], cwd=self.root, capture_output=True,
                               text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
            return CliResult(p.returncode, p.stdout, p.stderr)
        from click.testing import CliRunner

        from proxy.cli import App, main

        app = App()
        try:
            r = CliRunner().invoke(main, argv, obj=app)
        finally:
            if app._store is not None:
                app._store.close()
            if app._directory is not None:
                app._directory.close()
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        return CliResult(r.exit_code, r.stdout, r.stderr)

    def ok(self, *args: str, real: bool = False) -> CliResult:
        result = self.cli(*args, real=real)
        assert result.code == 0, (args, result)
        return result

    def show(self, user: str, real: bool = False) -> dict[str, Any]:
        view: dict[str, Any] = self.ok("user", "show", user, "--json", real=real).json
        return view

    def sql(self, statement: str) -> None:
        """Edit the state database behind the process's back (the sqlite3 shell)."""
        subprocess.run(["sqlite3", "-bail", "-cmd", ".timeout 10000", str(self.db), statement],
                       check=True, capture_output=True, timeout=30)


class Metrics:
    """One /metrics scrape."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples
        ]

    def get(self, name: str, **labels: str) -> float:
        """The sum over samples named ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(v for n, lab, v in self.samples
                   if n == name and all(lab.get(k) == w for k, w in labels.items()))

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.samples)

    def requests(self, protocol: str, result: str, reason: str) -> float:
        return self.get("mfa_proxy_requests_total", protocol=protocol, result=result,
                        reason=reason)


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def write_config(proxy: ProxyProcess, directory: Slapd, upstream: str, tls: ProxyTls | None,
                 *, mfa: str = "enrolled", max_failures: int = 4, radius: bool = True) -> None:
    ldaps = f'["127.0.0.1:{proxy.ldaps_port}"]' if tls else "[]"
    cert = (f"cert_file = {json.dumps(str(tls.cert_file))}\n"
            f"key_file = {json.dumps(str(tls.key_file))}\n") if tls else ""
    radius_section = f"""
[radius]
listen = ["127.0.0.1:{proxy.radius_port}"]
accounting_listen = []
mode = "auto"
separator = ","
require_message_authenticator = true

[[radius.clients]]
name = "vpn"
address = "127.0.0.0/8"
secret = "{RADIUS_SECRET}"
mfa = "enrolled"
""" if radius else ""
    proxy.config.write_text(f"""\
[state]
url = "sqlite:///var/state.db"
key_file = "var/secret.key"

[totp]
issuer = "mfa-proxy e2e"
digits = 6
period = {PERIOD}
window = {WINDOW}

[policy]
max_failures = {max_failures}
lockout_seconds = 900
enrollment_days = 7

[directory]
type = "ldap"
urls = [{json.dumps(directory.url)}]
bind_dn = {json.dumps(directory.svc_dn)}
bind_password = {json.dumps(directory.svc_password)}
user_base = "ou=people,{BASE_DN}"
user_filter = "(uid={{username}})"
group_base = "ou=groups,{BASE_DN}"
connect_timeout = 10
timeout = 20
{radius_section}
[ldap]
listen = ["127.0.0.1:{proxy.ldap_port}"]
ldaps_listen = {ldaps}
{cert}upstream = {json.dumps(upstream)}
exempt = {_toml_list([directory.svc_dn])}
mfa = "{mfa}"
separator = ","

[http]
listen = "127.0.0.1:{proxy.http_port}"
""")


@dataclass(frozen=True)
class ProxyTls:
    ca_file: Path
    cert_file: Path
    key_file: Path


def start_proxy(root: Path, directory: Slapd, tls: ProxyTls | None = None,
                upstream: str | None = None, **options: Any) -> ProxyProcess:
    """Write a config under ``root`` and start `serve` on it; retried on fresh ports."""
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(START_ATTEMPTS):
        proxy = ProxyProcess(root, free_port(), free_port(), _free_udp_port(), free_port())
        write_config(proxy, directory, upstream or directory.url, tls, **options)
        try:
            proxy.start()
            return proxy
        except RuntimeError:
            proxy.stop()
            if attempt == START_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def proxy_tls(tmp_path_factory: pytest.TempPathFactory) -> ProxyTls:
    """The proxy's listener certificate, from a CA of its own (not slapd's)."""
    directory = tmp_path_factory.mktemp("e2e-tls")
    ca_path, ca_key, ca_cert = make_ca(directory, "mfa-proxy e2e CA")
    cert, key = make_server_cert(directory, ca_key, ca_cert)
    return ProxyTls(ca_path, cert, key)


@pytest.fixture(scope="module")
def codes() -> Codes:
    return Codes()


@pytest.fixture(scope="module")
def proxy(slapd: Slapd, proxy_tls: ProxyTls, codes: Codes,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """The main process: RADIUS and LDAP (plain + StartTLS, LDAPS), mfa = "enrolled",
    max_failures = 4; users loaded with one `user import`."""
    root = tmp_path_factory.mktemp("e2e-main")
    process = start_proxy(root, slapd, proxy_tls)
    try:
        rows = [f"{user},{codes.new_totp_key(user)}" for user in ENROLLED]
        rows += [f"{user},,{days}" for user, days in IN_ENROLLMENT.items()]
        (root / "users.csv").write_text("username,secret,required_days\n" + "\n".join(rows) + "\n")
        imported = process.ok("user", "import", str(root / "users.csv"), real=True)
        assert imported.out.strip() == f"imported {len(ENROLLED)} key(s), 2 requirement(s)"
        yield process
    except BaseException:
        process.stop()
        raise
    process.stop_cleanly()


@pytest.fixture(scope="module")
def strict_proxy(slapd: Slapd, codes: Codes,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A second installation whose LDAP listener has mfa = "strict" (LDAP only)."""
    process = start_proxy(tmp_path_factory.mktemp("e2e-strict"), slapd, mfa="strict",
                          radius=False)
    try:
        yield process
    except BaseException:
        process.stop()
        raise
    process.stop_cleanly()


@dataclass
class CountedProxy:
    process: ProxyProcess
    slapd: Slapd
    codes: Codes


@pytest.fixture(scope="module")
def counted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CountedProxy]:
    """A proxy in front of a slapd of its own that logs every operation
    (``debug="stats"``): what one sign-in costs the directory, counted."""
    slapd = start_slapd(tmp_path_factory.mktemp("slapd-stats"), debug="stats")
    try:
        root = tmp_path_factory.mktemp("e2e-counted")
        process = start_proxy(root, slapd, radius=False)
        try:
            codes = Codes()  # (its own keys: the main proxy's codes are not touched)
            rows = [f"{user},{codes.new_totp_key(user)}" for user in ("alice", "bob")]
            (root / "users.csv").write_text("username,secret\n" + "\n".join(rows) + "\n")
            process.ok("user", "import", str(root / "users.csv"), real=True)
            yield CountedProxy(process, slapd, codes)
        except BaseException:
            process.stop()
            raise
        process.stop_cleanly()
    finally:
        slapd.stop()


# ---------------------------------------------------------------- clients


def ldap_env(ca_file: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDAP")}
    # (not LDAPNOINIT: it would ignore the LDAPTLS_* variables too)
    if ca_file:
        env["LDAPTLS_CACERT"] = str(ca_file)
        env["LDAPTLS_REQCERT"] = "demand"
    return env


def run(*argv: str, ca_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                          env=ldap_env(ca_file), stdin=subprocess.DEVNULL, check=False)


def whoami(url: str, dn: str, password: str, *extra: str,
           ca_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run("ldapwhoami", "-x", "-H", url, "-D", dn, "-w", password, *extra, ca_file=ca_file)


def assert_whoami(result: subprocess.CompletedProcess[str], dn: str) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dn:{dn}"


def assert_refused(result: subprocess.CompletedProcess[str], code: int, diagnostic: str) -> None:
    """ldapwhoami exits with the LDAP result code and prints the diagnostic message."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert f"({code})" in result.stderr
    assert f"additional info: {diagnostic}" in result.stderr, result.stderr


def ldapsearch(url: str, dn: str, password: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run("ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", url, "-D", dn,
               "-w", password, *args)


def ldap3_connection(url: str, dn: str, password: str) -> ldap3.Connection:
    return ldap3.Connection(ldap3.Server(url, get_info=ldap3.NONE, connect_timeout=10), dn,
                            password, receive_timeout=TIMEOUT)


@dataclass
class RadiusReply:
    code: str | None  # "Access-Accept", "Access-Reject", … or None (no answer)
    output: str


def radius(proxy: ProxyProcess, user: str, password: str) -> RadiusReply:
    """One Access-Request from radclient, with a Message-Authenticator."""
    if shutil.which("radclient") is None:  # scripts/test installs it: no skip
        pytest.fail("radclient (freeradius-utils) is not installed")
    request = (f'User-Name = "{user}"\nUser-Password = "{password}"\n'
               "NAS-Identifier = \"e2e\"\nMessage-Authenticator = 0x00\n")
    p = subprocess.run(
        ["radclient", "-x", "-r", "1", "-t", "10", f"127.0.0.1:{proxy.radius_port}", "auth",
         RADIUS_SECRET], input=request, capture_output=True, text=True, timeout=TIMEOUT,
        check=False)
    received = re.search(r"^Received (\S+) Id", p.stdout, re.MULTILINE)
    return RadiusReply(received.group(1) if received else None, p.stdout + p.stderr)


def ldif_entries(ldif: str) -> list[str]:
    """An ldapsearch -LLL output as its entries, sorted (lines kept in order)."""
    return sorted(entry.strip() for entry in ldif.strip().split("\n\n") if entry.strip())


# ---------------------------------------------------------------- binds with MFA


def test_bind_with_password_and_code_whoami_shows_the_dn(
        proxy: ProxyProcess, codes: Codes) -> None:
    dn = user_dn("alice")
    result = whoami(proxy.url, dn, f"alice-pw,{codes.fresh('alice')}")
    assert_whoami(result, dn)
    view = proxy.show("alice")
    assert view["status"] == "enrolled" and view["failures"] == 0 and not view["locked"]


def test_a_sign_in_is_one_bind_as_the_user_on_the_session_the_client_uses(
        counted: CountedProxy) -> None:
    """The password check is the client's upstream session bind itself: the
    directory sees one bind as the user per sign-in (and the core's look-up of
    the entry), never a second one on the core's own connection. A wrong code
    is one bind too, but on the core's connection: the client's session is never
    bound on the password alone (so there is nothing to reset)."""
    dn, slapd = user_dn("alice"), counted.slapd
    since = slapd.log_size()
    assert_whoami(whoami(counted.process.url, dn, f"alice-pw,{counted.codes.fresh('alice')}"),
                  dn)  # (WhoAmI is answered by the session: bound as alice)
    assert slapd.binds(since).count(dn) == 1
    assert [b for b in slapd.binds(since) if b not in (dn, slapd.svc_dn, "")] == []
    (session,) = [conn for conn, bound in slapd.bind_connections(since) if bound == dn]
    assert session in slapd.connections_opened(since)  # the client's own new session
    assert slapd.searches(since)  # the look-up of the entry
    checked_on = set()
    for _ in range(2):  # a wrong code (twice: the core's bind link may open at the first)
        since = slapd.log_size()
        assert_refused(whoami(counted.process.url, dn,
                              f"alice-pw,{counted.codes.wrong('alice')}"), 49,
                       "invalid credentials")
        assert slapd.binds(since).count(dn) == 1 and "" not in slapd.binds(since)
        checked_on |= {conn for conn, bound in slapd.bind_connections(since) if bound == dn}
    # One link of the core's, twice: not the new session each client connection opened.
    assert len(checked_on) == 1 and not checked_on & slapd.connections_opened(since)


def test_a_plain_bind_dn_is_one_search_and_a_spelling_to_resolve_is_read_first(
        counted: CountedProxy) -> None:
    """The DN a client usually sends (plain, spelled as the entry is): the core
    looks its uid up and compares DNs, one search; a spelling the directory has to
    resolve (here spaces after the commas) is read at its DN first, then looked up
    by its name (from the look-up cache now): both land on the entry."""
    slapd, codes, url = counted.slapd, counted.codes, counted.process.url
    dn = user_dn("bob")
    since = slapd.log_size()
    assert_whoami(whoami(url, dn, f"bob-pw,{codes.fresh('bob')}"), dn)
    searches = slapd.searches(since)
    assert len(searches) == 1 and "scope=2" in searches[0] and "(uid=bob)" in searches[0]
    since = slapd.log_size()
    spaced = dn.replace(",", ", ")
    assert_whoami(whoami(url, spaced, f"bob-pw,{codes.fresh('bob')}"), dn)
    searches = slapd.searches(since)
    assert len(searches) == 1 and "scope=0" in searches[0]  # the base read of that DN


def test_wrong_code_or_wrong_password_is_49_and_reads_the_same(
        proxy: ProxyProcess, codes: Codes) -> None:
    dn = user_dn("bob")
    before = proxy.metrics()
    bad_code = whoami(proxy.url, dn, f"bob-pw,{codes.wrong('bob')}")
    assert_refused(bad_code, 49, "invalid credentials")
    bad_password = whoami(proxy.url, dn, f"not-bobs-pw,{codes.fresh('bob')}")
    assert_refused(bad_password, 49, "invalid credentials")
    assert bad_code.stderr == bad_password.stderr  # a guesser learns nothing
    assert proxy.show("bob")["failures"] == 2
    after = proxy.metrics()
    assert after.requests("ldap", "reject", "bad_code") == \
        before.requests("ldap", "reject", "bad_code") + 1
    assert after.requests("ldap", "reject", "bad_password") == \
        before.requests("ldap", "reject", "bad_password") + 1
    # the same user with the right password and a good code gets in (and the count resets)
    assert_whoami(whoami(proxy.url, dn, f"bob-pw,{codes.fresh('bob')}"), dn)
    assert proxy.show("bob")["failures"] == 0


def test_replayed_code_is_49(proxy: ProxyProcess, codes: Codes) -> None:
    dn = user_dn("carol")
    before = proxy.metrics().requests("ldap", "reject", "replayed_code")
    code = codes.fresh("carol")
    assert_whoami(whoami(proxy.url, dn, f"carol-pw,{code}"), dn)
    # the same code again, in a new connection and bind
    assert_refused(whoami(proxy.url, dn, f"carol-pw,{code}"), 49, "invalid credentials")
    assert proxy.metrics().requests("ldap", "reject", "replayed_code") == before + 1
    assert_whoami(whoami(proxy.url, dn, f"carol-pw,{codes.fresh('carol')}"), dn)


def test_missing_code_for_an_enrolled_user_is_49(proxy: ProxyProcess, codes: Codes) -> None:
    dn = user_dn("dave")
    before = proxy.metrics()
    assert_refused(whoami(proxy.url, dn, "dave-pw"), 49, "invalid credentials")
    # a separator without six digits after it is no code: the whole is the password
    assert_refused(whoami(proxy.url, dn, "dave-pw,"), 49, "invalid credentials")
    after = proxy.metrics()
    for reason in ("missing_code", "bad_password"):
        assert after.requests("ldap", "reject", reason) == \
            before.requests("ldap", "reject", reason) + 1, reason
    assert proxy.show("dave")["failures"] == 2
    assert_whoami(whoami(proxy.url, dn, f"dave-pw,{codes.fresh('dave')}"), dn)


def test_locked_user_is_49_locked_even_with_the_right_code(
        proxy: ProxyProcess, codes: Codes) -> None:
    dn = user_dn("erin")
    lockouts = proxy.metrics().get("mfa_proxy_lockouts_total")
    for _ in range(3):  # max_failures = 4: the 4th locks, and says so
        assert_refused(whoami(proxy.url, dn, f"erin-pw,{codes.wrong('erin')}"), 49,
                       "invalid credentials")
    assert_refused(whoami(proxy.url, dn, f"erin-pw,{codes.wrong('erin')}"), 49,
                   "locked after too many failed attempts, until ")
    locked = whoami(proxy.url, dn, f"erin-pw,{codes.fresh('erin')}")
    assert_refused(locked, 49, "locked")
    view = proxy.show("erin")
    assert view["locked"] is True and view["failures"] == 4
    metrics = proxy.metrics()
    assert metrics.get("mfa_proxy_lockouts_total") == lockouts + 1
    assert metrics.requests("ldap", "reject", "locked_out") >= 1


def test_expired_enrollment_is_49_enrollment_expired(proxy: ProxyProcess) -> None:
    dn = user_dn("frank")
    before = proxy.metrics().requests("ldap", "reject", "enrollment_expired")
    assert proxy.show("frank")["status"] == "in_enrollment"
    assert_whoami(whoami(proxy.url, dn, "frank-pw"), dn)  # still in the period
    # No clock override in the process: move the deadline into the past instead.
    proxy.sql(f"UPDATE users SET enrollment_deadline = {int(time.time()) - 3600} "
              "WHERE username = 'frank'")
    assert proxy.show("frank")["status"] == "enrollment_expired"
    assert_refused(whoami(proxy.url, dn, "frank-pw"), 49, "enrollment expired")
    assert proxy.metrics().requests("ldap", "reject", "enrollment_expired") == before + 1
    # a bad password reads as any other bad password, not as "expired"
    assert_refused(whoami(proxy.url, dn, "wrong-pw"), 49, "invalid credentials")


def test_user_in_enrollment_binds_with_the_password_and_is_told_the_days_left(
        proxy: ProxyProcess) -> None:
    dn = user_dn("grace")
    before = proxy.metrics().requests("ldap", "accept", "in_enrollment")
    assert proxy.show("grace")["days_left"] == 5
    connection = ldap3_connection(proxy.url, dn, "grace-pw")
    try:
        assert connection.bind(), connection.result
        assert re.search(r"\b5 days left\b", connection.result["message"]), connection.result
        assert connection.extend.standard.who_am_i() == f"dn:{dn}"
    finally:
        connection.unbind()
    result = whoami(proxy.url, dn, "grace-pw")  # ldapwhoami shows it too
    assert_whoami(result, dn)
    assert "5 days left" in result.stderr
    assert proxy.metrics().requests("ldap", "accept", "in_enrollment") == before + 2


def test_not_required_user_binds_with_the_password_unless_strict(
        proxy: ProxyProcess, strict_proxy: ProxyProcess) -> None:
    dn = user_dn(NOT_REQUIRED)
    password = user_password(NOT_REQUIRED)
    assert proxy.show(NOT_REQUIRED)["status"] == "not_required"
    before = proxy.metrics().requests("ldap", "accept", "not_required")
    assert_whoami(whoami(proxy.url, dn, password), dn)
    assert proxy.metrics().requests("ldap", "accept", "not_required") == before + 1
    # mfa = "strict": every user needs a code; one never enrolled is refused
    assert_refused(whoami(strict_proxy.url, dn, password), 49, "invalid credentials")
    assert strict_proxy.metrics().requests("ldap", "reject", "not_enrolled") == 1


def test_strict_listener_accepts_an_enrolled_user_with_a_code(
        strict_proxy: ProxyProcess, codes: Codes) -> None:
    dn = user_dn("ivan")
    enrolled = strict_proxy.ok("user", "enroll", "ivan", "--secret", codes.new_totp_key("ivan"))
    assert enrolled.out.startswith("ivan: enrolled")
    assert_refused(whoami(strict_proxy.url, dn, "ivan-pw"), 49, "invalid credentials")
    assert_whoami(whoami(strict_proxy.url, dn, f"ivan-pw,{codes.fresh('ivan')}"), dn)


# ---------------------------------------------------------------- refused before the core


def test_empty_password_is_53(proxy: ProxyProcess) -> None:
    before = proxy.metrics().requests("ldap", "reject", "empty_password")
    dn = user_dn("alice")
    result = run("ldapwhoami", "-x", "-H", proxy.url, "-D", dn, "-w", "")
    assert_refused(result, 53, "unauthenticated bind")
    assert "Server is unwilling to perform (53)" in result.stderr
    searched = ldapsearch(proxy.url, dn, "", "-b", BASE_DN, "(uid=alice)", "cn")
    assert_refused(searched, 53, "unauthenticated bind")
    assert searched.stdout == ""
    assert proxy.metrics().requests("ldap", "reject", "empty_password") == before + 2
    assert proxy.show("alice")["failures"] == 0  # no guess: not counted


def test_sasl_bind_is_7(proxy: ProxyProcess) -> None:
    before = proxy.metrics().requests("ldap", "reject", "sasl_not_supported")
    external = ldap3.Connection(ldap3.Server(proxy.url, get_info=ldap3.NONE),
                                authentication=ldap3.SASL, sasl_mechanism=ldap3.EXTERNAL,
                                receive_timeout=TIMEOUT)
    try:
        external.open()
        assert not external.bind()
        assert external.result["result"] == 7, external.result
    finally:
        external.unbind()
    # ldapwhoami's SASL binds (EXTERNAL it refuses itself without a client certificate)
    digest = run("ldapwhoami", "-Y", "DIGEST-MD5", "-U", "alice", "-w", "alice-pw",
                 "-H", proxy.url)
    assert_refused(digest, 7, "SASL binds are not supported")
    plain = run("ldapwhoami", "-Y", "PLAIN", "-O", "none", "-U", "alice",
                "-w", "alice-pw,000000", "-H", proxy.url)
    assert_refused(plain, 7, "SASL binds are not supported")
    assert proxy.metrics().requests("ldap", "reject", "sasl_not_supported") == before + 3
    assert proxy.show("alice")["failures"] == 0


def test_sasl_plain_naming_the_exempt_dn_does_not_bypass_mfa(
        proxy: ProxyProcess, slapd: Slapd, codes: Codes) -> None:
    """The attack: a SASL PLAIN bind whose (ignored) name is the exempt service DN
    and whose credentials are ``\\0user\\0password`` was relayed, and slapd
    authenticated the user without a code."""
    user, dn = SASL_USER, user_dn(SASL_USER)
    proxy.ok("user", "enroll", user, "--secret", codes.new_totp_key(user))
    attack = sasl_plain_bind(1, slapd.svc_dn, user, user_password(user))
    with RawSession(slapd.port) as direct:  # slapd itself takes it: the attack is real
        direct.send(attack)
        assert result_code(direct.final([1])[1]) == 0
        assert direct.whoami(2) == f"dn:{dn}"
    before = proxy.metrics().requests("ldap", "reject", "sasl_not_supported")
    with RawSession(proxy.ldap_port) as through:
        through.send(attack)
        bind_response = through.final([1])[1]
        assert result_code(bind_response) == 7  # authMethodNotSupported
        through.send(raw_search(2, dn))
        assert result_code(through.final([2])[2]) == 50  # nothing is bound: bind required
        assert through.whoami(3) is None
    assert proxy.metrics().requests("ldap", "reject", "sasl_not_supported") == before + 1
    # she is enrolled: her password alone is not enough either, and with the code it is
    assert_refused(whoami(proxy.url, dn, user_password(user)), 49, "invalid credentials")
    assert_whoami(whoami(proxy.url, dn, f"{user_password(user)},{codes.fresh(user)}"), dn)


def test_operations_before_a_bind_are_refused(proxy: ProxyProcess) -> None:
    labels = {"operation": "search", "reason": "bind_required"}
    before = proxy.metrics().get("mfa_proxy_ldap_refused_total", **labels)
    with RawSession(proxy.ldap_port) as session:
        session.send(raw_search(1, user_dn("alice")))
        assert result_code(session.final([1])[1]) == 50
    assert proxy.metrics().get("mfa_proxy_ldap_refused_total", **labels) == before + 1


def test_exempt_service_account_binds_with_the_password_only(
        proxy: ProxyProcess, slapd: Slapd) -> None:
    before = proxy.metrics().requests("ldap", "accept", "exempt")
    assert_whoami(whoami(proxy.url, slapd.svc_dn, slapd.svc_password), slapd.svc_dn)
    metrics = proxy.metrics()
    assert metrics.requests("ldap", "accept", "exempt") == before + 1
    assert metrics.get("mfa_proxy_requests_total", protocol="ldap", client="ldap",
                       result="accept", reason="exempt") == before + 1
    # and its wrong password is the directory's own answer
    wrong = whoami(proxy.url, slapd.svc_dn, "not-the-secret")
    assert wrong.returncode == 49, wrong.stderr


def test_a_dn_outside_the_user_base_is_refused_unless_exempt(
        proxy: ProxyProcess, slapd: Slapd) -> None:
    """[ldap] user_base defaults to [directory] user_base: the rootdn (a real entry
    with a right password, but no user) does not get a password-only session."""
    direct = whoami(slapd.url, slapd.admin_dn, slapd.admin_password)
    assert_whoami(direct, slapd.admin_dn)  # the credential is good at the directory
    before = proxy.metrics().requests("ldap", "reject", "outside_user_base")
    assert_refused(whoami(proxy.url, slapd.admin_dn, slapd.admin_password), 49,
                   "invalid credentials")
    assert proxy.metrics().requests("ldap", "reject", "outside_user_base") == before + 1


# ---------------------------------------------------------------- after the bind


def test_search_through_the_proxy_is_identical_to_slapd(
        proxy: ProxyProcess, slapd: Slapd, codes: Codes) -> None:
    dn = user_dn("judy")
    args = ("-b", BASE_DN, "(|(objectClass=groupOfNames)(uid=j*)(uid=a*)(cn=svc))", "*", "+")
    through = ldapsearch(proxy.url, dn, f"judy-pw,{codes.fresh('judy')}", *args)
    direct = ldapsearch(slapd.url, dn, "judy-pw", *args)
    assert through.returncode == direct.returncode == 0, through.stderr
    assert ldif_entries(through.stdout) == ldif_entries(direct.stdout)
    assert through.stdout == direct.stdout  # same order, too
    # bound as judy, not anonymous: the ACL shows her the descriptions
    assert "description: secret description of alice" in through.stdout
    assert "dn: cn=vpn-users,ou=groups," in through.stdout
    paged = ("-E", "pr=200/noprompt", "-b", f"ou=people,{BASE_DN}", "(uid=user0*)", "cn")
    through = ldapsearch(proxy.url, dn, f"judy-pw,{codes.fresh('judy')}", *paged)
    direct = ldapsearch(slapd.url, dn, "judy-pw", *paged)
    assert through.returncode == direct.returncode, through.stderr
    assert ldif_entries(through.stdout) == ldif_entries(direct.stdout)
    assert through.stdout.count("dn: uid=user0") == 500  # slapd's size limit, both ways


def test_failed_mfa_bind_leaves_nothing_usable(proxy: ProxyProcess, codes: Codes) -> None:
    """After a failed bind every operation is refused (require_bind, on by default);
    that the directory session is anonymous too is tested with require_bind off in
    test_ldap_frontend.py."""
    dn = user_dn("mallory")

    def description(connection: ldap3.Connection) -> list[str] | None:
        """Her description, or None when the search is refused."""
        if not connection.search(dn, "(objectClass=*)", ldap3.BASE,
                                 attributes=["cn", "description"]):
            assert connection.result["result"] == 50, connection.result  # bind required
            return None
        (entry,) = connection.response
        assert entry["attributes"]["cn"] == ["mallory"]
        return list(entry["attributes"].get("description") or [])

    connection = ldap3_connection(proxy.url, dn, f"mallory-pw,{codes.wrong('mallory')}")
    try:
        connection.open()
        assert not connection.bind()
        assert connection.result["result"] == 49
        assert description(connection) is None
        assert connection.extend.standard.who_am_i() is None
        assert connection.rebind(dn, f"mallory-pw,{codes.fresh('mallory')}"), connection.result
        assert description(connection) == ["secret description of mallory"]
        assert connection.extend.standard.who_am_i() == f"dn:{dn}"
        # a failed bind after a good one ends that identity, on the same connection
        assert not connection.rebind(dn, f"mallory-pw,{codes.wrong('mallory')}")
        assert connection.result["result"] == 49
        assert description(connection) is None
        assert connection.extend.standard.who_am_i() is None
    finally:
        connection.unbind()


# ---------------------------------------------------------------- one user, two protocols


def test_ldap_and_radius_failures_share_one_counter_and_lock_together(
        proxy: ProxyProcess, codes: Codes) -> None:
    dn = user_dn("oscar")
    before = proxy.metrics()
    for _ in range(2):
        assert_refused(whoami(proxy.url, dn, f"oscar-pw,{codes.wrong('oscar')}"), 49,
                       "invalid credentials")
    assert proxy.show("oscar")["failures"] == 2
    reply = radius(proxy, "oscar", f"oscar-pw,{codes.wrong('oscar')}")
    assert reply.code == "Access-Reject", reply.output
    view = proxy.show("oscar")
    assert view["failures"] == 3 and not view["locked"]
    reply = radius(proxy, "oscar", f"oscar-pw,{codes.wrong('oscar')}")
    assert reply.code == "Access-Reject", reply.output
    # 2 over LDAP + 2 over RADIUS = max_failures: locked, everywhere
    assert_refused(whoami(proxy.url, dn, f"oscar-pw,{codes.fresh('oscar')}"), 49, "locked")
    assert radius(proxy, "oscar", f"oscar-pw,{codes.fresh('oscar')}").code == "Access-Reject"
    after = proxy.metrics()
    for protocol, reason, added in (("ldap", "bad_code", 2), ("radius", "bad_code", 2),
                                    ("ldap", "locked_out", 1), ("radius", "locked_out", 1)):
        assert after.requests(protocol, "reject", reason) == \
            before.requests(protocol, "reject", reason) + added, (protocol, reason)
    assert after.get("mfa_proxy_lockouts_total") == before.get("mfa_proxy_lockouts_total") + 1
    view = proxy.show("oscar", real=True)
    assert view["locked"] is True and view["failures"] == 4
    assert proxy.ok("user", "unlock", "oscar", real=True).out.strip() == "oscar: unlocked"
    assert proxy.show("oscar")["locked"] is False
    assert_whoami(whoami(proxy.url, dn, f"oscar-pw,{codes.fresh('oscar')}"), dn)


def test_dn_and_radius_username_are_one_user(proxy: ProxyProcess, codes: Codes) -> None:
    """Enrolled once with the CLI; `trent` over RADIUS and `uid=trent,…` over LDAP
    share the key and the used codes."""
    user, dn = "trent", user_dn("trent")
    enrolled = proxy.ok("user", "enroll", user, "--secret", codes.new_totp_key(user), real=True)
    assert enrolled.out.startswith("trent: enrolled")
    assert "otpauth://totp/" in enrolled.out
    first = codes.fresh(user)
    assert radius(proxy, user, f"trent-pw,{first}").code == "Access-Accept"
    # the code RADIUS used is spent for LDAP too
    assert_refused(whoami(proxy.url, dn, f"trent-pw,{first}"), 49, "invalid credentials")
    second = codes.fresh(user)
    assert_whoami(whoami(proxy.url, dn, f"trent-pw,{second}"), dn)
    # ... and the one LDAP used is a replay over RADIUS
    reply = radius(proxy, user, f"trent-pw,{second}")
    assert reply.code == "Access-Reject", reply.output
    # another spelling of the same DN is the same user
    odd = "UID=Trent, OU=People, " + BASE_DN.upper()
    third = codes.fresh(user)
    whoami_odd = whoami(proxy.url, odd, f"trent-pw,{third}")
    assert whoami_odd.returncode == 0, whoami_odd.stderr
    assert radius(proxy, user, f"trent-pw,{third}").code == "Access-Reject"
    view = proxy.show(user)
    assert view["status"] == "enrolled" and view["failures"] == 1  # the last replay


# ---------------------------------------------------------------- TLS listeners


def test_start_tls_and_ldaps_listeners_of_the_serve_process(
        proxy: ProxyProcess, proxy_tls: ProxyTls, slapd: Slapd, codes: Codes) -> None:
    dn = user_dn("peggy")
    started = whoami(proxy.url, dn, f"peggy-pw,{codes.fresh('peggy')}", "-ZZ",
                     ca_file=proxy_tls.ca_file)
    assert_whoami(started, dn)
    ldaps = whoami(proxy.ldaps_url, dn, f"peggy-pw,{codes.fresh('peggy')}",
                   ca_file=proxy_tls.ca_file)
    assert_whoami(ldaps, dn)
    # a client that does not trust the proxy's CA refuses it (before any bind)
    untrusted = whoami(proxy.ldaps_url, dn, f"peggy-pw,{codes.wrong('peggy')}",
                       ca_file=Path(slapd.ca_file))
    assert untrusted.returncode != 0 and "(49)" not in untrusted.stderr
    untrusted = whoami(proxy.url, dn, f"peggy-pw,{codes.wrong('peggy')}", "-ZZ",
                       ca_file=Path(slapd.ca_file))
    assert untrusted.returncode != 0 and "(49)" not in untrusted.stderr
    assert proxy.show("peggy")["failures"] == 0  # never reached the core


# ---------------------------------------------------------------- the directory goes away


def test_upstream_down_is_52_the_listener_stays_up_and_recovers(
        slapd_fresh: Slapd, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path / "proxy", slapd_fresh, radius=False)
    try:
        dn, password = user_dn(NOT_REQUIRED), user_password(NOT_REQUIRED)
        assert_whoami(whoami(proxy.url, dn, password), dn)
        slapd_fresh.stop()
        for _ in range(2):  # each a new connection: the listener is still there
            assert_refused(whoami(proxy.url, dn, password), 52, "directory unavailable")
        assert proxy.running
        metrics = proxy.metrics()
        assert metrics.get("mfa_proxy_ldap_upstream_errors_total") >= 2
        assert metrics.requests("ldap", "reject", "directory_unavailable") == 2
        slapd_fresh.start()
        assert_whoami(whoami(proxy.url, dn, password), dn)
        assert proxy.show(NOT_REQUIRED)["failures"] == 0  # an outage is not the user's failure
    except BaseException:
        proxy.stop()
        raise
    proxy.stop_cleanly()


# ---------------------------------------------------------------- metrics


def test_metrics_count_ldap_connections_and_requests_by_reason(
        proxy: ProxyProcess, codes: Codes, slapd: Slapd) -> None:
    dn = user_dn("walter")
    before = proxy.metrics()
    assert before.has("mfa_proxy_ldap_connections")
    held = ldap3_connection(proxy.url, dn, f"walter-pw,{codes.fresh('walter')}")
    try:
        assert held.bind(), held.result
        during = proxy.metrics()
        # this connection is open until the unbind below
        assert during.get("mfa_proxy_ldap_connections") >= 1
        assert_refused(whoami(proxy.url, dn, f"walter-pw,{codes.wrong('walter')}"), 49,
                       "invalid credentials")
        assert_whoami(whoami(proxy.url, slapd.svc_dn, slapd.svc_password), slapd.svc_dn)
    finally:
        held.unbind()
    # the server sees the close a moment after the client: wait for it (bounded)
    after = proxy.metrics()
    for _ in range(100):
        if after.get("mfa_proxy_ldap_connections") == before.get("mfa_proxy_ldap_connections"):
            break
        time.sleep(0.1)
        after = proxy.metrics()
    assert after.get("mfa_proxy_ldap_connections") == before.get("mfa_proxy_ldap_connections")
    for result, reason, added in (("accept", "ok", 1), ("reject", "bad_code", 1),
                                  ("accept", "exempt", 1)):
        assert after.requests("ldap", result, reason) == \
            before.requests("ldap", result, reason) + added, (result, reason)
    assert after.get("mfa_proxy_decision_seconds_count", protocol="ldap") == \
        before.get("mfa_proxy_decision_seconds_count", protocol="ldap") + 3
    assert after.get("mfa_proxy_ldap_forwarded_total") > before.get(
        "mfa_proxy_ldap_forwarded_total")  # the exempt bind and the WhoAmI requests
    # labels are bounded: never a username or a DN
    assert "walter" not in after.text and "uid=" not in after.text


def test_admin_commands_act_on_the_entry_whatever_the_spelling(proxy: ProxyProcess) -> None:
    """`user require ＶＩＣＴＯＲ` requires the entry uid=victor, keyed as serve keys it."""
    proxy.ok("user", "require", "ＶＩＣＴＯＲ", "--days", "3")
    assert proxy.show("victor")["status"] == "in_enrollment"
    assert proxy.show("EXAMPLE\\Victor")["username"] == "victor"
    names = [u["username"] for u in proxy.ok("user", "list", "--json").json]
    assert "victor" in names and "ＶＩＣＴＯＲ" not in names
    assert proxy.cli("user", "require", "nobody-at-all").code == 1
