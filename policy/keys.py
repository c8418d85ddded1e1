"""TOTP keys at rest: AES-256-GCM under a versioned key ring.

The key file holds every key version ever made (``version:base64key`` lines)
and marks the current one; rotation adds a version and re-encrypts, and older
versions stay readable so running instances keep working mid-rotation. A
ciphertext is bound to its username (associated data), so rows cannot be
swapped between users in the database.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import secrets
import struct
import threading
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("mfa_proxy.keys")
_HEADER = struct.Struct(">BI")  # format byte, key version
_FORMAT = 1


class KeyFileError(Exception):
    pass


class KeyRing:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._keys: dict[int, bytes] = {}
        self._ciphers: dict[int, AESGCM] = {}
        self.current = 0
        self._load(create=True)

    def _load(self, create: bool) -> None:
        if not self.path.exists():
            if not create:
                raise KeyFileError(f"{self.path}: missing")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # another process may make it first: then read theirs
            with contextlib.suppress(FileExistsError):
                _write_new(self.path, {1: AESGCM.generate_key(256)}, 1)
        keys, current = _parse(self.path)
        if self.path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users: chmod 600 it", self.path)
        with self._lock:
            self._keys, self.current = keys, current
            self._ciphers = {}

    def encrypt(self, plaintext: bytes, username: str) -> bytes:
        version = self.current
        nonce = secrets.token_bytes(12)
        ct = self._cipher(version).encrypt(nonce, plaintext, username.encode())
        return _HEADER.pack(_FORMAT, version) + nonce + ct

    def decrypt(self, blob: bytes, username: str) -> bytes:
        fmt, version = _HEADER.unpack_from(blob)
        if fmt != _FORMAT:
            raise KeyFileError(f"unknown ciphertext format {fmt}")
        if version not in self._keys:
            self._load(create=False)  # rotated by another process since we started
            if version not in self._keys:
                raise KeyFileError(f"{self.path}: no key version {version}")
        nonce, ct = blob[_HEADER.size:_HEADER.size + 12], blob[_HEADER.size + 12:]
        return self._cipher(version).decrypt(nonce, ct, username.encode())

    def _cipher(self, version: int) -> AESGCM:
        cipher = self._ciphers.get(version)
        if cipher is None:
            cipher = self._ciphers[version] = AESGCM(self._keys[version])
        return cipher

    def derive(self, purpose: bytes) -> bytes:
        """A stable sub-key for keyed hashes shared by every instance (the oldest
        version never changes, so rotation does not invalidate them)."""
        import hashlib
        import hmac

        return hmac.new(self._keys[min(self._keys)], purpose, hashlib.sha256).digest()

    @staticmethod
    def version_of(blob: bytes) -> int:
        version: int = _HEADER.unpack_from(blob)[1]
        return version

    def add_version(self) -> int:
        """Make a new current key version (written atomically); return it."""
        keys, _ = _parse(self.path)
        new = max(keys) + 1
        keys[new] = AESGCM.generate_key(256)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        _write_new(tmp, keys, new)
        os.replace(tmp, self.path)
        self._load(create=False)
        return new


def _write_new(path: Path, keys: dict[int, bytes], current: int) -> None:
    lines = ["# mfa-proxy key file: encrypts TOTP keys at rest. Keep it secret; back it up",
             "# with the database. Never delete old versions.", f"current = {current}"]
    lines += [f"{v} = {base64.b64encode(k).decode()}" for v, k in sorted(keys.items())]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _parse(path: Path) -> tuple[dict[int, bytes], int]:
    try:
        text = path.read_text(encoding="ascii")
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror}") from None
    keys: dict[int, bytes] = {}
    current = 0
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = (p.strip() for p in line.partition("="))
        try:
            if name == "current":
                current = int(value)
            else:
                keys[int(name)] = base64.b64decode(value, validate=True)
        except ValueError:
            raise KeyFileError(f"{path}: line {n} is not 'version = base64key'") from None
        if name != "current" and len(keys[int(name)]) != 32:
            raise KeyFileError(f"{path}: line {n}: key is not 256 bits")
    if current not in keys:
        raise KeyFileError(f"{path}: current key version {current} is not in the file")
    return keys, current
