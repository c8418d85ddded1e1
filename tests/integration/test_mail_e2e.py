"""Mail end to end: the real ``mfa-proxy serve`` and CLI, the real slapd (the
address is its ``mail`` attribute), a real SMTP server (aiosmtpd) receiving.

- admin commands queue; serve sends: invitation (deadline as a date and in
  days, the portal's link), ``--no-mail``, extend/reset notices, the
  security notice of a key set up in the portal (with the client address);
- a user without an address: no mail, a failed row, the metric;
- ``mail test`` with STARTTLS and AUTH (certificate checked), refusals;
- a reminder exactly once with two serve instances on one PostgreSQL;
- SMTP down (hung) while ``user require`` runs: the mail waits, sign-ins do
  not; it goes out when the server is back;
- serve killed between claiming a mail and sending it: sent once after the
  restart, when the claim has run out.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyotp
import pytest

from tests.integration.portalclient import PortalClient
from tests.integration.proxyproc import ProxyProcess, pyrad_auth, pyrad_client
from tests.integration.slapd import Slapd, user_password
from tests.integration.smtpserver import Blackhole, SmtpServer, free_port

PUBLIC_URL = "https://mfa.example.org/"
FROM = "MFA <mfa@example.org>"
ACCESS_ACCEPT, ACCESS_CHALLENGE = 2, 11
FAST = {"poll_seconds": 0.5, "retry_seconds": 1, "timeout_seconds": 2.0, "claim_seconds": 6}


def mail_section(smtp: str, **more: object) -> dict[str, object]:
    return {"smtp": smtp, "security": "none", "from": FROM, **FAST, **more}


def date_in(days: int) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).strftime("%Y-%m-%d")


def queue(proxy: ProxyProcess, *options: str) -> list[dict[str, object]]:
    out = proxy.cli("mail", "queue", "--json", *options).stdout
    return [json.loads(line) for line in out.splitlines()]


def wait_until(check: object, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}")


@dataclass
class World:
    proxy: ProxyProcess
    smtp: SmtpServer

    def mails_to(self, user: str, count: int = 1) -> list[object]:
        wait_until(lambda: len(self.smtp.to(f"{user}@example.org")) >= count,
                   what=f"{count} mail(s) to {user}\n{self.proxy.log_tail()}")
        return list(self.smtp.to(f"{user}@example.org"))


@pytest.fixture(scope="module")
def world(slapd: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    smtp = SmtpServer.start_new()
    proxy = ProxyProcess.configure(
        tmp_path_factory.mktemp("mail-e2e"), slapd,
        clients=[{"name": "vpn", "address": "127.0.0.1/32"}],
        portal={"public_url": PUBLIC_URL},
        overrides={"mail": mail_section(smtp.address), "totp": {"issuer": "Example Corp"}})
    try:
        with proxy.running():
            yield World(proxy, smtp)
    finally:
        smtp.stop()


def test_require_sends_one_invitation_with_the_deadline_and_the_link(world: World) -> None:
    r = world.proxy.cli("user", "require", "alice", "--days", "5")
    assert r.stdout == ("alice: MFA required; enrollment period 5 days; invitation queued "
                        "for serve to send\n")
    [mail] = world.mails_to("alice")
    body = SmtpServer.body(mail)  # type: ignore[arg-type]
    assert date_in(5) in mail["Subject"]  # type: ignore[index]
    assert "alice" in body and "within 5 days" in body and date_in(5) in body
    assert PUBLIC_URL in body and "Example Corp" in body
    assert mail["From"] == FROM and mail["To"] == "alice@example.org"  # type: ignore[index]
    assert world.smtp.envelopes[-1][0] == "mfa@example.org"
    m = world.proxy.metrics()
    assert m.value("mfa_proxy_mail_sent_total", event="required") >= 1
    wait_until(lambda: not [q for q in queue(world.proxy) if q["user"] == "alice"],
               what="the outbox row marked sent")
    [row] = [q for q in queue(world.proxy, "--all") if q["user"] == "alice"]
    assert (row["status"], row["address"], row["attempts"]) == ("sent", "alice@example.org", 1)


def test_no_mail_sends_no_invitation(world: World) -> None:
    r = world.proxy.cli("user", "require", "bob", "--no-mail")
    assert r.stdout == "bob: MFA required; enrollment period 7 days\n"
    world.proxy.cli("user", "require", "carol")  # queued after bob's: sent once bob's would be
    world.mails_to("carol")
    time.sleep(1.0)  # a round more
    assert world.smtp.to("bob@example.org") == []
    assert not [q for q in queue(world.proxy, "--all") if q["user"] == "bob"]


def test_extend_and_reset_tell_the_new_deadline(world: World) -> None:
    world.proxy.cli("user", "require", "dave", "--no-mail")
    world.proxy.cli("user", "extend", "dave", "--days", "20")
    [extended] = world.mails_to("dave")
    assert date_in(20) in SmtpServer.body(extended) and "20 days" in SmtpServer.body(extended)  # type: ignore[arg-type]
    world.proxy.cli("user", "enroll", "dave")
    world.proxy.cli("user", "reset", "dave", "--days", "3")
    mails = world.mails_to("dave", 3)
    subjects = [m["Subject"] for m in mails]  # type: ignore[index]
    assert "Security notice" in subjects[1] and "reset" in subjects[2]
    notice = SmtpServer.body(mails[1])  # type: ignore[arg-type]
    assert "the command line on" in notice and "call your administrator" in notice
    assert date_in(3) in SmtpServer.body(mails[2]) and "3 days" in SmtpServer.body(mails[2])  # type: ignore[arg-type]


def test_a_key_set_up_in_the_portal_gets_a_security_notice(world: World) -> None:
    world.proxy.cli("user", "require", "erin", "--no-mail")
    web = PortalClient(world.proxy.portal_port)
    web.follow(web.login("erin", user_password("erin")))
    page = web.start_setup()
    key = web.secret(page)
    done = web.post("/setup", {"code": pyotp.TOTP(key).now()})
    assert done.status == 303, done.body
    [notice] = world.mails_to("erin")
    body = SmtpServer.body(notice)  # type: ignore[arg-type]
    assert "erin" in notice["Subject"] and "Security notice" in notice["Subject"]  # type: ignore[index]
    assert "the self-service portal, from 127.0.0.1" in body
    assert "If this was not you, call your administrator" in body
    assert dt.datetime.now(dt.UTC).strftime("%Y-%m-%d") in body


def test_an_unknown_address_is_a_failed_row_and_a_metric(world: World) -> None:
    before = world.proxy.metrics().value("mfa_proxy_mail_failed_total", reason="refused")
    world.smtp.reject.add("frank@example.org")
    world.proxy.cli("user", "require", "frank")
    wait_until(lambda: [q for q in queue(world.proxy) if q["user"] == "frank"
                        and q["status"] == "failed"], what="frank's mail failed")
    [row] = [q for q in queue(world.proxy) if q["user"] == "frank"]
    assert "550" in str(row["last_error"]) and row["attempts"] == 1  # permanent: not retried
    m = world.proxy.metrics()
    assert m.value("mfa_proxy_mail_failed_total", reason="refused") == before + 1


def test_mail_help_says_that_serve_sends(world: World) -> None:
    for command in (("user", "require", "--help"), ("user", "reset", "--help")):
        out = " ".join(world.proxy.cli(*command).stdout.split())
        assert "outbox" in out and "running `mfa-proxy serve` sends it" in out


# -- a user without an address (the local users file) --------------------------------------


def test_a_user_without_an_address_gets_no_mail_and_is_counted(tmp_path: Path) -> None:
    smtp = SmtpServer.start_new()
    try:
        proxy = ProxyProcess.configure(
            tmp_path, directory={"type": "local", "users_file": str(tmp_path / "users.toml")},
            overrides={"mail": mail_section(smtp.address)})
        proxy.cli("local-user", "set", "amy", "--email", "amy@example.org", input="amy-pw\n")
        proxy.cli("local-user", "set", "ben", input="ben-pw\n")
        assert proxy.cli("local-user", "set", "ben", "--email", "not an address",
                         check=False).returncode == 1
        assert "--email" in proxy.cli("local-user", "set", "--help").stdout
        r = proxy.cli("user", "require", "ben")  # no address: no error for the admin
        assert r.returncode == 0
        proxy.cli("user", "require", "amy")
        assert {q["user"] for q in queue(proxy)} == {"amy", "ben"}  # serve is not running
        with proxy.running():
            wait_until(lambda: len(smtp.messages) == 1 and not [
                q for q in queue(proxy) if q["status"] == "pending"], what="sent")
            assert smtp.envelopes[0][1] == ["amy@example.org"]
            m = proxy.metrics()
            assert m.value("mfa_proxy_mail_failed_total", reason="no_address") == 1
            assert m.value("mfa_proxy_mail_sent_total", event="required") == 1
            assert "ben" in proxy.log_tail() and "no mail address" in proxy.log_tail()
        [row] = queue(proxy)
        assert (row["user"], row["status"]) == ("ben", "failed")
        assert "no mail address" in str(row["last_error"])
        # the address, once set, is used for the next mail
        proxy.cli("local-user", "set", "ben", "--email", "ben@example.org", "--keep-password")
        proxy.cli("user", "extend", "ben", "--days", "9")
        with proxy.running():
            wait_until(lambda: len(smtp.messages) == 2, what="ben's notice")
        assert smtp.envelopes[1][1] == ["ben@example.org"]
    finally:
        smtp.stop()


# -- mail test ---------------------------------------------------------------------------


def test_mail_test_with_starttls_auth_and_a_checked_certificate(tmp_path: Path) -> None:
    smtp = SmtpServer.start_new(tls_dir=tmp_path / "tls", username="mfa", password="s3cret")
    (tmp_path / "smtp-password").write_text("s3cret\n")
    try:
        proxy = ProxyProcess.configure(
            tmp_path, directory={"type": "local", "users_file": str(tmp_path / "users.toml")},
            overrides={"mail": {"smtp": smtp.address, "security": "starttls", "from": FROM,
                                "username": "mfa", "password_file": "smtp-password",
                                "ca_file": str(smtp.ca_file)}})
        r = proxy.cli("mail", "test", "someone@example.org")
        assert r.returncode == 0 and "sent: 250 2.0.0 Ok: queued as TEST" in r.stdout, r
        assert smtp.tls_used == [True] and smtp.authenticated == [True]
        assert "test mail" in smtp.messages[0]["Subject"]

        # without the CA the certificate is not trusted: refused before any AUTH
        del proxy.doc["mail"]["ca_file"]
        proxy.write_config()
        r = proxy.cli("mail", "test", "someone@example.org", check=False)
        assert r.returncode == 1 and "tls" in r.stderr and "certificate" in r.stderr.lower()
        # a wrong password
        proxy.doc["mail"].update(ca_file=str(smtp.ca_file), password_file="wrong")
        (tmp_path / "wrong").write_text("nope\n")
        proxy.write_config()
        r = proxy.cli("mail", "test", "someone@example.org", check=False)
        assert r.returncode == 1 and "auth" in r.stderr and "535" in r.stderr
        # security "none" against a server that insists on STARTTLS
        proxy.doc["mail"].update(security="none", password_file="smtp-password")
        proxy.write_config()
        r = proxy.cli("mail", "test", "someone@example.org", check=False)
        assert r.returncode == 1
        assert len(smtp.messages) == 1
    finally:
        smtp.stop()
    r = proxy.cli("mail", "test", "someone@example.org", check=False)  # nobody listens
    assert r.returncode == 1 and "unreachable" in r.stderr


def test_check_config_refuses_a_bad_mail_section(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "required.txt").write_text("Subject: hi $usr\n\nbody\n")
    proxy = ProxyProcess.configure(
        tmp_path, directory={"type": "local", "users_file": str(tmp_path / "users.toml")},
        overrides={"mail": {"smtp": "127.0.0.1:2525", "security": "ssl", "from": "nobody",
                            "templates": "templates", "reminder_hours": -1}})
    r = proxy.cli("check-config", check=False)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    for key in ("mail.security", "mail.from", "mail.templates", "mail.reminder_hours"):
        assert any(line.startswith(f"config error: {key}:") for line in lines), (key, lines)
    assert any("unknown placeholder $usr" in line for line in lines)
    proxy.doc["mail"] = {"smtp": "127.0.0.1:2525", "security": "none", "from": FROM,
                         "templates": "templates"}
    (tmp_path / "templates" / "required.txt").write_text("Subject: hi $username\n\n$days\n")
    proxy.write_config()
    assert proxy.cli("check-config").returncode == 0


# -- two instances, one PostgreSQL ---------------------------------------------------------


@pytest.mark.postgres
def test_a_reminder_goes_out_exactly_once_from_two_instances(
        slapd: Slapd, postgres: object, tmp_path: Path) -> None:
    url = postgres.new_database("mail")  # type: ignore[attr-defined]
    smtp = SmtpServer.start_new()
    try:
        first = ProxyProcess.configure(
            tmp_path / "a", slapd, state_url=url,
            overrides={"mail": mail_section(smtp.address, reminder_hours=48)})
        second = ProxyProcess.configure(
            tmp_path / "b", slapd, state_url=url, key_file=first.key_file,
            overrides={"mail": mail_section(smtp.address, reminder_hours=48)})
        first.cli("db", "upgrade")
        for user in ("grace", "heidi", "ivan"):
            first.cli("user", "require", user, "--days", "1", "--no-mail")
        first.cli("user", "enroll", "ivan")  # enrolled: no reminder
        first.cli("user", "require", "judy", "--days", "10", "--no-mail")  # not due yet
        with first.running(), second.running():
            wait_until(lambda: len(smtp.messages) >= 3, what="the reminders and the notice")
            time.sleep(3.0)  # several rounds of both senders
        got = sorted((rcpts[0], m["Subject"].split(":")[0])
                     for m, (_, rcpts) in zip(smtp.messages, smtp.envelopes, strict=True))
        assert got == [("grace@example.org", "Reminder"), ("heidi@example.org", "Reminder"),
                       ("ivan@example.org", "Security notice")]
        assert date_in(1) in SmtpServer.body(smtp.to("grace@example.org")[0])
        assert "1 day(s)" in SmtpServer.body(smtp.to("grace@example.org")[0])
    finally:
        smtp.stop()


# -- outage and crash ----------------------------------------------------------------------


def test_a_hung_mail_server_delays_no_sign_in_and_the_mail_waits(slapd: Slapd,
                                                                tmp_path: Path) -> None:
    port = free_port()
    hole = Blackhole(port)
    smtp: SmtpServer | None = None
    try:
        proxy = ProxyProcess.configure(
            tmp_path, slapd, clients=[{"name": "vpn", "address": "127.0.0.1/32"}],
            overrides={"mail": mail_section(f"127.0.0.1:{port}", timeout_seconds=10.0,
                                            claim_seconds=30)})
        secret = pyotp.random_base32()
        proxy.cli("user", "enroll", "walter", "--secret", secret)
        with proxy.running():
            proxy.cli("user", "require", "victor")  # returns at once: serve sends
            wait_until(lambda: hole.accepted, what="serve connects to the hung server")
            nas = pyrad_client(proxy)
            for _ in range(5):  # while the sender waits on the server
                reply = pyrad_auth(nas, "walter", user_password("walter"))
                assert reply.code == ACCESS_CHALLENGE
                time.sleep(0.3)
            # Every sign-in was answered while the sender still waited on the hung
            # server (its attempt had not failed yet): a sender that held the
            # reactor would have let them through only after its 10 s timeout.
            assert proxy.metrics().value("mfa_proxy_mail_failed_total",
                                         reason="unreachable") == 0
            wait_until(lambda: proxy.metrics().value("mfa_proxy_mail_failed_total",
                                                     reason="unreachable") >= 1,
                       what="a failed attempt")
            assert proxy.metrics().value("mfa_proxy_mail_queue") >= 1
            assert smtp is None
            hole.stop()
            smtp = SmtpServer(port)
            smtp.start()
            wait_until(lambda: smtp is not None and smtp.to("victor@example.org"),
                       timeout=40, what=f"the mail after the outage\n{proxy.log_tail()}")
            wait_until(lambda: proxy.metrics().value("mfa_proxy_mail_queue") == 0,
                       what="the queue gauge back to 0")
        # victor's invitation, and walter's security notice queued before serve started
        assert sorted(r[0] for _, r in smtp.envelopes) == ["victor@example.org",
                                                           "walter@example.org"]
    finally:
        hole.stop()
        if smtp is not None:
            smtp.stop()


def test_killed_between_claim_and_send_the_mail_is_sent_once_after_restart(
        slapd: Slapd, tmp_path: Path) -> None:
    port = free_port()
    hole = Blackhole(port)
    smtp = SmtpServer(port)
    try:
        proxy = ProxyProcess.configure(
            tmp_path, slapd,
            overrides={"mail": mail_section(f"127.0.0.1:{port}", timeout_seconds=5.0,
                                            claim_seconds=15)})
        proxy.cli("user", "require", "oscar")
        proxy.start()
        # claimed (one attempt counted), waiting on the server's greeting: kill it there
        wait_until(lambda: hole.accepted and queue(proxy)[0]["attempts"] == 1,
                   what="the mail claimed")
        claimed_at = time.monotonic()
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGKILL)
        proxy.proc.wait(10)
        proxy.proc = None
        hole.stop()
        smtp.start()
        # the claim still holds: a restarted serve leaves the mail alone until it runs out
        proxy.start()
        time.sleep(1.0)
        if time.monotonic() - claimed_at < 14:
            assert smtp.messages == []
        # ...then sends it, once
        wait_until(lambda: smtp.messages, timeout=40,
                   what=f"sent after restart\n{proxy.log_tail()}")
        assert time.monotonic() - claimed_at >= 10
        time.sleep(2.0)
        proxy.stop()
        assert len(smtp.messages) == 1 and smtp.envelopes[0][1] == ["oscar@example.org"]
        [row] = queue(proxy, "--all")
        assert (row["status"], row["attempts"]) == ("sent", 2)
    finally:
        hole.stop()
        smtp.stop()
        if proxy.alive:
            proxy.stop()


def test_sighup_moves_the_mail_server_without_a_restart(slapd: Slapd, tmp_path: Path) -> None:
    """[mail] reloads: the outbox waits on a server that is not there; the config names
    another; SIGHUP; the next round sends there, with the new sender address."""
    dead, live = free_port(), free_port()
    smtp = SmtpServer(live)
    smtp.start()
    try:
        proxy = ProxyProcess.configure(
            tmp_path, slapd, clients=[{"name": "vpn", "address": "127.0.0.1/32"}],
            overrides={"mail": mail_section(f"127.0.0.1:{dead}")})
        with proxy.running():
            proxy.cli("user", "require", "oscar")
            wait_until(lambda: proxy.metrics().value("mfa_proxy_mail_failed_total",
                                                     reason="unreachable") >= 1,
                       what="a failed attempt on the dead server")
            proxy.doc["mail"] = mail_section(f"127.0.0.1:{live}", **{
                "from": "IT <it@example.org>"})
            proxy.write_config()
            reloads = proxy.metrics().value("mfa_proxy_config_reloads_total", result="success")
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: proxy.metrics().value("mfa_proxy_config_reloads_total",
                                                     result="success") > reloads,
                       what="the reload")
            wait_until(lambda: smtp.to("oscar@example.org"), timeout=40,
                       what=f"the invitation on the new server\n{proxy.log_tail()}")
            assert smtp.envelopes[-1][0] == "it@example.org"
            assert "wait for a restart" not in proxy.log_tail()
    finally:
        smtp.stop()
