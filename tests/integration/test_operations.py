"""Running the proxy as an operations team does: JSON logs, SIGTERM drains, SIGHUP
reloads.  The real `serve` (the test slapd as the directory), real clients."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import ldap3
import pyotp
import pytest

from tests.integration.proxyproc import ProxyProcess, pyrad_auth, pyrad_client
from tests.integration.slapd import Slapd, user_dn, user_password

pytestmark = pytest.mark.timeout(240)

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
ACCESS_ACCEPT, ACCESS_REJECT = 2, 3


def code(offset_steps: int = 0) -> str:
    return pyotp.TOTP(SECRET).at(time.time() + 30 * offset_steps)


def ldap_connection(proxy: ProxyProcess, name: str, password: str) -> ldap3.Connection:
    server = ldap3.Server("127.0.0.1", port=proxy.ldap_port, connect_timeout=10)
    return ldap3.Connection(server, user_dn(name), password, receive_timeout=15)


def log_lines(proxy: ProxyProcess) -> list[str]:
    return proxy.log_path.read_text(errors="replace").splitlines()


# ---------------------------------------------------------------- JSON logs


def test_json_logs_parse_and_carry_no_password_or_code(tmp_path: Path, slapd: Slapd) -> None:
    proxy = ProxyProcess.configure(
        tmp_path, slapd, clients=[{"name": "vpn", "address": "127.0.0.1/32"}], ldap={},
        overrides={"logging": {"format": "json", "decisions": "all"},
                   "totp": {"window": 2}})
    proxy.cli("user", "enroll", "carol", "--secret", SECRET)
    used: list[str] = [SECRET, proxy.client_secret().decode()]
    with proxy.running():
        nas = pyrad_client(proxy)
        good, later = code(), code(1)
        used += [good, later, user_password("carol"), user_password("erin"), "wrong-pass"]
        assert pyrad_auth(nas, "carol", f"{user_password('carol')},{good}").code == \
            ACCESS_ACCEPT
        assert pyrad_auth(nas, "carol", f"wrong-pass,{later}").code == ACCESS_REJECT
        assert pyrad_auth(nas, "carol\nFORGED", "x").code == ACCESS_REJECT
        conn = ldap_connection(proxy, "erin", user_password("erin"))
        assert conn.bind()
        conn.unbind()
        assert not ldap_connection(proxy, "carol", f"{user_password('carol')},000000").bind()
        used.append("000000")
    lines = log_lines(proxy)
    objects = [json.loads(line) for line in lines]  # every line is one JSON object
    for obj in objects:
        assert {"time", "level", "logger", "event", "message"} <= set(obj)
    decisions = [o for o in objects if o["event"] == "decision"]
    assert {(o["user"], o["protocol"], o["result"], o["reason"]) for o in decisions} >= {
        ("carol", "radius", "accept", "ok"), ("carol", "radius", "reject", "bad_password"),
        ("erin", "ldap", "accept", "not_required"), ("carol", "ldap", "reject", "bad_code")}
    assert all(isinstance(o["latency_ms"], float) for o in decisions)
    assert any(o.get("user", "").startswith("carol\\nFORGED") for o in objects)
    text = "\n".join(lines)
    for secret in used:
        assert not re.search(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])", text), \
            f"{secret!r} is in the log"
