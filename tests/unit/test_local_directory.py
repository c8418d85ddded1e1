"""The embedded directory: a TOML users file with argon2id hashes."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from backends.base import DirectoryUnavailable, Identity, InvalidCredentials, UnknownUser
from backends.local import LocalDirectory

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@pytest.fixture
def users(tmp_path: Path) -> LocalDirectory:
    return LocalDirectory(tmp_path / "var" / "users.toml", FAST)


def test_set_then_verify(users: LocalDirectory) -> None:
    users.set_password("alice", "correct horse", ["vpn-users", "admins"])
    assert users.verify("alice", "correct horse") == Identity(
        "alice", None, ("vpn-users", "admins"))


def test_wrong_password_is_invalid_credentials_not_unknown(users: LocalDirectory) -> None:
    users.set_password("alice", "correct horse")
    with pytest.raises(InvalidCredentials) as e:
        users.verify("alice", "wrong")
    assert not isinstance(e.value, UnknownUser)


def test_unknown_user(users: LocalDirectory) -> None:
    users.set_password("alice", "correct horse")
    with pytest.raises(UnknownUser):
        users.verify("bob", "correct horse")


def test_missing_file_means_no_users(users: LocalDirectory) -> None:
    assert not users.path.exists()
    with pytest.raises(UnknownUser):
        users.verify("alice", "x")
    assert users.lookup("alice") is None
    assert users.list_users() == []
    users.ping()  # an empty directory is a working one


def test_empty_password_is_refused_before_any_hash(users: LocalDirectory) -> None:
    users.set_password("alice", "correct horse")
    with pytest.raises(InvalidCredentials):
        users.verify("alice", "")
    with pytest.raises(InvalidCredentials):
        users.set_password("bob", "")


def test_file_is_private_and_holds_argon2id_hashes_only(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    LocalDirectory(path).set_password("alice", "correct horse")  # the default hasher
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "correct horse" not in text
    entry = tomllib.loads(text)["users"]["alice"]
    assert entry["password"].startswith("$argon2id$")
    assert LocalDirectory(path).verify("alice", "correct horse").username == "alice"


def test_changing_a_password(users: LocalDirectory) -> None:
    users.set_password("alice", "first", ["vpn-users"])
    users.set_password("alice", "second")
    assert users.verify("alice", "second").groups == ("vpn-users",)  # groups kept
    with pytest.raises(InvalidCredentials):
        users.verify("alice", "first")
    users.set_password("alice", "second", [])
    assert users.verify("alice", "second").groups == ()


def test_other_users_survive_a_write(users: LocalDirectory) -> None:
    users.set_password("alice", "a-pw", ["g"])
    users.set_password("bob", "b-pw")
    assert users.verify("alice", "a-pw").groups == ("g",)
    assert users.verify("bob", "b-pw").username == "bob"
    assert users.list_users() == ["alice", "bob"]
    assert not list(users.path.parent.glob(".*.tmp"))


def test_changes_by_another_process_are_seen_without_restart(users: LocalDirectory) -> None:
    users.set_password("alice", "old")
    assert users.verify("alice", "old")
    other = LocalDirectory(users.path, FAST)
    other.set_password("alice", "new")
    other.set_password("carol", "c-pw")
    # a different mtime, even within the same second (nanoseconds)
    st = users.path.stat()
    os.utime(users.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert users.verify("alice", "new")
    assert users.verify("carol", "c-pw")


@pytest.mark.parametrize("name", ["st*r(x)", 'quo"te', "back\\slash", "zoë", "dotted.name",
                                  "with space", "[users]"])
def test_names_that_need_quoting(users: LocalDirectory, name: str) -> None:
    users.set_password(name, "pw", [f"group {name}"])
    fresh = LocalDirectory(users.path, FAST)
    assert fresh.verify(name, "pw") == Identity(name, None, (f"group {name}",))
    assert fresh.list_users() == [name]


def test_passwords_with_any_characters(users: LocalDirectory) -> None:
    pw = 'p@ss "wörd" \\ , 123456 \t'
    users.set_password("alice", pw)
    assert users.verify("alice", pw)
    with pytest.raises(InvalidCredentials):
        users.verify("alice", pw.strip())


def test_lookup(users: LocalDirectory) -> None:
    users.set_password("alice", "pw", ["vpn-users"])
    assert users.lookup("alice") == Identity("alice", None, ("vpn-users",))
    assert users.lookup("bob") is None


def test_group_members(users: LocalDirectory) -> None:
    users.set_password("alice", "pw", ["vpn-users", "admins"])
    users.set_password("bob", "pw", ["vpn-users"])
    users.set_password("carol", "pw")
    assert users.group_members("vpn-users") == ["alice", "bob"]
    assert users.group_members("admins") == ["alice"]
    with pytest.raises(UnknownUser):
        users.group_members("nobody-here")


def test_hand_written_file(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    hashed = FAST.hash("pw")
    path.write_text(f'[users.alice]\npassword = "{hashed}"\ngroups = ["g"]\n'
                    '[users.nopass]\ngroups = ["g"]\n')
    d = LocalDirectory(path, FAST)
    assert d.verify("alice", "pw").groups == ("g",)
    with pytest.raises(InvalidCredentials):  # an entry without a password cannot sign in
        d.verify("nopass", "pw")
    with pytest.raises(InvalidCredentials):
        d.verify("nopass", "not a password")  # not even with the internal dummy's
    assert d.lookup("nopass") == Identity("nopass", None, ("g",))


def test_corrupt_file_is_unavailable_not_unknown(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text("[users.alice\n")
    d = LocalDirectory(path, FAST)
    with pytest.raises(DirectoryUnavailable):
        d.verify("alice", "pw")
    with pytest.raises(DirectoryUnavailable):
        d.ping()


def test_bad_hash_in_file_refuses(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text('[users.alice]\npassword = "plaintext-not-a-hash"\n')
    with pytest.raises(InvalidCredentials):
        LocalDirectory(path, FAST).verify("alice", "plaintext-not-a-hash")


def test_the_mail_address_is_kept_with_the_entry(users: LocalDirectory) -> None:
    users.set_password("alice", "correct horse", ["vpn"], "alice@example.org")
    found = users.lookup("ALICE")
    assert found is not None and found.mail == "alice@example.org"
    users.set_password("alice", "new horse")  # None: the address stays
    assert users.verify("alice", "new horse").mail == "alice@example.org"
    users.update("alice", email="a@example.org")  # the password stays
    assert users.verify("alice", "new horse").mail == "a@example.org"
    assert users.lookup("alice").groups == ("vpn",)  # type: ignore[union-attr]
    users.update("alice", email="")
    assert users.lookup("alice").mail is None  # type: ignore[union-attr]
    with pytest.raises(UnknownUser):
        users.update("bob", email="bob@example.org")
    with pytest.raises(ValueError):
        users.update("alice", email='x"\nevil = "1')
