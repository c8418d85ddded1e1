"""End to end: the real ``mfa-proxy serve`` against the real slapd, as NAS see it.

One proxy process for the module, with one RADIUS client per loopback source
address (a client's behaviour is chosen by where the request comes from):

    127.0.0.1  vpn      auto, separator ","          (radclient sends from here)
    127.0.0.2  append   append, separator ","
    127.0.0.3  nosep    append, separator "" (the last 6 characters are the code)
    127.0.0.4  chal     challenge
    127.0.0.5  legacy   append, no Message-Authenticator required
    127.0.0.6  notice   auto, enrollment_notice = "challenge"
    127.0.0.7  strict   auto, mfa = "strict"

Users come from the session slapd (``userNNNNN`` / ``passNNNNN``, and alice,
bob, dave for the group tests); their MFA state is loaded before the start
with one ``user import``.  Every test takes fresh users from a pool, so the
tests do not depend on each other or on their order.  What the proxy decided
is read back from ``/metrics`` (the exact (client, result, reason) counted)
and from ``user show --json``.  Protocol-level checks against a fake core live
in ``test_radius_protocol.py``; these go through the whole product.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import pyotp
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proxy.radius.testing import access_request, accounting_request, build_request
from tests.integration.proxyproc import (
    Datagrams,
    Metrics,
    ProxyProcess,
    pyrad_auth,
    pyrad_client,
)
from tests.integration.slapd import Slapd, user_password

ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE = 2, 3, 11
ACCESS_REQUEST, STATUS_SERVER = 1, 12
USER_NAME, USER_PASSWORD, REPLY_MESSAGE, STATE, PROXY_STATE = 1, 2, 18, 24, 33
MESSAGE_AUTHENTICATOR = 80
MAX_FAILURES = 3
ENROLLING_DAYS = 5

_CLIENTS: list[dict[str, Any]] = [
    {"name": "vpn", "address": "127.0.0.1/32"},
    {"name": "append", "address": "127.0.0.2/32", "mode": "append"},
    {"name": "nosep", "address": "127.0.0.3/32", "mode": "append", "separator": ""},
    {"name": "chal", "address": "127.0.0.4/32", "mode": "challenge"},
    {"name": "legacy", "address": "127.0.0.5/32", "mode": "append",
     "require_message_authenticator": False},
    {"name": "notice", "address": "127.0.0.6/32", "enrollment_notice": "challenge"},
    {"name": "strict", "address": "127.0.0.7/32", "mfa": "strict"},
]
CLIENTS = [{"secret": f"{c['name']}-e2e-shared-secret-0123456789", **c} for c in _CLIENTS]
SECRET = {c["name"]: str(c["secret"]).encode() for c in CLIENTS}
SOURCE = {c["name"]: c["address"].split("/")[0] for c in CLIENTS}
REPLY_RULES = [
    {"group": "admins", "attributes": {"Class": "admins", "Session-Timeout": 3600}},
    {"group": "vpn-users", "attributes": {"Filter-Id": "vpn"}},
]


def totp_secret(name: str) -> str:
    """A fixed key per user, so a test can make its codes."""
    return base64.b32encode(hashlib.sha1(name.encode()).digest()).decode()  # noqa: S324


def code(name: str) -> str:
    return pyotp.TOTP(totp_secret(name)).now()


def wrong_code(name: str) -> str:
    """Six digits that are no valid code for ``name`` anywhere near now."""
    totp, now = pyotp.TOTP(totp_secret(name)), time.time()
    near = {totp.at(now + 30 * k) for k in range(-3, 4)}
    return next(c for c in (f"{n:06d}" for n in range(123456, 999999, 111111)) if c not in near)


@dataclass
class Pools:
    """Users prepared before the proxy started, handed out once each."""

    enrolled: list[str] = field(default_factory=list)
    enrolling: list[str] = field(default_factory=list)  # in enrollment, 5 days left
    expired: list[str] = field(default_factory=list)  # enrollment period over
    plain: list[str] = field(default_factory=list)  # never required

    def take(self, pool: str) -> str:
        names: list[str] = getattr(self, pool)
        return names.pop(0)


def numbered(first: int, count: int) -> list[str]:
    return [f"user{i:05d}" for i in range(first, first + count)]


@dataclass
class E2E:
    proxy: ProxyProcess
    users: Pools


@pytest.fixture(scope="module")
def e2e(slapd: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    pools = Pools(enrolled=numbered(1, 60), enrolling=numbered(101, 10),
                  expired=numbered(201, 5), plain=numbered(301, 40))
    proxy = ProxyProcess.configure(
        tmp_path_factory.mktemp("radius-e2e"), slapd, clients=CLIENTS, reply=REPLY_RULES,
        overrides={"policy": {"max_failures": MAX_FAILURES, "lockout_seconds": 900}})
    rows = [f"{u},{totp_secret(u)}" for u in [*pools.enrolled, "alice", "bob", "dave"]]
    rows += [f"{u},,{ENROLLING_DAYS}" for u in pools.enrolling]
    rows += [f"{u},,1" for u in pools.expired]
    (proxy.workdir / "users.csv").write_text("\n".join(rows) + "\n")
    proxy.cli("user", "import", str(proxy.workdir / "users.csv"))
    # The CLI has no clock to move: the deadline is put in the past in the row itself.
    with closing(sqlite3.connect(proxy.state_path)) as db, db:
        db.executemany("UPDATE users SET enrollment_deadline = ? WHERE username = ?",
                       [(int(time.time()) - 3600, u) for u in pools.expired])
    with proxy.running():
        yield E2E(proxy, pools)


# --- reading what happened -----------------------------------------------------------


def decisions(before: Metrics, after: Metrics) -> dict[tuple[str, str, str], float]:
    """(client, result, reason) -> how many more requests were counted."""
    out = {}
    for (name, labels), value in after.items():
        if name != "mfa_proxy_requests_total":
            continue
        delta = value - before.get((name, labels), 0.0)
        if delta:
            d = dict(labels)
            assert d["protocol"] == "radius"
            out[(d["client"], d["result"], d["reason"])] = delta
    return out


def counted(before: Metrics, after: Metrics, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


class Watch:
    """Metrics before; ``decided()`` after: exactly what the proxy counted meanwhile."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.before = proxy.metrics()

    def decided(self) -> dict[tuple[str, str, str], float]:
        return decisions(self.before, self.proxy.metrics())

    def counted(self, name: str, **labels: str) -> float:
        return counted(self.before, self.proxy.metrics(), name, **labels)


def stored(proxy: ProxyProcess, name: str) -> dict[str, object]:
    """A user's row, read straight from SQLite (cheaper than the CLI; {} when none)."""
    with closing(sqlite3.connect(proxy.state_path)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM users WHERE username = ?", (name,)).fetchone()
    return dict(row) if row else {}


def message(reply: object) -> str:
    values = reply.get("Reply-Message") or []  # type: ignore[attr-defined]
    return "".join(values)


# --- radclient (FreeRADIUS's own client) ---------------------------------------------


@dataclass
class RadclientReply:
    code: str | None  # "Access-Accept"... or None when nothing valid came back
    attributes: list[tuple[str, str]]  # in the order received

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.attributes if n == name]


def radclient(port: int, secret: bytes, attributes: str, kind: str = "auth",
              timeout: float = 10.0) -> RadclientReply:
    """One radclient run from 127.0.0.1 (client "vpn"); it checks the Response
    Authenticator and Message-Authenticator itself and prints the attributes."""
    proc = subprocess.run(
        ["radclient", "-x", "-r", "1", "-t", str(timeout), f"127.0.0.1:{port}", kind,
         secret.decode()],
        input=attributes.encode(), capture_output=True, timeout=timeout + 20, check=False)
    out = proc.stdout.decode(errors="replace")
    received = re.search(r"^Received (\S+) Id", out, re.MULTILINE)
    if received is None:
        return RadclientReply(None, [])
    found = []
    for line in out[received.end():].splitlines()[1:]:
        match = re.match(r"^\s+([\w-]+) = (.*)$", line)
        if match is None:
            break
        found.append((match.group(1), match.group(2).strip('"')))
    return RadclientReply(received.group(1), found)


def radclient_auth(e2e: E2E, user: str, password: str, extra: str = "") -> RadclientReply:
    return radclient(e2e.proxy.radius_port, e2e.proxy.client_secret("vpn"),
                     f'User-Name = "{user}"\nUser-Password = "{password}"\n{extra}'
                     "Message-Authenticator = 0x00\n")


# --- raw bytes, checked without the product's code -------------------------------------


def check_reply(reply: bytes, request: bytes, secret: bytes) -> list[tuple[int, bytes]]:
    """What a careful NAS checks (RFC 2865 §3, RFC 3579 §3.2, BlastRADIUS): the
    Response Authenticator, and a Message-Authenticator as the FIRST attribute,
    valid.  Returns the attributes in order."""
    assert len(reply) >= 20 and int.from_bytes(reply[2:4], "big") == len(reply)
    assert reply[1] == request[1], "Identifier"
    expected = hashlib.md5(reply[:4] + request[4:20] + reply[20:] + secret).digest()  # noqa: S324
    assert reply[4:20] == expected, "Response Authenticator"
    assert reply[20] == MESSAGE_AUTHENTICATOR and reply[21] == 18, \
        f"first attribute is {reply[20]}, not Message-Authenticator"
    signed = reply[:4] + request[4:20] + reply[20:22] + bytes(16) + reply[38:]
    assert hmac.new(secret, signed, "md5").digest() == reply[22:38], "Message-Authenticator"
    attributes, pos = [], 20
    while pos < len(reply):
        attributes.append((reply[pos], reply[pos + 2:pos + reply[pos + 1]]))
        pos += reply[pos + 1]
    return attributes


def status_server(secret: bytes, identifier: int) -> bytes:
    return build_request(STATUS_SERVER, identifier, secret, [])


def assert_dropped(e2e: E2E, datagram: bytes, client: str, reason: str) -> None:
    """Sent from ``client``'s address, the datagram got no answer and was counted
    as dropped for ``reason``.

    A Status-Server from the same socket right after it is answered at once
    (no directory involved), which proves the first datagram was read; the
    drop counter says what became of it, and nothing was decided for it.
    """
    proxy = e2e.proxy
    watch = Watch(proxy)
    with Datagrams(proxy.radius_port, SOURCE[client]) as nas:
        nas.send(datagram)
        ping = status_server(SECRET[client], (datagram[1] + 1) % 256)
        answer = nas.exchange(ping)
        assert answer is not None, "no answer to a Status-Server after the datagram"
        check_reply(answer, ping, SECRET[client])
        assert watch.counted("mfa_proxy_radius_dropped_total", reason=reason) == 1
        assert watch.decided() == {}
        assert nas.receive(timeout=0.2) is None  # and still nothing for the datagram


# --- modes ---------------------------------------------------------------------------


def test_auto_mode_password_and_code_in_one_field(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    watch = Watch(e2e.proxy)
    reply = radclient_auth(e2e, user, f"{user_password(user)},{code(user)}")
    assert reply.code == "Access-Accept"  # radclient verified both authenticators
    assert reply.attributes[0][0] == "Message-Authenticator"
    assert watch.decided() == {("vpn", "accept", "ok"): 1}


def test_auto_mode_password_alone_is_challenged_then_the_code_accepted(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    nas = pyrad_client(e2e.proxy, "vpn", SOURCE["vpn"])
    watch = Watch(e2e.proxy)
    first = pyrad_auth(nas, user, user_password(user))
    assert first.code == ACCESS_CHALLENGE
    assert "code" in message(first).lower()
    second = pyrad_auth(nas, user, code(user), state=first["State"][0])
    assert second.code == ACCESS_ACCEPT
    assert watch.decided() == {("vpn", "challenge", "code_needed"): 1, ("vpn", "accept", "ok"): 1}


def test_auto_mode_user_without_mfa_signs_in_with_the_password(e2e: E2E) -> None:
    user = e2e.users.take("plain")
    watch = Watch(e2e.proxy)
    assert radclient_auth(e2e, user, user_password(user)).code == "Access-Accept"
    assert watch.decided() == {("vpn", "accept", "not_required"): 1}


def test_append_mode_with_separator(e2e: E2E) -> None:
    user, other = e2e.users.take("enrolled"), e2e.users.take("enrolled")
    nas = pyrad_client(e2e.proxy, "append", SOURCE["append"])
    watch = Watch(e2e.proxy)
    assert pyrad_auth(nas, user, f"{user_password(user)},{code(user)}").code == ACCESS_ACCEPT
    # append mode never challenges: an enrolled user without a code is refused
    assert pyrad_auth(nas, other, user_password(other)).code == ACCESS_REJECT
    assert watch.decided() == {("append", "accept", "ok"): 1,
                               ("append", "reject", "missing_code"): 1}


def test_append_mode_without_separator_takes_the_last_six_characters(e2e: E2E) -> None:
    user, other = e2e.users.take("enrolled"), e2e.users.take("enrolled")
    nas = pyrad_client(e2e.proxy, "nosep", SOURCE["nosep"])
    watch = Watch(e2e.proxy)
    assert pyrad_auth(nas, user, user_password(user) + code(user)).code == ACCESS_ACCEPT
    assert pyrad_auth(nas, other, user_password(other) + wrong_code(other)).code == ACCESS_REJECT
    # "," is part of the password here: with it, the password is wrong
    third = e2e.users.take("enrolled")
    assert pyrad_auth(nas, third, f"{user_password(third)},{code(third)}").code == ACCESS_REJECT
    assert watch.decided() == {("nosep", "accept", "ok"): 1, ("nosep", "reject", "bad_code"): 1,
                               ("nosep", "reject", "bad_password"): 1}


def test_challenge_mode_in_two_steps_with_state_carried(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    nas = pyrad_client(e2e.proxy, "chal", SOURCE["chal"])
    watch = Watch(e2e.proxy)
    first = pyrad_auth(nas, user, user_password(user))
    assert first.code == ACCESS_CHALLENGE
    state = first["State"][0]
    assert len(state) >= 16 and message(first)
    assert pyrad_auth(nas, user, code(user), state=state).code == ACCESS_ACCEPT
    # the State was single-use
    assert pyrad_auth(nas, user, code(user), state=state).code == ACCESS_REJECT
    assert watch.decided() == {("chal", "challenge", "code_needed"): 1,
                               ("chal", "accept", "ok"): 1, ("chal", "reject", "bad_state"): 1}


def test_challenge_mode_wrong_code_in_the_second_step(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    nas = pyrad_client(e2e.proxy, "chal", SOURCE["chal"])
    first = pyrad_auth(nas, user, user_password(user))
    assert first.code == ACCESS_CHALLENGE
    watch = Watch(e2e.proxy)
    assert pyrad_auth(nas, user, wrong_code(user), state=first["State"][0]).code == ACCESS_REJECT
    assert watch.decided() == {("chal", "reject", "bad_code"): 1}
    assert stored(e2e.proxy, user)["failures"] == 1


def test_challenge_mode_takes_the_whole_field_as_the_password(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    nas = pyrad_client(e2e.proxy, "chal", SOURCE["chal"])
    watch = Watch(e2e.proxy)
    reply = pyrad_auth(nas, user, f"{user_password(user)},{code(user)}")
    assert reply.code == ACCESS_REJECT
    assert watch.decided() == {("chal", "reject", "bad_password"): 1}


# --- OpenVPN static challenge ---------------------------------------------------------


def scrv1(password: str, answer: str) -> str:
    b64 = base64.b64encode
    return f"SCRV1:{b64(password.encode()).decode()}:{b64(answer.encode()).decode()}"


@pytest.mark.parametrize("client", ["vpn", "append", "chal"])
def test_openvpn_static_challenge_in_every_mode(e2e: E2E, client: str) -> None:
    user = e2e.users.take("enrolled")
    nas = pyrad_client(e2e.proxy, client, SOURCE[client])
    watch = Watch(e2e.proxy)
    assert pyrad_auth(nas, user, scrv1(user_password(user), code(user))).code == ACCESS_ACCEPT
    other = e2e.users.take("enrolled")
    assert pyrad_auth(nas, other, scrv1(user_password(other), wrong_code(other))).code \
        == ACCESS_REJECT
    assert watch.decided() == {(client, "accept", "ok"): 1, (client, "reject", "bad_code"): 1}


# --- users' MFA states ------------------------------------------------------------------


def test_user_in_enrollment_is_told_the_days_left(e2e: E2E) -> None:
    user = e2e.users.take("enrolling")
    watch = Watch(e2e.proxy)
    reply = radclient_auth(e2e, user, user_password(user))
    assert reply.code == "Access-Accept"
    assert f"{ENROLLING_DAYS} days left" in " ".join(reply.values("Reply-Message"))
    assert watch.decided() == {("vpn", "accept", "in_enrollment"): 1}


def test_expired_enrollment_is_refused(e2e: E2E) -> None:
    user = e2e.users.take("expired")
    watch = Watch(e2e.proxy)
    reply = radclient_auth(e2e, user, user_password(user))
    assert reply.code == "Access-Reject"
    assert "expired" in " ".join(reply.values("Reply-Message"))
    assert watch.decided() == {("vpn", "reject", "enrollment_expired"): 1}
    assert e2e.proxy.user(user)["status"] == "enrollment_expired"


def test_bypass_user_signs_in_with_the_password_alone(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    e2e.proxy.cli("user", "bypass", user, "--on")
    nas = pyrad_client(e2e.proxy, "append", SOURCE["append"])
    watch = Watch(e2e.proxy)
    assert pyrad_auth(nas, user, user_password(user)).code == ACCESS_ACCEPT
    assert pyrad_auth(nas, user, "not-the-password").code == ACCESS_REJECT
    assert watch.decided() == {("append", "accept", "bypass"): 1,
                               ("append", "reject", "bad_password"): 1}


def test_strict_client_refuses_a_user_who_never_enrolled(e2e: E2E) -> None:
    user, enrolled = e2e.users.take("plain"), e2e.users.take("enrolled")
    nas = pyrad_client(e2e.proxy, "strict", SOURCE["strict"])
    watch = Watch(e2e.proxy)
    assert pyrad_auth(nas, user, user_password(user)).code == ACCESS_REJECT
    assert pyrad_auth(nas, enrolled, f"{user_password(enrolled)},{code(enrolled)}").code \
        == ACCESS_ACCEPT
    assert watch.decided() == {("strict", "reject", "not_enrolled"): 1,
                               ("strict", "accept", "ok"): 1}


def test_lockout_after_max_failures_then_unlock(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    nas = pyrad_client(e2e.proxy, "append", SOURCE["append"])
    watch = Watch(e2e.proxy)
    for _ in range(MAX_FAILURES):
        assert pyrad_auth(nas, user, f"wrong-password,{code(user)}").code == ACCESS_REJECT
    assert watch.counted("mfa_proxy_lockouts_total") == 1
    # the right password and code, but the account is locked
    locked = pyrad_auth(nas, user, f"{user_password(user)},{code(user)}")
    assert locked.code == ACCESS_REJECT
    assert "locked" in message(locked).lower()
    assert watch.decided() == {("append", "reject", "bad_password"): MAX_FAILURES,
                               ("append", "reject", "locked_out"): 1}
    shown = e2e.proxy.user(user)
    assert shown["locked"] is True and shown["failures"] == MAX_FAILURES
    e2e.proxy.cli("user", "unlock", user)
    assert pyrad_auth(nas, user, f"{user_password(user)},{code(user)}").code == ACCESS_ACCEPT
    assert stored(e2e.proxy, user)["failures"] == 0


def test_wrong_password_counts_one_failure_and_spends_no_code(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    nas = pyrad_client(e2e.proxy, "append", SOURCE["append"])
    current = code(user)
    watch = Watch(e2e.proxy)
    assert pyrad_auth(nas, user, f"wrong-password,{current}").code == ACCESS_REJECT
    assert stored(e2e.proxy, user)["failures"] == 1
    assert pyrad_auth(nas, user, f"{user_password(user)},{current}").code == ACCESS_ACCEPT
    assert watch.decided() == {("append", "reject", "bad_password"): 1,
                               ("append", "accept", "ok"): 1}
    assert stored(e2e.proxy, user)["failures"] == 0


def test_wrong_code_is_refused_and_counted(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    watch = Watch(e2e.proxy)
    reply = radclient_auth(e2e, user, f"{user_password(user)},{wrong_code(user)}")
    assert reply.code == "Access-Reject"
    assert watch.decided() == {("vpn", "reject", "bad_code"): 1}
    assert stored(e2e.proxy, user)["failures"] == 1


def test_replayed_code_is_refused(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    field = f"{user_password(user)},{code(user)}"
    watch = Watch(e2e.proxy)
    assert radclient_auth(e2e, user, field).code == "Access-Accept"
    assert radclient_auth(e2e, user, field).code == "Access-Reject"  # a new request, same code
    assert watch.decided() == {("vpn", "accept", "ok"): 1, ("vpn", "reject", "replayed_code"): 1}


def test_users_are_told_why_with_radclient(e2e: E2E) -> None:
    """A wrong password and a wrong code read the same; a replayed code says to wait;
    the attempt that locks says until when (ISO 8601), and so does every attempt
    after it. The texts are the core's (policy/engine.py), the same on LDAP."""
    import datetime as dt

    user = e2e.users.take("enrolled")
    said = lambda password: " ".join(  # noqa: E731
        radclient_auth(e2e, user, password).values("Reply-Message"))
    good = f"{user_password(user)},{code(user)}"
    assert radclient_auth(e2e, user, good).code == "Access-Accept"
    replayed = said(good)
    assert "already" in replayed and "wait for the next" in replayed
    e2e.proxy.cli("user", "unlock", user)  # the replay counted as a failure
    bad_code = said(f"{user_password(user)},{wrong_code(user)}")
    bad_password = said(f"wrong-password,{code(user)}")
    assert bad_code == bad_password == "invalid credentials: wrong password or verification code"
    assert MAX_FAILURES == 3  # this third failure locks
    before = time.time()
    locking = said(f"wrong-password,{wrong_code(user)}")
    prefix = "locked after too many failed attempts, until "
    assert locking.startswith(prefix), locking
    until = dt.datetime.fromisoformat(locking[len(prefix):].replace("Z", "+00:00"))
    assert before + 900 - 5 <= until.timestamp() <= time.time() + 900 + 5
    assert said(good) == locking  # locked: the same text, the same time
    e2e.proxy.cli("user", "unlock", user)


def test_domain_and_realm_forms_are_the_same_user(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    watch = Watch(e2e.proxy)
    nas = pyrad_client(e2e.proxy, "vpn", SOURCE["vpn"])
    assert pyrad_auth(nas, f"EXAMPLE\\{user.upper()}", "wrong-password").code == ACCESS_REJECT
    assert stored(e2e.proxy, user)["failures"] == 1  # one user, one failure counter
    assert radclient_auth(e2e, f"{user}@example.org",
                          f"{user_password(user)},{code(user)}").code == "Access-Accept"
    assert stored(e2e.proxy, user)["failures"] == 0
    assert watch.decided() == {("vpn", "reject", "bad_password"): 1, ("vpn", "accept", "ok"): 1}


def test_unknown_user_is_refused_and_leaves_no_state(e2e: E2E) -> None:
    watch = Watch(e2e.proxy)
    assert radclient_auth(e2e, "nobody-here", "whatever,123456").code == "Access-Reject"
    assert watch.decided() == {("vpn", "reject", "unknown_user"): 1}
    assert stored(e2e.proxy, "nobody-here") == {}


# --- log and audit injection ---------------------------------------------------------------

FORGED_USER_NAME = "alice\nFORGED decision user=admin result=accept"
FORGED_ESCAPED = "alice\\nFORGED decision user=admin result=accept"


def audit_rows(proxy: ProxyProcess, client: str) -> list[str]:
    """The usernames of ``client``'s audit rows, read straight from SQLite."""
    with closing(sqlite3.connect(proxy.state_path)) as db:
        return [r[0] for r in db.execute("SELECT username FROM audit WHERE client = ?",
                                         (client,))]


def test_a_newline_in_the_user_name_forges_no_log_line_and_no_audit_row(e2e: E2E) -> None:
    """The attack: a User-Name whose second line reads like a decision.  The
    proxy refuses the name, logs it on one line with the newline as ``\\n``,
    and audits it escaped the same way; the ANSI and U+2028 variants too."""
    proxy = e2e.proxy
    names = [FORGED_USER_NAME, "bob\x1b[2J\x1b[1;1HFORGED\u2028FORGED\rFORGED"]
    escaped = [FORGED_ESCAPED, "bob\\x1b[2J\\x1b[1;1HFORGED\\u2028FORGED\\rFORGED"]
    watch = Watch(proxy)
    with Datagrams(proxy.radius_port, SOURCE["append"]) as nas:
        for n, name in enumerate(names):
            request = access_request(SECRET["append"], name, "pw,123456", identifier=90 + n)
            reply = nas.exchange(request)
            assert reply is not None and reply[0] == ACCESS_REJECT
    assert watch.decided() == {("append", "reject", "invalid_username"): 2}
    log = proxy.log_path.read_text(encoding="utf-8", errors="replace")
    forged = [line for line in log.split("\n") if "FORGED" in line]
    assert not [line for line in forged if line.startswith("FORGED")], log[-2000:]
    assert len(forged) == 2, forged  # one record each, each one line
    assert any(f"decision user={FORGED_ESCAPED} protocol=radius client=append" in line
               for line in forged), forged
    assert any(f"user={escaped[1]} protocol=radius" in line for line in forged), forged
    assert not any(c in line for line in forged for c in "\r\x1b\u2028")
    deadline = time.monotonic() + 10  # audit rows are written every 0.25 s
    while (rows := sorted(u for u in audit_rows(proxy, "append") if "FORGED" in u)) != escaped:
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)


# --- reply attributes ---------------------------------------------------------------------


def test_reply_attributes_by_group(e2e: E2E) -> None:
    # alice: admins and vpn-users; bob: vpn-users; dave: neither (all enrolled)
    replies = {u: radclient_auth(e2e, u, f"{user_password(u)},{code(u)}")
               for u in ("alice", "bob", "dave")}
    assert {u: r.code for u, r in replies.items()} == dict.fromkeys(replies, "Access-Accept")
    alice, bob, dave = replies["alice"], replies["bob"], replies["dave"]
    assert alice.values("Class") == ["0x" + b"admins".hex()]
    assert alice.values("Session-Timeout") == ["3600"]
    assert alice.values("Filter-Id") == ["vpn"]
    assert bob.values("Filter-Id") == ["vpn"]
    assert bob.values("Class") == [] and bob.values("Session-Timeout") == []
    assert [n for n, _ in dave.attributes] == ["Message-Authenticator"]


def test_reply_attributes_also_in_challenge_mode(e2e: E2E) -> None:
    """carol (vpn-users, never required) on the challenge-mode client."""
    nas = pyrad_client(e2e.proxy, "chal", SOURCE["chal"])
    reply = pyrad_auth(nas, "carol", user_password("carol"))
    assert reply.code == ACCESS_ACCEPT
    assert reply["Filter-Id"] == ["vpn"]


# --- the enrollment notice as a challenge ------------------------------------------------


def test_enrollment_notice_as_a_challenge(e2e: E2E) -> None:
    user = e2e.users.take("enrolling")
    nas = pyrad_client(e2e.proxy, "notice", SOURCE["notice"])
    watch = Watch(e2e.proxy)
    first = pyrad_auth(nas, user, user_password(user))
    assert first.code == ACCESS_CHALLENGE
    assert f"{ENROLLING_DAYS} days left" in message(first)
    second = pyrad_auth(nas, user, "ok", state=first["State"][0])
    assert second.code == ACCESS_ACCEPT
    assert watch.decided() == {("notice", "challenge", "in_enrollment"): 1,
                               ("notice", "accept", "in_enrollment"): 1}
    # an enrolled user on the same client is asked for the code as usual
    enrolled = e2e.users.take("enrolled")
    assert pyrad_auth(nas, enrolled, f"{user_password(enrolled)},{code(enrolled)}").code \
        == ACCESS_ACCEPT


# --- BlastRADIUS (CVE-2024-3596) ---------------------------------------------------------


def test_request_without_message_authenticator_is_dropped(e2e: E2E) -> None:
    user = e2e.users.take("plain")
    request = access_request(e2e.proxy.client_secret("vpn"), user, user_password(user),
                             identifier=11, message_authenticator=False)
    assert_dropped(e2e, request, "vpn", "missing_message_authenticator")


def test_forged_message_authenticator_is_dropped(e2e: E2E) -> None:
    user = e2e.users.take("plain")
    secret = e2e.proxy.client_secret("vpn")
    good = access_request(secret, user, user_password(user), identifier=21)
    forged = good[:-16] + bytes(16)  # the Message-Authenticator goes last in these
    assert_dropped(e2e, forged, "vpn", "bad_message_authenticator")
    # a valid signature under another secret (a NAS with the wrong secret)
    other = access_request(b"not-the-secret", user, user_password(user), identifier=22)
    assert_dropped(e2e, other, "vpn", "bad_message_authenticator")
    # an attribute changed after signing, the Message-Authenticator kept
    tampered = good.replace(user.encode(), b"user99999")
    assert tampered != good
    assert_dropped(e2e, tampered, "vpn", "bad_message_authenticator")


def test_client_that_does_not_require_it_accepts_a_request_without(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    secret = e2e.proxy.client_secret("legacy")
    request = access_request(secret, user, f"{user_password(user)},{code(user)}",
                             identifier=31, message_authenticator=False)
    watch = Watch(e2e.proxy)
    with Datagrams(e2e.proxy.radius_port, SOURCE["legacy"]) as nas:
        reply = nas.exchange(request)
    assert reply is not None and reply[0] == ACCESS_ACCEPT
    check_reply(reply, request, secret)  # the reply is signed all the same
    assert watch.decided() == {("legacy", "accept", "ok"): 1}
    # not required, but verified when present: a bad one is still dropped
    signed = access_request(secret, user, "whatever", identifier=32)
    assert_dropped(e2e, signed[:-16] + bytes(16), "legacy", "bad_message_authenticator")


def test_every_reply_starts_with_a_valid_message_authenticator(e2e: E2E) -> None:
    """Accept, Reject, Challenge and the Status-Server answer, byte by byte;
    Proxy-State is copied back after our attributes."""
    secret = e2e.proxy.client_secret("vpn")
    enrolled, plain = e2e.users.take("enrolled"), e2e.users.take("plain")
    proxy_state = [(PROXY_STATE, b"hop-1"), (PROXY_STATE, b"hop-2")]
    requests = {
        ACCESS_ACCEPT: access_request(secret, plain, user_password(plain), identifier=41,
                                      extra=proxy_state),
        ACCESS_REJECT: access_request(secret, plain, "wrong", identifier=42, extra=proxy_state),
        ACCESS_CHALLENGE: access_request(secret, enrolled, user_password(enrolled),
                                         identifier=43, extra=proxy_state),
    }
    with Datagrams(e2e.proxy.radius_port, SOURCE["vpn"]) as nas:
        for expected, request in requests.items():
            reply = nas.exchange(request)
            assert reply is not None and reply[0] == expected
            attributes = check_reply(reply, request, secret)
            assert [v for t, v in attributes if t == PROXY_STATE] == [b"hop-1", b"hop-2"]
            assert attributes[-2:] == proxy_state
        ping = status_server(secret, 44)
        reply = nas.exchange(ping)
    assert reply is not None and reply[0] == ACCESS_ACCEPT
    check_reply(reply, ping, secret)


def test_packet_from_an_unknown_address_is_dropped(e2e: E2E) -> None:
    user = e2e.users.take("plain")
    request = access_request(e2e.proxy.client_secret("vpn"), user, user_password(user),
                             identifier=51)
    watch = Watch(e2e.proxy)
    with Datagrams(e2e.proxy.radius_port, "127.0.0.99") as stranger:
        stranger.send(request)
        stranger.send(status_server(e2e.proxy.client_secret("vpn"), 52))
        # both are dropped; the counter is the only sign (bounded wait for it)
        deadline = time.monotonic() + 10
        while watch.counted("mfa_proxy_radius_dropped_total", reason="unknown_client") < 2:
            assert time.monotonic() < deadline, "the drops were never counted"
            time.sleep(0.02)
        assert stranger.receive(timeout=0.2) is None
    assert watch.decided() == {}


# --- retransmissions (RFC 5080 §2.2.2) ---------------------------------------------------


def test_retransmission_gets_the_same_bytes_and_spends_the_code_once(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    secret = e2e.proxy.client_secret("vpn")
    field = f"{user_password(user)},{code(user)}"
    request = access_request(secret, user, field, identifier=61)
    watch = Watch(e2e.proxy)
    with Datagrams(e2e.proxy.radius_port, SOURCE["vpn"]) as nas:
        first = nas.exchange(request)
        again = nas.exchange(request)  # the NAS did not hear us and sends it again
        assert first is not None and first[0] == ACCESS_ACCEPT
        assert again == first
        # a NEW request with the same code is a replay
        fresh = access_request(secret, user, field, identifier=62)
        third = nas.exchange(fresh)
    assert third is not None and third[0] == ACCESS_REJECT
    check_reply(third, fresh, secret)
    assert watch.decided() == {("vpn", "accept", "ok"): 1, ("vpn", "reject", "replayed_code"): 1}
    assert watch.counted("mfa_proxy_radius_retransmissions_total", client="vpn") == 1


def test_accepted_request_replayed_from_new_source_ports_gets_the_cached_answer(
        e2e: E2E) -> None:
    """The attack: an accepted Access-Request captured on the wire and replayed
    byte for byte from five new source ports.  Each copy gets the first answer
    from the duplicate cache; none is decided again (as a replayed code), so
    the user's failure counter stays 0 and nobody is locked out."""
    user = e2e.users.take("enrolled")
    secret = e2e.proxy.client_secret("vpn")
    request = access_request(secret, user, f"{user_password(user)},{code(user)}",
                             identifier=63)
    watch = Watch(e2e.proxy)
    with Datagrams(e2e.proxy.radius_port, SOURCE["vpn"]) as nas:
        first = nas.exchange(request)
    assert first is not None and first[0] == ACCESS_ACCEPT
    attackers = [Datagrams(e2e.proxy.radius_port, SOURCE["vpn"]) for _ in range(5)]
    try:  # all open at once: five distinct source ports
        assert len({a.sock.getsockname()[1] for a in attackers}) == 5
        for attacker in attackers:
            assert attacker.exchange(request) == first
    finally:
        for attacker in attackers:
            attacker.close()
    assert watch.decided() == {("vpn", "accept", "ok"): 1}
    assert watch.counted("mfa_proxy_radius_retransmissions_total", client="vpn") == 5
    shown = e2e.proxy.user(user)
    assert shown["failures"] == 0 and shown["locked"] is False


def test_retransmitted_wrong_password_counts_one_failure(e2e: E2E) -> None:
    user = e2e.users.take("enrolled")
    secret = e2e.proxy.client_secret("vpn")
    request = access_request(secret, user, f"not-my-password,{code(user)}", identifier=71)
    watch = Watch(e2e.proxy)
    with Datagrams(e2e.proxy.radius_port, SOURCE["vpn"]) as nas:
        first = nas.exchange(request)
        again = nas.exchange(request)
    assert first is not None and first[0] == ACCESS_REJECT and again == first
    assert e2e.proxy.user(user)["failures"] == 1
    assert watch.decided() == {("vpn", "reject", "bad_password"): 1}


# --- Status-Server and accounting ---------------------------------------------------------


def test_status_server_is_answered_and_not_counted_as_a_request(e2e: E2E) -> None:
    watch = Watch(e2e.proxy)
    reply = radclient(e2e.proxy.radius_port, e2e.proxy.client_secret("vpn"),
                      "Message-Authenticator = 0x00\n", kind="status")
    assert reply.code == "Access-Accept"
    assert watch.decided() == {}


def test_accounting_request_is_answered_on_the_accounting_port(e2e: E2E) -> None:
    watch = Watch(e2e.proxy)
    reply = radclient(e2e.proxy.accounting_port, e2e.proxy.client_secret("vpn"),
                      'User-Name = "alice"\nAcct-Status-Type = Start\n'
                      'Acct-Session-Id = "e2e-1"\nNAS-IP-Address = 127.0.0.1\n', kind="acct")
    assert reply.code == "Accounting-Response"
    # and through pyrad from another client, checked by pyrad
    nas = pyrad_client(e2e.proxy, "append", SOURCE["append"])
    request = nas.CreateAcctPacket(User_Name="bob", Acct_Status_Type="Stop",
                                   Acct_Session_Id="e2e-2")
    assert nas.SendPacket(request).code == 5  # Accounting-Response
    assert watch.counted("mfa_proxy_radius_accounting_total", client="vpn") == 1
    assert watch.counted("mfa_proxy_radius_accounting_total", client="append") == 1
    assert watch.decided() == {}
    # a wrong secret: no answer, counted
    wrong = accounting_request(b"not-the-secret", [(USER_NAME, b"bob")], identifier=81)
    with Datagrams(e2e.proxy.accounting_port, SOURCE["vpn"]) as nas_socket:
        nas_socket.send(wrong)
        good = accounting_request(e2e.proxy.client_secret("vpn"), [(USER_NAME, b"bob")],
                                  identifier=82)
        assert nas_socket.exchange(good) is not None
    assert watch.counted("mfa_proxy_radius_dropped_total",
                         reason="bad_request_authenticator") == 1


# --- metrics ------------------------------------------------------------------------------


def test_metric_families_and_their_labels(e2e: E2E) -> None:
    """The contract's families, after an accept, a reject, a challenge, a drop and
    a lockout; label values are bounded (never a username or an address)."""
    enrolled, victim = e2e.users.take("enrolled"), e2e.users.take("enrolled")
    nas = pyrad_client(e2e.proxy, "vpn", SOURCE["vpn"])
    assert pyrad_auth(nas, enrolled, f"{user_password(enrolled)},{code(enrolled)}").code \
        == ACCESS_ACCEPT
    assert pyrad_auth(nas, enrolled, user_password(enrolled)).code == ACCESS_CHALLENGE
    for _ in range(MAX_FAILURES):
        assert pyrad_auth(nas, victim, "wrong").code == ACCESS_REJECT
    assert_dropped(e2e, access_request(e2e.proxy.client_secret("vpn"), victim, "x",
                                       identifier=91, message_authenticator=False),
                   "vpn", "missing_message_authenticator")
    m = e2e.proxy.metrics()

    requests = m.label_sets("mfa_proxy_requests_total")
    assert requests and all(set(ls) == {"protocol", "client", "result", "reason"}
                            for ls in requests)
    assert {ls["result"] for ls in requests} == {"accept", "reject", "challenge"}
    assert {ls["protocol"] for ls in requests} == {"radius"}
    assert {ls["client"] for ls in requests} <= {c["name"] for c in CLIENTS}
    assert m.value("mfa_proxy_requests_total", client="vpn", result="reject",
                   reason="bad_password") >= MAX_FAILURES

    assert m.types["mfa_proxy_decision_seconds"] == "histogram"
    # every request the core decided (answers given without it, such as an
    # unknown State, are not observed)
    assert 2 + MAX_FAILURES <= m.value("mfa_proxy_decision_seconds_count", protocol="radius") \
        <= m.value("mfa_proxy_requests_total", protocol="radius")
    assert m.value("mfa_proxy_decision_seconds_bucket", protocol="radius", le="+Inf") \
        == m.value("mfa_proxy_decision_seconds_count", protocol="radius")

    dropped = m.label_sets("mfa_proxy_radius_dropped_total")
    assert all(set(ls) == {"reason"} for ls in dropped)
    assert m.value("mfa_proxy_radius_dropped_total", reason="missing_message_authenticator") >= 1

    assert m.types["mfa_proxy_directory_seconds"] == "histogram"
    assert m.value("mfa_proxy_directory_seconds_count") >= 3
    assert m.value("mfa_proxy_lockouts_total") >= 1

    users = {ls["status"]: m[("mfa_proxy_users", frozenset(ls.items()))]
             for ls in m.label_sets("mfa_proxy_users")}
    assert set(users) == {"enrolled", "in_enrollment", "enrollment_expired",
                          "enrolled_not_required", "not_required"}
    assert users["enrolled"] >= 1 and users["in_enrollment"] >= 1
    assert users["enrollment_expired"] >= 1

    # bounded labels: no username, no address anywhere
    values = {v for (_, labels) in m for _, v in labels}
    assert not values & {enrolled, victim, "alice", "127.0.0.1"}
    assert not any(v.startswith("user0") for v in values)


# --- hypothesis: whatever arrives, the process keeps answering ---------------------------

FUZZ_USER = "fuzz-nobody"  # in no directory: a decision for it never counts a failure
PLACES = {"vpn": SOURCE["vpn"], "legacy": SOURCE["legacy"], "stranger": "127.0.0.99"}


@st.composite
def well_formed(draw: st.DrawFn) -> bytes:
    """A packet whose lengths add up, mostly an Access-Request with a User-Name
    and a User-Password, with random attributes around them: from the
    "legacy" client (no Message-Authenticator needed) it reaches the decision."""
    attributes = []
    if draw(st.integers(0, 9)):
        name = draw(st.sampled_from([FUZZ_USER.encode(), b"*", b"(uid=*)", b"a\\00b"])
                    | st.text(min_size=1, max_size=30).map(str.encode)
                    | st.binary(min_size=1, max_size=30))
        attributes.append((USER_NAME, name))
    if draw(st.integers(0, 9)):
        attributes.append((USER_PASSWORD, draw(st.integers(1, 8).flatmap(
            lambda n: st.binary(min_size=16 * n, max_size=16 * n)))))
    extra = draw(st.lists(st.tuples(
        st.sampled_from([USER_NAME, USER_PASSWORD, 3, REPLY_MESSAGE, STATE, 26, PROXY_STATE,
                         40, 44, 79, MESSAGE_AUTHENTICATOR, 255, 0]),
        st.binary(max_size=40)), max_size=5))
    attributes[draw(st.integers(0, len(attributes))):0] = extra
    body = b"".join(bytes((t, len(v) + 2)) + v for t, v in attributes)
    code_ = draw(st.sampled_from([ACCESS_REQUEST] * 6 + [STATUS_SERVER, 4, 2, 0, 255]))
    head = bytes((code_, draw(st.integers(0, 255)))) + (20 + len(body)).to_bytes(2, "big")
    return head + draw(st.binary(min_size=16, max_size=16)) + body


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid Access-Request (with or without Message-Authenticator), damaged."""
    secret = draw(st.sampled_from([SECRET["vpn"], SECRET["legacy"]]))
    data = bytearray(access_request(
        secret, FUZZ_USER, draw(st.text(max_size=40)), identifier=draw(st.integers(0, 255)),
        state=draw(st.none() | st.binary(max_size=20)),
        message_authenticator=draw(st.booleans())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "grow", "length", "attr_length"]))
        if op == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[draw(st.integers(0, len(data))):]
        elif op == "grow":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "length" and len(data) >= 4:
            data[2:4] = draw(st.integers(0, 65535)).to_bytes(2, "big")
        elif op == "attr_length" and len(data) > 21:
            data[21] = draw(st.integers(0, 255))
    return bytes(data)


def answered_or_dropped(before: Metrics, after: Metrics) -> float:
    """Datagrams accounted for: dropped, decided, accounting answered, or
    answered from the duplicate cache."""
    return sum(counted(before, after, name) for name in (
        "mfa_proxy_radius_dropped_total", "mfa_proxy_requests_total",
        "mfa_proxy_radius_accounting_total", "mfa_proxy_radius_retransmissions_total"))


def wait_for_datagram(proxy: ProxyProcess, nas: Datagrams, what: str) -> bytes:
    """Up to 15 s, in slices, failing at once if the process died."""
    for _ in range(30):
        assert proxy.alive, f"mfa-proxy died after {what}:\n{proxy.log_tail()}"
        reply = nas.receive(timeout=0.5)
        if reply is not None:
            return reply
    raise AssertionError(f"no answer after {what}")


# No shrinking: a failure may cost a bounded wait per example, and shrinking
# would repeat it hundreds of times; the failing datagram is in the message.
@settings(max_examples=200, deadline=None, database=None,
          phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(datagram=st.one_of(st.binary(max_size=300), well_formed(), mutated()),
       place=st.sampled_from(["legacy", "legacy", "legacy", "vpn", "stranger"]),
       accounting=st.sampled_from([False, False, False, True]))
def test_random_and_mutated_datagrams_never_stop_the_server(
        e2e: E2E, datagram: bytes, place: str, accounting: bool) -> None:
    """Every datagram is dropped (counted by reason) or answered (counted), never
    an internal error; a valid Status-Server is answered right after it.  Each
    example waits for its own answer, so nothing is left in flight for the
    other tests."""
    proxy = e2e.proxy
    port = proxy.accounting_port if accounting else proxy.radius_port
    before = proxy.metrics()
    with Datagrams(port, PLACES[place]) as nas, Datagrams(port, SOURCE["vpn"]) as ping:
        nas.send(datagram)
        request = status_server(SECRET["vpn"], 7)
        ping.send(request)
        check_reply(wait_for_datagram(proxy, ping, repr(datagram)), request, SECRET["vpn"])
        # The datagram was read before the ping and handled at once up to its drop
        # or its hand-over to the core.
        middle = proxy.metrics()
        dropped = counted(before, middle, "mfa_proxy_radius_dropped_total")
        assert dropped in (0, 1)
        assert counted(before, middle, "mfa_proxy_radius_dropped_total",
                       reason="internal_error") == 0
        if not dropped:  # then it is answered: wait for that
            wait_for_datagram(proxy, nas, repr(datagram))
    assert answered_or_dropped(before, proxy.metrics()) == 1


def test_after_the_fuzz_the_process_still_decides(e2e: E2E) -> None:
    """Runs after the hypothesis test (file order); also meaningful alone."""
    user = e2e.users.take("enrolled")
    reply = radclient_auth(e2e, user, f"{user_password(user)},{code(user)}")
    assert reply.code == "Access-Accept"
    assert e2e.proxy.alive
    m = e2e.proxy.metrics()
    assert m.value("mfa_proxy_radius_dropped_total", reason="internal_error") == 0
    assert m.value("mfa_proxy_requests_total", reason="internal_error") == 0
    assert m.value("mfa_proxy_requests_total", reason="state_unavailable") == 0
    assert "Traceback" not in e2e.proxy.log_tail(10**7)
