"""The RADIUS server on real loopback sockets, driven by FreeRADIUS's radclient.

Behind the server is the real core (policy engine and authenticator on a
SQLite store, tests/unit/test_ldap_frontend_fakes.py ``RealCore``); only the
directory is in memory. These tests are about the protocol as a real NAS
sees it — signatures, State, Status-Server, retransmissions, accounting,
IPv6 — and every answer is the one the core decided.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pyrad.dictionary import Dictionary
from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread

from backends.base import Identity
from policy.decision import AuthRequest, Decision, SplitMode
from proxy.radius.clients import ClientTable, RadiusClientConfig, ReplyRule
from proxy.radius.packet import (
    SHIPPED_DICTIONARY,
    Attr,
    Packet,
    hmac_md5,
    parse_datagram,
    verify_message_authenticator,
)
from proxy.radius.server import RadiusServer, ServerSettings
from proxy.radius.testing import RecordingEvents, access_request, verify_reply
from tests.unit.test_ldap_frontend_fakes import MemoryDirectory, RealCore

DICTIONARY_PATH = SHIPPED_DICTIONARY
SECRET = "testing123-a-long-shared-secret"
PASSWORD = "alice-pw"  # MemoryDirectory's password for alice
ADMINS = "cn=admins,ou=groups,dc=example,dc=org"
SLOW_SECONDS = 1.5


@pytest.fixture(scope="module", autouse=True)
def _radclient_installed() -> None:
    """No skip: scripts/test installs freeradius-utils, so its absence is a failure."""
    if shutil.which("radclient") is None:
        pytest.fail("radclient (freeradius-utils) is not installed")


class SlowDirectory(MemoryDirectory):
    """The test entries, alice in the admins group; the password check of user
    "slow" answers after SLOW_SECONDS (a directory under load)."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(("alice", "slow", "enrolling"))
        self.reactor = reactor

    def lookup(self, username: str) -> Deferred[Identity | None]:
        def with_groups(identity: Identity | None) -> Identity | None:
            if identity is not None and identity.username == "alice":
                return Identity(identity.username, identity.dn, (ADMINS,))
            return identity
        return super().lookup(username).addCallback(with_groups)

    def check_password(self, identity: Identity, password: str) -> Deferred[Identity]:
        checked = super().check_password(identity, password)
        if identity.username != "slow":
            return checked
        later: Deferred[None] = Deferred()
        self.reactor.callLater(SLOW_SECONDS, later.callback, None)
        return later.addCallback(lambda _: checked)


class Core(RealCore):
    """The real core, keeping what it decided for each request it was asked."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(SlowDirectory(reactor), enrolled=("alice", "slow"))
        self.enrolling("enrolling", 4)
        self.decisions: list[Decision] = []

    def __call__(self, request: AuthRequest) -> Deferred[Decision]:
        def keep(decision: Decision) -> Decision:
            self.decisions.append(decision)
            return decision
        return self.authenticate(request).addCallback(keep)

    def count(self, username: str) -> int:
        return sum(1 for r in list(self.requests) if r.username == username)

    def last_message(self) -> str | None:
        """The core's last message as radclient prints it (None: no Reply-Message)."""
        return self.decisions[-1].message or None


@dataclass
class Listening:
    server: RadiusServer
    core: Core
    events: RecordingEvents
    auth_port: int
    acct_port: int
    auth6_port: int


@pytest.fixture(scope="module")
def radius(twisted_reactor: Any) -> Iterator[Listening]:
    core = Core(twisted_reactor)
    events = RecordingEvents()
    clients = ClientTable([
        RadiusClientConfig("vpn", ("127.0.0.1",), SECRET.encode()),
        RadiusClientConfig("vpn6", ("::1",), SECRET.encode(), mode=SplitMode.CHALLENGE),
    ])
    settings = ServerSettings(reply_rules=(
        ReplyRule("admins", {"Class": "admins", "Fortinet-Group-Name": "vpn-admins"}),))

    def start() -> tuple[RadiusServer, list[Any]]:
        server = RadiusServer(clients, core, Dictionary(str(DICTIONARY_PATH)), events=events,
                              clock=twisted_reactor, settings=settings)
        ports = server.listen(twisted_reactor, auth=[("127.0.0.1", 0), ("::1", 0)],
                              accounting=[("127.0.0.1", 0)])
        return server, ports

    server, ports = blockingCallFromThread(twisted_reactor, start)
    try:
        yield Listening(server, core, events, ports[0].getHost().port,
                        ports[2].getHost().port, ports[1].getHost().port)
    finally:
        for port in ports:
            blockingCallFromThread(twisted_reactor, port.stopListening)
        core.close()


@dataclass
class Reply:
    code: str | None  # "Access-Accept", ... or None when nothing came back
    attributes: dict[str, list[str]]

    def first(self, name: str) -> str | None:
        values = self.attributes.get(name)
        return values[0] if values else None


def radclient(port: int, attributes: str, *, kind: str = "auth", secret: str = SECRET,
              host: str = "127.0.0.1", retries: int = 1, timeout: float = 2) -> Reply:
    """One radclient run; its verbose output read back into a Reply."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    proc = subprocess.run(
        ["radclient", "-x", "-r", str(retries), "-t", str(timeout), target, kind, secret],
        input=attributes.encode(), capture_output=True, timeout=30, check=False)
    return parse_radclient(proc.stdout.decode(errors="replace"))


def parse_radclient(output: str) -> Reply:
    received = re.search(r"^Received (\S+) Id", output, re.MULTILINE)
    if received is None:
        return Reply(None, {})
    attributes: dict[str, list[str]] = {}
    for line in output[received.end():].splitlines()[1:]:
        match = re.match(r"^\s+([\w-]+) = (.*)$", line)
        if match is None:
            break
        attributes.setdefault(match.group(1), []).append(match.group(2).strip('"'))
    return Reply(received.group(1), attributes)


def request_text(password: str, user: str = "alice", extra: str = "",
                 message_authenticator: bool = True) -> str:
    text = f'User-Name = "{user}"\nUser-Password = "{password}"\n{extra}'
    return text + ("Message-Authenticator = 0x00\n" if message_authenticator else "")


# --- authentication as a NAS sees it -----------------------------------------------


def test_append_mode_accept_with_group_attributes(radius: Listening) -> None:
    reply = radclient(radius.auth_port, request_text(radius.core.good("alice"),
                                                     extra="Proxy-State = 0x6162\n"))
    assert reply.code == "Access-Accept"  # radclient checked both authenticators
    assert list(reply.attributes)[0] == "Message-Authenticator"
    assert reply.first("Class") == "0x61646d696e73"  # "admins"
    assert reply.first("Fortinet-Group-Name") == "vpn-admins"
    assert reply.first("Proxy-State") == "0x6162"


def test_wrong_password_is_rejected_with_the_cores_message(radius: Listening) -> None:
    reply = radclient(radius.auth_port, request_text(f"wrong,{radius.core.code('alice')}"))
    assert reply.code == "Access-Reject"
    assert radius.core.decisions[-1].reason == "bad_password"
    assert reply.first("Reply-Message") == radius.core.last_message()


def test_challenge_in_two_steps_with_state(radius: Listening) -> None:
    first = radclient(radius.auth_port, request_text(PASSWORD))
    assert first.code == "Access-Challenge"
    assert first.first("Reply-Message") == radius.core.last_message()
    assert radius.core.last_message()  # the core asks for the code in words
    state = first.first("State")
    assert state is not None and state.startswith("0x")
    code = radius.core.code("alice")
    second = radclient(radius.auth_port, request_text(code, extra=f"State = {state}\n"))
    assert second.code == "Access-Accept"
    asked = radius.core.count("alice")
    replay = radclient(radius.auth_port, request_text(code, extra=f"State = {state}\n"))
    assert replay.code == "Access-Reject"  # the State was single-use
    assert radius.core.count("alice") == asked  # refused before the core


def test_enrollment_reply_message(radius: Listening) -> None:
    reply = radclient(radius.auth_port, request_text("enrolling-pw", user="enrolling"))
    assert reply.code == "Access-Accept"
    assert radius.core.decisions[-1].days_left == 4
    assert reply.first("Reply-Message") == radius.core.last_message()
    assert "4 days left" in (reply.first("Reply-Message") or "")


def test_status_server(radius: Listening) -> None:
    before = len(radius.events.requests)
    reply = radclient(radius.auth_port, "Message-Authenticator = 0x00\n", kind="status")
    assert reply.code == "Access-Accept"
    assert len(radius.events.requests) == before  # not an authentication request


def test_wrong_secret_is_dropped(radius: Listening) -> None:
    before = radius.events.drops["bad_message_authenticator"]
    reply = radclient(radius.auth_port, request_text(radius.core.good("alice")),
                      secret="not-the-secret", timeout=0.5)
    assert reply.code is None
    assert radius.events.drops["bad_message_authenticator"] == before + 1


def test_missing_message_authenticator_is_dropped(radius: Listening) -> None:
    before = radius.events.drops["missing_message_authenticator"]
    reply = radclient(radius.auth_port, request_text(radius.core.good("alice"),
                                                     message_authenticator=False), timeout=0.5)
    assert reply.code is None
    assert radius.events.drops["missing_message_authenticator"] == before + 1


def test_chap_is_rejected(radius: Listening) -> None:
    before = radius.core.count("chapuser")
    reply = radclient(radius.auth_port, 'User-Name = "chapuser"\nCHAP-Password = "s3cret"\n'
                                        "Message-Authenticator = 0x00\n")
    assert reply.code == "Access-Reject"
    assert radius.core.count("chapuser") == before
    assert ("vpn", "reject", "unsupported_auth") in radius.events.requests


def test_radclient_retransmission_is_decided_once(radius: Listening) -> None:
    # radclient resends the identical packet after 1 s; the decision takes 1.5 s.
    before = radius.core.count("slow")
    reply = radclient(radius.auth_port, request_text(radius.core.good("slow"), user="slow"),
                      retries=3, timeout=1)
    assert reply.code == "Access-Accept"
    assert radius.core.count("slow") == before + 1


def test_retransmission_gets_the_same_bytes_once_decided(radius: Listening) -> None:
    before = radius.core.count("slow")
    request = access_request(SECRET.encode(), "slow", radius.core.good("slow"), identifier=77)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as nas:
        nas.connect(("127.0.0.1", radius.auth_port))
        nas.settimeout(5)
        nas.send(request)
        time.sleep(0.3)
        nas.send(request)  # while deciding: no answer for it
        first = nas.recv(4096)
        nas.settimeout(0.5)
        with pytest.raises(TimeoutError):
            nas.recv(4096)  # only one answer for the two copies
        nas.settimeout(5)
        nas.send(request)  # once decided: the cached answer, at once
        started = time.monotonic()
        second = nas.recv(4096)
    assert time.monotonic() - started < SLOW_SECONDS / 2
    assert second == first and verify_reply(first, request, SECRET.encode())
    assert parse_datagram(first).code == 2  # type: ignore[union-attr]  # Access-Accept
    assert radius.core.count("slow") == before + 1


def test_accounting_is_answered(radius: Listening) -> None:
    before = len(radius.events.accountings)
    reply = radclient(radius.acct_port, 'User-Name = "alice"\nAcct-Status-Type = Start\n'
                                        'Acct-Session-Id = "s-1"\n', kind="acct")
    assert reply.code == "Accounting-Response"
    assert len(radius.events.accountings) == before + 1


def test_accounting_with_a_wrong_secret_is_dropped(radius: Listening) -> None:
    reply = radclient(radius.acct_port, 'User-Name = "alice"\nAcct-Status-Type = Stop\n',
                      kind="acct", secret="not-the-secret", timeout=0.5)
    assert reply.code is None


def test_ipv6_listener_in_challenge_mode(radius: Listening) -> None:
    first = radclient(radius.auth6_port, request_text(PASSWORD), host="::1")
    assert first.code == "Access-Challenge"
    state = first.first("State")
    second = radclient(radius.auth6_port,
                       request_text(radius.core.code("alice"), extra=f"State = {state}\n"),
                       host="::1")
    assert second.code == "Access-Accept"
    assert [r.source for r in radius.core.requests if r.client == "vpn6"][-1] == "::1"


def test_state_from_another_client_is_refused(radius: Listening) -> None:
    first = radclient(radius.auth6_port, request_text(PASSWORD), host="::1")
    state = first.first("State")
    other = radclient(radius.auth_port,
                      request_text(radius.core.code("alice"), extra=f"State = {state}\n"))
    assert other.code == "Access-Reject"


# --- Message-Authenticator: a live radclient's bytes ----------------------------------


def test_live_radclient_message_authenticator_matches_ours() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        proc = subprocess.Popen(
            ["radclient", "-q", "-r", "1", "-t", "1", f"127.0.0.1:{sock.getsockname()[1]}",
             "auth", SECRET], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            assert proc.stdin is not None
            proc.stdin.write(request_text("pässword,123456").encode())
            proc.stdin.close()
            data, _ = sock.recvfrom(4096)
        finally:
            try:
                proc.wait(timeout=10)  # it gives up waiting for an answer after 1 s
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    packet = parse_datagram(data)
    assert isinstance(packet, Packet) and len(packet.message_authenticators) == 1
    assert verify_message_authenticator(packet, SECRET.encode())
    offset = packet.message_authenticators[0]
    zeroed = data[:offset] + bytes(16) + data[offset + 16:]
    assert hmac_md5(SECRET.encode(), zeroed) == data[offset:offset + 16]
    assert packet.first(Attr.USER_NAME) == b"alice"
