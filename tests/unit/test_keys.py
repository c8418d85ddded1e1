"""TOTP keys at rest: AES-GCM under a versioned key ring bound to the username."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from policy.keys import KeyFileError, KeyRing

PLAIN = b"JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_created_0600_in_a_new_folder(tmp_path: Path) -> None:
    path = tmp_path / "var" / "secret.key"
    ring = KeyRing(path)
    assert path.is_file()
    assert mode(path) == 0o600
    assert ring.current == 1


def test_existing_key_file_is_read_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    first = KeyRing(path)
    before = path.read_bytes()
    second = KeyRing(path)
    assert path.read_bytes() == before
    assert second.decrypt(first.encrypt(PLAIN, "alice"), "alice") == PLAIN


def test_ciphertext_is_not_the_plaintext_and_round_trips(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "k")
    blob = ring.encrypt(PLAIN, "alice")
    assert PLAIN not in blob
    assert PLAIN.lower() not in blob
    assert ring.decrypt(blob, "alice") == PLAIN


def test_same_plaintext_encrypts_differently_each_time(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "k")
    assert ring.encrypt(PLAIN, "alice") != ring.encrypt(PLAIN, "alice")


def test_ciphertext_is_bound_to_its_username(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "k")
    blob = ring.encrypt(PLAIN, "alice")
    with pytest.raises(InvalidTag):
        ring.decrypt(blob, "bob")
    with pytest.raises(InvalidTag):
        ring.decrypt(blob, "Alice")


def test_tampered_ciphertext_is_refused(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "k")
    blob = bytearray(ring.encrypt(PLAIN, "alice"))
    blob[-1] ^= 1
    with pytest.raises(InvalidTag):
        ring.decrypt(bytes(blob), "alice")


def test_another_key_file_cannot_decrypt(tmp_path: Path) -> None:
    blob = KeyRing(tmp_path / "a").encrypt(PLAIN, "alice")
    with pytest.raises(InvalidTag):
        KeyRing(tmp_path / "b").decrypt(blob, "alice")


def test_add_version_keeps_old_versions_readable(tmp_path: Path) -> None:
    path = tmp_path / "k"
    ring = KeyRing(path)
    old = ring.encrypt(PLAIN, "alice")
    assert ring.version_of(old) == 1
    assert ring.add_version() == 2
    assert ring.current == 2
    new = ring.encrypt(PLAIN, "alice")
    assert ring.version_of(new) == 2
    assert ring.decrypt(old, "alice") == PLAIN
    assert ring.decrypt(new, "alice") == PLAIN
    assert mode(path) == 0o600
    assert not path.with_name(path.name + ".tmp").exists()


def test_a_running_instance_reads_versions_added_by_another_process(tmp_path: Path) -> None:
    """Mid-rotation: the service started before `keys rotate` still decrypts
    rows the rotation has re-encrypted under the new version."""
    path = tmp_path / "k"
    running = KeyRing(path)
    rotator = KeyRing(path)
    rotator.add_version()
    rotated = rotator.encrypt(PLAIN, "alice")
    assert running.current == 1
    assert running.decrypt(rotated, "alice") == PLAIN
    assert running.current == 2  # reloaded the file


def test_unknown_key_version_is_a_clear_error(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "k")
    blob = bytearray(ring.encrypt(PLAIN, "alice"))
    blob[1:5] = (99).to_bytes(4, "big")
    with pytest.raises(KeyFileError, match="no key version 99"):
        ring.decrypt(bytes(blob), "alice")


def test_derive_is_stable_across_rotation_and_instances(tmp_path: Path) -> None:
    path = tmp_path / "k"
    ring = KeyRing(path)
    before = ring.derive(b"repeat-window")
    ring.add_version()
    assert ring.derive(b"repeat-window") == before
    assert KeyRing(path).derive(b"repeat-window") == before
    assert ring.derive(b"other") != before


@pytest.mark.parametrize(("text", "message"), [
    ("current = 1\n1 = not-base64!\n", "line 2"),
    ("current = 2\n1 = " + "A" * 43 + "=\n", "current key version 2"),
    ("current = 1\n1 = QUJD\n", "not 256 bits"),
    ("garbage\n", "line 1 is not"),
    ("# only a comment\n", "current key version 0"),
])
def test_broken_key_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "k"
    path.write_text(text)
    with pytest.raises(KeyFileError, match=message):
        KeyRing(path)


def test_migrations_head_constant_matches_alembic() -> None:
    """policy.migrations.HEAD lets a current database skip loading Alembic; it
    must name the newest revision in versions/."""
    from policy.migrations import HEAD, head_revision

    assert head_revision() == HEAD
