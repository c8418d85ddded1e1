"""Attacks on the MFA identity: every spelling of alice is alice, nothing else is.

The contract (PRODUCT.md, "Identity"): the MFA identity is the directory
ENTRY. Every spelling of a name or bind DN that the directory resolves to one
entry shares one key, one failure counter and one replay marker; a name that
resolves to no entry creates no state; a bind DN that is not exactly one
entry under ``user_base`` is refused (49).

These tests attack a real ``mfa-proxy serve`` in front of the session slapd
(``[directory] type = "ldap"``, the LDAP front-end relaying to the same
slapd, a RADIUS client in append mode on 127.0.0.1).  The spellings are
generated, and each is FIRST tried on slapd itself (the ground truth):

- a bind DN: a simple bind of that DN with alice's password straight to slapd,
  then whoami must say ``dn:uid=alice,ou=people,dc=example,dc=org``;
- a RADIUS User-Name: an ``ldapsearch`` as the service account with the user
  filter ``(uid=NAME)`` (NAME escaped per RFC 4515, after the ``DOMAIN\\``
  and ``@realm`` the contract strips) must return alice's entry and no other.

What slapd accepts for alice must, through the proxy, be alice: the password
alone is refused (alice is enrolled), password + fresh code is accepted (and
whoami shows alice's canonical DN), a wrong password counts in ALICE's
counter (``user show``/``user list --json``), and ``user list`` never gains a
row.  What slapd refuses is refused by the proxy, with no new state.

Each test class runs its own proxy and state (alice and carol enrolled with
known keys from one ``user import``; bob, dave and the rest never required),
and starts a new one when the fresh codes of the current one are spent
(:class:`TargetPool`).  Codes are real TOTP codes: the proxies
run with ``[totp] window = 10`` and :class:`Codes` hands out strictly
increasing time steps, so replay protection never refuses a test's own good
code and a step boundary never turns one bad.  No assertion depends on
timing; every loop is bounded.

The raw LDAP client below (:class:`LdapClient`: bind and whoami over one TCP
connection, BER by hand) and the other helpers are also used by
test_lockout_races.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pyotp
import pytest

from tests.integration.proxyproc import ProxyProcess, pyrad_auth, pyrad_client
from tests.integration.slapd import BASE_DN, Slapd, user_dn, user_password

pytestmark = pytest.mark.timeout(600)

PEOPLE = f"ou=people,{BASE_DN}"
ALICE = "alice"
ALICE_DN = user_dn(ALICE)
ALICE_PW = user_password(ALICE)
ADMIN_DN = f"cn=admin,{BASE_DN}"  # the rootdn: not under user_base
ADMIN_PW = "admin-secret"
SVC_DN = f"cn=svc,ou=services,{BASE_DN}"  # an entry outside user_base
SVC_PW = "svc-secret"

PERIOD = 30
WINDOW = 10  # the largest the config allows: room for many fresh codes
MAX_FAILURES = 5
CLIENT_TIMEOUT = 30.0  # one LDAP or RADIUS exchange; a hung proxy fails the test

INVALID_CREDENTIALS = 49
INVALID_DN_SYNTAX = 34
ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE = 2, 3, 11

ENROLLED = ("alice", "carol")  # enrolled in every proxy of this module
FAILURE_REASONS = frozenset({"bad_password", "bad_code", "missing_code", "replayed_code"})


def totp_key(name: str) -> str:
    """A fixed base32 TOTP key per user (160 bits)."""
    return base64.b32encode(hashlib.sha1(f"attacks {name}".encode()).digest()).decode()  # noqa: S324


# ---------------------------------------------------------------- TOTP codes


class Codes:
    """Real codes for one user's key, for strictly increasing time steps.

    The server accepts ``now ± window`` steps and refuses a step at or before
    the last one it accepted; handing out steps from ``now - window + 1``
    upwards (one step of margin each side) gives ~19 fresh codes at once and
    one more per period.  When they are used up, :meth:`fresh` waits for the
    next step (at most one period): correctness never depends on speed.
    """

    def __init__(self, key: str, period: int = PERIOD, window: int = WINDOW) -> None:
        self.totp = pyotp.TOTP(key, interval=period)
        self.period, self.window = period, window
        self.last: int | None = None

    def _now(self) -> int:
        return int(time.time()) // self.period

    def remaining(self) -> int:
        """Fresh codes available now without waiting."""
        now = self._now()
        low = now - self.window + 1 if self.window else now
        high = now + self.window - 1 if self.window else now
        nxt = low if self.last is None else max(self.last + 1, low)
        return max(0, high - nxt + 1)

    def fresh(self) -> str:
        now = self._now()
        low = now - self.window + 1 if self.window else now
        step = low if self.last is None else max(self.last + 1, low)
        high = now + self.window - 1 if self.window else now
        if step > high:  # every step in the window is spent: wait for the next one
            wait_until = (step - (self.window - 1 if self.window else 0)) * self.period + 0.5
            time.sleep(min(max(0.0, wait_until - time.time()), self.period + 1.0))
        self.last = step
        return self.totp.at(step * self.period)

    def wrong(self) -> str:
        """Six digits that are no code of this key anywhere near now."""
        now = self._now()
        near = {self.totp.at(s * self.period)
                for s in range(now - self.window - 3, now + self.window + 4)}
        return next(c for c in ("000000", "999999", "123456", "654321", "111111") if c not in near)


# ---------------------------------------------------------------- a raw LDAP client


def _ber_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _ber_length(len(content)) + content


def _ber_int(tag: int, value: int) -> bytes:
    return _tlv(tag, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def _read_tlv(data: bytes, pos: int) -> tuple[int, bytes, int] | None:
    """(tag, content, end) of the TLV at ``pos``; None when ``data`` is too short."""
    if len(data) < pos + 2:
        return None
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first & 0x80:
        count = first & 0x7F
        if len(data) < pos + count:
            return None
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    else:
        length = first
    if len(data) < pos + length:
        return None
    return tag, data[pos:pos + length], pos + length


def _elements(content: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(content):
        found = _read_tlv(content, pos)
        assert found is not None, f"truncated BER: {content.hex()}"
        tag, value, pos = found
        out.append((tag, value))
    return out


def timeless(text: str) -> str:
    """A message with its times left out: "locked ..., until 2026-01-31T09:15:00Z" is
    the same answer for a known and an unknown name locked a second apart."""
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<time>", text)


@dataclass(frozen=True)
class LdapResult:
    code: int
    matched_dn: str = ""
    diagnostic: str = ""

    @property
    def what(self) -> str:
        return f"{self.code} {self.diagnostic!r}" + (f" matched {self.matched_dn!r}"
                                                      if self.matched_dn else "")


WHOAMI_OID = b"1.3.6.1.4.1.4203.1.11.3"


class LdapClient:
    """Simple binds and whoami on one LDAP connection, bytes exactly as given.

    (ldap3 and python-ldap check or rewrite DNs; an attacker's client does not.)
    """

    def __init__(self, port: int, host: str = "127.0.0.1",
                 timeout: float = CLIENT_TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.message_id = 0
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LdapClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send_bind(self, dn: str, password: str) -> int:
        self.message_id += 1
        bind = _tlv(0x60, _ber_int(0x02, 3) + _tlv(0x04, dn.encode())
                    + _tlv(0x80, password.encode()))
        self.sock.sendall(_tlv(0x30, _ber_int(0x02, self.message_id) + bind))
        return self.message_id

    def bind(self, dn: str, password: str) -> LdapResult:
        message_id = self.send_bind(dn, password)
        return self.read_result(message_id, 0x61)

    def whoami(self) -> tuple[LdapResult, str]:
        """(result, authzId); authzId is "" for an anonymous session."""
        self.message_id += 1
        request = _tlv(0x77, _tlv(0x80, WHOAMI_OID))
        self.sock.sendall(_tlv(0x30, _ber_int(0x02, self.message_id) + request))
        tag, content = self._read_message(self.message_id)
        assert tag == 0x78, f"expected an ExtendedResponse, got tag {tag:#x}"
        parts = _elements(content)
        value = next((v for t, v in parts if t == 0x8B), b"")
        return self._result(parts), value.decode(errors="replace")

    def identity(self) -> str:
        """Who this session is, as far as the directory says ("" = anonymous or refused)."""
        result, authz = self.whoami()
        return authz if result.code == 0 else ""

    def read_result(self, message_id: int, expected_tag: int) -> LdapResult:
        tag, content = self._read_message(message_id)
        assert tag == expected_tag, f"expected tag {expected_tag:#x}, got {tag:#x}"
        return self._result(_elements(content))

    @staticmethod
    def _result(parts: list[tuple[int, bytes]]) -> LdapResult:
        code = int.from_bytes(parts[0][1], "big")
        matched = parts[1][1].decode(errors="replace") if len(parts) > 1 else ""
        diagnostic = parts[2][1].decode(errors="replace") if len(parts) > 2 else ""
        return LdapResult(code, matched, diagnostic)

    def _read_message(self, message_id: int) -> tuple[int, bytes]:
        """The protocolOp (tag, content) of the next message; a Notice of
        Disconnection (message ID 0) or a closed connection fails the test."""
        while True:
            found = _read_tlv(self.buffer, 0)
            if found is not None:
                _, message, end = found
                self.buffer = self.buffer[end:]
                parts = _elements(message)
                got = int.from_bytes(parts[0][1], "big")
                tag, content = parts[1]
                assert got == message_id, f"message ID {got} (op {tag:#x}) instead of {message_id}"
                return tag, content
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the server closed the connection")
            self.buffer += chunk


def bind_once(port: int, dn: str, password: str) -> tuple[LdapResult, str]:
    """Bind on a new connection; (bind result, whoami identity after it)."""
    with LdapClient(port) as ldap:
        result = ldap.bind(dn, password)
        return result, ldap.identity()


# ---------------------------------------------------------------- ldap-utils


def _ldap_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LDAP")}


def ldapwhoami(url: str, dn: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ldapwhoami", "-x", "-H", url, "-D", dn, "-w", password],
                          capture_output=True, text=True, timeout=60, env=_ldap_env(),
                          stdin=subprocess.DEVNULL, check=False)


def filter_value(value: str) -> str:
    """RFC 4515 escaping: metacharacters, NUL and every non-ASCII byte as \\XX."""
    out = []
    for byte in value.encode():
        out.append(f"\\{byte:02x}" if byte in b"*()\\\x00" or byte > 0x7E else chr(byte))
    return "".join(out)


def as_the_directory_sees_it(name: str) -> str:
    """The contract's own spellings: ``DOMAIN\\user`` and ``user@realm`` are ``user``."""
    if "\\" in name:
        name = name.rsplit("\\", 1)[1]
    if "@" in name:
        name = name.split("@", 1)[0]
    return name


@cache
def slapd_binds_as_alice(url: str, dn: str, password: str = ALICE_PW) -> bool:
    """Ground truth: slapd itself binds ``dn`` with that password as alice's entry."""
    done = ldapwhoami(url, dn, password)
    return done.returncode == 0 and done.stdout.strip() == f"dn:{ALICE_DN}"


@cache
def slapd_bind_code(url: str, dn: str, password: str = ALICE_PW) -> int:
    """slapd's own result code for that simple bind (ldapwhoami exits with it)."""
    return ldapwhoami(url, dn, password).returncode


@cache
def slapd_bind_identity(url: str, dn: str, password: str) -> str | None:
    """Whom slapd binds ``dn`` as (the whoami authzId), or None when it refuses."""
    done = ldapwhoami(url, dn, password)
    return done.stdout.strip() if done.returncode == 0 else None


@cache
def slapd_finds_alice(url: str, name: str) -> bool:
    """Ground truth: the user filter ``(uid=NAME)`` finds alice's entry, only it."""
    done = subprocess.run(
        ["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", url, "-D", SVC_DN, "-w", SVC_PW,
         "-b", PEOPLE, f"(uid={filter_value(as_the_directory_sees_it(name))})", "1.1"],
        capture_output=True, text=True, timeout=60, env=_ldap_env(), stdin=subprocess.DEVNULL,
        check=False)
    if done.returncode != 0:
        return False
    dns = [line.removeprefix("dn: ") for line in done.stdout.splitlines()
           if line.startswith("dn: ")]
    return dns == [ALICE_DN]


# ---------------------------------------------------------------- spellings


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) - 0x21 + 0xFF01) if "!" <= c <= "~" else c for c in text)


def math_bold(text: str) -> str:
    return "".join(chr(0x1D41A + ord(c) - ord("a")) if "a" <= c <= "z" else c for c in text)


def circled(text: str) -> str:
    return "".join(chr(0x24D0 + ord(c) - ord("a")) if "a" <= c <= "z" else c for c in text)


def hex_escaped(text: str) -> str:
    return "".join(f"\\{b:02x}" for b in text.encode())


def value_spellings(uid: str) -> dict[str, str]:
    """Values slapd's caseIgnoreMatch (with its Unicode folding) may take for ``uid``."""
    return {
        "upper": uid.upper(),
        "title": uid.title(),
        "dotted-capital-I": uid.upper().replace("I", "\u0130"),
        "dotted-capital-I-lower": uid.replace("i", "\u0130"),
        "fullwidth": fullwidth(uid),
        "fullwidth-upper": fullwidth(uid.upper()),
        "fullwidth-first": fullwidth(uid[0].upper()) + uid[1:],
        "math-bold-first": math_bold(uid[0]) + uid[1:],
        "math-bold": math_bold(uid),
        "circled-first": circled(uid[0]) + uid[1:],
    }


def ldap_spellings(uid: str = ALICE) -> dict[str, str]:
    """Bind DNs for the entry ``uid=UID,ou=people,...`` as an attacker may spell them."""
    rest = "ou=people,dc=example,dc=org"
    out = {"canonical": f"uid={uid},{rest}"}
    for name, attribute in {"alias-userid": "userid", "alias-UserID": "UserID",
                            "oid": "0.9.2342.19200300.100.1.1", "option": "uid;x",
                            "option-binary": "uid;binary", "option-upper": "UID;X-Y"}.items():
        out[name] = f"{attribute}={uid},{rest}"
    out["all-upper"] = f"uid={uid},{rest}".upper()
    out["mixed-case"] = f"UID={uid.upper()},OU=people,dc=EXAMPLE,dc=org"
    out["spaces"] = " , ".join(" = ".join(rdn.split("=")) for rdn in f"uid={uid},{rest}".split(","))
    out["leading-space"] = f" uid={uid},{rest}"
    out["trailing-space"] = f"uid={uid},{rest} "
    out["semicolons"] = f"uid={uid};ou=people;dc=example;dc=org"
    out["hex-escape-first"] = f"uid={hex_escaped(uid[0])}{uid[1:]},{rest}"
    out["hex-escape-all"] = f"uid={hex_escaped(uid)},{rest}"
    out["escaped-leading-space"] = f"uid=\\20{uid},{rest}"
    out["escaped-trailing-space"] = f"uid={uid}\\20,{rest}"
    out["quoted"] = f'uid="{uid}",{rest}'
    out["ou-oid"] = f"uid={uid},2.5.4.11=people,dc=example,dc=org"
    out["ou-escaped"] = f"uid={uid},ou=\\70eople,dc=example,dc=org"
    for name, value in value_spellings(uid).items():
        out[f"value-{name}"] = f"uid={value},{rest}"
    out["option+fullwidth"] = f"uid;x={fullwidth(uid)},{rest}"
    out["alias+upper+spaces"] = f"userid = {uid.upper()} , ou = people , dc = example , dc = org"
    return out


def ldap_non_spellings(uid: str = ALICE) -> dict[str, str]:
    """DNs near alice's that are NOT her entry (slapd refuses them with her password)."""
    rest = "ou=people,dc=example,dc=org"
    return {
        "dotless-i": f"uid={uid.replace('i', 'ı')},{rest}",
        "soft-hyphen": f"uid={uid[:2]}\u00ad{uid[2:]},{rest}",
        "zero-width-space": f"uid={uid}\u200b,{rest}",
        "combining-dot": f"uid={uid.replace('i', 'i̇')},{rest}",
        "prefix": f"uid={uid[:-1]},{rest}",
        "wrong-attribute": f"cn={uid},{rest}",
        "other-ou": f"uid={uid},ou=other,dc=example,dc=org",
        "other-ou-option": f"uid;x={uid},ou=other,dc=example,dc=org",
        "services-ou": f"uid={uid},ou=services,dc=example,dc=org",
        "no-ou": f"uid={uid},dc=example,dc=org",
        "multi-valued-rdn": f"uid={uid}+cn={uid},{rest}",
        "ber-value": f"uid=#0405{uid.encode().hex()},{rest}",
        "wildcard": f"uid=*,{rest}",
        "wildcard-prefix": f"uid={uid[:2]}*,{rest}",
    }


def radius_spellings(uid: str = ALICE) -> dict[str, str]:
    out = {"canonical": uid}
    out.update(value_spellings(uid))
    out["padded"] = f" {uid} "
    out["leading-space"] = f" {uid}"
    out["domain"] = f"EXAMPLE\\{uid}"
    out["domain-lower"] = f"example\\{uid.upper()}"
    out["realm"] = f"{uid}@example.org"
    out["realm-upper"] = f"{uid.upper()}@EXAMPLE.ORG"
    out["domain+fullwidth"] = f"EXAMPLE\\{fullwidth(uid)}"
    out["realm+dotted-I"] = f"{uid.upper().replace('I', chr(0x130))}@example.org"
    return out


def radius_non_spellings(uid: str = ALICE) -> dict[str, str]:
    return {
        "dotless-i": uid.replace("i", "ı"),
        "soft-hyphen": f"{uid[:2]}\u00ad{uid[2:]}",
        "zero-width-space": f"{uid}\u200b",
        "combining-dot": uid.replace("i", "i̇"),
        "prefix": uid[:-1],
        "wildcard": "*",
        "wildcard-inside": f"{uid[:2]}*{uid[-2:]}",
        "filter-injection": f"{uid})(uid=*",
        "filter-injection-or": f"*)(|(uid={uid}",
        "nul": f"{uid}\x00x",
    }


# ---------------------------------------------------------------- the target


def read_users(proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    """``user list --json`` as {username: row}."""
    rows = json.loads(proxy.cli("user", "list", "--json").stdout)
    return {str(row["username"]): row for row in rows}


def users_table_count(proxy: ProxyProcess) -> int:
    """Rows in the state database's ``users`` table."""
    with closing(sqlite3.connect(proxy.state_path, timeout=30)) as db:
        return int(db.execute("SELECT count(*) FROM users").fetchone()[0])


def message(reply: Any) -> str:
    return " ".join(str(v) for v in (reply.get("Reply-Message") or []))


@dataclass
class Target:
    """One running proxy with its own state; alice and carol enrolled."""

    slapd: Slapd
    proxy: ProxyProcess
    codes: dict[str, Codes] = field(default_factory=dict)
    baseline: frozenset[str] = frozenset()  # the usernames in `user list` after set-up
    # The usernames at the last look (each test compares against what it found
    # there, so one test's leftovers are not blamed on the next); `seen_fresh`
    # is False until a test has looked, so a test that died early is covered.
    seen: frozenset[str] = frozenset()
    seen_fresh: bool = False
    _nas: Any = None

    @property
    def ldap_url(self) -> str:
        return f"ldap://127.0.0.1:{self.proxy.ldap_port}"

    def fresh(self, user: str = ALICE) -> str:
        return self.codes[user].fresh()

    def wrong(self, user: str = ALICE) -> str:
        return self.codes[user].wrong()

    # LDAP
    def bind(self, dn: str, password: str) -> tuple[LdapResult, str]:
        return bind_once(self.proxy.ldap_port, dn, password)

    def whoami(self, dn: str, password: str) -> subprocess.CompletedProcess[str]:
        """ldapwhoami (ldap-utils) through the proxy."""
        return ldapwhoami(self.ldap_url, dn, password)

    # RADIUS
    def radius(self, name: str, password: str, state: bytes | None = None) -> Any:
        if self._nas is None:
            self._nas = pyrad_client(self.proxy, "nas", timeout=CLIENT_TIMEOUT)
        return pyrad_auth(self._nas, name, password, state)

    # state
    def users(self) -> dict[str, dict[str, Any]]:
        users = read_users(self.proxy)
        self.seen, self.seen_fresh = frozenset(users), True
        return users

    def begin_test(self) -> None:
        """Before a test: alice unlocked, and `seen` up to date."""
        self.unlock()
        if not self.seen_fresh:
            self.users()
        self.seen_fresh = False

    def unlock(self, user: str = ALICE) -> None:
        self.proxy.cli("user", "unlock", user)


def configure_target(slapd: Slapd, workdir: Path, **overrides: Any) -> ProxyProcess:
    """A proxy config for ``slapd`` (RADIUS client "nas" in append mode on 127.0.0.1,
    "chal" in challenge mode on 127.0.0.4; LDAP relaying to slapd, nothing exempt);
    alice and carol enrolled with :func:`totp_key` keys."""
    sections: dict[str, dict[str, Any]] = {
        "policy": {"max_failures": MAX_FAILURES, "lockout_seconds": 900},
        "totp": {"period": PERIOD, "window": WINDOW},
    }
    for name, section in overrides.items():
        sections.setdefault(name, {}).update(section)
    proxy = ProxyProcess.configure(
        workdir, slapd,
        clients=[{"name": "nas", "address": "127.0.0.1/32", "mode": "append"},
                 {"name": "chal", "address": "127.0.0.4/32", "mode": "challenge"}],
        radius={"separator": ","},
        ldap={"upstream": slapd.url, "exempt": [], "mfa": "enrolled", "separator": ","},
        overrides=sections)
    csv = workdir / "enrolled.csv"
    csv.write_text("".join(f"{u},{totp_key(u)}\n" for u in ENROLLED))
    proxy.cli("user", "import", str(csv))
    return proxy


class TargetPool:
    """Running proxies for one test class, one at a time.

    A test asks for a target with enough fresh codes left for it; when the
    current proxy's window is spent, it is stopped (cleanly, asserted) and a
    new one with new state takes over, instead of waiting for the clock.
    """

    def __init__(self, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.slapd, self.tmp_path_factory = slapd, tmp_path_factory
        self.current: Target | None = None

    def get(self, codes_needed: int) -> Target:
        t = self.current
        if t is not None and t.codes[ALICE].remaining() >= codes_needed:
            return t
        self.close()
        proxy = configure_target(self.slapd, self.tmp_path_factory.mktemp("identity"))
        proxy.start()
        t = Target(self.slapd, proxy, {u: Codes(totp_key(u)) for u in ENROLLED})
        self.current = t
        t.baseline = frozenset(t.users())
        assert t.baseline == set(ENROLLED), t.baseline
        t.seen_fresh = True
        return t

    def close(self) -> None:
        t, self.current = self.current, None
        if t is not None:
            t.proxy.stop()


@pytest.fixture(scope="class")
def pool(slapd: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TargetPool]:
    targets = TargetPool(slapd, tmp_path_factory)
    try:
        yield targets
    finally:
        targets.close()


@pytest.fixture
def target(pool: TargetPool, request: pytest.FixtureRequest) -> Target:
    """The class's proxy, with alice unlocked and at least the class's
    ``codes_per_test`` fresh codes (default 2) left."""
    t = pool.get(getattr(request.cls, "codes_per_test", 2))
    t.begin_test()
    return t


# ---------------------------------------------------------------- the batteries


def ldap_spelling_problems(t: Target, dn: str) -> list[str]:
    """What goes wrong when ``dn`` (which slapd binds as alice) is used through the proxy."""
    problems = []
    result, who = t.bind(dn, ALICE_PW)
    if result.code != INVALID_CREDENTIALS:
        problems.append(f"password alone: {result.what}, not 49 (MFA bypassed)")
    if who:
        problems.append(f"password alone: the session is bound as {who!r}")
    done = t.whoami(dn, f"{ALICE_PW},{t.fresh()}")
    if done.returncode != 0 or done.stdout.strip() != f"dn:{ALICE_DN}":
        problems.append(f"password + fresh code: exit {done.returncode} "
                        f"{(done.stdout + done.stderr).strip()!r}, not accepted as {ALICE_DN}")
    result, who = t.bind(dn, f"wrong-{ALICE_PW},{t.wrong()}")
    if result.code != INVALID_CREDENTIALS or who:
        problems.append(f"wrong password: {result.what}, session {who!r}")
    problems += state_problems(t, expect_failures=1)
    return problems


def radius_spelling_problems(t: Target, name: str) -> list[str]:
    problems = []
    reply = t.radius(name, ALICE_PW)
    if reply.code != ACCESS_REJECT:
        problems.append(f"password alone: code {reply.code} {message(reply)!r}, not Access-Reject")
    reply = t.radius(name, f"{ALICE_PW},{t.fresh()}")
    if reply.code != ACCESS_ACCEPT:
        problems.append(f"password + fresh code: code {reply.code} {message(reply)!r}, "
                        "not Access-Accept")
    reply = t.radius(name, f"wrong-{ALICE_PW},{t.wrong()}")
    if reply.code != ACCESS_REJECT:
        problems.append(f"wrong password: code {reply.code}, not Access-Reject")
    problems += state_problems(t, expect_failures=1)
    return problems


def state_problems(t: Target, expect_failures: int | None) -> list[str]:
    """``user list --json``: no rows since the last look; alice's counter as expected
    (None: not checked)."""
    problems = []
    before = t.seen
    users = t.users()
    if set(users) - before:
        problems.append(f"user list gained rows: {sorted(set(users) - before)!r}")
    if expect_failures is not None and users[ALICE]["failures"] != expect_failures:
        problems.append(f"alice's failure counter is {users[ALICE]['failures']}, "
                        f"not {expect_failures}")
    return problems


def refused_ldap(result: LdapResult, who: str, what: str, allowed: frozenset[int]
                 ) -> list[str]:
    if result.code in allowed and not who:
        return []
    return [f"{what}: {result.what}, session {who!r} "
            f"(expected refused with {'/'.join(map(str, sorted(allowed)))}, anonymous)"]


def ldap_non_spelling_problems(t: Target, dn: str) -> list[str]:
    """``dn`` is not alice's entry for slapd: refused however it is tried (49 -- or
    34 where slapd itself finds the DN malformed), anonymous after, no state."""
    allowed = frozenset({INVALID_CREDENTIALS}) | (
        {INVALID_DN_SYNTAX} if slapd_bind_code(t.slapd.url, dn) == INVALID_DN_SYNTAX else set())
    problems = []
    for what, password in (("password + fresh code", f"{ALICE_PW},{t.fresh()}"),
                           ("password alone", ALICE_PW),
                           ("wrong password", f"wrong-{ALICE_PW}")):
        problems += refused_ldap(*t.bind(dn, password), what, allowed)
    problems += state_problems(t, expect_failures=None)
    return problems


def radius_non_spelling_problems(t: Target, name: str) -> list[str]:
    problems = []
    for what, password in (("password + fresh code", f"{ALICE_PW},{t.fresh()}"),
                           ("password alone", ALICE_PW),
                           ("wrong password", f"wrong-{ALICE_PW}")):
        reply = t.radius(name, password)
        if reply.code != ACCESS_REJECT:
            problems.append(f"{what}: code {reply.code} {message(reply)!r}, not Access-Reject")
    problems += state_problems(t, expect_failures=None)
    return problems


def report(kind: str, spelling: str, problems: list[str]) -> str:
    return f"{kind} {spelling!r}:\n  " + "\n  ".join(problems)


def accepted_ldap(slapd: Slapd) -> dict[str, str]:
    return {k: dn for k, dn in ldap_spellings().items() if slapd_binds_as_alice(slapd.url, dn)}


def accepted_radius(slapd: Slapd) -> dict[str, str]:
    return {k: n for k, n in radius_spellings().items() if slapd_finds_alice(slapd.url, n)}


# ---------------------------------------------------------------- A: spellings of alice


class TestGroundTruth:
    """The probes themselves: without them every spelling test could pass vacuously."""

    def test_slapd_takes_the_rfc_spellings_of_alice(self, slapd: Slapd) -> None:
        spellings = ldap_spellings()
        # RFC 4512/4514/4517: any LDAP server must accept these for the entry.
        for key in ("canonical", "alias-userid", "oid", "all-upper", "spaces",
                    "hex-escape-first", "hex-escape-all"):
            assert slapd_binds_as_alice(slapd.url, spellings[key]), (key, spellings[key])
        assert slapd_finds_alice(slapd.url, ALICE) and slapd_finds_alice(slapd.url, "ALICE")

    def test_slapd_refuses_what_is_not_alice(self, slapd: Slapd) -> None:
        for key in ("prefix", "wrong-attribute", "other-ou", "no-ou", "wildcard"):
            dn = ldap_non_spellings()[key]
            assert not slapd_binds_as_alice(slapd.url, dn), (key, dn)
        for key in ("prefix", "wildcard", "filter-injection"):
            assert not slapd_finds_alice(slapd.url, radius_non_spellings()[key]), key

    def test_the_rootdn_and_the_service_entry_bind_on_slapd(self, slapd: Slapd) -> None:
        assert slapd_bind_identity(slapd.url, "cn;x=admin,dc=example,dc=org", ADMIN_PW) \
            == f"dn:{ADMIN_DN}"
        assert slapd_bind_identity(slapd.url, SVC_DN, SVC_PW) == f"dn:{SVC_DN}"


class TestLdapSpellingsOfAlice:
    """Every bind DN that slapd binds as alice is alice's one MFA identity."""

    @pytest.mark.parametrize("spelling", list(ldap_spellings()))
    def test_bind_dn_spelling(self, target: Target, spelling: str) -> None:
        dn = ldap_spellings()[spelling]
        if slapd_binds_as_alice(target.slapd.url, dn):
            problems = ldap_spelling_problems(target, dn)
        else:  # this slapd does not fold it: then it must simply be refused
            problems = ldap_non_spelling_problems(target, dn)
        assert not problems, report("bind DN", dn, problems)


class TestRadiusSpellingsOfAlice:
    """Every User-Name that finds alice's entry is alice's one MFA identity."""

    @pytest.mark.parametrize("spelling", list(radius_spellings()))
    def test_user_name_spelling(self, target: Target, spelling: str) -> None:
        name = radius_spellings()[spelling]
        if slapd_finds_alice(target.slapd.url, name):
            problems = radius_spelling_problems(target, name)
        else:
            problems = radius_non_spelling_problems(target, name)
        assert not problems, report("User-Name", name, problems)


class TestNotAlice:
    """Names and DNs slapd does not resolve to alice's entry; entries outside user_base."""

    @pytest.mark.parametrize("spelling", list(ldap_non_spellings()))
    def test_bind_dn_that_is_not_alice(self, target: Target, spelling: str) -> None:
        dn = ldap_non_spellings()[spelling]
        if slapd_binds_as_alice(target.slapd.url, dn):  # this slapd folds it after all
            problems = ldap_spelling_problems(target, dn)
        else:
            problems = ldap_non_spelling_problems(target, dn)
        assert not problems, report("bind DN", dn, problems)

    @pytest.mark.parametrize("spelling", list(radius_non_spellings()))
    def test_user_name_that_is_not_alice(self, target: Target, spelling: str) -> None:
        name = radius_non_spellings()[spelling]
        if slapd_finds_alice(target.slapd.url, name):
            problems = radius_spelling_problems(target, name)
        else:
            problems = radius_non_spelling_problems(target, name)
        assert not problems, report("User-Name", name, problems)

    # B: DNs slapd binds, but not as an entry under user_base

    @pytest.mark.parametrize("dn", ["cn;x=admin,dc=example,dc=org",
                                    "cn;binary=admin,dc=example,dc=org",
                                    "2.5.4.3=admin,dc=example,dc=org",
                                    "CN=ADMIN,DC=EXAMPLE,DC=ORG",
                                    ADMIN_DN])
    def test_rootdn_is_refused_and_leaves_the_session_anonymous(
            self, target: Target, dn: str) -> None:
        problems = []
        if slapd_bind_identity(target.slapd.url, dn, ADMIN_PW) is None:
            pytest.fail(f"slapd itself refuses {dn!r}: the fixture changed")
        for password in (ADMIN_PW, f"{ADMIN_PW},{target.wrong()}"):
            result, who = target.bind(dn, password)
            if result.code != INVALID_CREDENTIALS or who:
                problems.append(f"{password!r}: {result.what}, session {who!r} "
                                "(expected 49 and anonymous)")
        problems += state_problems(target, expect_failures=None)
        assert not problems, report("bind DN", dn, problems)

    @pytest.mark.parametrize("dn", [SVC_DN, "cn;x=svc,ou=services,dc=example,dc=org",
                                    "CN=SVC,OU=SERVICES,DC=EXAMPLE,DC=ORG",
                                    "cn = svc , ou = services , dc = example , dc = org"])
    def test_entry_outside_user_base_does_not_bind_with_a_password_only(
            self, target: Target, dn: str) -> None:
        if slapd_bind_identity(target.slapd.url, dn, SVC_PW) != f"dn:{SVC_DN}":
            pytest.fail(f"slapd itself does not bind {dn!r} as {SVC_DN}: the fixture changed")
        result, who = target.bind(dn, SVC_PW)
        problems = [] if result.code == INVALID_CREDENTIALS and not who else [
            f"password only: {result.what}, session {who!r} (expected 49 and anonymous)"]
        problems += state_problems(target, expect_failures=None)
        assert not problems, report("bind DN", dn, problems)


class TestOneIdentityAcrossSpellings:
    """One failure counter and one replay marker, whichever spelling and protocol."""

    codes_per_test = 16

    def _attempts(self, slapd: Slapd) -> list[tuple[str, str]]:
        """(protocol, spelling) for every non-canonical spelling slapd takes, LDAP and
        RADIUS interleaved."""
        ldap = [("ldap", dn) for k, dn in accepted_ldap(slapd).items() if k != "canonical"]
        radius = [("radius", n) for k, n in accepted_radius(slapd).items() if k != "canonical"]
        mixed: list[tuple[str, str]] = []
        for i in range(max(len(ldap), len(radius))):
            mixed += ldap[i:i + 1] + radius[i:i + 1]
        assert len(mixed) >= MAX_FAILURES, mixed
        return mixed

    def _try(self, t: Target, protocol: str, spelling: str, password: str) -> tuple[bool, str]:
        """(accepted, what the client was told)."""
        if protocol == "ldap":
            result, who = t.bind(spelling, password)
            return result.code == 0 or bool(who), result.diagnostic
        reply = t.radius(spelling, password)
        return reply.code != ACCESS_REJECT, message(reply)

    def test_failures_in_mixed_spellings_add_up_to_alice_s_lock(self, target: Target) -> None:
        """Wrong passwords in five different spellings (LDAP and RADIUS in turn): each
        one counts in alice's counter, and the fifth locks her."""
        t = target
        attempts = self._attempts(t.slapd)[:MAX_FAILURES]
        problems = []
        accepted, _ = self._try(t, "ldap", ALICE_DN, f"{ALICE_PW},{t.fresh()}")
        assert accepted, "the canonical DN with password + code is refused: nothing to attack"
        for n, (protocol, spelling) in enumerate(attempts, start=1):
            accepted, _ = self._try(t, protocol, spelling, f"wrong-{ALICE_PW},{t.wrong()}")
            alice = t.users()[ALICE]
            if accepted or alice["failures"] != n:
                problems.append(f"wrong password {n} by {protocol} {spelling!r}: "
                                f"{'ACCEPTED, ' if accepted else ''}alice's counter is "
                                f"{alice['failures']}, not {n}")
        if not alice["locked"]:
            problems.append(f"after {MAX_FAILURES} failures in {MAX_FAILURES} spellings "
                            "alice is not locked")
        problems += state_problems(t, expect_failures=None)
        assert not problems, "\n".join(problems)

    def test_once_locked_alice_is_locked_in_every_spelling(self, target: Target) -> None:
        """Locked by wrong passwords in her canonical names, alice is refused as
        locked in every spelling, even with the right password and a valid code --
        which stays unspent (accepted once she is unlocked)."""
        t = target
        for n in range(MAX_FAILURES):
            protocol, name = ("ldap", ALICE_DN) if n % 2 == 0 else ("radius", ALICE)
            accepted, said = self._try(t, protocol, name, f"wrong-{ALICE_PW},{t.wrong()}")
            assert not accepted, f"{protocol} {name!r}: a wrong password was accepted"
        assert t.users()[ALICE]["locked"], "five canonical failures did not lock alice"
        problems = []
        code = t.fresh()  # one code for all: a correct proxy spends none of it while locked
        everyone = [("ldap", ALICE_DN), ("radius", ALICE), *self._attempts(t.slapd)]
        for protocol, spelling in everyone:
            accepted, said = self._try(t, protocol, spelling, f"{ALICE_PW},{code}")
            if accepted or "locked" not in said.lower():
                problems.append(f"{protocol} {spelling!r} while locked: "
                                f"{'ACCEPTED' if accepted else 'refused'} with {said!r} "
                                "(expected refused as locked)")
        problems += state_problems(t, expect_failures=None)
        t.unlock()
        accepted, said = self._try(t, "ldap", ALICE_DN, f"{ALICE_PW},{code}")
        if not accepted:
            problems.append(f"after unlock the unspent code was refused ({said!r}): "
                            "an attempt while locked spent it")
        assert not problems, "\n".join(problems)

    def test_a_code_is_accepted_once_whatever_the_spelling(self, target: Target) -> None:
        t = target
        attempts = self._attempts(t.slapd)
        problems = []
        per_code = MAX_FAILURES - 1  # replays count as failures: accept again before a lock
        for first in range(0, len(attempts), per_code):
            code = t.fresh()
            protocol = "ldap" if first % 2 == 0 else "radius"
            canonical = ALICE_DN if protocol == "ldap" else ALICE
            accepted, said = self._try(t, protocol, canonical, f"{ALICE_PW},{code}")
            assert accepted, f"{protocol} {canonical!r} with a fresh code refused: {said!r}"
            for p, spelling in attempts[first:first + per_code]:
                accepted, _ = self._try(t, p, spelling, f"{ALICE_PW},{code}")
                if accepted:
                    problems.append(f"{p} {spelling!r}: the code {protocol} {canonical!r} "
                                    "had just used was accepted again")
        problems += state_problems(t, expect_failures=None)
        assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- C: unknown names


UNKNOWN_COUNT = 200


def unknown_dns(count: int) -> Iterable[str]:
    forms = ("uid=nobody{:03d},ou=people,dc=example,dc=org",
             "uid=nobody{:03d},ou=people,dc=example,dc=org",
             "UID=NOBODY{:03d},OU=PEOPLE,DC=EXAMPLE,DC=ORG",
             "uid;x=nobody{:03d},ou=people,dc=example,dc=org",
             "userid=nobody{:03d},ou=people,dc=example,dc=org")
    return (forms[i % len(forms)].format(i) for i in range(count))


def unknown_names(count: int) -> Iterable[str]:
    forms = ("nobody{:03d}", "nobody{:03d}", "NOBODY{:03d}", "EXAMPLE\\nobody{:03d}",
             "nobody{:03d}@example.org", fullwidth("nobody") + "{:03d}")
    return (forms[i % len(forms)].format(i) for i in range(count))


class TestUnknownNames:
    """No state for names that are no entry; unknown and known read the same."""

    def test_binds_to_made_up_dns_create_no_state(self, target: Target) -> None:
        t = target
        rows_before, names_before = users_table_count(t.proxy), t.seen
        answers: dict[tuple[int, str], int] = {}
        with LdapClient(t.proxy.ldap_port) as ldap:  # rebinding on one connection, as apps do
            for i, dn in enumerate(unknown_dns(UNKNOWN_COUNT)):
                password = "guess" if i % 2 else f"guess,{i % 1000000:06d}"
                result = ldap.bind(dn, password)
                answers[(result.code, result.diagnostic)] = answers.get(
                    (result.code, result.diagnostic), 0) + 1
        assert all(code == INVALID_CREDENTIALS for code, _ in answers), answers
        assert users_table_count(t.proxy) == rows_before
        assert set(t.users()) == names_before

    def test_radius_requests_for_made_up_names_create_no_state(self, target: Target) -> None:
        t = target
        rows_before, names_before = users_table_count(t.proxy), t.seen
        codes: dict[int, int] = {}
        for i, name in enumerate(unknown_names(UNKNOWN_COUNT)):
            reply = t.radius(name, "guess" if i % 2 else f"guess,{i:06d}")
            codes[reply.code] = codes.get(reply.code, 0) + 1
        assert codes == {ACCESS_REJECT: UNKNOWN_COUNT}, codes
        assert users_table_count(t.proxy) == rows_before
        assert set(t.users()) == names_before

    @pytest.mark.parametrize(("known", "unknown"), [("alice", "nobody-ldap-a"),
                                                    ("bob", "nobody-ldap-b")],
                             ids=["enrolled", "never-required"])
    def test_unknown_bind_dn_reads_like_a_known_one(self, target: Target, known: str,
                                                    unknown: str) -> None:
        """Seven wrong passwords each (the known user is locked after five): the same
        result code, matched DN and diagnostic, attempt by attempt."""
        t = target
        names_before = t.seen
        seen: dict[str, list[LdapResult]] = {}
        for who in (known, unknown):
            seen[who] = [t.bind(user_dn(who), f"not-the-password-{i}")[0]
                         for i in range(MAX_FAILURES + 2)]
        differ = [f"attempt {i + 1}: known {k.what} / unknown {u.what}"
                  for i, (k, u) in enumerate(zip(seen[known], seen[unknown], strict=True))
                  if (k.code, k.matched_dn, timeless(k.diagnostic))
                  != (u.code, u.matched_dn, timeless(u.diagnostic))]
        assert not differ, f"{known} and {unknown} read differently:\n  " + "\n  ".join(differ)
        assert set(t.users()) <= names_before | {known}

    @pytest.mark.parametrize(("known", "unknown"), [("carol", "nobody-radius-c"),
                                                    ("dave", "nobody-radius-d")],
                             ids=["enrolled", "never-required"])
    def test_unknown_user_name_reads_like_a_known_one(self, target: Target, known: str,
                                                      unknown: str) -> None:
        t = target
        names_before = t.seen
        seen: dict[str, list[tuple[int, str]]] = {}
        for who in (known, unknown):
            replies = [t.radius(who, f"not-the-password-{i}") for i in range(MAX_FAILURES + 2)]
            seen[who] = [(r.code, timeless(message(r))) for r in replies]
        differ = [f"attempt {i + 1}: known {k} / unknown {u}"
                  for i, (k, u) in enumerate(zip(seen[known], seen[unknown], strict=True))
                  if k != u]
        assert not differ, f"{known} and {unknown} read differently:\n  " + "\n  ".join(differ)
        assert set(t.users()) <= names_before | {known}
