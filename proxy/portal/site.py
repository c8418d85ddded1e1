"""The self-service portal over twisted.web: pages in, the core asked, pages out.

Like the RADIUS and LDAP front-ends it never decides. A login is an
:class:`AuthRequest` for the same ``authenticate`` (protocol ``portal``): the
password first, in challenge form, so an enrolled user is asked for the code
on a second page (the verified identity stays in the server-side session,
never in the page); the account rules are :class:`~policy.admin.Accounts`
(start and confirm a set-up, status) and sessions are
:class:`~policy.sessions.PortalSessions`, both state work run with
``run_blocking`` (the state thread), never on the reactor.

Every answer goes through :meth:`Portal._send`: the security headers, the
cookies, one body. Unknown paths are 404, wrong methods 405, bodies over
:data:`MAX_BODY` 413, forms that are not forms 400 — each a page, never a
traceback. Nothing secret is put in a URL or a log line.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from policy.admin import Accounts, Confirmation, EnrollmentExpired, Locked, SetupOutcome
from policy.decision import (
    Authenticate,
    AuthRequest,
    Decision,
    MfaMode,
    Outcome,
    Reason,
    SplitMode,
)
from policy.schema import LOCKED_FOREVER
from policy.sessions import LoginCsrf, PortalSession, PortalSessions, Stage
from proxy.portal import pages
from proxy.portal.pages import Branding

log = logging.getLogger("mfa_proxy.portal")

MAX_BODY = 8192  # a login form is a few hundred bytes
MAX_FIELD = 1024
SESSION_COOKIE = "mfa_portal"
LOGIN_COOKIE = "mfa_portal_login"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
BAD_CREDENTIALS = "The username, password or code is not correct."

RunBlocking = Callable[..., "Deferred[Any]"]


class PortalEvents(Protocol):
    def request(self, result: str, reason: str) -> None: ...

    def decision_seconds(self, seconds: float) -> None: ...

    def setup(self, result: str) -> None: ...

    def lockout(self) -> None: ...


class NoEvents:
    def request(self, result: str, reason: str) -> None:
        pass

    def decision_seconds(self, seconds: float) -> None:
        pass

    def setup(self, result: str) -> None:
        pass

    def lockout(self) -> None:
        pass


@dataclass
class Reply:
    """One answer: a page or a redirect, and the cookies to set (None: delete)."""

    status: int = 200
    body: bytes = b""
    location: str | None = None
    cookies: dict[str, str | None] = field(default_factory=dict)
    content_type: bytes = b"text/html; charset=utf-8"
    headers: dict[bytes, bytes] = field(default_factory=dict)


class BadForm(Exception):
    """Not a form this portal sent (400)."""


class PortalRequest(Request):
    """Bodies are read up to MAX_BODY and parsed here, not by twisted.web (no
    multipart parsing, no temporary files)."""

    _parsePOSTFormSubmission = False
    body_too_large = False

    def gotLength(self, length: int | None) -> None:  # noqa: N802 (Twisted's name)
        if length is not None and length > MAX_BODY:
            self.body_too_large = True
        super().gotLength(None if self.body_too_large else length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        if self.body_too_large:
            return
        assert self.content is not None
        if self.content.tell() + len(data) > MAX_BODY:
            self.body_too_large = True
            return
        super().handleContentChunk(data)


class Portal:
    def __init__(self, authenticate: Authenticate, accounts: Accounts,
                 sessions: PortalSessions, login_csrf: LoginCsrf, run_blocking: RunBlocking,
                 branding: Branding, *, tls: bool = False,
                 events: PortalEvents | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 run_cpu: RunBlocking | None = None) -> None:
        self.authenticate = authenticate
        # CPU work that would hold up the reactor (a QR code is ~13 ms of pure Python):
        # a thread of the reactor's pool, not the state thread sign-ins wait for.
        if run_cpu is None:
            from twisted.internet.threads import deferToThread

            run_cpu = deferToThread
        self.run_cpu = run_cpu
        self.accounts, self.sessions, self.login_csrf = accounts, sessions, login_csrf
        self.run_blocking = run_blocking
        self.branding, self.tls = branding, tls
        self.events: PortalEvents = events or NoEvents()
        self.clock = clock
        self.routes: dict[bytes, dict[bytes, Callable[[Request], Awaitable[Reply]]]] = {
            b"/": {b"GET": self.home},
            b"/login": {b"POST": self.login},
            b"/login/code": {b"POST": self.login_code},
            b"/setup": {b"GET": self.setup_page, b"POST": self.setup_confirm},
            b"/setup/start": {b"POST": self.setup_start},
            b"/logout": {b"POST": self.logout},
            b"/static/portal.css": {b"GET": self.css},
        }

    # -- the Twisted side ---------------------------------------------------------------

    def site(self) -> Site:
        site = _QuietSite(_PortalResource(self))
        site.requestFactory = PortalRequest
        site.displayTracebacks = False
        site.noisy = False
        return site

    def handle(self, request: Request) -> None:
        d = Deferred.fromCoroutine(self._dispatch(request))
        d.addErrback(self._crashed, request)
        d.addCallback(self._send, request)
        d.addErrback(lambda f: log.error("portal: could not answer: %s", f.getTraceback()))

    async def _dispatch(self, request: Request) -> Reply:
        path = request.path or b""
        methods = self.routes.get(path)
        if methods is None:
            return self.message(404, "not_found", "Page not found",
                                "There is no page at this address.")
        method = request.method or b""
        handler = methods.get(b"GET" if method == b"HEAD" else method)
        if handler is None:
            reply = self.message(405, "method_not_allowed", "Not allowed",
                                 "This page cannot be used that way.")
            allow = sorted({*methods, *([b"HEAD"] if b"GET" in methods else [])})
            reply.headers[b"allow"] = b", ".join(allow)
            return reply
        if getattr(request, "body_too_large", False):
            reply = self.message(413, "too_large", "Too much data",
                                 "The form sent more data than a form of this portal can hold.")
            reply.headers[b"connection"] = b"close"
            return reply
        try:
            return await handler(request)
        except BadForm:
            return self.message(400, "bad_form", "Not a form of this portal",
                                "The page sent something this portal did not ask for. "
                                "Go back and try again.")

    def _crashed(self, failure: Failure, request: Request) -> Reply:
        log.error("portal: %s %s failed:\n%s", _text(request.method),
                  _text(request.path), failure.getTraceback())
        return self.message(500, "error", "Something went wrong",
                            "The portal could not finish this request. Try again in a moment.")

    def _send(self, reply: Reply, request: Request) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.setResponseCode(reply.status)
        headers = {
            b"content-security-policy": CSP.encode(),
            b"x-frame-options": b"DENY",
            b"referrer-policy": b"no-referrer",
            b"cache-control": b"no-store",
            b"x-content-type-options": b"nosniff",
            b"cross-origin-opener-policy": b"same-origin",
            b"server": b"mfa-proxy",
        }
        if self.tls:
            headers[b"strict-transport-security"] = b"max-age=31536000"
        headers[b"content-type"] = reply.content_type
        headers.update(reply.headers)
        if reply.location is not None:
            headers[b"location"] = reply.location.encode()
        for name, value in headers.items():
            request.setHeader(name, value)
        for cookie, cookie_value in reply.cookies.items():
            self._cookie(request, cookie, cookie_value)
        request.setHeader(b"content-length", str(len(reply.body)).encode())
        request.write(reply.body)
        request.finish()

    def _cookie(self, request: Request, name: str, value: str | None) -> None:
        flags = "; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if self.tls else "")
        if value is None:
            flags += "; Max-Age=0"
        request.responseHeaders.addRawHeader(b"set-cookie",
                                             f"{name}={value or ''}{flags}".encode())

    # -- pages --------------------------------------------------------------------------

    async def home(self, request: Request) -> Reply:
        session = await self._session(request)
        notice = _NOTICES.get(_query(request, b"done"), "")
        if session is None:
            return self._login_form(request, notice)
        if session.stage is Stage.CODE:
            return self.page("code.html", username=session.username,
                             csrf_token=session.csrf_token)
        return await self._account(session, notice)

    def _login_form(self, request: Request, notice: str = "", status: int = 200) -> Reply:
        cookie = _cookie(request, LOGIN_COOKIE)
        reply = Reply(status)
        if cookie is None or len(cookie) > 128:
            cookie, token = self.login_csrf.issue()
            reply.cookies[LOGIN_COOKIE] = cookie
        else:
            token = self.login_csrf.token_for(cookie)
        reply.body = pages.render("login.html", self.branding, csrf_token=token, notice=notice)
        return reply

    async def _account(self, session: PortalSession, notice: str = "") -> Reply:
        view = await self.run_blocking(self.accounts.view, session.username)
        if view.locked:
            return self._locked(None)
        # New recovery codes (right after a set-up): shown on this page, once.
        codes = await self.run_blocking(self.accounts.take_for_display, session.id_hash,
                                        session.username)
        status = view.status
        can_set_up = status in ("in_enrollment", "not_required") and not view.enrolled
        can_reset = view.enrolled and session.mfa_verified
        deadline = (view.enrollment_deadline or "")[:10]
        return self.page("account.html", view=view, deadline=deadline,
                         csrf_token=session.csrf_token, can_set_up=can_set_up,
                         can_reset=can_reset, notice=notice, recovery_codes=codes)

    async def login(self, request: Request) -> Reply:
        form = _form(request, {"csrf_token", "username", "password"})
        if not self.login_csrf.check(_cookie(request, LOGIN_COOKIE), form.get("csrf_token")):
            return self._forbidden()
        username, password = form.get("username", ""), form.get("password", "")
        if "username" not in form or "password" not in form:
            raise BadForm()
        started = self.clock()
        decision = await self.authenticate(AuthRequest(
            username=username, password=password, protocol="portal", client="portal",
            mfa=MfaMode.ENROLLED, split=SplitMode.CHALLENGE, source=_peer(request)))
        self._count(decision, started)
        if decision.outcome is Outcome.REJECT or decision.identity is None:
            return self._rejected(decision)
        stage = Stage.SIGNED_IN if decision.accepted else Stage.CODE
        token, _ = await self.run_blocking(self.sessions.start, decision.username, stage,
                                           decision.identity, False,
                                           _cookie(request, SESSION_COOKIE))
        return Reply(303, location="/", cookies={SESSION_COOKIE: token, LOGIN_COOKIE: None})

    async def login_code(self, request: Request) -> Reply:
        form = _form(request, {"csrf_token", "code"})
        token = _cookie(request, SESSION_COOKIE)
        session = await self._session(request)
        if session is None or session.stage is not Stage.CODE or not _csrf_ok(session, form):
            return self._forbidden()
        started = self.clock()
        decision = await self.authenticate(AuthRequest(
            username=session.username, password="", protocol="portal", client="portal",
            mfa=MfaMode.ENROLLED, split=SplitMode.CHALLENGE, code=form.get("code", "").strip(),
            verified_identity=session.identity, source=_peer(request)))
        self._count(decision, started)
        if not decision.accepted or decision.identity is None:
            # As a RADIUS challenge: one answer per code step; sign in again.
            await self.run_blocking(self.sessions.end, token)
            reply = self._rejected(decision)
            reply.cookies[SESSION_COOKIE] = None
            return reply
        new_token, _ = await self.run_blocking(self.sessions.start, decision.username,
                                               Stage.SIGNED_IN, decision.identity, True, token)
        return Reply(303, location="/", cookies={SESSION_COOKIE: new_token})

    async def setup_start(self, request: Request) -> Reply:
        form = _form(request, {"csrf_token"})
        session = await self._signed_in(request, form)
        if session is None:
            return self._forbidden()
        view = await self.run_blocking(self.accounts.view, session.username)
        if view.enrolled and not session.mfa_verified:
            return self.message(403, "code_needed", "Sign in with your code first",
                                "To replace your key, sign out and sign in again with your "
                                "password and a code from your app, or ask your administrator.",
                                error=True)
        try:
            await self.run_blocking(self.accounts.start_setup, session.username)
        except Locked:
            return self._locked(None)
        except EnrollmentExpired:
            return self._expired()
        return Reply(303, location="/setup")

    async def setup_page(self, request: Request, error: str = "",
                         session: PortalSession | None = None, status: int = 200) -> Reply:
        if session is None:
            session = await self._signed_in(request, None)
        if session is None:
            return Reply(303, location="/")
        enrollment = await self.run_blocking(self.accounts.pending_setup, session.username)
        if enrollment is None:
            return Reply(303, location="/")
        view = await self.run_blocking(self.accounts.view, session.username)
        qr = await self.run_cpu(pages.qr_data_uri, enrollment.uri)
        reply = self.page("setup.html", username=session.username, error=error,
                          qr_data_uri=qr,
                          grouped_key=pages.grouped(enrollment.totp_key),
                          enrolled=view.enrolled, csrf_token=session.csrf_token)
        reply.status = status
        return reply

    async def setup_confirm(self, request: Request) -> Reply:
        form = _form(request, {"csrf_token", "code"})
        token = _cookie(request, SESSION_COOKIE)
        session = await self._signed_in(request, form)
        if session is None:
            return self._forbidden()
        result: Confirmation = await self.run_blocking(
            self.accounts.confirm_setup, session.username, form.get("code", ""),
            _peer(request))
        self.events.setup(result.outcome.value)
        if result.lockout_started:
            self.events.lockout()
        if result.confirmed:
            # A new level of trust (the user just proved the new key): a new session id.
            new_token, signed_in = await self.run_blocking(
                self.sessions.start, session.username, Stage.SIGNED_IN, session.identity, True,
                token)
            if result.recovery_codes:  # the account page shows them once
                await self.run_blocking(self.accounts.hold_for_display, signed_in.id_hash,
                                        session.username, result.recovery_codes)
            return Reply(303, location="/?done=setup", cookies={SESSION_COOKIE: new_token})
        if result.outcome is SetupOutcome.BAD_CODE and not result.lockout_started:
            return await self.setup_page(request, "That code was not accepted. Check the time "
                                         "on your phone and enter the code the app shows now.",
                                         session, status=400)
        if result.outcome is SetupOutcome.NO_PENDING_KEY:
            return self.message(409, "setup_expired", "Set-up expired",
                                "This set-up took too long or was replaced by a newer one. "
                                "Start again from your account page.", back="Your account")
        await self.run_blocking(self.sessions.end, token)
        reply = self._locked(None)
        reply.cookies[SESSION_COOKIE] = None
        return reply

    async def logout(self, request: Request) -> Reply:
        form = _form(request, {"csrf_token"})
        token = _cookie(request, SESSION_COOKIE)
        session = await self._session(request)
        if session is None or not _csrf_ok(session, form):
            return self._forbidden()
        await self.run_blocking(self.sessions.end, token)
        return Reply(303, location="/?done=logout", cookies={SESSION_COOKIE: None})

    async def css(self, request: Request) -> Reply:
        reply = Reply(200, pages.stylesheet(), content_type=b"text/css; charset=utf-8")
        return reply

    # -- helpers ----------------------------------------------------------------------

    async def _session(self, request: Request) -> PortalSession | None:
        token = _cookie(request, SESSION_COOKIE)
        if token is None:
            return None
        session: PortalSession | None = await self.run_blocking(self.sessions.find, token)
        return session

    async def _signed_in(self, request: Request,
                         form: dict[str, str] | None) -> PortalSession | None:
        """The signed-in session, and (for a POST) its CSRF token checked."""
        session = await self._session(request)
        if session is None or not session.signed_in:
            return None
        if form is not None and not _csrf_ok(session, form):
            return None
        return session

    def page(self, template: str, **values: Any) -> Reply:
        return Reply(200, pages.render(template, self.branding, **values))

    def message(self, status: int, kind: str, title: str, text: str, detail: str = "",
                error: bool = True, back: str = "Back to the start") -> Reply:
        reply = self.page("message.html", kind=kind, title=title, text=text, detail=detail,
                          error=error, back=back)
        reply.status = status
        return reply

    def _forbidden(self) -> Reply:
        return self.message(403, "forbidden", "Please start again",
                            "This form has expired or did not come from this portal "
                            "(your session may have ended). Nothing was changed.",
                            back="Sign in")

    def _rejected(self, decision: Decision) -> Reply:
        reason = decision.public_reason or decision.reason
        if reason is Reason.LOCKED_OUT:
            return self._locked(decision.locked_until)
        if reason is Reason.ENROLLMENT_EXPIRED:
            return self._expired()
        if reason is Reason.NOT_ENROLLED:
            return self.message(403, "not_enrolled", "Not set up",
                                "Two-step verification is required and not set up for your "
                                "account. Ask your administrator.")
        if reason in (Reason.DIRECTORY_UNAVAILABLE, Reason.STATE_UNAVAILABLE, Reason.BUSY):
            return self.message(503, "unavailable", "Please try again",
                                "The sign-in service is not available right now. Try again "
                                "in a moment.")
        return self.message(401, "bad_credentials", "Sign-in failed", BAD_CREDENTIALS,
                            "Several failed attempts in a row lock the account for a while.",
                            back="Try again")

    def _locked(self, until: float | None) -> Reply:
        detail = "Ask your administrator to unlock it."
        if until is not None and until < LOCKED_FOREVER:
            when = dt.datetime.fromtimestamp(until, dt.UTC).strftime("%H:%M UTC")
            detail = f"Try again after {when}, or ask your administrator to unlock it."
        return self.message(403, "locked", "Account locked",
                            "Your account is locked after too many failed attempts.", detail)

    def _expired(self) -> Reply:
        return self.message(403, "enrollment_expired", "Enrollment period over",
                            "Your time to set up two-step verification has run out, so "
                            "sign-ins are refused.",
                            "Ask your administrator to extend or reset your enrollment period.")

    def _count(self, decision: Decision, started: float) -> None:
        self.events.request(decision.outcome.value, decision.reason.value)
        self.events.decision_seconds(max(0.0, self.clock() - started))


_NOTICES = {
    "setup": "Done: your authenticator app is set up. From now on, sign-ins ask for its code.",
    "logout": "You are signed out.",
}


class _PortalResource(Resource):
    isLeaf = True

    def __init__(self, portal: Portal) -> None:
        super().__init__()
        self.portal = portal

    def render(self, request: Request) -> Any:
        self.portal.handle(request)
        return NOT_DONE_YET


class _QuietSite(Site):
    """No access log: a log line per page view says nothing the audit rows don't."""

    def log(self, request: Request) -> None:
        pass


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace")[:200]


def _cookie(request: Request, name: str) -> str | None:
    raw = request.getCookie(name.encode())
    if raw is None:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


def _query(request: Request, name: bytes) -> str:
    values = (request.args or {}).get(name) or [b""]
    return values[0].decode("ascii", "replace")


def _peer(request: Request) -> str:
    peer = request.getClientAddress()
    return str(getattr(peer, "host", ""))


def _csrf_ok(session: PortalSession, form: dict[str, str]) -> bool:
    from policy.sessions import tokens_match

    return tokens_match(session.csrf_token, form.get("csrf_token"))


def _form(request: Request, allowed: set[str]) -> dict[str, str]:
    """A urlencoded form with only ``allowed`` fields, each at most once (BadForm)."""
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != b"application/x-www-form-urlencoded":
        raise BadForm()
    assert request.content is not None
    request.content.seek(0)
    raw = request.content.read()
    try:
        text = raw.decode("utf-8")
        fields = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text),
                          max_num_fields=len(allowed) + 1)
    except (UnicodeDecodeError, ValueError):
        raise BadForm() from None
    if not set(fields) <= allowed or any(len(v) != 1 for v in fields.values()):
        raise BadForm()
    form = {k: v[0] for k, v in fields.items()}
    if any(len(v) > MAX_FIELD or "\x00" in v for v in form.values()):
        raise BadForm()
    return form
