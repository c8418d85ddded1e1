"""Running the proxy as an operations team does: JSON logs, SIGTERM drains, SIGHUP
reloads.  The real `serve` (the test slapd as the directory), real clients."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    ids = [o["request_id"] for o in decisions]  # one per attempt, the front-end's or the core's
    assert all(isinstance(i, str) and i and i != "-" for i in ids) and len(set(ids)) == len(ids)
    assert any(o.get("user", "").startswith("carol\\nFORGED") for o in objects)
    text = "\n".join(lines)
    for secret in used:
        assert not re.search(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])", text), \
            f"{secret!r} is in the log"


# ---------------------------------------------------------------- SIGTERM: drain


class SlowRelay:
    """A TCP relay to slapd whose answers wait ``delay`` seconds each (0: none):
    a directory that is slow on demand, so a decision is in flight long enough
    to send a signal meanwhile. Threads; bounded; closed by :meth:`close`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if slow and self.delay:
                    time.sleep(self.delay)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def relay(slapd: Slapd) -> Iterator[SlowRelay]:
    r = SlowRelay(slapd.port)
    yield r
    r.close()


def sigterm(proxy: ProxyProcess) -> subprocess.Popen[bytes]:
    """SIGTERM by PID; the process, now the test's to wait for."""
    proc = proxy.proc
    assert proc is not None and proc.poll() is None
    proxy.proc = None
    proc.send_signal(signal.SIGTERM)
    return proc


def in_background(f: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = f(*args)
        except Exception as e:  # noqa: BLE001 - reported by the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_sigterm_drains_answers_in_flight_refuses_new_and_closes_ldap(
        tmp_path: Path, slapd: Slapd, relay: SlowRelay) -> None:
    from tests.integration.ldapwire import RawSession

    proxy = ProxyProcess.configure(
        tmp_path, slapd, clients=[{"name": "vpn", "address": "127.0.0.1/32"}],
        ldap={"upstream": slapd.url, "unbound_timeout": 0},
        directory={"urls": [relay.url], "timeout": 10.0},
        overrides={"service": {"shutdown_grace_seconds": 20}, "totp": {"window": 2}})
    proxy.cli("user", "enroll", "carol", "--secret", SECRET)
    proxy.start()
    try:
        session = RawSession(proxy.ldap_port)
        relay.delay = 1.5  # each directory answer: a sign-in takes a few seconds now
        nas = pyrad_client(proxy)
        thread, answer = in_background(pyrad_auth, nas, "carol",
                                       f"{user_password('carol')},{code()}")
        wait_for(lambda: proxy.metrics().value("mfa_proxy_directory_seconds_count") >= 1
                 or "value" in answer)
        assert "value" not in answer, "the sign-in was not slow enough to be in flight"
        started = time.monotonic()
        proc = sigterm(proxy)
        wait_for(lambda: proxy.get("/readyz", timeout=2)[0] == 503, timeout=5)
        status, body = proxy.get("/readyz")
        assert status == 503 and "shutting down" in body
        late = pyrad_client(proxy, timeout=2.0)
        from pyrad.client import Timeout

        with pytest.raises(Timeout):
            pyrad_auth(late, "erin", user_password("erin"))  # new: no answer, fail over
        thread.join(30)
        assert answer.get("value") is not None and answer["value"].code == ACCESS_ACCEPT
        session.wait_closed()  # the open LDAP session is closed by the proxy...
        assert session.notice is not None and session.notice.code == 52, (
            session.received, proxy.log_tail())
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 20
    finally:
        relay.delay = 0
        if proxy.proc is not None:
            proxy.stop()
    rows = json.loads(proxy.cli("audit", "--json", "--user", "carol").stdout)
    assert (rows["result"], rows["reason"]) == ("accept", "ok")
    assert "drained in" in proxy.log_tail()


def test_the_grace_period_bounds_the_drain(tmp_path: Path, slapd: Slapd,
                                           relay: SlowRelay) -> None:
    proxy = ProxyProcess.configure(
        tmp_path, slapd, clients=[{"name": "vpn", "address": "127.0.0.1/32"}],
        directory={"urls": [relay.url], "timeout": 30.0},
        overrides={"service": {"shutdown_grace_seconds": 1}})
    proxy.start()
    relay.delay = 8.0
    nas = pyrad_client(proxy, timeout=20)
    _, answer = in_background(pyrad_auth, nas, "erin", user_password("erin"))
    time.sleep(0.5)
    started = time.monotonic()
    proc = sigterm(proxy)
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 6  # grace 1 s + stopping, not the 8 s answer
    assert "still in flight" in proxy.log_tail()
    relay.delay = 0


def test_sigterm_under_load_every_answer_has_its_audit_row(tmp_path: Path,
                                                           slapd: Slapd) -> None:
    proxy = ProxyProcess.configure(tmp_path, slapd,
                                   clients=[{"name": "vpn", "address": "127.0.0.1/32"}])
    users = ("erin", "frank", "grace", "heidi")
    answered: dict[str, int] = dict.fromkeys(users, 0)
    stop = threading.Event()

    def sign_in(user: str) -> None:
        nas = pyrad_client(proxy, timeout=3.0)
        for _ in range(2000):  # bounded
            if stop.is_set():
                return
            try:
                reply = pyrad_auth(nas, user, user_password(user))
            except Exception:  # no answer: the proxy is draining or gone
                return
            assert reply.code == ACCESS_ACCEPT
            answered[user] += 1

    proxy.start()
    threads = [threading.Thread(target=sign_in, args=(u,), daemon=True) for u in users]
    for t in threads:
        t.start()
    wait_for(lambda: sum(answered.values()) >= 40, timeout=30)
    proc = sigterm(proxy)
    assert proc.wait(timeout=30) == 0
    stop.set()
    for t in threads:
        t.join(10)
    rows = [json.loads(line) for line in
            proxy.cli("audit", "--json", "--limit", "0").stdout.splitlines()]
    for user in users:
        assert sum(1 for r in rows if r["user"] == user) == answered[user], user


# ---------------------------------------------------------------- SIGHUP: reload


def sighup_and_wait(proxy: ProxyProcess, result: str) -> None:
    """SIGHUP by PID; returns once the reload is counted with ``result``."""
    before = proxy.metrics().value("mfa_proxy_config_reloads_total", result=result)
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: proxy.metrics().value("mfa_proxy_config_reloads_total",
                                           result=result) > before)


@pytest.fixture
def two_clients(tmp_path: Path, slapd: Slapd) -> Iterator[ProxyProcess]:
    """"vpn" (127.0.0.1) carries the load; "wifi" (127.0.0.2) gets a new secret."""
    proxy = ProxyProcess.configure(
        tmp_path, slapd, clients=[{"name": "vpn", "address": "127.0.0.1/32"},
                                  {"name": "wifi", "address": "127.0.0.2/32"}],
        ldap={"upstream": slapd.url}, overrides={"policy": {"max_failures": 5}})
    with proxy.running():
        yield proxy


def test_sighup_under_load_swaps_secret_and_policy_without_dropping(
        two_clients: ProxyProcess) -> None:
    from pyrad.client import Timeout

    proxy = two_clients
    old_wifi = pyrad_client(proxy, "wifi", source="127.0.0.2", timeout=2.0)
    assert pyrad_auth(old_wifi, "erin", user_password("erin")).code == ACCESS_ACCEPT
    ldap = ldap_connection(proxy, "erin", user_password("erin"))
    assert ldap.bind()

    answered: dict[str, int] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def load(user: str) -> None:
        nas = pyrad_client(proxy, "vpn", timeout=10.0)
        answered[user] = 0
        for _ in range(5000):  # bounded
            if stop.is_set():
                return
            try:
                assert pyrad_auth(nas, user, user_password(user)).code == ACCESS_ACCEPT
            except BaseException as e:  # noqa: BLE001 - a dropped request fails the test
                errors.append(e)
                return
            answered[user] += 1

    threads = [threading.Thread(target=load, args=(u,), daemon=True)
               for u in ("frank", "grace", "heidi")]
    for t in threads:
        t.start()
    wait_for(lambda: sum(answered.values()) >= 20, timeout=30)
    proxy.doc["radius"]["clients"][1]["secret"] = "wifi-new-shared-secret-0123456789"
    proxy.doc["policy"]["max_failures"] = 2
    proxy.doc["ldap"]["exempt"] = [f"cn=svc,ou=services,{user_dn('x').split(',', 2)[2]}"]
    proxy.write_config()
    sighup_and_wait(proxy, "success")
    time.sleep(1.0)  # the load goes on after the reload
    stop.set()
    for t in threads:
        t.join(30)
    assert errors == []
    assert all(n > 0 for n in answered.values())

    with pytest.raises(Timeout):  # the old secret: dropped (bad Message-Authenticator)
        pyrad_auth(old_wifi, "erin", user_password("erin"))
    new_wifi = pyrad_client(proxy, "wifi", source="127.0.0.2", timeout=5.0)
    assert pyrad_auth(new_wifi, "erin", user_password("erin")).code == ACCESS_ACCEPT

    # the new policy: 2 failures lock
    for _ in range(2):
        assert pyrad_auth(new_wifi, "ivan", "wrong").code == ACCESS_REJECT
    assert proxy.user("ivan")["locked"] is True

    # the LDAP session bound before the reload is still bound as erin
    assert ldap.extend.standard.who_am_i() == f"dn:{user_dn('erin')}"
    ldap.unbind()

    # no request decided twice: one audit row per answer
    rows = [json.loads(line) for line in
            proxy.cli("audit", "--json", "--client", "vpn", "--limit", "0").stdout.splitlines()]
    for user, count in answered.items():
        assert sum(1 for r in rows if r["user"] == user) == count, user
    assert "config reloaded" in proxy.log_tail()


def test_a_broken_config_on_sighup_keeps_the_old_one(two_clients: ProxyProcess) -> None:
    proxy = two_clients
    good = proxy.config_path.read_text()
    proxy.config_path.write_text(good.replace("max_failures = 5", 'max_failures = "lots"')
                                 .replace('name = "wifi"', 'name = "vpn"'))
    sighup_and_wait(proxy, "failure")
    log = proxy.log_tail()
    assert "reload refused, the running config is kept: policy.max_failures" in log
    assert "duplicate client name 'vpn'" in log
    assert proxy.get("/readyz")[0] == 200
    wifi = pyrad_client(proxy, "wifi", source="127.0.0.2", timeout=5.0)
    assert pyrad_auth(wifi, "erin", user_password("erin")).code == ACCESS_ACCEPT
    for _ in range(3):  # still max_failures = 5
        assert pyrad_auth(wifi, "judy", "wrong").code == ACCESS_REJECT
    proxy.config_path.write_text(good)  # for the CLI; not reloaded
    assert proxy.user("judy")["locked"] is False
    proxy.config_path.write_text("not [valid toml")
    sighup_and_wait(proxy, "failure")
    assert "not valid TOML" in proxy.log_tail()
    proxy.config_path.write_text(good)
    m = proxy.metrics()
    assert m.value("mfa_proxy_config_reloads_total", result="success") == 0
    assert m.value("mfa_proxy_config_last_reload_timestamp_seconds") > 0


def test_sighup_swaps_the_directory_without_a_restart(tmp_path: Path, slapd: Slapd) -> None:
    """[directory] reloads (and the portal's session_minutes): a wrong service
    password is mended by SIGHUP; nothing waits for a restart."""
    proxy = ProxyProcess.configure(
        tmp_path, slapd, clients=[{"name": "vpn", "address": "127.0.0.1/32"}],
        ldap={"upstream": slapd.url}, directory={"bind_password": "not-the-password"},
        portal={"session_minutes": 15})
    proxy.start(ready=False)  # the directory refuses the service account: not ready
    try:
        assert proxy.get("/readyz")[0] == 503
        nas = pyrad_client(proxy, "vpn")
        refused = pyrad_auth(nas, "erin", user_password("erin"))
        assert refused.code == ACCESS_REJECT
        rows = [json.loads(line) for line in
                proxy.cli("audit", "--json", "--limit", "1").stdout.splitlines()]
        assert rows[0]["reason"] == "directory_unavailable"
        proxy.doc["directory"]["bind_password"] = slapd.svc_password
        proxy.doc["directory"]["timeout"] = 4.0
        proxy.doc["portal"]["session_minutes"] = 5  # swapped in too
        proxy.write_config()
        sighup_and_wait(proxy, "success")
        assert pyrad_auth(nas, "erin", user_password("erin")).code == ACCESS_ACCEPT
        wait_for(lambda: "the directory answers" in proxy.log_tail())
        tail = proxy.log_tail()
        assert "the directory settings changed: next sign-ins use the new ones" in tail
        assert "wait for a restart" not in tail and "directory." not in tail
        wait_for(lambda: proxy.get("/readyz")[0] == 200)
    finally:
        proxy.stop()


def test_sighup_says_which_changes_need_a_restart(two_clients: ProxyProcess) -> None:
    proxy = two_clients
    proxy.doc["logging"] = {"level": "debug", "format": "json"}
    old_ldap = proxy.doc["ldap"]["listen"]
    proxy.doc["ldap"]["listen"] = ["127.0.0.1:1"]
    proxy.doc["radius"]["challenge_timeout"] = 60
    proxy.write_config()
    proxy.doc["ldap"]["listen"] = old_ldap  # what really listens
    sighup_and_wait(proxy, "success")
    wait_for(lambda: "2 change(s) wait for a restart" in proxy.log_tail())
    tail = proxy.log_tail()
    assert "ldap.listen changed: takes effect only after a restart" in tail
    assert "radius.challenge_timeout changed" in tail
    last = [line for line in tail.splitlines() if "config reloaded" in line][-1]
    assert json.loads(last)["event"] == "reload"  # the new log format, at once
    assert proxy.get("/readyz")[0] == 200


# ---------------------------------------------------------------- shipped monitoring


def test_the_dashboard_and_alerts_query_what_a_running_serve_exports(
        two_clients: ProxyProcess) -> None:
    from tests.unit.test_shipped_conf import METRIC, RULES, dashboard_queries, exported_names

    proxy = two_clients
    nas = pyrad_client(proxy, "vpn")
    assert pyrad_auth(nas, "erin", user_password("erin")).code == ACCESS_ACCEPT
    status, body = proxy.get("/metrics")
    assert status == 200
    exported = exported_names(body)
    used = {m for q in dashboard_queries() for m in METRIC.findall(q)}
    used |= set(METRIC.findall(RULES.read_text()))
    assert len(used) >= 15
    assert used - exported == set()
    assert 'mfa_proxy_config_reloads_total{result="failure"} 0.0' in body
    assert 'mfa_proxy_users_enrollment_ending{within="3d"}' in body
