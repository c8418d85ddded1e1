"""End to end, the deployment cases: directory failover and outage, and two
proxy instances sharing one state store (idempotent success across them).

Each test starts its own ``mfa-proxy serve`` process(es): they need a private
slapd they may stop, or a second instance.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from typing import Any

import pyotp
import pytest

from tests.integration.proxyproc import ProxyProcess, pyrad_auth, pyrad_client
from tests.integration.slapd import Slapd, free_port, user_password

ACCESS_ACCEPT, ACCESS_REJECT = 2, 3
OUTAGE_BOUND = 20.0  # seconds: generous; (connect_timeout + timeout) x URLs is 6 s here
RECOVERY_BOUND = 30.0


def totp_secret(name: str) -> str:
    return base64.b32encode(hashlib.sha1(name.encode()).digest()).decode()  # noqa: S324


def code(name: str) -> str:
    return pyotp.TOTP(totp_secret(name)).now()


def enroll(proxy: ProxyProcess, *names: str) -> None:
    """All in one `user import` (one CLI start instead of one per user)."""
    csv = proxy.workdir / "users.csv"
    csv.write_text("".join(f"{n},{totp_secret(n)}\n" for n in names))
    proxy.cli("user", "import", str(csv))


def requests(proxy: ProxyProcess, **labels: str) -> float:
    return proxy.metrics().value("mfa_proxy_requests_total", **labels)


# --- failover and outage ---------------------------------------------------------------


def test_directory_failover_outage_and_recovery(slapd_fresh: Slapd, tmp_path: Path) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}"  # nothing listens there
    proxy = ProxyProcess.configure(
        tmp_path, slapd_fresh, clients=[{"name": "vpn", "address": "127.0.0.1/32"}],
        directory={"urls": [dead, slapd_fresh.url], "connect_timeout": 1.0, "timeout": 2.0})
    enroll(proxy, "alice", "bob", "carol")
    with proxy.running():
        nas = pyrad_client(proxy)
        # the first URL is dead: the second one answers
        assert pyrad_auth(nas, "alice", f"alice-pw,{code('alice')}").code == ACCESS_ACCEPT
        # a failure before the outage, to see that the outage does not add to it
        assert pyrad_auth(nas, "bob", f"wrong,{code('bob')}").code == ACCESS_REJECT
        assert proxy.user("bob")["failures"] == 1

        slapd_fresh.stop()
        before = requests(proxy, reason="directory_unavailable")
        started = time.monotonic()
        for password in (f"bob-pw,{code('bob')}", f"wrong,{code('bob')}"):
            assert pyrad_auth(nas, "bob", password).code == ACCESS_REJECT
        assert time.monotonic() - started < 2 * OUTAGE_BOUND
        assert requests(proxy, reason="directory_unavailable") == before + 2
        assert requests(proxy, client="vpn", result="reject",
                        reason="directory_unavailable") == before + 2
        assert proxy.metrics().value("mfa_proxy_directory_errors_total") >= 2
        status, body = proxy.get("/readyz")
        assert status == 503 and "directory" in body
        assert proxy.get("/healthz")[0] == 200
        assert proxy.alive

        slapd_fresh.start()  # same ports, same data
        deadline = time.monotonic() + RECOVERY_BOUND
        while proxy.get("/readyz")[0] != 200:
            assert time.monotonic() < deadline, "not ready again after slapd came back"
            time.sleep(0.1)
        assert proxy.user("bob")["failures"] == 1  # the outage was not bob's failure
        assert pyrad_auth(nas, "carol", f"carol-pw,{code('carol')}").code == ACCESS_ACCEPT
        assert pyrad_auth(nas, "bob", f"bob-pw,{code('bob')}").code == ACCESS_ACCEPT
        assert proxy.user("bob")["failures"] == 0


# --- two instances, one state ----------------------------------------------------------


@pytest.fixture
def two_instances(slapd: Slapd, tmp_path: Path) -> tuple[ProxyProcess, ProxyProcess]:
    """A and B share one SQLite state file and key file; each has the same two
    clients: "window" (127.0.0.1, repeat_window_seconds = 30) and "strict"
    (127.0.0.2, no window)."""
    clients: list[dict[str, Any]] = [
        {"name": "window", "address": "127.0.0.1/32", "mode": "append",
         "repeat_window_seconds": 30, "secret": "window-secret-0123456789abcdef"},
        {"name": "strict", "address": "127.0.0.2/32", "mode": "append",
         "secret": "strict-secret-0123456789abcdef"},
    ]
    a = ProxyProcess.configure(tmp_path / "a", slapd, clients=clients)
    b = ProxyProcess.configure(tmp_path / "b", slapd, clients=clients, state_url=a.state_url,
                               key_file=a.key_file)
    return a, b


def test_idempotent_success_across_two_instances_only_with_a_window(
        two_instances: tuple[ProxyProcess, ProxyProcess]) -> None:
    a, b = two_instances
    enroll(a, "user00501", "user00502")
    with a.running(), b.running():
        # with the window: the same user, password and code, a new request to B
        field = f"{user_password('user00501')},{code('user00501')}"
        on_a, on_b = pyrad_client(a, "window"), pyrad_client(b, "window")
        assert pyrad_auth(on_a, "user00501", field).code == ACCESS_ACCEPT
        assert pyrad_auth(on_b, "user00501", field).code == ACCESS_ACCEPT
        assert requests(b, client="window", result="accept", reason="repeat") == 1
        # but not with another password around the same code
        assert pyrad_auth(on_b, "user00501", f"wrong,{code('user00501')}").code == ACCESS_REJECT

        # without the window (the default), a reused code is refused on the other instance
        field = f"{user_password('user00502')},{code('user00502')}"
        on_a, on_b = (pyrad_client(a, "strict", "127.0.0.2"),
                      pyrad_client(b, "strict", "127.0.0.2"))
        assert pyrad_auth(on_a, "user00502", field).code == ACCESS_ACCEPT
        assert pyrad_auth(on_b, "user00502", field).code == ACCESS_REJECT
        assert requests(b, client="strict", result="reject", reason="replayed_code") == 1


# --- two instances, one PostgreSQL state --------------------------------------------------


def test_two_instances_on_postgresql_share_codes_and_failures(
        slapd: Slapd, tmp_path: Path, postgres: Any) -> None:
    """The deployment PostgreSQL is for: `db upgrade`, then two `serve` processes on one
    database. A code accepted by one is a replay on the other; failures on both count
    towards one lockout."""
    url = postgres.new_database("two_instances")
    clients = [{"name": "vpn", "address": "127.0.0.1/32", "mode": "append"}]
    a = ProxyProcess.configure(tmp_path / "a", slapd, clients=clients, state_url=url,
                               overrides={"policy": {"max_failures": 4}})
    b = ProxyProcess.configure(tmp_path / "b", slapd, clients=clients, state_url=url,
                               key_file=a.key_file, overrides={"policy": {"max_failures": 4}})
    upgraded = a.cli("db", "upgrade")
    assert "revision" in upgraded.stdout
    enroll(a, "user00601", "user00602")
    with a.running(), b.running():
        on_a, on_b = pyrad_client(a, "vpn"), pyrad_client(b, "vpn")
        field = f"{user_password('user00601')},{code('user00601')}"
        assert pyrad_auth(on_a, "user00601", field).code == ACCESS_ACCEPT
        assert pyrad_auth(on_b, "user00601", field).code == ACCESS_REJECT
        assert requests(b, client="vpn", result="reject", reason="replayed_code") == 1

        for nas in (on_a, on_b, on_a, on_b):
            assert pyrad_auth(nas, "user00602", f"wrong,{code('user00602')}").code \
                == ACCESS_REJECT
        view = b.user("user00602")
        assert (view["failures"], view["locked"]) == (4, True)
        good = f"{user_password('user00602')},{code('user00602')}"
        assert pyrad_auth(on_a, "user00602", good).code == ACCESS_REJECT  # locked on A too
