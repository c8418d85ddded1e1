"""The portal's HTTP side without a socket: raw HTTP bytes into the real
twisted.web channel of :meth:`Portal.site`, the real core behind it (the
engine tests' harness: a real SQLite Store, key ring and fake clock, a fake
directory behind Deferreds that fire at once), bytes out.

The end-to-end tests (tests/integration/test_portal_e2e.py) drive the real
``serve``; these pin what needs a clock or exact bytes: the idle timeout,
CSRF refusals that change nothing, body limits, chunked bodies.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from policy.admin import Accounts
from policy.engine import Authenticator
from policy.sessions import LoginCsrf, PortalSessions
from policy.totp import TotpParams
from policy.usernames import UsernameRules
from proxy.portal.pages import Branding
from proxy.portal.site import MAX_BODY, Portal
from tests.unit.test_engine import AsyncFake, Harness, make_harness

IDLE_MINUTES = 15


@dataclass
class Answer:
    status: int
    headers: dict[str, list[str]]
    body: str

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else None


@dataclass
class Browser:
    portal: Portal
    cookies: dict[str, str] = field(default_factory=dict)
    csrf: str = ""

    def send(self, raw: bytes) -> Answer:
        channel = self.portal.site().buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        out = transport.value()
        channel.connectionLost(None)
        return self._parse(out)

    def _parse(self, out: bytes) -> Answer:
        head, _, body = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        for cookie in headers.get("set-cookie", []):
            name, _, rest = cookie.partition("=")
            value = rest.split(";")[0]
            if "Max-Age=0" in cookie:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        text = body.decode("utf-8", "replace")
        found = re.search(r'name="csrf_token" value="([^"]+)"', text)
        if found:
            self.csrf = found.group(1)
        return Answer(status, headers, text)

    def request(self, method: str, path: str, body: bytes = b"",
                ctype: str = "application/x-www-form-urlencoded",
                extra: str = "") -> Answer:
        cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        head = f"{method} {path} HTTP/1.1\r\nHost: portal\r\nConnection: close\r\n"
        if cookie:
            head += f"Cookie: {cookie}\r\n"
        if method == "POST":
            head += f"Content-Type: {ctype}\r\n"
            if "chunked" not in extra:
                head += f"Content-Length: {len(body)}\r\n"
        return self.send((head + extra + "\r\n").encode() + body)

    def get(self, path: str = "/") -> Answer:
        return self.request("GET", path)

    def post(self, path: str, fields: dict[str, str], csrf: bool = True) -> Answer:
        data = dict(fields)
        if csrf:
            data.setdefault("csrf_token", self.csrf)
        return self.request("POST", path, urlencode(data).encode())


@dataclass
class World:
    h: Harness
    accounts: Accounts
    portal: Portal

    def browser(self) -> Browser:
        return Browser(self.portal)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    h = make_harness(tmp_path)

    def run(f: Any, *a: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(f, *a)

    auth = Authenticator(h.engine, AsyncFake(h.directory), run, clock=h.clock)
    accounts = Accounts(h.store, h.keys, TotpParams(), "Example Corp", 7, UsernameRules(),
                        h.clock)
    portal = Portal(auth.authenticate, accounts,
                    PortalSessions(h.store, IDLE_MINUTES * 60, h.clock),
                    LoginCsrf(b"k" * 32), run, Branding("Example Corp"), clock=h.clock,
                    run_cpu=run)
    yield World(h, accounts, portal)
    h.store.close()


def signed_in(world: World, user: str = "alice") -> Browser:
    b = world.browser()
    b.get("/")
    answer = b.post("/login", {"username": user, "password": f"{user}-pw"})
    assert answer.status == 303, answer.body
    assert 'id="mfa-status"' in b.get("/").body
    return b


def test_a_session_ends_after_session_minutes_idle(world: World) -> None:
    world.h.require("alice")
    b = signed_in(world)
    world.h.clock.advance(IDLE_MINUTES * 60 - 1)
    assert 'id="mfa-status"' in b.get("/").body  # each request restarts the timer
    world.h.clock.advance(IDLE_MINUTES * 60 - 1)
    assert 'id="mfa-status"' in b.get("/").body
    world.h.clock.advance(IDLE_MINUTES * 60)
    page = b.get("/")
    assert 'name="password"' in page.body and 'id="mfa-status"' not in page.body
    assert b.post("/setup/start", {}).status == 403  # the old form's token is no good


def test_login_without_a_valid_csrf_token_changes_nothing(world: World) -> None:
    world.h.enroll("alice")
    b = world.browser()
    b.get("/")
    for fields in ({"username": "alice", "password": "wrong"},
                   {"username": "alice", "password": "wrong", "csrf_token": "f" * 64}):
        assert b.post("/login", fields, csrf=False).status == 403
    other = world.browser()
    other.get("/")
    b.csrf = other.csrf  # a token made for another browser's cookie
    assert b.post("/login", {"username": "alice", "password": "wrong"}).status == 403
    assert world.h.record("alice").failures == 0
    world.h.engine.audit.flush()
    assert world.h.store.admin.recent_audit("alice") == []


def test_setup_without_a_valid_csrf_token_makes_no_pending_key(world: World) -> None:
    world.h.require("alice")
    b = signed_in(world)
    assert b.post("/setup/start", {}, csrf=False).status == 403
    assert world.h.store.admin.get_pending("alice", world.h.clock()) is None
    assert b.post("/setup/start", {}).status == 303
    pending = world.h.store.admin.get_pending("alice", world.h.clock())
    assert pending is not None
    assert b.post("/setup", {"code": "123456"}, csrf=False).status == 403
    assert world.h.record("alice").failures == 0  # a refused form is not a wrong code


def test_a_wrong_code_on_the_code_step_ends_that_step(world: World) -> None:
    world.h.require("alice")
    world.h.enroll("alice")
    b = world.browser()
    b.get("/")
    assert b.post("/login", {"username": "alice", "password": "alice-pw"}).status == 303
    assert 'name="code"' in b.get("/").body
    wrong = "000000" if world.h.code() != "000000" else "111111"
    answer = b.post("/login/code", {"code": wrong})
    assert answer.status == 401 and 'data-kind="bad_credentials"' in answer.body
    assert "mfa_portal" not in b.cookies
    assert world.h.record("alice").failures == 1


def test_an_enrolled_user_signs_in_with_a_code(world: World) -> None:
    world.h.require("alice")
    world.h.enroll("alice")
    b = world.browser()
    b.get("/")
    b.post("/login", {"username": "alice", "password": "alice-pw"})
    b.get("/")
    assert b.post("/login/code", {"code": world.h.code()}).status == 303
    page = b.get("/")
    assert 'data-status="enrolled"' in page.body and 'id="reset-mfa"' in page.body


def test_a_bypass_user_with_a_key_cannot_replace_it_with_the_password_alone(
        world: World) -> None:
    world.h.enroll("alice")
    world.h.store.admin.set_bypass("alice", True)
    b = signed_in(world)
    assert 'id="reset-mfa"' not in b.get("/").body
    assert b.post("/setup/start", {}).status == 403
    assert world.h.store.admin.get_pending("alice", world.h.clock()) is None


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_body_is_refused_with_a_page(world: World, chunked: bool) -> None:
    b = world.browser()
    b.get("/")
    body = b"username=" + b"a" * (MAX_BODY + 10)
    if chunked:
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                          for i in range(0, len(body), 1000)) + b"0\r\n\r\n"
        answer = b.request("POST", "/login", chunks, extra="Transfer-Encoding: chunked\r\n")
    else:
        answer = b.request("POST", "/login", body)
    assert answer.status == 413 and 'id="message"' in answer.body


def test_a_crash_is_a_clean_page(world: World) -> None:
    def broken(*_: Any) -> Any:
        raise RuntimeError("the state store is on fire")

    world.portal.run_blocking = lambda f, *a: defer.maybeDeferred(broken)
    b = world.browser()
    b.cookies["mfa_portal"] = "x" * 43
    answer = b.get("/")
    assert answer.status == 500 and 'id="message"' in answer.body
    assert "on fire" not in answer.body and "Traceback" not in answer.body
    assert answer.header("content-security-policy")


def test_unknown_paths_and_methods(world: World) -> None:
    b = world.browser()
    assert b.get("/admin").status == 404
    answer = b.request("PUT", "/setup")
    assert answer.status == 405 and answer.header("allow") == "GET, HEAD, POST"
    assert b.request("HEAD", "/").status == 200


def test_set_up_and_confirm(world: World) -> None:
    import pyotp

    world.h.require("alice")
    b = signed_in(world)
    assert b.post("/setup/start", {}).status == 303
    page = b.get("/setup")
    assert page.status == 200 and 'id="totp-qr" src="data:image/png;base64,' in page.body
    found = re.search(r'id="totp-secret">([A-Z2-7 ]+)<', page.body)
    assert found is not None
    key = found.group(1).replace(" ", "")
    answer = b.post("/setup", {"code": pyotp.TOTP(key).at(world.h.clock())})
    assert answer.status == 303 and answer.header("location") == "/?done=setup"
    assert 'data-status="enrolled"' in b.get("/?done=setup").body
    assert world.accounts.view("alice").status == "enrolled"
