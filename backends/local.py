"""The embedded default directory: a TOML users file with argon2id hashes.

    [users.alice]
    password = "$argon2id$v=19$m=65536,t=3,p=4$…"
    groups = ["vpn-users"]
    email = "alice@example.org"

The file is re-read when it changes, so `mfa-proxy local-user set` takes
effect without a restart.
"""

from __future__ import annotations

import os
import threading
import tomllib
import unicodedata
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from backends.base import (
    DirectoryUnavailable,
    Identity,
    InvalidCredentials,
    UnknownUser,
    check_password_not_empty,
)

HEADER = ("# mfa-proxy local users: `mfa-proxy local-user set USER` writes this file.\n"
          "# Passwords are argon2id hashes; groups are free-form names.\n")


class LocalDirectory:
    name = "local"

    def __init__(self, path: Path, hasher: PasswordHasher | None = None) -> None:
        self.path = path
        self.hasher = hasher or PasswordHasher()
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._users: dict[str, dict[str, Any]] = {}
        self._folded: dict[str, str] = {}  # folded name -> the file's key
        self._dummy_hash: str | None = None

    @property
    def _dummy(self) -> str:
        """Unknown users still cost one hash check, so timing does not tell who
        exists (made on first use: the admin CLI never needs it)."""
        if self._dummy_hash is None:
            self._dummy_hash = self.hasher.hash("not a password")
        return self._dummy_hash

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise DirectoryUnavailable(f"{self.path}: {e.strerror}") from e
        with self._lock:
            if mtime != self._mtime:
                try:
                    data = tomllib.loads(self.path.read_text(encoding="utf-8"))
                except (OSError, tomllib.TOMLDecodeError) as e:
                    raise DirectoryUnavailable(f"{self.path}: {e}") from e
                users = data.get("users", {})
                self._users = {str(k): v for k, v in users.items() if isinstance(v, dict)}
                self._folded = {_fold(k): k for k in self._users}
                self._mtime = mtime
            return self._users

    def _entry(self, username: str) -> tuple[str, dict[str, Any]] | None:
        """The file's own key and entry for any case or compatibility form of a name."""
        users = self._load()
        key = self._folded.get(_fold(username))
        return (key, users[key]) if key is not None and key in users else None

    def verify(self, username: str, password: str) -> Identity:
        check_password_not_empty(password)
        entry = self._load().get(username)
        hashed = str(entry.get("password", "")) if entry else ""
        try:
            self.hasher.verify(hashed or self._dummy, password)
        except (VerificationError, InvalidHashError):
            raise (InvalidCredentials if entry else UnknownUser)(username) from None
        if not entry or not hashed:
            raise UnknownUser(username)
        return self._identity(username, entry)

    @staticmethod
    def _identity(username: str, entry: dict[str, Any]) -> Identity:
        groups = entry.get("groups", [])
        email = entry.get("email")
        return Identity(username, None, tuple(str(g) for g in groups),
                        mail=str(email) if email else None)

    def lookup(self, username: str) -> Identity | None:
        found = self._entry(username)
        return self._identity(*found) if found is not None else None

    def lookup_dn(self, dn: str) -> Identity | None:
        return None  # the file has no DNs: an LDAP bind DN names nobody here

    def check_password(self, identity: Identity, password: str) -> Identity:
        """The password of an entry :meth:`lookup` found (by its own key)."""
        check_password_not_empty(password)
        entry = self._load().get(identity.username)
        hashed = str(entry.get("password", "")) if entry else ""
        if not hashed:
            raise UnknownUser(identity.username)
        try:
            self.hasher.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            raise InvalidCredentials(identity.username) from None
        return identity

    def group_members(self, group: str) -> list[str]:
        members = [u for u, e in self._load().items() if group in e.get("groups", [])]
        if not members:
            raise UnknownUser(f"no local users in group {group!r}")
        return sorted(members)

    def list_users(self) -> list[str]:
        return sorted(self._load())

    def entries(self) -> list[Identity]:
        """Every user of the file (name, groups, mail address), by name."""
        users = self._load()
        return [self._identity(name, users[name]) for name in sorted(users)]

    def delete(self, username: str) -> str:
        """Remove the user (any case or compatibility form of the name) from the
        file, replaced atomically; the file's own name for them. UnknownUser
        when there is none."""
        found = self._entry(username)
        if found is None:
            raise UnknownUser(username)
        name = found[0]
        users = {u: dict(e) for u, e in self._load().items() if u != name}
        self._write_all(users)
        return name

    def ping(self) -> None:
        self._load()

    def close(self) -> None:
        pass

    def set_password(self, username: str, password: str, groups: list[str] | None = None,
                     email: str | None = None) -> None:
        """Write the user's argon2id hash (and groups, and mail address: "" removes
        it, None keeps it); the file is replaced atomically, mode 0600."""
        check_password_not_empty(password)
        users = {u: dict(e) for u, e in self._load().items()}
        entry = users.setdefault(username, {})
        entry["password"] = self.hasher.hash(password)
        self._write(users, username, groups, email)

    def update(self, username: str, groups: list[str] | None = None,
               email: str | None = None) -> None:
        """Change an existing user's groups or mail address, keeping the password."""
        users = {u: dict(e) for u, e in self._load().items()}
        if username not in users:
            raise UnknownUser(username)
        self._write(users, username, groups, email)

    def _write(self, users: dict[str, dict[str, Any]], username: str,
               groups: list[str] | None, email: str | None) -> None:
        entry = users[username]
        if groups is not None:
            entry["groups"] = groups
        if email is not None:
            if any(ord(c) < 0x20 or c in '"\\' for c in email):
                raise ValueError("a mail address has no control characters, quotes or "
                                 "backslashes")
            if email:
                entry["email"] = email
            else:
                entry.pop("email", None)
        self._write_all(users)

    def _write_all(self, users: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(HEADER + _dump(users))
        os.replace(tmp, self.path)


def _fold(name: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold()).strip()


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dump(users: dict[str, dict[str, Any]]) -> str:
    out = []
    for name in sorted(users):
        entry = users[name]
        out.append(f"\n[users.{_quote(name)}]")
        out.append(f"password = {_quote(str(entry.get('password', '')))}")
        groups = entry.get("groups")
        if groups:
            out.append("groups = [" + ", ".join(_quote(str(g)) for g in groups) + "]")
        if entry.get("email"):
            out.append(f"email = {_quote(str(entry['email']))}")
    return "\n".join(out) + "\n"
