"""`mfa-proxy audit` on rows written by real sign-ins: the real `serve` (RADIUS and
LDAP, the test slapd as the directory), real clients (pyrad, ldap3), then the CLI
with each filter, --json, and --follow as a subprocess.  The same queries on
PostgreSQL go through the store directly."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ldap3
import pyotp
import pytest

from policy.schema import AuditFilter, AuditRecord
from policy.store import Store
from tests.integration.proxyproc import MFA_PROXY, ProxyProcess, pyrad_auth, pyrad_client
from tests.integration.slapd import Slapd, user_dn, user_password

pytestmark = pytest.mark.timeout(180)

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
ACCESS_ACCEPT, ACCESS_REJECT = 2, 3


def code(offset_steps: int = 0) -> str:
    return pyotp.TOTP(SECRET).at(time.time() + 30 * offset_steps)


def ldap_bind(proxy: ProxyProcess, name: str, password: str) -> bool:
    server = ldap3.Server("127.0.0.1", port=proxy.ldap_port, connect_timeout=10)
    conn = ldap3.Connection(server, user_dn(name), password, receive_timeout=15)
    try:
        return bool(conn.bind())
    finally:
        conn.unbind()


@pytest.fixture(scope="module")
def signed_in(tmp_path_factory: pytest.TempPathFactory, slapd: Slapd
              ) -> Iterator[ProxyProcess]:
    """A proxy after: carol accepted over RADIUS (password and code), carol refused
    over RADIUS (bad password), dave refused over LDAP (bad code), erin accepted
    over LDAP (never required: password only)."""
    proxy = ProxyProcess.configure(tmp_path_factory.mktemp("audit"), slapd,
                                   clients=[{"name": "vpn", "address": "127.0.0.1/32"}],
                                   ldap={}, overrides={"totp": {"window": 2}})
    for user in ("carol", "dave"):
        proxy.cli("user", "enroll", user, "--secret", SECRET)
    with proxy.running():
        nas = pyrad_client(proxy)
        assert pyrad_auth(nas, "carol", f"{user_password('carol')},{code()}").code == \
            ACCESS_ACCEPT
        assert pyrad_auth(nas, "carol", f"wrong,{code(1)}").code == ACCESS_REJECT
        assert not ldap_bind(proxy, "dave", f"{user_password('dave')},000000")
        assert ldap_bind(proxy, "erin", user_password("erin"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(audit_json(proxy)) < 4:
            time.sleep(0.1)  # rows are flushed every 0.25 s
        yield proxy


def audit_json(proxy: ProxyProcess, *args: str) -> list[dict[str, Any]]:
    out = proxy.cli("audit", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


def who(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(r["user"], r["protocol"], r["reason"]) for r in rows]


def test_every_sign_in_has_a_row_newest_first(signed_in: ProxyProcess) -> None:
    rows = audit_json(signed_in)
    assert who(rows) == [("erin", "ldap", "not_required"), ("dave", "ldap", "bad_code"),
                         ("carol", "radius", "bad_password"), ("carol", "radius", "ok")]
    for row in rows:
        assert set(row) == {"time", "user", "protocol", "client", "source", "result",
                            "reason", "latency_ms"}
        assert row["source"] == "127.0.0.1"
        assert isinstance(row["latency_ms"], float) and 0 < row["latency_ms"] < 30_000
        assert row["time"].endswith("Z")
    assert {r["client"] for r in rows} == {"vpn", "ldap"}


def test_each_filter(signed_in: ProxyProcess) -> None:
    p = signed_in
    assert who(audit_json(p, "--user", "carol")) == [("carol", "radius", "bad_password"),
                                                      ("carol", "radius", "ok")]
    assert who(audit_json(p, "--user", "CAROL")) == who(audit_json(p, "--user", "carol"))
    assert who(audit_json(p, "--result", "accept")) == [("erin", "ldap", "not_required"),
                                                         ("carol", "radius", "ok")]
    assert who(audit_json(p, "--reason", "bad_code")) == [("dave", "ldap", "bad_code")]
    assert who(audit_json(p, "--protocol", "ldap")) == [("erin", "ldap", "not_required"),
                                                         ("dave", "ldap", "bad_code")]
    assert who(audit_json(p, "--client", "vpn", "--result", "reject")) == [
        ("carol", "radius", "bad_password")]
    assert len(audit_json(p, "--since", "1h")) == 4
    assert audit_json(p, "--until", "1h") == []
    assert audit_json(p, "--since", "2000-01-01", "--until", "2000-01-02T00:00:00Z") == []
    assert len(audit_json(p, "--since", "2000-01-01T00:00:00+00:00")) == 4
    assert who(audit_json(p, "--limit", "1")) == [("erin", "ldap", "not_required")]


def test_text_table_and_bad_usage(signed_in: ProxyProcess) -> None:
    out = signed_in.cli("audit", "--user", "dave").stdout.splitlines()
    assert out[0].split() == ["TIME", "USER", "PROTOCOL", "CLIENT", "SOURCE", "RESULT",
                              "REASON", "LATENCY"]
    assert len(out) == 2 and "dave" in out[1] and "bad_code" in out[1] and " ms" in out[1]
    for bad in (["--since", "yesterday"], ["--result", "maybe"], ["--limit", "-1"]):
        done = signed_in.cli("audit", *bad, check=False)
        assert done.returncode == 2, done.stderr
    assert "ISO 8601" in signed_in.cli("audit", "--since", "soon", check=False).stderr


def test_follow_prints_new_rows_as_they_come(signed_in: ProxyProcess) -> None:
    p = signed_in
    follower = subprocess.Popen(
        [MFA_PROXY, "audit", "--follow", "--json", "--user", "carol", "--limit", "1",
         "--interval", "0.2", "-c", str(p.config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())
        assert first["reason"] == "bad_password"
        nas = pyrad_client(p)
        assert pyrad_auth(nas, "carol", f"{user_password('carol')},{code(2)}").code == \
            ACCESS_ACCEPT
        assert pyrad_auth(nas, "frank", "whatever").code == ACCESS_REJECT  # not carol
        new = json.loads(follower.stdout.readline())  # bounded by the test's timeout
        assert (new["user"], new["result"], new["reason"]) == ("carol", "accept", "ok")
    finally:
        follower.terminate()  # by its own PID
        follower.wait(timeout=10)


@pytest.mark.postgres
def test_the_same_queries_on_postgresql(postgres: Any) -> None:
    store = Store(postgres.new_database("audit"))
    try:
        store.upgrade()
        t = time.time()
        store.hot.audit([AuditRecord(t - 10, "alice", "radius", "vpn", "10.0.0.1", "reject",
                                     "bad_code", 2.5),
                     AuditRecord(t, "alice", "ldap", "ldap", "127.0.0.1", "accept", "ok", 1.0),
                     AuditRecord(t, "bob", "radius", "vpn", "10.0.0.2", "accept", "ok")])
        rows = store.admin.query_audit(AuditFilter(username="alice"))
        assert [(r.record.protocol, r.record.latency_ms) for r in rows] == [
            ("ldap", 1.0), ("radius", 2.5)]
        assert [r.record.username for r in store.admin.query_audit(
            AuditFilter(result="accept", since=t - 1))] == ["bob", "alice"]
        assert store.admin.query_audit(AuditFilter(client="vpn", reason="ok"))[0].record.username \
            == "bob"
        rows = store.admin.query_audit(AuditFilter())
        assert store.admin.last_audit_id() == max(r.id for r in rows)
    finally:
        store.close()


def test_db_revision_has_the_audit_index(signed_in: ProxyProcess) -> None:
    from sqlalchemy import create_engine, inspect

    engine = create_engine(signed_in.state_url)
    try:
        indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes("audit")}
    finally:
        engine.dispose()
    assert indexes["ix_audit_user_time"] == ["username", "at", "id"]
    assert "ix_audit_username" not in indexes
    assert Path(signed_in.state_path).exists()
