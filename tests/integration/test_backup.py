"""`mfa-proxy db backup` while `serve` runs, a restore from it, the PostgreSQL
advice, and an upgrade that would be a downgrade (refused)."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pyotp
import pytest

from policy.migrations import HEAD
from tests.integration.proxyproc import ProxyProcess, pyrad_auth, pyrad_client
from tests.integration.slapd import Slapd, user_password

pytestmark = pytest.mark.timeout(180)

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
ACCESS_ACCEPT = 2


def test_online_backup_then_restore(tmp_path: Path, slapd: Slapd) -> None:
    proxy = ProxyProcess.configure(tmp_path / "run", slapd, overrides={"totp": {"window": 2}})
    proxy.cli("user", "enroll", "carol", "--secret", SECRET)
    backup = tmp_path / "backup.db"
    with proxy.running():
        nas = pyrad_client(proxy)
        totp = pyotp.TOTP(SECRET)
        assert pyrad_auth(nas, "carol", f"{user_password('carol')},{totp.now()}").code == \
            ACCESS_ACCEPT
        time.sleep(0.5)  # the audit row is flushed
        out = proxy.cli("db", "backup", str(backup)).stdout
        assert "1 user(s)" in out and "1 audit row(s)" in out and f"schema {HEAD}" in out
        assert str(proxy.key_file) in out  # keep it with the key file
        assert backup.stat().st_mode & 0o077 == 0
        refused = proxy.cli("db", "backup", str(backup), check=False)
        assert refused.returncode == 1 and "--force" in refused.stderr
        assert proxy.cli("db", "backup", str(backup), "--force").returncode == 0
        proxy.cli("user", "reset", "carol")  # after the backup: lost when restoring
    with sqlite3.connect(backup) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT username FROM users").fetchall() == [("carol",)]
    # restore: stopped, the backup (and the same key file) in place of the state
    for suffix in ("", "-wal", "-shm"):
        Path(f"{proxy.state_path}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, proxy.state_path)
    assert proxy.user("carol")["status"] == "enrolled"
    with proxy.running():
        nas = pyrad_client(proxy)
        code = pyotp.TOTP(SECRET).at(time.time() + 30)  # a step not used before
        assert pyrad_auth(nas, "carol", f"{user_password('carol')},{code}").code == \
            ACCESS_ACCEPT


def test_postgresql_backup_says_pg_dump_without_the_password(tmp_path: Path) -> None:
    config = tmp_path / "pg.toml"
    config.write_text(
        '[state]\nurl = "postgresql+psycopg://mfa:s3cret-pw@db.example:5432/mfa"\n'
        '[directory]\ntype = "local"\n')
    import subprocess

    from tests.integration.proxyproc import MFA_PROXY

    done = subprocess.run([MFA_PROXY, "db", "backup", "x.dump", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "pg_dump --format=custom --file=x.dump 'postgresql://mfa@db.example:5432/mfa'" \
        in done.stdout
    assert "s3cret-pw" not in done.stdout + done.stderr


def test_a_database_from_a_newer_version_is_not_downgraded(tmp_path: Path,
                                                           slapd: Slapd) -> None:
    proxy = ProxyProcess.configure(tmp_path, slapd)
    proxy.cli("db", "upgrade")
    with sqlite3.connect(proxy.state_path) as db:
        db.execute("UPDATE alembic_version SET version_num = '0099'")
    done = proxy.cli("db", "upgrade", check=False)
    assert done.returncode == 1
    assert "revision 0099, newer than this mfa-proxy knows" in done.stderr
    assert "downgrades are not supported" in done.stderr
    with pytest.raises(RuntimeError, match="newer than this mfa-proxy knows"):
        proxy.start()
