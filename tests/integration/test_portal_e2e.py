"""End to end: the self-service portal of the real ``mfa-proxy serve``, against
the real slapd (and, at the end, the local users file), driven by a scripted
browser (tests/integration/portalclient.py) and checked through the other
doors: RADIUS with the key set up in the portal (radclient, FreeRADIUS's own
client), ``user show --json``, /metrics and the audit table.

Users come from the session slapd (``userNNNNN`` / ``passNNNNN``); each test
takes fresh ones from a pool, so the tests do not depend on each other.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pyotp
import pytest

from tests.integration.portalclient import Page, PortalClient
from tests.integration.proxyproc import ProxyProcess
from tests.integration.slapd import Slapd, make_ca, make_server_cert, user_password
from tests.integration.test_radius_e2e import radclient

PUBLIC_URL = "https://mfa.example.org/"
ISSUER = "Example Corp"


def fixed_key(name: str) -> str:
    return base64.b32encode(hashlib.sha1(name.encode()).digest()).decode()  # noqa: S324


def code_for(key: str, offset_steps: int = 0) -> str:
    return pyotp.TOTP(key).at(time.time() + 30 * offset_steps)


def wrong_code(key: str) -> str:
    near = {code_for(key, k) for k in range(-3, 4)}
    return next(c for c in (f"{n:06d}" for n in range(123456, 999999, 111111)) if c not in near)


@dataclass
class Pools:
    enrolling: list[str] = field(default_factory=list)
    enrolled: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)

    def take(self, pool: str) -> str:
        names: list[str] = getattr(self, pool)
        return names.pop(0)


@dataclass
class World:
    proxy: ProxyProcess
    users: Pools

    def web(self) -> PortalClient:
        return PortalClient(self.proxy.portal_port)

    def radius(self, user: str, password: str) -> str | None:
        reply = radclient(self.proxy.radius_port, self.proxy.client_secret("vpn"),
                          f'User-Name = "{user}"\nUser-Password = "{password}"\n'
                          "Message-Authenticator = 0x00\n")
        self.last_radius = reply
        return reply.code

    def show(self, user: str) -> dict[str, object]:
        return self.proxy.user(user)


def numbered(first: int, count: int) -> list[str]:
    return [f"user{i:05d}" for i in range(first, first + count)]


@pytest.fixture(scope="module")
def world(slapd: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    pools = Pools(enrolling=numbered(401, 20), enrolled=numbered(451, 20),
                  expired=numbered(481, 3))
    proxy = ProxyProcess.configure(
        tmp_path_factory.mktemp("portal-e2e"), slapd,
        clients=[{"name": "vpn", "address": "127.0.0.1/32"}],
        portal={"public_url": PUBLIC_URL},
        overrides={"totp": {"issuer": ISSUER}})
    rows = [f"{u},,5" for u in pools.enrolling + pools.expired]
    rows += [f"{u},{fixed_key(u)}" for u in pools.enrolled]
    (proxy.workdir / "users.csv").write_text("\n".join(rows) + "\n")
    proxy.cli("user", "import", str(proxy.workdir / "users.csv"))
    with closing(sqlite3.connect(proxy.state_path)) as db, db:
        db.executemany("UPDATE users SET enrollment_deadline = ? WHERE username = ?",
                       [(int(time.time()) - 60, u) for u in pools.expired])
    with proxy.running():
        yield World(proxy, pools)


def signed_in(world: World, user: str) -> tuple[PortalClient, Page]:
    web = world.web()
    page = web.follow(web.login(user, user_password(user)))
    assert page.status == 200 and page.has("mfa-status"), page.body
    return web, page


def set_up(web: PortalClient, button: str = "setup-mfa") -> tuple[str, Page]:
    """Start a set-up, confirm it with a code from the page's own key; (key, account page)."""
    page = web.start_setup(button)
    assert page.status == 200 and page.has("totp-qr"), page.body
    key = web.secret(page)
    done = web.post("/setup", {"code": code_for(key)})
    assert done.status == 303, done.body
    return key, web.follow(done)


# -- the flow --------------------------------------------------------------------------------


def test_a_user_in_enrollment_sets_up_the_key_and_uses_it_on_radius(world: World) -> None:
    user = world.users.take("enrolling")
    web, account = signed_in(world, user)
    assert account.by_id("mfa-status")["data-status"] == "in_enrollment"
    assert account.text("days-left") == "5"
    assert account.has("setup-mfa") and not account.has("reset-mfa") and account.has("logout")

    page = web.start_setup()
    qr = page.by_id("totp-qr")
    assert qr["_tag"] == "img" and qr["src"].startswith("data:image/png;base64,")
    assert base64.b64decode(qr["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    key = web.secret(page)
    assert len(page.text("totp-secret").split()) == 8  # 32 base32 characters, grouped by 4
    assert ISSUER in page.body and user in page.body
    assert world.show(user)["status"] == "in_enrollment"  # nothing changes before a code

    done = web.follow(web.post("/setup", {"code": code_for(key)}))
    assert done.by_id("mfa-status")["data-status"] == "enrolled" and done.has("reset-mfa")
    shown = world.show(user)
    assert (shown["status"], shown["enrolled"], shown["failures"]) == ("enrolled", True, 0)

    # The key the page showed is the key RADIUS asks for (the next step's code:
    # the one that confirmed is used up).
    assert world.radius(user, f"{user_password(user)},{code_for(key, 1)}") == "Access-Accept"
    assert world.radius(user, user_password(user)) == "Access-Challenge"  # a code is needed


def test_the_code_that_confirmed_cannot_be_replayed_on_radius(world: World) -> None:
    user = world.users.take("enrolling")
    web, _ = signed_in(world, user)
    page = web.start_setup()
    key = web.secret(page)
    code = code_for(key)
    assert web.post("/setup", {"code": code}).status == 303
    assert world.radius(user, f"{user_password(user)},{code}") == "Access-Reject"
    assert world.show(user)["failures"] == 1


def test_a_code_accepted_on_radius_is_refused_on_the_portal_and_back(world: World) -> None:
    user = world.users.take("enrolled")
    key, password = fixed_key(user), user_password(user)
    code = code_for(key)
    assert world.radius(user, f"{password},{code}") == "Access-Accept"
    web = world.web()
    page = web.login_with_code(user, password, code)
    assert page.status == 401 and page.by_id("message")["data-kind"] == "bad_credentials"

    later = code_for(key, 1)
    page = web.follow(web.login_with_code(user, password, later))
    assert page.by_id("mfa-status")["data-status"] == "enrolled"
    assert world.radius(user, f"{password},{later}") == "Access-Reject"


def test_an_enrolled_user_gives_password_then_code(world: World) -> None:
    user = world.users.take("enrolled")
    web = world.web()
    step = web.follow(web.login(user, user_password(user)))
    assert step.input_names == {"code", "csrf_token"}
    assert user_password(user) not in step.body
    page = web.post("/login/code", {"code": code_for(fixed_key(user))})
    assert page.status == 303
    account = web.follow(page)
    assert account.by_id("mfa-status")["data-status"] == "enrolled"
    assert account.has("reset-mfa") and not account.has("setup-mfa")


def test_a_bad_password_and_a_bad_code_read_the_same(world: World) -> None:
    user = world.users.take("enrolled")
    web = world.web()
    bad_password = web.login(user, "not-" + user_password(user))
    bad_code = world.web().login_with_code(user, user_password(user), wrong_code(fixed_key(user)))
    assert bad_password.status == bad_code.status == 401
    assert bad_password.text("message") == bad_code.text("message")
    unknown = world.web().login("nobody-here", "whatever")
    assert unknown.text("message") == bad_password.text("message")
    assert world.show(user)["failures"] == 2


def test_reset_by_the_user_keeps_the_old_key_until_the_new_one_is_confirmed(
        world: World) -> None:
    user = world.users.take("enrolled")
    old, password = fixed_key(user), user_password(user)
    web = world.web()
    account = web.follow(web.login_with_code(user, password, code_for(old)))
    page = web.start_setup("reset-mfa")
    new = web.secret(page)
    assert new != old
    # Pending: the old key still works, the new one does not yet.
    assert world.radius(user, f"{password},{code_for(new, 1)}") == "Access-Reject"
    assert world.radius(user, f"{password},{code_for(old, 1)}") == "Access-Accept"
    assert world.show(user)["status"] == "enrolled"
    # A wrong code keeps the same pending key on the page, and counts.
    again = web.post("/setup", {"code": wrong_code(new)})
    assert again.status == 400 and again.has("error") and web.secret(again) == new
    assert world.show(user)["failures"] == 1
    confirming = code_for(new)
    done = web.post("/setup", {"code": confirming})
    assert done.status == 303
    account = web.follow(done)
    assert account.by_id("mfa-status")["data-status"] == "enrolled"
    assert world.show(user)["failures"] == 0  # a confirmed key clears the count
    assert world.radius(user, f"{password},{confirming}") == "Access-Reject"  # used up
    assert world.radius(user, f"{password},{code_for(old, 2)}") == "Access-Reject"  # old key
    assert world.radius(user, f"{password},{code_for(new, 1)}") == "Access-Accept"


def test_five_wrong_portal_passwords_lock_the_user_for_radius_too(world: World) -> None:
    user = world.users.take("enrolled")
    key, password = fixed_key(user), user_password(user)
    for _ in range(5):
        page = world.web().login(user, "wrong-password")
    assert page.status == 401  # the 5th failure is still "bad credential"; it locked
    shown = world.show(user)
    assert shown["locked"] is True and shown["failures"] == 5
    assert world.radius(user, f"{password},{code_for(key)}") == "Access-Reject"
    page = world.web().login(user, password)
    assert page.status == 403 and page.by_id("message")["data-kind"] == "locked"
    world.proxy.cli("user", "unlock", user)


def test_an_expired_enrollment_gets_its_own_page(world: World) -> None:
    user = world.users.take("expired")
    page = world.web().login(user, user_password(user))
    assert page.status == 403 and page.by_id("message")["data-kind"] == "enrollment_expired"
    assert "administrator" in page.body


def test_a_user_never_required_may_set_up_a_key(world: World) -> None:
    user = "user00499"
    web, account = signed_in(world, user)
    assert account.by_id("mfa-status")["data-status"] == "not_required"
    key, account = set_up(web)
    assert account.by_id("mfa-status")["data-status"] == "enrolled"
    assert world.radius(user, f"{user_password(user)},{code_for(key, 1)}") == "Access-Accept"


def test_logout_ends_the_session(world: World) -> None:
    user = world.users.take("enrolling")
    web, account = signed_in(world, user)
    session = web.cookies["mfa_portal"]
    out = web.post("/logout", {})
    assert out.status == 303 and "mfa_portal" not in web.cookies
    web.cookies["mfa_portal"] = session  # the old id opens nothing any more
    assert web.get("/").input_names >= {"username", "password"}


def test_login_rotates_the_session_id(world: World) -> None:
    user = world.users.take("enrolled")
    web = world.web()
    first = web.login(user, user_password(user))
    code_step = web.cookies["mfa_portal"]
    web.follow(first)
    web.post("/login/code", {"code": code_for(fixed_key(user))})
    assert web.cookies["mfa_portal"] != code_step
    stale = PortalClient(world.proxy.portal_port)
    stale.cookies["mfa_portal"] = code_step
    assert "username" in stale.get("/").input_names


# -- CSRF, cookies, headers, bad input --------------------------------------------------------


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(world: World) -> None:
    user = world.users.take("enrolling")
    web = world.web()
    web.get("/")
    page = web.post("/login", {"username": user, "password": user_password(user)}, csrf=False)
    assert page.status == 403
    page = web.post("/login", {"username": user, "password": "wrong", "csrf_token": "0" * 64})
    assert page.status == 403
    assert world.show(user)["failures"] == 0

    web, account = signed_in(world, user)
    for path in ("/setup/start", "/logout"):
        assert web.post(path, {}, csrf=False).status == 403
        assert web.post(path, {"csrf_token": "forged"}).status == 403
    assert web.get("/setup").status == 303  # no pending key was made
    assert web.get("/").has("mfa-status")  # still signed in
    # Another session's token is no good either.
    other, other_page = signed_in(world, world.users.take("enrolling"))
    assert web.post("/setup/start", {"csrf_token": other_page.csrf}).status == 403
    # The code step and the set-up confirmation too.
    page = web.start_setup()
    key = web.secret(page)
    assert web.post("/setup", {"code": code_for(key)}, csrf=False).status == 403
    assert world.show(user)["status"] == "in_enrollment"


def test_cookies_are_httponly_and_samesite_strict(world: World) -> None:
    user = world.users.take("enrolling")
    web = world.web()
    form = web.get("/")
    (login_cookie,) = form.set_cookies
    page = web.post("/login", {"username": user, "password": user_password(user)})
    cookies = [login_cookie, *page.set_cookies]
    assert any(c.startswith("mfa_portal=") for c in cookies)
    for c in cookies:
        flags = [f.strip().lower() for f in c.split(";")[1:]]
        assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
        assert "secure" not in flags  # plain HTTP here; see the TLS test
    session = web.cookies["mfa_portal"]
    assert len(session) >= 43  # 256 bits
    assert session not in world.proxy.log_tail(100_000)


def test_every_page_sends_the_security_headers(world: World) -> None:
    web = world.web()
    for page in (web.get("/"), web.get("/no-such-page"), web.request("PUT", "/"),
                 web.post("/login", {}, csrf=False), web.get("/static/portal.css")):
        csp = page.header("content-security-policy") or ""
        assert "default-src 'none'" in csp and "script-src" not in csp
        assert "frame-ancestors 'none'" in csp
        assert page.header("x-frame-options") == "DENY"
        assert page.header("referrer-policy") == "no-referrer"
        assert page.header("cache-control") == "no-store"
        assert "<script" not in page.body.lower()


@pytest.mark.parametrize(("method", "path", "body", "ctype", "status"), [
    ("GET", "/nothing-here", None, None, 404),
    ("GET", "/login", None, None, 405),
    ("DELETE", "/", None, None, 405),
    ("POST", "/login", b"username=" + b"a" * 20000, "application/x-www-form-urlencoded", 413),
    ("POST", "/login", b"\xff\xfe\xfd", "application/x-www-form-urlencoded", 400),
    ("POST", "/login", b"username=a&username=b", "application/x-www-form-urlencoded", 400),
    ("POST", "/login", b"evil=1", "application/x-www-form-urlencoded", 400),
    ("POST", "/login", b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--x--",
     "multipart/form-data; boundary=x", 400),
    ("POST", "/login", b"{\"username\": \"a\"}", "application/json", 400),
])
def test_bad_requests_get_a_clean_page(world: World, method: str, path: str,
                                       body: bytes | None, ctype: str | None,
                                       status: int) -> None:
    web = world.web()
    web.get("/")
    headers = {"Content-Type": ctype} if ctype else {}
    page = web.request(method, path, body, headers)
    assert page.status == status
    assert page.header("content-type") == "text/html; charset=utf-8"
    assert page.has("message") and "Traceback" not in page.body
    if status == 405:
        assert page.header("allow")


def test_nothing_secret_reaches_a_url_or_the_log(world: World) -> None:
    user = world.users.take("enrolling")
    web, _ = signed_in(world, user)
    page = web.start_setup()
    key = web.secret(page)
    done = web.post("/setup", {"code": code_for(key)})
    assert key not in (done.header("location") or "")
    log = world.proxy.log_tail(1_000_000)
    assert key not in log and user_password(user) not in log


# -- the rest of the product sees the portal ----------------------------------------------------


def test_portal_sign_ins_are_counted_and_audited_like_radius_and_ldap(world: World) -> None:
    user = world.users.take("enrolled")
    before = world.proxy.metrics()
    web = world.web()
    web.follow(web.login_with_code(user, user_password(user), code_for(fixed_key(user))))
    after = world.proxy.metrics()

    def delta(**labels: str) -> float:
        return (after.value("mfa_proxy_requests_total", protocol="portal", **labels)
                - before.value("mfa_proxy_requests_total", protocol="portal", **labels))

    assert delta(result="challenge", reason="code_needed") == 1
    assert delta(result="accept", reason="ok") == 1
    assert after.value("mfa_proxy_decision_seconds_count", protocol="portal") >= 2
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # audit rows are flushed every 0.25 s
        with closing(sqlite3.connect(world.proxy.state_path)) as db:
            rows = db.execute("SELECT protocol, result, reason FROM audit WHERE username = ?",
                              (user,)).fetchall()
        if ("portal", "accept", "ok") in rows:
            break
        time.sleep(0.1)
    assert ("portal", "challenge", "code_needed") in rows and ("portal", "accept", "ok") in rows


def test_a_set_up_in_the_portal_shows_in_the_users_gauge_at_once(world: World) -> None:
    """mfa_proxy_users is recounted right after an account change made through the
    running process (the periodic count is every 30 s; a CLI change waits for it)."""
    def enrolled() -> float:
        return world.proxy.metrics().value("mfa_proxy_users", status="enrolled")

    user = world.users.take("enrolling")
    web, _ = signed_in(world, user)
    time.sleep(0.5)  # any recount due to the sign-in is done
    before = enrolled()
    set_up(web)
    deadline = time.monotonic() + 5  # well under the 30 s of the periodic count
    while enrolled() != before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert enrolled() == before + 1


def test_the_radius_enrollment_notice_ends_with_the_public_url(world: World) -> None:
    user = world.users.take("enrolling")
    assert world.radius(user, user_password(user)) == "Access-Accept"
    (notice,) = world.last_radius.values("Reply-Message")
    assert "days left" in notice and notice.endswith(PUBLIC_URL)


# -- the local users file, and TLS ----------------------------------------------------------------


@pytest.fixture
def local_proxy(tmp_path: Path) -> Iterator[ProxyProcess]:
    ca, ca_key, ca_cert = make_ca(tmp_path)
    cert, key = make_server_cert(tmp_path, ca_key, ca_cert, ["127.0.0.1"])
    proxy = ProxyProcess.configure(
        tmp_path, directory={"type": "local", "users_file": str(tmp_path / "users.toml")},
        portal={"cert_file": str(cert), "key_file": str(key)})
    proxy.cli("local-user", "set", "demo", input="demo-password\n")
    proxy.cli("user", "require", "demo", "--days", "3")
    with proxy.running():
        yield proxy


def test_local_users_file_over_tls(local_proxy: ProxyProcess) -> None:
    web = PortalClient(local_proxy.portal_port, tls=True)
    form = web.get("/")
    assert form.header("strict-transport-security")
    page = web.post("/login", {"username": "demo", "password": "demo-password"})
    for c in [*form.set_cookies, *page.set_cookies]:
        assert "; Secure" in c and "HttpOnly" in c and "SameSite=Strict" in c
    account = web.follow(page)
    assert account.by_id("mfa-status")["data-status"] == "in_enrollment"
    assert account.text("days-left") == "3"
    key, account = set_up(web)
    assert account.by_id("mfa-status")["data-status"] == "enrolled"
    reply = radclient(local_proxy.radius_port, local_proxy.client_secret(),
                      f'User-Name = "demo"\nUser-Password = "demo-password,{code_for(key, 1)}"\n'
                      "Message-Authenticator = 0x00\n")
    assert reply.code == "Access-Accept"


# -- two instances on one PostgreSQL ------------------------------------------------------------


@pytest.mark.postgres
def test_a_set_up_started_on_one_instance_is_confirmed_on_the_other(
        slapd: Slapd, tmp_path: Path, postgres: object) -> None:
    """Sessions and pending keys live in the shared state: a load balancer may send
    each request of a flow to another instance."""
    url = postgres.new_database("portal_two_instances")  # type: ignore[attr-defined]
    clients = [{"name": "vpn", "address": "127.0.0.1/32"}]
    a = ProxyProcess.configure(tmp_path / "a", slapd, clients=clients, state_url=url,
                               portal={})
    b = ProxyProcess.configure(tmp_path / "b", slapd, clients=clients, state_url=url,
                               key_file=a.key_file, portal={})
    a.cli("db", "upgrade")
    user = "user00498"
    a.cli("user", "require", user)
    with a.running(), b.running():
        on_a, on_b = PortalClient(a.portal_port), PortalClient(b.portal_port)
        form = on_a.get("/")
        on_b.cookies = on_a.cookies  # one browser, two instances behind a balancer
        page = on_b.post("/login", {"username": user, "password": user_password(user),
                                    "csrf_token": form.csrf})
        assert page.status == 303
        assert on_a.start_setup().has("totp-secret")
        setup = on_b.get("/setup")
        key = on_b.secret(setup)
        assert key == on_a.secret(on_a.get("/setup"))
        done = on_b.follow(on_b.post("/setup", {"code": code_for(key)}))
        assert done.by_id("mfa-status")["data-status"] == "enrolled"
        assert on_a.get("/").by_id("mfa-status")["data-status"] == "enrolled"
        assert a.user(user)["status"] == "enrolled"
