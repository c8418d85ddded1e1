"""The RADIUS server's flow, without sockets: bytes in, bytes out, a fake core."""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable

import pytest
from pyrad.dictionary import Dictionary
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from backends.base import Identity
from policy.decision import AuthRequest, Decision, MfaMode, Outcome, Reason, SplitMode
from proxy.radius.clients import ClientTable, RadiusClientConfig, ReplyRule
from proxy.radius.packet import (
    SHIPPED_DICTIONARY,
    Attr,
    Code,
    Packet,
    encode_attribute,
    parse_datagram,
)
from proxy.radius.server import RadiusPort, RadiusServer, ServerSettings
from proxy.radius.testing import (
    RecordingEvents,
    access_request,
    accounting_request,
    build_request,
    verify_reply,
)

DICTIONARY = Dictionary(str(SHIPPED_DICTIONARY))
SECRET = b"vpn-shared-secret"
NAS = ("10.0.0.5", 40000)
ALICE = Identity("alice", "uid=alice,ou=people,dc=example,dc=org", ("cn=admins,ou=groups",))


def decision(outcome: Outcome, reason: Reason = Reason.OK, **kw) -> Decision:
    return Decision(outcome, reason, "alice", **kw)


class FakeCore:
    """Answers with the next decision given; remembers every request."""

    def __init__(self) -> None:
        self.requests: list[AuthRequest] = []
        self.answers: list[Callable[[AuthRequest], Deferred[Decision]]] = []

    def then(self, value: Decision | Deferred[Decision] | Exception) -> FakeCore:
        if isinstance(value, Deferred):
            self.answers.append(lambda _: value)
        elif isinstance(value, Exception):
            self.answers.append(lambda _: fail(value))
        else:
            self.answers.append(lambda _: succeed(value))
        return self

    def __call__(self, request: AuthRequest) -> Deferred[Decision]:
        self.requests.append(request)
        return self.answers.pop(0)(request)


class Harness:
    def __init__(self, **client_kw) -> None:
        self.core = FakeCore()
        self.events = RecordingEvents()
        self.clock = Clock()
        self.sent: list[bytes] = []
        settings = ServerSettings(reply_rules=(
            ReplyRule("admins", {"Class": "admins", "Session-Timeout": 3600}),))
        clients = ClientTable([
            RadiusClientConfig("vpn", ("10.0.0.0/24",), SECRET, **client_kw),
            RadiusClientConfig("legacy", ("10.9.0.0/24",), b"legacy-secret",
                               require_message_authenticator=False),
        ])
        self.server = RadiusServer(clients, self.core, DICTIONARY, events=self.events,
                                   clock=self.clock, settings=settings)

    def send(self, data: bytes, source: tuple[str, int] = NAS) -> bytes | None:
        before = len(self.sent)
        self.server.handle_auth(data, source, self.sent.append)
        return self.sent[-1] if len(self.sent) > before else None

    def ask(self, password: str | None, *, state: bytes | None = None,
            extra=(), secret: bytes = SECRET, user: str = "alice") -> tuple[bytes, Packet]:
        request = access_request(secret, user, password, state=state, extra=extra)
        reply = self.send(request)
        assert reply is not None, self.events.drops
        assert verify_reply(reply, request, secret)
        packet = parse_datagram(reply)
        assert isinstance(packet, Packet)
        return request, packet


def message(packet: Packet) -> str:
    return b"".join(packet.all(Attr.REPLY_MESSAGE)).decode()


# --- Access-Request → AuthRequest ------------------------------------------


def test_append_mode_accept_carries_group_attributes() -> None:
    h = Harness(mode="append", mfa="strict", separator=":", repeat_window_seconds=10)
    h.core.then(decision(Outcome.ACCEPT, identity=ALICE))
    _, reply = h.ask("s3cret:123456")
    assert reply.code == Code.ACCESS_ACCEPT
    assert reply.first(25) == b"admins" and reply.first(27) == (3600).to_bytes(4, "big")
    assert reply.first(Attr.REPLY_MESSAGE) is None
    sent = h.core.requests[0]
    assert (sent.username, sent.password, sent.code) == ("alice", "s3cret:123456", None)
    assert (sent.protocol, sent.client, sent.source) == ("radius", "vpn", "10.0.0.5")
    assert (sent.split, sent.mfa, sent.separator) == (SplitMode.APPEND, MfaMode.STRICT, ":")
    assert sent.repeat_window_seconds == 10 and sent.verified_identity is None
    assert h.events.requests == [("vpn", "accept", "ok")]
    assert len(h.events.decisions) == 1


def test_reject_carries_the_core_message() -> None:
    h = Harness()
    h.core.then(decision(Outcome.REJECT, Reason.BAD_CODE, message="Wrong password or code"))
    _, reply = h.ask("s3cret,000000")
    assert reply.code == Code.ACCESS_REJECT
    assert message(reply) == "Wrong password or code"
    assert h.events.requests == [("vpn", "reject", "bad_code")]


def test_reject_without_message_has_no_reply_message() -> None:
    h = Harness()
    h.core.then(decision(Outcome.REJECT, Reason.BAD_PASSWORD))
    _, reply = h.ask("nope")
    assert reply.first(Attr.REPLY_MESSAGE) is None


def test_challenge_in_two_steps() -> None:
    h = Harness(mode="challenge")
    h.core.then(decision(Outcome.NEED_CODE, Reason.CODE_NEEDED, identity=ALICE,
                         message="Enter your verification code"))
    _, challenge = h.ask("s3cret")
    assert challenge.code == Code.ACCESS_CHALLENGE
    assert message(challenge) == "Enter your verification code"
    state = challenge.first(Attr.STATE)
    assert state and len(state) >= 16
    h.core.then(decision(Outcome.ACCEPT, identity=ALICE))
    _, accept = h.ask("123456", state=state)
    assert accept.code == Code.ACCESS_ACCEPT
    second = h.core.requests[1]
    assert (second.code, second.verified_identity, second.password) == ("123456", ALICE, "")
    assert h.events.requests == [("vpn", "challenge", "code_needed"), ("vpn", "accept", "ok")]
    # the State was single-use
    _, again = h.ask("123456", state=state)
    assert again.code == Code.ACCESS_REJECT and len(h.core.requests) == 2
    assert h.events.requests[-1] == ("vpn", "reject", "bad_state")


def test_the_core_prompt_is_used_when_it_gives_one() -> None:
    h = Harness(mode="challenge")
    h.core.then(decision(Outcome.NEED_CODE, Reason.CODE_NEEDED, identity=ALICE,
                         message="Code from your authenticator app"))
    _, challenge = h.ask("s3cret")
    assert message(challenge) == "Code from your authenticator app"


def test_state_of_another_user_is_refused() -> None:
    h = Harness(mode="challenge")
    h.core.then(decision(Outcome.NEED_CODE, Reason.CODE_NEEDED, identity=ALICE))
    _, challenge = h.ask("s3cret")
    _, reply = h.ask("123456", state=challenge.first(Attr.STATE), user="mallory")
    assert reply.code == Code.ACCESS_REJECT and len(h.core.requests) == 1


def test_expired_state_is_refused() -> None:
    h = Harness(mode="challenge")
    h.core.then(decision(Outcome.NEED_CODE, Reason.CODE_NEEDED, identity=ALICE))
    _, challenge = h.ask("s3cret")
    h.clock.advance(121)
    _, reply = h.ask("123456", state=challenge.first(Attr.STATE))
    assert reply.code == Code.ACCESS_REJECT
    assert h.events.requests[-1] == ("vpn", "reject", "bad_state")


def test_openvpn_static_challenge_gives_password_and_code() -> None:
    h = Harness(mode="challenge")
    h.core.then(decision(Outcome.ACCEPT))
    b64 = base64.b64encode
    field = f"SCRV1:{b64(b's3cret').decode()}:{b64(b'123456').decode()}"
    h.ask(field)
    assert (h.core.requests[0].password, h.core.requests[0].code) == ("s3cret", "123456")


def test_openvpn_static_challenge_with_empty_response_has_no_code() -> None:
    h = Harness()
    h.core.then(decision(Outcome.ACCEPT))
    h.ask(f"SCRV1:{base64.b64encode(b's3cret').decode()}:")
    assert (h.core.requests[0].password, h.core.requests[0].code) == ("s3cret", None)


# --- enrollment notices -----------------------------------------------------


def test_enrollment_reply_message_is_the_core_text() -> None:
    h = Harness()
    h.core.then(decision(Outcome.ACCEPT, Reason.IN_ENROLLMENT, days_left=5,
                         message="Enroll at https://mfa.example.org: 5 days left"))
    _, reply = h.ask("s3cret")
    assert message(reply) == "Enroll at https://mfa.example.org: 5 days left"


def test_enrollment_notice_none_says_nothing() -> None:
    h = Harness(enrollment_notice="none")
    h.core.then(decision(Outcome.ACCEPT, Reason.IN_ENROLLMENT, days_left=5))
    _, reply = h.ask("s3cret")
    assert reply.code == Code.ACCESS_ACCEPT and reply.first(Attr.REPLY_MESSAGE) is None


def test_enrollment_notice_as_challenge_then_any_answer_is_accepted() -> None:
    h = Harness(enrollment_notice="challenge")
    h.core.then(decision(Outcome.ACCEPT, Reason.IN_ENROLLMENT, days_left=3, identity=ALICE,
                         message="Set up MFA: 3 days left"))
    _, notice = h.ask("s3cret")
    assert notice.code == Code.ACCESS_CHALLENGE and message(notice) == "Set up MFA: 3 days left"
    _, accept = h.ask("", state=notice.first(Attr.STATE))
    assert accept.code == Code.ACCESS_ACCEPT
    assert accept.first(25) == b"admins" and accept.first(Attr.REPLY_MESSAGE) is None
    assert len(h.core.requests) == 1  # the answer is not decided again
    assert h.events.requests == [("vpn", "challenge", "in_enrollment"),
                                 ("vpn", "accept", "in_enrollment")]


# --- rejected without asking the core ----------------------------------------


@pytest.mark.parametrize(("extra", "password"), [
    ([(Attr.CHAP_PASSWORD, bytes(17))], None),
    ([(Attr.EAP_MESSAGE, b"\x02\x01\x00\x06\x01a")], None),
    ([(26, (311).to_bytes(4, "big") + b"\x19\x34" + bytes(50))], None),
    ([(Attr.CHAP_PASSWORD, bytes(17))], "also-a-password"),
])
def test_chap_mschap_and_eap_are_rejected_unsupported(extra, password) -> None:
    h = Harness()
    _, reply = h.ask(password, extra=extra)
    assert reply.code == Code.ACCESS_REJECT and h.core.requests == []
    assert h.events.requests == [("vpn", "reject", "unsupported_auth")]
    assert len(h.events.decisions) == 1  # a local reject is a decision too: timed


def test_no_user_password_is_rejected() -> None:
    h = Harness()
    _, reply = h.ask(None)
    assert reply.code == Code.ACCESS_REJECT
    assert h.events.requests == [("vpn", "reject", "missing_password")]


def test_no_user_name_is_rejected() -> None:
    h = Harness()
    request = build_request(Code.ACCESS_REQUEST, 3, SECRET, [(Attr.USER_PASSWORD, bytes(16))])
    reply = h.send(request)
    assert reply is not None and reply[0] == Code.ACCESS_REJECT
    assert h.events.requests == [("vpn", "reject", "missing_username")]
    assert len(h.events.decisions) == 1


def test_garbled_password_from_a_wrong_secret_never_reaches_the_core() -> None:
    # A legacy client sends no Message-Authenticator, so a wrong secret only
    # shows as a password that is not text (48 random octets are valid UTF-8
    # with a chance near 2**-40): no failure is counted against alice.
    h = Harness()
    for _ in range(20):
        request = access_request(b"wrong-secret", "alice", "pässwörd" * 5,
                                 message_authenticator=False)
        reply = h.send(request, source=("10.9.0.7", 1000))
        assert reply is not None and reply[0] == Code.ACCESS_REJECT
    assert h.core.requests == []
    assert h.events.requests == [("legacy", "reject", "malformed_password")] * 20


# --- dropped -------------------------------------------------------------------


def test_missing_message_authenticator_is_dropped_when_required() -> None:
    h = Harness()
    assert h.send(access_request(SECRET, "alice", "pw", message_authenticator=False)) is None
    assert h.events.drops == {"missing_message_authenticator": 1}


def test_legacy_client_may_omit_the_message_authenticator() -> None:
    h = Harness()
    h.core.then(decision(Outcome.ACCEPT))
    request = access_request(b"legacy-secret", "alice", "pw", message_authenticator=False)
    reply = h.send(request, source=("10.9.0.7", 1000))
    assert reply is not None and verify_reply(reply, request, b"legacy-secret")


def test_wrong_secret_is_dropped_silently() -> None:
    h = Harness()
    assert h.send(access_request(b"not-the-secret", "alice", "pw")) is None
    assert h.events.drops == {"bad_message_authenticator": 1} and h.core.requests == []


def test_unknown_client_is_dropped_and_logged_once_a_minute(caplog) -> None:
    h = Harness()
    caplog.set_level(logging.WARNING, "mfa_proxy.radius")
    for _ in range(3):
        assert h.send(access_request(SECRET, "alice", "pw"), ("192.0.2.9", 5)) is None
    h.send(access_request(SECRET, "alice", "pw"), ("192.0.2.10", 5))
    h.clock.advance(61)
    h.send(access_request(SECRET, "alice", "pw"), ("192.0.2.9", 5))
    assert h.events.drops == {"unknown_client": 5}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "192.0.2.9" in lines[0] and "192.0.2.10" in lines[1]


@pytest.mark.parametrize("code", [Code.ACCOUNTING_REQUEST, Code.ACCESS_ACCEPT, 40, 255])
def test_other_codes_are_dropped_on_the_auth_port(code: int) -> None:
    h = Harness()
    assert h.send(build_request(code, 1, SECRET, [(Attr.USER_NAME, b"a")])) is None
    assert h.events.drops == {"unsupported_code": 1}


def test_malformed_datagram_is_dropped_by_reason() -> None:
    h = Harness()
    assert h.send(b"\x01\x02\x00") is None
    assert h.events.drops == {"too_short": 1}


# --- duplicates ------------------------------------------------------------------


def test_retransmission_is_answered_once_decided_with_the_same_bytes() -> None:
    h = Harness()
    pending: Deferred[Decision] = Deferred()
    h.core.then(pending)
    request = access_request(SECRET, "alice", "s3cret,123456")
    assert h.send(request) is None  # deciding
    assert h.send(request) is None  # a retransmission meanwhile: nothing
    assert h.events.drops == {"duplicate_in_progress": 1}
    pending.callback(decision(Outcome.ACCEPT))
    first = h.sent[-1]
    assert h.send(request) == first
    assert len(h.core.requests) == 1 and h.events.retransmissions == ["vpn"]
    assert h.events.requests == [("vpn", "accept", "ok")]
    h.clock.advance(31)  # after the window the same bytes are a new attempt
    h.core.then(decision(Outcome.REJECT, Reason.REPLAYED_CODE))
    assert h.send(request) != first and len(h.core.requests) == 2


def test_a_copy_from_another_port_or_address_of_the_client_is_a_duplicate() -> None:
    """The replay attack: a captured Access-Request sent again from new source
    ports (or another address of the same client) is answered from the cache,
    never decided again (which would count a replayed code as a failure)."""
    h = Harness()
    h.core.then(decision(Outcome.ACCEPT))
    request = access_request(SECRET, "alice", "s3cret,123456")
    first = h.send(request, ("10.0.0.5", 1))
    assert first is not None
    for source in [("10.0.0.5", port) for port in range(2, 7)] + [("10.0.0.77", 1812)]:
        assert h.send(request, source) == first
    assert len(h.core.requests) == 1
    assert h.events.requests == [("vpn", "accept", "ok")]
    assert h.events.retransmissions == ["vpn"] * 6


def test_a_copy_from_another_port_while_deciding_gets_nothing() -> None:
    h = Harness()
    pending: Deferred[Decision] = Deferred()
    h.core.then(pending)
    request = access_request(SECRET, "alice", "s3cret,123456")
    assert h.send(request, ("10.0.0.5", 1)) is None
    assert h.send(request, ("10.0.0.5", 2)) is None
    assert h.events.drops == {"duplicate_in_progress": 1}
    pending.callback(decision(Outcome.ACCEPT))
    assert len(h.core.requests) == 1


def test_same_identifier_with_another_authenticator_or_client_is_not_a_duplicate() -> None:
    h = Harness()
    for _ in range(3):
        h.core.then(decision(Outcome.ACCEPT))
    authenticator = bytes(range(16))
    request = access_request(SECRET, "alice", "pw", identifier=9, authenticator=authenticator)
    h.send(request)
    h.send(access_request(SECRET, "alice", "pw", identifier=9))  # a new request
    # the same Identifier and Request Authenticator from another client
    legacy = access_request(b"legacy-secret", "alice", "pw", identifier=9,
                            authenticator=authenticator)
    h.send(legacy, ("10.9.0.5", 40000))
    assert [r.client for r in h.core.requests] == ["vpn", "vpn", "legacy"]


# --- the core failing -------------------------------------------------------------


def test_an_exception_in_the_core_is_a_reject_never_a_crash(caplog) -> None:
    h = Harness()

    def broken(request: AuthRequest) -> Deferred[Decision]:
        raise RuntimeError("bug in the core")

    h.server.authenticate = broken
    caplog.set_level(logging.ERROR, "mfa_proxy.radius")
    _, reply = h.ask("pw")
    assert reply.code == Code.ACCESS_REJECT
    assert h.events.requests == [("vpn", "reject", "internal_error")]
    assert "bug in the core" in caplog.text


def test_a_failed_deferred_is_a_reject() -> None:
    h = Harness()
    h.core.then(RuntimeError("directory exploded"))
    _, reply = h.ask("pw")
    assert reply.code == Code.ACCESS_REJECT
    assert h.events.requests == [("vpn", "reject", "internal_error")]


def test_a_reply_too_long_to_build_becomes_a_bare_reject(caplog) -> None:
    h = Harness()
    h.core.then(decision(Outcome.REJECT, Reason.BAD_PASSWORD, message="x" * 5000))
    _, reply = h.ask("pw")
    assert reply.code == Code.ACCESS_REJECT and reply.first(Attr.REPLY_MESSAGE) is None
    assert h.events.requests == [("vpn", "reject", "internal_error")]


def test_an_answer_that_cannot_be_sent_is_dropped_and_a_retry_decided_again() -> None:
    h = Harness()
    h.core.then(decision(Outcome.ACCEPT)).then(decision(Outcome.ACCEPT))
    request = access_request(SECRET, "alice", "pw")

    def broken_send(data: bytes) -> None:
        raise OSError("network is down")

    h.server.handle_auth(request, NAS, broken_send)
    assert h.events.drops == {"internal_error": 1}
    assert h.send(request) is not None and len(h.core.requests) == 2


def test_slow_decision_past_nas_timeout_is_logged(caplog) -> None:
    h = Harness(nas_timeout=0.5)
    pending: Deferred[Decision] = Deferred()
    h.core.then(pending)
    caplog.set_level(logging.WARNING, "mfa_proxy.radius")
    h.send(access_request(SECRET, "alice", "pw"))
    h.clock.advance(2)
    pending.callback(decision(Outcome.ACCEPT))
    assert "nas_timeout" in caplog.text and h.events.decisions == [2.0]


# --- Status-Server and accounting -------------------------------------------------


def test_status_server_gets_an_access_accept() -> None:
    h = Harness()
    request = build_request(Code.STATUS_SERVER, 9, SECRET, [])
    reply = h.send(request)
    assert reply is not None and reply[0] == Code.ACCESS_ACCEPT
    assert verify_reply(reply, request, SECRET)
    assert h.events.requests == [] and h.core.requests == []


def test_status_server_needs_a_message_authenticator_even_from_legacy() -> None:
    h = Harness()
    request = build_request(Code.STATUS_SERVER, 9, b"legacy-secret", [],
                            message_authenticator=False)
    assert h.send(request, ("10.9.0.7", 1)) is None
    assert h.events.drops == {"missing_message_authenticator": 1}


def account(h: Harness, data: bytes, source=NAS) -> bytes | None:
    before = len(h.sent)
    h.server.handle_accounting(data, source, h.sent.append)
    return h.sent[-1] if len(h.sent) > before else None


def test_accounting_is_answered_and_counted(caplog) -> None:
    h = Harness()
    caplog.set_level(logging.INFO, "mfa_proxy.radius")
    request = accounting_request(SECRET, [(Attr.USER_NAME, b"alice"),
                                          (Attr.ACCT_STATUS_TYPE, (1).to_bytes(4, "big")),
                                          (Attr.ACCT_SESSION_ID, b"s-1"),
                                          (Attr.PROXY_STATE, b"ps")])
    reply = account(h, request)
    assert reply is not None and reply[0] == Code.ACCOUNTING_RESPONSE
    assert verify_reply(reply, request, SECRET)
    assert reply.endswith(encode_attribute(Attr.PROXY_STATE, b"ps"))
    assert h.events.accountings == ["vpn"]
    assert "Start" in caplog.text and "'alice'" in caplog.text


def test_accounting_with_a_wrong_secret_is_dropped() -> None:
    h = Harness()
    assert account(h, accounting_request(b"wrong", [(Attr.USER_NAME, b"alice")])) is None
    assert h.events.drops == {"bad_request_authenticator": 1}


def test_access_request_on_the_accounting_port_is_dropped() -> None:
    h = Harness()
    assert account(h, access_request(SECRET, "alice", "pw")) is None
    assert h.events.drops == {"unsupported_code": 1}


def test_status_server_on_the_accounting_port() -> None:
    h = Harness()
    request = build_request(Code.STATUS_SERVER, 9, SECRET, [])
    reply = account(h, request)
    assert reply is not None and reply[0] == Code.ACCOUNTING_RESPONSE
    assert verify_reply(reply, request, SECRET)


# --- the Twisted side -------------------------------------------------------------


class FakeTransport:
    def __init__(self, error: Exception | None = None) -> None:
        self.written: list[tuple[bytes, object]] = []
        self.error = error

    def write(self, data: bytes, addr: object) -> None:
        if self.error:
            raise self.error
        self.written.append((data, addr))


def test_protocol_writes_the_reply_to_the_source() -> None:
    h = Harness()
    h.core.then(decision(Outcome.ACCEPT))
    protocol = h.server.auth_protocol()
    protocol.transport = FakeTransport()  # type: ignore[assignment]
    source = ("10.0.0.5", 1812, 0, 0)
    protocol.datagramReceived(access_request(SECRET, "alice", "pw"), source)
    assert protocol.transport.written[0][1] == source  # type: ignore[union-attr]


def test_protocol_survives_a_send_error_and_a_closed_transport() -> None:
    h = Harness()
    h.core.then(decision(Outcome.ACCEPT)).then(decision(Outcome.ACCEPT))
    protocol: RadiusPort = h.server.auth_protocol()
    protocol.transport = FakeTransport(OSError("no buffer space"))  # type: ignore[assignment]
    protocol.datagramReceived(access_request(SECRET, "alice", "pw"), NAS)
    protocol.transport = None
    protocol.datagramReceived(access_request(SECRET, "alice", "pw"), NAS)
    assert len(h.core.requests) == 2


def test_a_bad_reply_rule_fails_at_start() -> None:
    with pytest.raises(ValueError, match="Session-Timeout"):
        RadiusServer(ClientTable([RadiusClientConfig(
            "c", ("10.0.0.1",), b"s", reply_rules=(ReplyRule("g", {"Session-Timeout": "x"}),))]),
            FakeCore(), DICTIONARY, clock=Clock())


def test_client_rules_follow_global_rules() -> None:
    core = FakeCore().then(decision(Outcome.ACCEPT, identity=ALICE))
    server = RadiusServer(
        ClientTable([RadiusClientConfig("c", ("10.0.0.0/24",), SECRET, reply_rules=(
            ReplyRule("admins", {"Filter-Id": "admin-acl"}),))]),
        core, DICTIONARY, clock=Clock(),
        settings=ServerSettings(reply_rules=(ReplyRule("admins", {"Class": "a"}),)))
    sent: list[bytes] = []
    server.handle_auth(access_request(SECRET, "alice", "pw"), NAS, sent.append)
    reply = parse_datagram(sent[0])
    assert isinstance(reply, Packet)
    assert [t for t, _ in reply.attributes] == [Attr.MESSAGE_AUTHENTICATOR, 25, 11]


def test_a_reject_before_the_core_logs_the_core_s_decision_line(
        caplog: pytest.LogCaptureFixture) -> None:
    """One decision-line format for every reject path (policy.engine.DECISION_LINE)."""
    h = Harness(mode="challenge")
    with caplog.at_level(logging.INFO, "mfa_proxy.radius"):
        _, reply = h.ask("123456", state=b"x" * 16)
    assert reply.code == Code.ACCESS_REJECT
    [line] = [r.getMessage() for r in caplog.records if r.name == "mfa_proxy.radius"]
    assert re.fullmatch(r"decision user=alice protocol=radius client=vpn source=10\.0\.0\.5 "
                        r"result=reject reason=bad_state latency_ms=0\.0 "
                        r"request_id=[0-9a-f]{6}-[0-9a-f]+", line), line


def test_the_core_is_asked_with_the_exchange_s_request_id() -> None:
    h = Harness()
    h.core.then(decision(Outcome.REJECT, Reason.BAD_PASSWORD))
    h.core.then(decision(Outcome.REJECT, Reason.BAD_PASSWORD))
    h.ask("wrong,123456")
    h.ask("wrong,654321")
    first, second = (r.request_id for r in h.core.requests)
    assert re.fullmatch(r"[0-9a-f]{6}-[0-9a-f]+", first) and first != second


def test_radius_ports_are_not_noisy() -> None:
    assert RadiusPort.noisy is False


def test_only_a_client_with_reply_rules_asks_the_core_for_groups() -> None:
    core = FakeCore().then(decision(Outcome.ACCEPT)).then(decision(Outcome.ACCEPT)).then(
        decision(Outcome.ACCEPT))
    clients = ClientTable([
        RadiusClientConfig("plain", ("10.0.0.0/24",), SECRET),
        RadiusClientConfig("ruled", ("10.1.0.0/24",), SECRET, reply_rules=(
            ReplyRule("admins", {"Filter-Id": "admin-acl"}),)),
    ])
    server = RadiusServer(clients, core, DICTIONARY, clock=Clock())
    sent: list[bytes] = []
    server.handle_auth(access_request(SECRET, "alice", "pw"), NAS, sent.append)
    server.handle_auth(access_request(SECRET, "alice", "pw"), ("10.1.0.5", 1), sent.append)
    assert [r.needs_groups for r in core.requests] == [False, True]
    # a global rule (after a reload, too) makes every client ask
    server.reconfigure(clients, (ReplyRule("staff", {"Class": "s"}),))
    server.handle_auth(access_request(SECRET, "alice", "pw2"), NAS, sent.append)
    assert core.requests[-1].needs_groups
