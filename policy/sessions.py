"""Portal sessions: server-side, in the state store, so any instance can serve
the next request of a flow another one started.

The browser holds a random 256-bit id; the store keeps only its SHA-256, so a
copy of the database opens no session. A session ends after ``idle_seconds``
without a request, on logout, and whenever a login step succeeds (the id is
rotated: a new id for each new level of trust, so an id planted before the
login is worth nothing after it). Each session has its own CSRF token, sent
back in every form; before login, the login form's token is tied to a
random cookie by a keyed hash (:class:`LoginCsrf`), so no state is kept for
visitors who only look at the form.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from backends.base import Identity
from policy.clock import Clock
from policy.schema import SessionData
from policy.store import Store

TOKEN_BYTES = 32  # 256 bits
MAX_TOKEN_LENGTH = 128  # anything longer is not one of ours: not even hashed


class Stage(enum.StrEnum):
    CODE = "code"  # the password was verified; the code comes next
    SIGNED_IN = "signed_in"


@dataclass(frozen=True)
class PortalSession:
    id_hash: bytes
    username: str  # canonical: the directory entry's own name
    stage: Stage
    identity: Identity  # the entry the password step verified (for the code step)
    mfa_verified: bool  # signed in with password and code
    csrf_token: str

    @property
    def signed_in(self) -> bool:
        return self.stage is Stage.SIGNED_IN


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


def tokens_match(expected: str, given: str | None) -> bool:
    if not given or len(given) > MAX_TOKEN_LENGTH:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def _identity_json(identity: Identity) -> str:
    return json.dumps({"username": identity.username, "dn": identity.dn,
                       "groups": list(identity.groups)})


def _identity(text: str) -> Identity:
    data = json.loads(text)
    return Identity(str(data["username"]), data.get("dn"), tuple(data.get("groups", ())))


class PortalSessions:
    """Start, find and end portal sessions (blocking: the state thread's work)."""

    def __init__(self, store: Store, idle_seconds: int, clock: Clock = time.time) -> None:
        self.store, self.idle_seconds, self.clock = store, idle_seconds, clock

    def start(self, username: str, stage: Stage, identity: Identity, mfa_verified: bool,
              replacing: str | None = None) -> tuple[str, PortalSession]:
        """A new session (and the id to give the browser); the session ``replacing``
        names, if any, ends: ids are rotated at every login step."""
        if replacing:
            self.end(replacing)
        token = new_token()
        now = int(self.clock())
        data = SessionData(token_hash(token), username, stage.value, _identity_json(identity),
                           mfa_verified, new_token(), now, now + self.idle_seconds)
        self.store.admin.create_session(data)
        return token, self._session(data)

    def find(self, token: str | None) -> PortalSession | None:
        """The live session this id opens (its idle timer restarts), or None."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        data = self.store.admin.touch_session(token_hash(token), self.clock(), self.idle_seconds)
        return self._session(data) if data is not None else None

    def end(self, token: str | None) -> None:
        if token and len(token) <= MAX_TOKEN_LENGTH:
            self.store.admin.delete_session(token_hash(token))

    @staticmethod
    def _session(data: SessionData) -> PortalSession:
        return PortalSession(data.id_hash, data.username, Stage(data.stage),
                             _identity(data.identity), data.mfa_verified, data.csrf_token)


class LoginCsrf:
    """The login form's CSRF token before there is a session: a random cookie and,
    in the form, its HMAC under a key every instance shares. A forged POST has
    neither the cookie (SameSite=Strict) nor a way to make the matching token."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def issue(self) -> tuple[str, str]:
        """(cookie value, form token)."""
        cookie = new_token()
        return cookie, self.token_for(cookie)

    def token_for(self, cookie: str) -> str:
        return hmac.new(self.key, cookie.encode("ascii", "replace"), hashlib.sha256).hexdigest()

    def check(self, cookie: str | None, token: str | None) -> bool:
        if not cookie or len(cookie) > MAX_TOKEN_LENGTH:
            return False
        return tokens_match(self.token_for(cookie), token)
